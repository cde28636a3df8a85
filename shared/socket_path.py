"""Unix socket path limits, groups and the umask sockets are created under (see safe_paths for the rest)."""

import contextlib
import grp
import os
from collections.abc import Iterator
from pathlib import Path

from keysealer.shared.errors import UsageError

# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


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


def worker_socket_path(broker_socket: Path, slot: int) -> Path:
    """Where the frontend reaches worker `slot` directly: next to the broker's socket, same owner and mode."""
    return broker_socket.with_name(f"{broker_socket.name}.w{slot}")
