"""The broker: the only KeySealer process that loads the PKCS #11 module and holds the PIN."""
