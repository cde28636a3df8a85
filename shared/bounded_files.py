"""The one way KeySealer reads a file it is given (configs, the PIN, CURVE keys, the token's store): never
blocking, regular files only, size-capped, read with a bound.

A FIFO or a device would hang the reader or feed it without end; procfs and sysfs files report a size
that is not their content (0 for /proc/self/environ). So the file must be a regular file, its reported
size must be within the cap, and what it holds must be exactly that size.
"""

import os
import stat
from pathlib import Path

from keysealer.shared.errors import FileRefused

_CHUNK = 64 * 1024


def read_bounded(path: Path, what: str, limit: int, follow_symlinks: bool = True,
                 private: bool = False) -> bytearray:
    """The file's bytes (a bytearray, so a caller holding a secret can overwrite it once used).

    `follow_symlinks` False refuses a symlink as the last component. `private`: also refuse a file others
    can read or write, or one owned by another user (root, as an operator, may read any).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise FileRefused(path, what, f"cannot open: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused(path, what, "not a regular file")
        if private:
            _check_private(path, what, info)
        if info.st_size > limit:
            raise FileRefused(path, what, f"larger than {limit} bytes")
        data = _read_at_most(fd, path, what, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FileRefused(path, what, f"larger than {limit} bytes")
    if len(data) != info.st_size:
        data[:] = bytes(len(data))
        raise FileRefused(path, what, f"holds {len(data)} bytes but reports {info.st_size}: not a file on "
                          "a disk (procfs or sysfs?), or it changed while being read")
    return data


def read_bounded_text(path: Path, what: str, limit: int) -> str:
    """A UTF-8 text file, as read_bounded reads it (symlinks followed)."""
    data = read_bounded(path, what, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileRefused(path, what, f"not UTF-8 text (byte {exc.start})") from None


def _check_private(path: Path, what: str, info: os.stat_result) -> None:
    if info.st_mode & 0o077:
        raise FileRefused(path, what, f"mode {stat.S_IMODE(info.st_mode):04o} lets others read it; "
                          "use 0400 or 0600")
    if os.geteuid() != 0 and info.st_uid != os.geteuid():
        raise FileRefused(path, what, f"not owned by this process's user (uid {os.geteuid()})")


def _read_at_most(fd: int, path: Path, what: str, count: int) -> bytearray:
    data = bytearray()
    while len(data) < count:
        try:
            chunk = os.read(fd, min(_CHUNK, count - len(data)))
        except OSError as exc:
            raise FileRefused(path, what, f"cannot read: {exc.strerror}") from None
        if not chunk:
            break
        data += chunk
    return data
