"""CURVE key files for the IPC link, in ZeroMQ's certificate format (interoperable with zcert tools).

`NAME.key` holds the public key (shareable); `NAME.key_secret` holds both halves and is 0600 from the
moment it exists.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import zmq

from keysealer.shared.bounded_files import read_bounded
from keysealer.shared.process import EXIT_USAGE, FatalError
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
    """Write NAME.key and NAME.key_secret; refuse to overwrite either."""
    if not directory.is_dir():
        raise FatalError(f"{directory}: no such directory", EXIT_USAGE)
    if not name or "/" in name or not name.isprintable():
        raise FatalError(f"key name {name!r}: must be a plain file name", EXIT_USAGE)
    public_path, secret_path = directory / f"{name}{PUBLIC_SUFFIX}", directory / f"{name}{SECRET_SUFFIX}"
    for path in (public_path, secret_path):
        if path.exists():
            raise FatalError(f"{path} exists already; not overwriting a key", EXIT_USAGE)
    public, secret = zmq.curve_keypair()
    header = "#   ZeroMQ CURVE certificate written by keysealer ipc-keygen\nmetadata\ncurve\n"
    with umask(0o177):
        _write_new(secret_path, f'{header}    public-key = "{public.decode()}"\n    secret-key = "{secret.decode()}"\n')
    with umask(0o133):
        _write_new(public_path, f'{header}    public-key = "{public.decode()}"\n')
    return public_path, secret_path


def _write_new(path: Path, text: str) -> None:
    with path.open("x", encoding="ascii") as handle:
        handle.write(text)


def _fields(data: bytes, path: Path) -> dict[bytes, bytes]:
    found = dict(_FIELD.findall(data))
    if b"public" not in found:
        raise FatalError(f"{path}: not a ZeroMQ CURVE certificate (no public-key)", EXIT_USAGE)
    return found


def load_keypair(path: Path) -> KeyPair:
    data = read_secret_file(path, "CURVE secret key")
    fields = _fields(bytes(data), path)
    data[:] = bytes(len(data))
    if b"secret" not in fields:
        raise FatalError(f"{path}: holds no secret-key (give the {SECRET_SUFFIX} file)", EXIT_USAGE)
    return KeyPair(fields[b"public"], fields[b"secret"])


def load_public_key(path: Path) -> bytes:
    data = read_bounded(path, "CURVE public key", MAX_SECRET_FILE_BYTES)
    return _fields(bytes(data), path)[b"public"]
