"""Python stubs generated from proto/v1beta1.proto by proto/generate.py (do not edit)."""
