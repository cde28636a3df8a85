"""Reading the token PIN: from a file only, never argv or the environment, refused if others can read it."""

import os
import stat
from pathlib import Path

from keysealer.shared.process import EXIT_USAGE, FatalError

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
    """The PIN as a bytearray, so the caller can overwrite it once the token has taken it."""
    path = pin_path(configured)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise FatalError(f"PIN file {path}: cannot open: {exc.strerror}", EXIT_USAGE) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FatalError(f"PIN file {path}: not a regular file", EXIT_USAGE)
        if info.st_mode & 0o077:
            raise FatalError(
                f"PIN file {path}: mode {stat.S_IMODE(info.st_mode):04o} lets others read it; "
                "use 0400 or 0600", EXIT_USAGE)
        if info.st_uid != os.geteuid():
            raise FatalError(f"PIN file {path}: not owned by the broker's user (uid {os.geteuid()})",
                             EXIT_USAGE)
        pin = bytearray(os.read(fd, 4096))
    finally:
        os.close(fd)
    while pin and pin[-1] in b"\r\n":
        pin.pop()
    if not pin:
        raise FatalError(f"PIN file {path}: empty", EXIT_USAGE)
    return pin
