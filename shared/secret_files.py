"""Reading secrets (the token PIN, CURVE secret keys) from files that only their owner can read."""

from pathlib import Path

from keysealer.shared.bounded_files import read_bounded
from keysealer.shared.errors import FileRefused, UnusableFile

MAX_SECRET_FILE_BYTES = 4096


def read_secret_file(path: Path, what: str) -> bytearray:
    """The file's bytes as a bytearray, so callers can overwrite them once used.

    Refused unless it is a regular file (no symlink), readable by its owner only, and owned by this
    process's user (root may read any, as an operator running the CLI).
    """
    try:
        return read_bounded(path, what, MAX_SECRET_FILE_BYTES, follow_symlinks=False, private=True)
    except FileRefused as exc:
        raise UnusableFile(str(exc)) from None
