"""KeySealer: a Kubernetes KMS v2 plugin backed by a PKCS #11 token."""
