"""The frontend: the unprivileged process serving the KMS v2 gRPC API. It never loads PKCS #11."""
