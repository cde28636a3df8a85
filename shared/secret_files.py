"""Reading secrets (the token PIN, CURVE secret keys) from files that only their owner can read."""

import os
import stat
from pathlib import Path

from keysealer.shared.process import EXIT_USAGE, FatalError

MAX_SECRET_FILE_BYTES = 4096


def read_secret_file(path: Path, what: str) -> bytearray:
    """The file's bytes as a bytearray, so callers can overwrite them once used.

    Refused unless it is a regular file (no symlink), readable by its owner only, and owned by this
    process's user (root may read any, as an operator running the CLI).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise FatalError(f"{what} {path}: cannot open: {exc.strerror}", EXIT_USAGE) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FatalError(f"{what} {path}: not a regular file", EXIT_USAGE)
        if info.st_mode & 0o077:
            raise FatalError(f"{what} {path}: mode {stat.S_IMODE(info.st_mode):04o} lets others read it; "
                             "use 0400 or 0600", EXIT_USAGE)
        if os.geteuid() != 0 and info.st_uid != os.geteuid():
            raise FatalError(f"{what} {path}: not owned by this process's user (uid {os.geteuid()})", EXIT_USAGE)
        data = bytearray(os.read(fd, MAX_SECRET_FILE_BYTES + 1))
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise FatalError(f"{what} {path}: larger than {MAX_SECRET_FILE_BYTES} bytes", EXIT_USAGE)
    return data
