"""CURVE key files for the IPC link, in ZeroMQ's certificate format (interoperable with zcert tools).

`NAME.key` holds the public key (shareable); `NAME.key_secret` holds both halves and is 0600 from the
moment it exists.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq

from keysealer.shared.bounded_files import read_bounded
from keysealer.shared.errors import UnusableFile, UsageError
from keysealer.shared.safe_paths import check_file_root_reads, create_file, open_directory
from keysealer.shared.secret_files import MAX_SECRET_FILE_BYTES, read_secret_file
from keysealer.shared.socket_path import umask

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_FIELD = re.compile(rb'^\s*(public|secret)-key\s*=\s*"([0-9A-Za-z.:+=^!/*?&<>()\[\]{}@%$#-]{40})"\s*$', re.M)


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 characters
    secret: bytes


def generate(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret; refuse to overwrite either.

    The directory must be one nobody but root or us can write (safe_paths): elsewhere another user could
    replace the secret key with one they know, and then pass for the broker or the frontend.
    """
    if not name or "/" in name or name in (".", "..") or not name.isprintable():
        raise UsageError(f"key name {name!r}: must be a plain file name")
    dir_fd = open_directory(Path(os.path.abspath(directory)))
    try:
        public_name, secret_name = f"{name}{PUBLIC_SUFFIX}", f"{name}{SECRET_SUFFIX}"
        for file_name in (public_name, secret_name):
            if _exists(dir_fd, file_name):
                raise UsageError(f"{directory / file_name} exists already; not overwriting a key")
        public, secret = zmq.curve_keypair()
        header = "#   ZeroMQ CURVE certificate written by keysealer ipc-keygen\nmetadata\ncurve\n"
        _write_new(dir_fd, secret_name, 0o600,
                   f'{header}    public-key = "{public.decode()}"\n    secret-key = "{secret.decode()}"\n')
        _write_new(dir_fd, public_name, 0o644, f'{header}    public-key = "{public.decode()}"\n')
    finally:
        os.close(dir_fd)
    return directory / public_name, directory / secret_name


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _write_new(dir_fd: int, name: str, mode: int, text: str) -> None:
    with umask(0o777 & ~mode), os.fdopen(create_file(dir_fd, name, mode), "w", encoding="ascii") as handle:
        handle.write(text)


def _fields(data: bytes, path: Path) -> dict[bytes, bytes]:
    found = dict(_FIELD.findall(data))
    if b"public" not in found:
        raise UnusableFile(f"{path}: not a ZeroMQ CURVE certificate (no public-key)")
    return found


def load_keypair(path: Path) -> KeyPair:
    data = read_secret_file(path, "CURVE secret key")
    fields = _fields(bytes(data), path)
    data[:] = bytes(len(data))
    if b"secret" not in fields:
        raise UnusableFile(f"{path}: holds no secret-key (give the {SECRET_SUFFIX} file)")
    return KeyPair(fields[b"public"], fields[b"secret"])


def load_public_key(path: Path) -> bytes:
    # Whoever could replace it could pass for the broker (or, in client_keys, for a frontend).
    check_file_root_reads(path, "CURVE public key")
    data = read_bounded(path, "CURVE public key", MAX_SECRET_FILE_BYTES)
    return _fields(bytes(data), path)[b"public"]
