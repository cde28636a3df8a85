"""Code both processes use: the IPC schema, the ciphertext format, config loading, the CLI."""
