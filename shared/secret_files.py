"""Reading secrets (the token PIN, CURVE secret keys) from files that only their owner can read."""

from pathlib import Path

from keysealer.shared.bounded_files import read_bounded
from keysealer.shared.errors import FileRefused, UnusableFile
from keysealer.shared.safe_paths import check_file_root_reads

MAX_SECRET_FILE_BYTES = 4096


def read_secret_file(path: Path, what: str) -> bytearray:
    """The file's bytes as a bytearray, so callers can overwrite them once used.

    Refused unless it is a regular file (no symlink), readable by its owner only, and owned by this
    process's user (root may read any, as an operator running the CLI). Root also refuses one whose
    directories someone else could change (safe_paths); the file itself may be its service user's.
    """
    check_file_root_reads(path, what, any_owner=True)
    try:
        return read_bounded(path, what, MAX_SECRET_FILE_BYTES, follow_symlinks=False, private=True)
    except FileRefused as exc:
        raise UnusableFile(str(exc)) from None
