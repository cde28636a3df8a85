"""Code both processes use: the IPC schema, the ciphertext format, config loading, errors. It imports neither side."""
