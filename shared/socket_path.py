"""Taking a Unix socket path over safely: a stale socket left by a crash is removed, a live one never is."""

import contextlib
import grp
import logging
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

from keysealer.shared.process import UsageError

log = logging.getLogger(__name__)

# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


def claim_socket_path(path: Path) -> None:
    """Make `path` free to bind, or raise UsageError when something else owns it."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise UsageError(f"{path}: socket path longer than {MAX_SOCKET_PATH_BYTES} bytes")
    if not path.parent.is_dir():
        raise UsageError(f"{path}: directory {path.parent} does not exist")
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # nobody listens: left behind by a crashed process
        return
    except OSError as exc:
        raise UsageError(f"{path}: cannot check whether the socket is in use: {exc.strerror}") from None
    finally:
        probe.close()
    raise UsageError(f"{path} is served by another live process; refusing to take it over")


def remove_socket(path: Path) -> None:
    """Remove our socket at exit; a process that dropped privileges may lack the right, and a stale socket
    is taken over at the next start anyway."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove %s: %s; the next start takes it over", path, exc.strerror)


def group_id(group: str, field: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise UsageError(f"{field}: no group named {group!r}") from None


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Create files with tight modes from the start, not chmod'ed afterwards."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)
