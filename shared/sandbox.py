"""Process lockdown for KeySealer's key-holding processes.

A broker worker holds a logged-in PKCS #11 session and the frontend holds the
KMS socket: if either is compromised, the attacker should not be able to run
programs, talk to the network, debug other processes or poke the kernel's
rarely used corners.  ``lock_down`` takes away what a Python process serving
KMS requests never needs, *after* the process has done its setup (loaded the
PKCS #11 module, opened sockets), so nothing at startup has to be special-cased.

Only stdlib and pyseccomp are imported here on purpose: ``doctor`` and every
process import this module early, and it must not pull in grpc, PyKCS11 or zmq.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import os
import pwd
import resource
import socket
import termios
from collections.abc import Sequence
from typing import Any, Final

from keysealer.shared.errors import SandboxError


# pyseccomp locates libseccomp with ctypes.util.find_library, which runs
# /sbin/ldconfig in a subprocess: importing it after exec is blocked would fail,
# so import it with this module (before any lockdown) and keep the error.
def _import_seccomp() -> tuple[Any, BaseException | None]:
    try:
        import pyseccomp  # type: ignore[import-untyped,unused-ignore]
    except (ImportError, RuntimeError, OSError) as exc:  # RuntimeError: no libseccomp
        return None, exc
    return pyseccomp, None


_seccomp, _seccomp_import_error = _import_seccomp()

__all__ = [
    "DENIED_SYSCALLS",
    "drop_privileges",
    "lock_down",
    "sandbox_status",
]


DENIED_SYSCALLS: Final[tuple[str, ...]] = (
    # Running other programs: the main thing an attacker wants.
    "execve",
    "execveat",
    # Reading or steering other processes' memory and file descriptors.
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "process_madvise",
    "pidfd_getfd",
    "kcmp",
    "migrate_pages",
    "move_pages",
    # Filesystem namespace and mounts (old and new mount API).
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    # Namespaces: a fresh user namespace is the usual start of a kernel exploit.
    "setns",
    "unshare",
    # Kernel attack surface with no use here.
    "bpf",
    "perf_event_open",
    "userfaultfd",
    # io_uring runs socket/open operations without passing through this
    # filter, so it would bypass the socket() family restriction.
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "keyctl",
    "add_key",
    "request_key",
    "personality",
    "modify_ldt",
    "iopl",
    "ioperm",
    "syslog",
    "lookup_dcookie",
    "fanotify_init",
    # Open files by handle, bypassing path permission checks.
    "open_by_handle_at",
    "name_to_handle_at",
    # Kernel modules, kexec, and machine-wide state.
    "init_module",
    "finit_module",
    "delete_module",
    "create_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "sethostname",
    "setdomainname",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "stime",
    "vhangup",
    # Obsolete interfaces.
    "uselib",
    "_sysctl",
    "ustat",
    "sysfs",
    "nfsservctl",
)

_PR_GET_DUMPABLE: Final = 3
_PR_SET_DUMPABLE: Final = 4
_PR_GET_SECCOMP: Final = 21
_PR_SET_NO_NEW_PRIVS: Final = 38
_PR_GET_NO_NEW_PRIVS: Final = 39
_SECCOMP_MODE_FILTER: Final = 2

# Namespace flags of clone(); CLONE_NEWTIME overlaps the exit signal bits there.
_CLONE_NAMESPACE_FLAGS: Final[tuple[int, ...]] = (
    0x00020000,  # CLONE_NEWNS
    0x02000000,  # CLONE_NEWCGROUP
    0x04000000,  # CLONE_NEWUTS
    0x08000000,  # CLONE_NEWIPC
    0x10000000,  # CLONE_NEWUSER
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
)

_U32: Final = 0xFFFFFFFF

# dlopen(NULL) gives the interpreter's libc without find_library's subprocess.
_libc = ctypes.CDLL(None, use_errno=True)
_prctl_fn = _libc.prctl
_prctl_fn.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
_prctl_fn.restype = ctypes.c_int


def _prctl(option: int, arg2: int = 0, what: str = "") -> int:
    ret: int = _prctl_fn(option, arg2, 0, 0, 0)
    if ret < 0:
        err = ctypes.get_errno()
        raise SandboxError(f"prctl({what or option}) failed: {os.strerror(err)} (errno {err})")
    return ret


def _syscall_nr(name: str) -> int | None:
    """Native syscall number, or None where this architecture lacks the call."""
    nr: int = _seccomp.resolve_syscall(_seccomp.Arch.NATIVE, name)
    # libseccomp answers -1 for unknown names and negative pseudo numbers for
    # calls that only exist on other architectures.
    return nr if nr >= 0 else None


def _deny_families(flt: Any, syscall: str, allowed: frozenset[int]) -> None:
    """Make ``syscall(domain, ...)`` fail unless domain is one of ``allowed``.

    libseccomp cannot AND two comparisons on one argument, so the refused
    values are listed: every value below the largest allowed one that is not
    allowed, and everything above it.  Comparisons are on the full 64 bits, so
    only the exact allowed values get through.
    """
    nr = _syscall_nr(syscall)
    if nr is None:
        return
    refuse = _seccomp.ERRNO(errno.EAFNOSUPPORT)
    top = max(allowed)
    for family in range(top):
        if family not in allowed:
            flt.add_rule(refuse, nr, _seccomp.Arg(0, _seccomp.EQ, family))
    flt.add_rule(refuse, nr, _seccomp.Arg(0, _seccomp.GT, top))


def _build_filter(allow_inet: bool) -> Any:
    sc = _seccomp
    flt = sc.SyscallFilter(sc.ALLOW)
    # A foreign ABI (i386 int 0x80, x32) would dodge every rule below.
    try:
        flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    except OSError:  # kernel older than 4.14: kill the thread instead
        flt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_THREAD)
    # ZeroMQ's I/O threads (and any other) already run: filter them too.
    flt.set_attr(sc.Attr.CTL_TSYNC, 1)

    deny = sc.ERRNO(errno.EPERM)
    for name in DENIED_SYSCALLS:
        nr = _syscall_nr(name)
        if nr is not None:
            flt.add_rule(deny, nr)

    families = {socket.AF_UNIX}
    if allow_inet:
        families |= {socket.AF_INET, socket.AF_INET6}
    _deny_families(flt, "socket", frozenset(families))
    # socketpair only exists for AF_UNIX in practice.
    _deny_families(flt, "socketpair", frozenset({socket.AF_UNIX}))

    # Keep the process undumpable: with dumpable 1 another process of the same
    # uid could ptrace it or read /proc/PID/mem.  Setting 0 again stays allowed
    # so lock_down can run twice.  option is an int: mask to the low 32 bits.
    flt.add_rule(
        deny,
        "prctl",
        sc.Arg(0, sc.MASKED_EQ, _U32, _PR_SET_DUMPABLE),
        sc.Arg(1, sc.NE, 0),
    )

    # TIOCSTI pushes bytes into a terminal's input: commands for the shell
    # that started us.  cmd is an unsigned int: compare the low 32 bits.
    flt.add_rule(deny, "ioctl", sc.Arg(1, sc.MASKED_EQ, _U32, termios.TIOCSTI))

    # fork() and threads stay; clone() that creates namespaces does not.  The
    # flags are clone's first argument except on s390.  clone3 passes them in
    # memory the filter cannot read: it answers ENOSYS, so glibc falls back to
    # clone(), whose flags the rules above do see.
    if sc.system_arch() not in (sc.Arch.S390, sc.Arch.S390X):
        clone_nr = _syscall_nr("clone")
        if clone_nr is not None:
            for flag in _CLONE_NAMESPACE_FLAGS:
                flt.add_rule(deny, clone_nr, sc.Arg(0, sc.MASKED_EQ, flag, flag))
        clone3_nr = _syscall_nr("clone3")
        if clone3_nr is not None:
            flt.add_rule(sc.ERRNO(errno.ENOSYS), clone3_nr)
    return flt


def lock_down(allow_inet: bool = False) -> None:
    """Confine this process (all its threads) and every child it forks.

    After this, exec and the calls in DENIED_SYSCALLS fail with EPERM, and
    sockets other than AF_UNIX fail with EAFNOSUPPORT (AF_INET and AF_INET6
    are also allowed when ``allow_inet``, for HSMs reached over TCP or a
    loopback metrics endpoint).  The process is made undumpable with no core
    files.  Safe to call again: each call stacks one more filter.

    Raises SandboxError naming the step the kernel or libseccomp refused.
    """
    # Also set by libseccomp on load; done first so it holds even if the
    # filter fails to load below.
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
    # Undumpable: no core file with key material, no ptrace or /proc/PID/mem
    # access from other processes of the same uid.
    _prctl(_PR_SET_DUMPABLE, 0, "PR_SET_DUMPABLE")
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        raise SandboxError(f"setrlimit(RLIMIT_CORE, (0, 0)) failed: {exc}") from exc

    if _seccomp is None:
        raise SandboxError(
            f"seccomp unavailable: cannot import pyseccomp/libseccomp: {_seccomp_import_error}"
        ) from _seccomp_import_error
    try:
        flt = _build_filter(allow_inet)
    except (OSError, ValueError) as exc:
        raise SandboxError(f"building the seccomp filter failed: {exc}") from exc
    try:
        flt.load()
    except OSError as exc:
        hint = ""
        if exc.errno == errno.ESRCH:
            hint = " (a thread runs under a different seccomp filter, so TSYNC is refused)"
        raise SandboxError(f"loading the seccomp filter failed: {exc}{hint}") from exc

    # Trust the kernel's word rather than the return codes.
    if _prctl(_PR_GET_NO_NEW_PRIVS, 0, "PR_GET_NO_NEW_PRIVS") != 1:
        raise SandboxError("no_new_privs is not set after lockdown")
    if _prctl(_PR_GET_SECCOMP, 0, "PR_GET_SECCOMP") != _SECCOMP_MODE_FILTER:
        raise SandboxError("seccomp filter mode is not active after lockdown")
    if _prctl(_PR_GET_DUMPABLE, 0, "PR_GET_DUMPABLE") != 0:
        raise SandboxError("process is still dumpable after lockdown")


def _is_root() -> bool:
    # A saved or real uid of 0 is enough to become root again.
    return 0 in os.getresuid()


def _lookup_user(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise SandboxError(f"unknown user {user!r}") from None


def _group_ids(primary: int, extra_groups: Sequence[str]) -> list[int]:
    gids = [primary]
    for name in extra_groups:
        try:
            gid = grp.getgrnam(name).gr_gid
        except KeyError:
            raise SandboxError(f"unknown group {name!r}") from None
        if gid not in gids:
            gids.append(gid)
    return gids


def _verify_dropped(user: str, uid: int, gid: int, gids: list[int]) -> None:
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise SandboxError(f"uids/gids did not change to {user!r}")
    if sorted(os.getgroups()) != sorted(gids):
        raise SandboxError(f"supplementary groups are {os.getgroups()}, expected {gids}")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise SandboxError(f"regained root after dropping to {user!r}")
    cap_eff = sandbox_status().get("CapEff")
    if cap_eff is not None and int(cap_eff, 16) != 0:
        raise SandboxError(f"capabilities left after dropping to {user!r}: CapEff {cap_eff}")


def require_user_if_root(user: str | None) -> None:
    """Refuse early, before anything is opened, to run as root without being told whom to become."""
    if user is None and _is_root():
        raise SandboxError("running as root: set 'user' in the config to the account to drop to")


def drop_privileges(user: str | None, extra_groups: Sequence[str] = ()) -> None:
    """Switch a root process to ``user`` for good.

    Groups become the user's primary group plus ``extra_groups`` (root's and
    /etc/group's supplementary groups are deliberately not inherited).  As
    non-root, ``user`` must be None or the current user: there is nothing to
    drop, and anything else means the config does not match how we run.
    """
    if not _is_root():
        if user is None or set(os.getresuid()) == {_lookup_user(user).pw_uid}:
            return
        raise SandboxError(f"running as uid {os.geteuid()}, not as root: cannot switch to user {user!r}")

    require_user_if_root(user)
    assert user is not None
    pw = _lookup_user(user)
    if pw.pw_uid == 0:
        raise SandboxError(f"user {user!r} has uid 0: choose an unprivileged account")
    gids = _group_ids(pw.pw_gid, extra_groups)

    # Groups and gid first: after setresuid they can no longer be changed.
    try:
        os.setgroups(gids)
        os.setresgid(pw.pw_gid, pw.pw_gid, pw.pw_gid)
        os.setresuid(pw.pw_uid, pw.pw_uid, pw.pw_uid)
    except OSError as exc:
        raise SandboxError(f"dropping privileges to {user!r} failed: {exc}") from exc
    _verify_dropped(user, pw.pw_uid, pw.pw_gid, gids)


_STATUS_FIELDS: Final[tuple[str, ...]] = ("Seccomp", "Seccomp_filters", "NoNewPrivs", "CapEff")
# /proc/PID/status is about 1.5 kB; a procfs file reports no size, so the read itself is bounded.
_MAX_STATUS_BYTES: Final = 64 * 1024


def sandbox_status(pid: int | str = "self") -> dict[str, str]:
    """Lockdown fields of /proc/PID/status: Seccomp ("2" = filtered),
    NoNewPrivs ("1"), Seccomp_filters and CapEff where the kernel shows them."""
    if isinstance(pid, bool) or not (
        (isinstance(pid, int) and pid > 0)
        or (isinstance(pid, str) and (pid in ("self", "thread-self") or pid.isdecimal()))
    ):
        raise SandboxError(f"invalid pid {pid!r}")
    path = f"/proc/{pid}/status"
    try:
        # Binary + utf-8: after drop_privileges a codec lookup may need an
        # import from a directory the new user cannot read.
        with open(path, "rb") as fh:
            lines = fh.read(_MAX_STATUS_BYTES).decode("utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise SandboxError(f"cannot read {path}: {exc}") from exc
    found: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key in _STATUS_FIELDS:
            found[key] = value.strip()
    return found


# The explicit way to keep root: for `keysealer dev` started by root, never the default.
STAY_ROOT = "root"


def become_configured_user(user: str | None, extra_groups: Sequence[str] = ()) -> bool:
    """Drop to the configured user once every privileged resource is open; True if still root.

    A process started as root refuses to go on without `user`; `user: root` keeps root on purpose.
    """
    if user == STAY_ROOT and _is_root():
        return True
    drop_privileges(user, extra_groups)
    return False
