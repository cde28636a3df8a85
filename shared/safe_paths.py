"""Paths a process started as root may touch, and how: never through anything another user can change.

Every directory is reached component by component from `/` with O_NOFOLLOW|O_DIRECTORY; each existing
component is checked before we go on: owned by root or by us (a symlink is followed only if root or we own
it), and not writable by others unless it has the sticky bit (as /tmp does). A directory we manage (a
socket directory) may also belong to the service user; it is created with mkdir(dir_fd=...) and given
its owner and mode with fchown/fchmod on its descriptor. Stale sockets are removed relative to the
verified directory's descriptor, and sockets get their owner, group and mode when bind() creates them
(below), never by path afterwards. Anything unexpected is refused with one line (exit 2).
"""

import contextlib
import errno
import logging
import os
import pwd
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from keysealer.shared.errors import UnsafePathError, UsageError
from keysealer.shared.sandbox import STAY_ROOT
from keysealer.shared.socket_path import MAX_SOCKET_PATH_BYTES, group_id, umask

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINKS = 40  # as the kernel's own path walk
# Directories we create on the way to a socket directory: others must be able to traverse them.
_PARENT_MODE = 0o755


def socket_path_problem(path: Path) -> str | None:
    """Why `path` cannot be a socket path. Checked at config load, before anything is created: sun_path
    holds 107 bytes, and a relative path would depend on the working directory of whoever starts us."""
    if not path.is_absolute():
        return "must be an absolute path"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        return f"socket path {path} is longer than {MAX_SOCKET_PATH_BYTES} bytes"
    return None


@dataclass(frozen=True)
class Owner:
    """Who what we create belongs to: the user we run as in the end, and a group."""

    uid: int
    gid: int


def owner_of_created(account: pwd.struct_passwd | None, group: str | None, field: str) -> Owner:
    """The service account (or us, when there is none) with `group` (named by config `field`), else the
    account's own group."""
    uid = account.pw_uid if account else os.geteuid()
    gid = group_id(group, field) if group is not None else account.pw_gid if account else os.getegid()
    return Owner(uid, gid)


def service_account(user: str | None) -> pwd.struct_passwd | None:
    """The account a root-started process becomes, or None when it stays who it is."""
    if os.geteuid() != 0 or user in (None, STAY_ROOT):
        return None
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"user: no user named {user!r}") from None


def _refuse(path: Path | str, why: str) -> UnsafePathError:
    return UnsafePathError(f"{path}: {why}; refusing to use it")


def check_trusted(info: os.stat_result, path: Path | str, owners: frozenset[int] = frozenset(),
                  check_mode: bool = True) -> None:
    """A file or directory only root, we (and `owners`) can change; others may add entries only to a
    sticky directory (unless not `check_mode`)."""
    trusted = {0, os.geteuid(), *owners}
    if info.st_uid not in trusted:
        us = "" if os.geteuid() == 0 else f" or uid {os.geteuid()}"
        raise _refuse(path, f"owned by uid {info.st_uid}, not by root{us}")
    others_write = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if check_mode and others_write and not (stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX):
        raise _refuse(path, f"mode {stat.S_IMODE(info.st_mode):04o} lets others write it")


def open_directory(path: Path, owners: frozenset[int] = frozenset(), create_parents: bool = False,
                   for_sockets: bool = False) -> int:
    """A descriptor of directory `path`, reached without following a symlink anyone else controls.

    Every component must pass check_trusted; `path` itself may also belong to a uid in `owners`. With
    create_parents, missing directories are created (0755, ours) on the way. `for_sockets`, run by another
    user than root: components others can write pass (a pod's emptyDir is 0777): a socket bound somewhere
    else gives that user no more than its own rights. Content we read back later (dev, ipc-keygen) does
    not get this leeway.
    """
    if not path.is_absolute():
        raise _refuse(path, "not an absolute path")
    fd = os.open("/", _DIR_FLAGS)
    pending = list(path.parts[1:])
    walked = Path("/")
    links = 0
    created = ""
    check_mode = os.geteuid() == 0 or not for_sockets
    try:
        check_trusted(os.fstat(fd), walked, check_mode=check_mode)
        while pending:
            name = pending.pop(0)
            last = not pending
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create_parents:
                    raise UnsafePathError(f"{walked / name}: no such directory") from None
                with contextlib.suppress(FileExistsError):  # raced with someone: the reopen checks it
                    os.mkdir(name, _PARENT_MODE, dir_fd=fd)
                    created = name
                pending.insert(0, name)
                continue
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePathError(f"{walked / name}: cannot open: {exc.strerror}") from None
                target = _trusted_link(fd, name, walked)
                links += 1
                if links > _MAX_SYMLINKS:
                    raise _refuse(path, "too many symbolic links") from None
                if target.is_absolute():
                    os.close(fd)
                    fd, walked = os.open("/", _DIR_FLAGS), Path("/")
                pending[:0] = [part for part in target.parts if part != "/"]
                continue
            os.close(fd)
            fd, walked = child, walked / name
            if created == name:
                os.fchmod(fd, _PARENT_MODE)  # whatever the umask: `user` must be able to pass through
                created = ""
            check_trusted(os.fstat(fd), walked, owners if last else frozenset(), check_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _trusted_link(dir_fd: int, name: str, walked: Path) -> Path:
    info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISLNK(info.st_mode):
        raise _refuse(walked / name, "not a directory")
    if info.st_uid not in (0, os.geteuid()):
        raise _refuse(walked / name, f"a symbolic link owned by uid {info.st_uid}")
    return Path(os.readlink(name, dir_fd=dir_fd))


def prepare_directory(path: Path, mode: int, owner: Owner, parent_fd: int | None = None) -> int:
    """Create directory `path` if missing (in `parent_fd` when given, else after a checked walk to its
    parent), and give it `owner` and `mode` on its descriptor. An existing one must belong to root, us or
    the owner-to-be: never adopt a directory someone else made (in /tmp, say)."""
    own_parent = parent_fd is None
    parent = parent_fd if parent_fd is not None else open_directory(path.parent, create_parents=True,
                                                                    for_sockets=True)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path.name, 0o700, dir_fd=parent)
        try:
            fd = os.open(path.name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise _refuse(path, "not a directory" if exc.errno in (errno.ELOOP, errno.ENOTDIR)
                          else f"cannot open: {exc.strerror}") from None
    finally:
        if own_parent:
            os.close(parent)
    try:
        info = os.fstat(fd)
        if info.st_uid not in (0, os.geteuid(), owner.uid):
            raise _refuse(path, f"owned by uid {info.st_uid}, which did not create it for us")
        # Only what differs: a non-root broker (a pod's) already owns what it made, and its seccomp profile
        # allows no chown at all.
        if (info.st_uid, info.st_gid) != (owner.uid, owner.gid):
            os.fchown(fd, owner.uid, owner.gid)
        if stat.S_IMODE(info.st_mode) != mode:
            os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


class SocketDirectory:
    """A verified directory our sockets live in, held open: every later operation is relative to it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def existing(cls, path: Path, owners: frozenset[int] = frozenset()) -> "SocketDirectory":
        return cls(path, open_directory(path, owners, for_sockets=True))

    def claim(self, name: str) -> None:
        """Make `name` free to bind: a stale socket (nobody listens) is removed, a live one never is."""
        where = self.path / name
        try:
            mode = os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise UsageError(f"{where} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(where))
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.fd)  # nobody listens: left behind by a crashed process
            return
        except OSError as exc:
            raise UsageError(f"{where}: cannot check whether the socket is in use: {exc.strerror}") from None
        finally:
            probe.close()
        raise UsageError(f"{where} is served by another live process; refusing to take it over")

    @contextlib.contextmanager
    def creating(self, name: str, mode: int, owner: Owner) -> Iterator[str]:
        """The path to bind `name` at; the socket bind() creates there gets `mode` and `owner`, and is never
        open to more than that on the way.

        Started by root for a service user, we bind with that user's uid and the wanted group as our
        effective ids: the kernel gives the new socket those, and a directory that user controls can only
        redirect the bind to where that user could bind anyway. Otherwise the directory is ours (checked
        when opened) and nobody else can swap the socket, so its group and mode are set by name in it.
        """
        root, saved_gid = os.geteuid() == 0, os.getegid()
        regroup = not root and owner.gid != saved_gid
        # Without root the group is set after bind (below): until then the socket is for us alone.
        with umask(0o177 if regroup else 0o777 & ~mode):
            if root:
                os.setegid(owner.gid)
                os.seteuid(owner.uid)
            try:
                if not os.access(".", os.W_OK | os.X_OK, dir_fd=self.fd, effective_ids=True):
                    raise UsageError(f"{self.path / name}: uid {os.geteuid()} cannot create it: no write "
                                     f"access to {self.path}")
                yield str(self.path / name)
            finally:
                if root:
                    os.seteuid(0)
                    os.setegid(saved_gid)
        if regroup:
            os.chown(name, -1, owner.gid, dir_fd=self.fd, follow_symlinks=False)
            os.chmod(name, mode, dir_fd=self.fd)

    def remove(self, name: str) -> None:
        """Remove our socket at exit; a process that dropped privileges may lack the right, and a stale
        socket is taken over at the next start anyway."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s; the next start takes it over", self.path / name, exc.strerror)


def check_tree(dir_fd: int, path: Path) -> None:
    """Everything under the open directory `dir_fd`: no symlink, nothing owned or writable by others.

    For a directory whose content root acts on (`keysealer dev`'s state: its broker.yaml names the module
    the broker loads): reused only if nobody else could have written any of it.
    """
    for entry in os.scandir(dir_fd):
        info = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            raise _refuse(path / entry.name, "a symbolic link")
        check_trusted(info, path / entry.name)
        if stat.S_ISDIR(info.st_mode):
            child = os.open(entry.name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                check_tree(child, path / entry.name)
            finally:
                os.close(child)


def open_own_directory(path: Path) -> int:
    """Directory `path`, created 0700 if missing, reached by a checked walk: root's (or ours) and nobody
    else's."""
    parent = open_directory(path.parent, create_parents=True)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path.name, 0o700, dir_fd=parent)
    finally:
        os.close(parent)
    return open_directory(path)


def create_file(dir_fd: int, name: str, mode: int) -> int:
    """A new file `name` in a checked directory: never an existing one, never through a symlink."""
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)


def check_file_root_reads(path: Path, what: str, any_owner: bool = False) -> None:
    """Refuse a file root is about to read and act on (a config, a key, a PIN, a PKCS #11 module) when
    anyone but root or us could change what it holds: through the file itself, or through any directory
    or symlink on its path. Without root there is nothing to take over: no check.

    `any_owner`: the file itself may belong to someone else (a service user's own secret key, whose mode
    the secret reader checks); its directories still may not.
    """
    if os.geteuid() != 0:
        return
    current = Path(os.path.abspath(path))
    for _ in range(_MAX_SYMLINKS):
        if not os.path.lexists(current):
            return  # the reader reports a missing file in its own words
        try:
            dir_fd = open_directory(current.parent)
        except UnsafePathError as exc:
            raise UnsafePathError(f"{what} {path}: {exc}") from None
        try:
            info = os.stat(current.name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(info.st_mode):
                if info.st_uid not in (0, os.geteuid()):
                    raise _refuse(f"{what} {path}", f"{current} is a symbolic link owned by uid {info.st_uid}")
                current = Path(os.path.abspath(current.parent / os.readlink(current.name, dir_fd=dir_fd)))
                continue
        except FileNotFoundError:
            return
        finally:
            os.close(dir_fd)
        if not any_owner or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            check_trusted(info, f"{what} {path}")
        return
    raise _refuse(f"{what} {path}", "too many symbolic links")
