"""Reading the token PIN: from a file only, never argv or the environment, refused if others can read it."""

import os
from pathlib import Path

from keysealer.shared.errors import UnusableFile
from keysealer.shared.secret_files import read_secret_file

# A systemd credential (LoadCredential=pin:...) wins over the configured file when present.
CREDENTIAL_NAME = "pin"


def pin_path(configured: Path) -> Path:
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials:
        candidate = Path(credentials) / CREDENTIAL_NAME
        if candidate.exists():
            return candidate
    return configured


def read_pin(configured: Path) -> bytearray:
    """The user PIN (a systemd credential if present, else the configured file), as a bytearray so the
    caller can overwrite it once the token has taken it."""
    return read_pin_file(pin_path(configured))


def read_pin_file(path: Path) -> bytearray:
    # Read by root under `user: root` or by `keys`: read_secret_file refuses a PIN someone else could have
    # put there (it would cost a failed login).
    pin = read_secret_file(path, "PIN file")
    while pin and pin[-1] in b"\r\n":
        pin.pop()
    if not pin:
        raise UnusableFile(f"PIN file {path}: empty")
    return pin
