"""`keysealer doctor` checks on files: who can read the PIN and the CURVE secret keys, who can change the
configs, and whether the socket directories are as the broker and frontend need them."""

import grp
import os
import pwd
import stat
from pathlib import Path

from keysealer.shared.errors import FileRefused, UnusableFile, UsageError
from keysealer.shared.ipc_keys import load_public_key
from keysealer.shared.socket_path import group_id
from keysealer.tools.doctor_findings import Outcome, failed, passed, warned

# The broker creates its socket directory with this mode (supervisor.py) and keeps it there.
SOCKET_DIR_MODE = 0o750


def account_uid(user: str) -> int:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise UsageError(f"user: no user named {user!r}") from None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)  # containers often lack a passwd entry for another container's user


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _describe(path: Path, info: os.stat_result) -> str:
    return f"{path}: mode {stat.S_IMODE(info.st_mode):04o}, owner {_user_name(info.st_uid)}"


def secret_file(path: Path, what: str, owner_uid: int | None) -> Outcome:
    """A file only its reader may read, as shared/secret_files.py demands (owner_uid None: reader unknown,
    owner not checked)."""
    try:
        info = path.lstat()
    except OSError as exc:
        return failed(f"{path}: {exc.strerror}", f"write the {what} there, mode 0600")
    if stat.S_ISLNK(info.st_mode):
        return failed(f"{path} is a symlink, which is refused", f"put the {what} file itself at {path}")
    if not stat.S_ISREG(info.st_mode):
        return failed(f"{path} is not a regular file", f"put the {what} file at {path}")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        can = "read" if mode & 0o044 else "change"
        return failed(f"{path} is mode {mode:04o}: other users can {can} the {what}", f"chmod 600 {path}")
    if owner_uid is not None and info.st_uid != owner_uid:
        reader = _user_name(owner_uid)
        return failed(f"{path} belongs to {_user_name(info.st_uid)}, but {reader} reads it",
                      f"chown {reader} {path}")
    return passed(_describe(path, info))


def public_keys(paths: list[Path], what: str) -> Outcome:
    """CURVE public key files, read as the broker and frontend read them (shared/ipc_keys.py)."""
    for path in paths:
        try:
            load_public_key(path)
        except (FileRefused, UnusableFile) as exc:
            return failed(str(exc), f"put {what} there: the NAME.key file `keysealer ipc-keygen` wrote")
    return passed(", ".join(str(p) for p in paths))


def config_file(path: Path) -> Outcome:
    """A config names the module the broker loads: whoever can change it runs code as the broker."""
    info = path.stat()  # it was just loaded: it exists
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        return failed(f"{path} is mode {mode:04o}: other users can change it", f"chmod go-w {path}")
    return passed(_describe(path, info))


def broker_socket_dir(socket: Path, group: str | None) -> Outcome:
    directory = socket.parent
    try:
        gid = group_id(group, "ipc.group") if group is not None else None
    except UsageError as exc:
        return failed(str(exc), "create the group, or fix ipc.group")
    wanted = f"mode {SOCKET_DIR_MODE:04o}" + (f", group {group}" if group else "")
    try:
        info = directory.stat()
    except FileNotFoundError:
        if directory.parent.is_dir():
            return passed(f"{directory} does not exist yet; the broker creates it ({wanted})")
        return warned(f"neither {directory} nor {directory.parent} exists; the broker creates both",
                      "check ipc.socket for a typo")
    if not stat.S_ISDIR(info.st_mode):
        return failed(f"{directory} is not a directory", "move it away, or choose another ipc.socket")
    mode = stat.S_IMODE(info.st_mode)
    if mode & ~SOCKET_DIR_MODE:
        return failed(f"{directory} is mode {mode:04o}: looser than {SOCKET_DIR_MODE:04o}",
                      f"chmod {SOCKET_DIR_MODE:o} {directory}")
    if gid is not None and info.st_gid != gid:
        return failed(f"{directory} has group {_group_name(info.st_gid)}, not ipc.group {group}",
                      f"chgrp {group} {directory}")
    return passed(f"{directory}: mode {mode:04o}, group {_group_name(info.st_gid)}")


def listen_dir(socket: Path) -> Outcome:
    """The frontend does not create the directory of its KMS socket (systemd's RuntimeDirectory= does)."""
    if socket.parent.is_dir():
        return passed(f"{socket.parent} exists")
    return failed(f"{socket.parent} (listen.socket's directory) does not exist", f"mkdir -p {socket.parent}")


def same_socket(broker_socket: Path, frontend_socket: Path) -> Outcome:
    if os.path.normpath(broker_socket) == os.path.normpath(frontend_socket):
        return passed(f"the frontend connects to {broker_socket}, where the broker listens")
    return failed(f"the frontend connects to {frontend_socket}, the broker listens on {broker_socket}",
                  "make the frontend's broker.socket equal the broker's ipc.socket")
