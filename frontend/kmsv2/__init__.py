"""Python stubs generated from proto/api.proto by proto/generate.py (do not edit)."""
