"""Proof tests for keysealer.shared.sandbox.

Every test runs the real lock_down / drop_privileges in a fresh child
interpreter (a seccomp filter cannot be removed, so never in the pytest
process).  The child prints one JSON line; the parent asserts on it.  Attempts
to exec are made last in each child: if the protection were missing the child
would turn into /bin/true and print no result, which fails the test too.
"""

from __future__ import annotations

import grp
import importlib.util
import json
import os
import pwd
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SOFTHSM_LIB = "/usr/lib/softhsm/libsofthsm2.so"
RESULT_MARK = "KEYSEALER-RESULT:"
IS_ROOT = os.geteuid() == 0

# Helpers every child gets: record an attempt as "ok" or its errno name.
PRELUDE = textwrap.dedent(
    f"""
    import ctypes, errno, json, os, socket, sys

    PARAMS = json.loads(sys.argv[1])

    def attempt(fn):
        try:
            fn()
        except OSError as exc:
            return errno.errorcode.get(exc.errno, str(exc.errno))
        return "ok"

    def make_socket(family, kind=socket.SOCK_STREAM):
        socket.socket(family, kind).close()

    _libc = ctypes.CDLL(None, use_errno=True)

    def prctl(option, arg2=0):
        zero = ctypes.c_ulong(0)
        ret = _libc.prctl(option, ctypes.c_ulong(arg2), zero, zero, zero)
        return ret if ret >= 0 else "errno:" + errno.errorcode[ctypes.get_errno()]

    def emit(result):
        print({RESULT_MARK!r} + json.dumps(result), flush=True)
    """
)


def _package_root_ok() -> bool:
    """Is keysealer.shared importable from this repo (e.g. editable install)?"""
    try:
        spec = importlib.util.find_spec("keysealer.shared")
    except ImportError:
        return False
    locations = list(spec.submodule_search_locations or []) if spec else []
    return any(Path(loc).resolve() == (REPO / "shared").resolve() for loc in locations)


@pytest.fixture(scope="session")
def child_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment under which a child imports keysealer.shared from this repo."""
    env = dict(os.environ)
    if not _package_root_ok():
        # Same mapping as setuptools' package-dir: keysealer -> shared/_root,
        # keysealer.shared -> shared.
        farm = tmp_path_factory.mktemp("import-root")
        pkg = farm / "keysealer"
        pkg.mkdir()
        root_init = REPO / "shared" / "_root" / "__init__.py"
        (pkg / "__init__.py").write_text(root_init.read_text() if root_init.exists() else "")
        (pkg / "shared").symlink_to(REPO / "shared", target_is_directory=True)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(farm), env.get("PYTHONPATH")]))
    return env


def run_child(env: dict[str, str], body: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    script = PRELUDE + textwrap.dedent(body)
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(params or {})],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    results = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    assert proc.returncode == 0 and results, (
        f"child gave no result (did exec escape the sandbox?): rc={proc.returncode}\n"
        f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    result: dict[str, Any] = json.loads(results[-1][len(RESULT_MARK) :])
    return result


@pytest.fixture
def softhsm_env(child_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    if not Path(SOFTHSM_LIB).exists():
        pytest.skip(f"SoftHSM not installed at {SOFTHSM_LIB}")
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    return {**child_env, "SOFTHSM2_CONF": str(conf)}


def test_lockdown_keeps_pkcs11_working_and_blocks_exec_and_network(softhsm_env: dict[str, str], tmp_path: Path) -> None:
    result = run_child(
        softhsm_env,
        """
        import resource, subprocess
        import PyKCS11
        from keysealer.shared.sandbox import lock_down, sandbox_status

        # Setup as a broker worker does it: token, login, key, then lock down.
        lib = PyKCS11.PyKCS11Lib()
        lib.load(PARAMS["lib"])
        # PKCS #11 labels are 32 bytes, blank padded.
        label = PARAMS["label"].ljust(32)
        lib.initToken(lib.getSlotList(tokenPresent=False)[0], PARAMS["so_pin"], label)
        # SoftHSM moves an initialised token to a new slot id: look it up again.
        slot = next(
            s for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.rstrip("\\x00 ") == PARAMS["label"]
        )
        session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
        session.login(PARAMS["so_pin"], PyKCS11.CKU_SO)
        session.initPin(PARAMS["user_pin"])
        session.logout()
        session.login(PARAMS["user_pin"])

        def aes_template(label):
            return [
                (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
                (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
                (PyKCS11.CKA_VALUE_LEN, 32),
                (PyKCS11.CKA_TOKEN, True),
                (PyKCS11.CKA_SENSITIVE, True),
                (PyKCS11.CKA_EXTRACTABLE, False),
                (PyKCS11.CKA_ENCRYPT, True),
                (PyKCS11.CKA_DECRYPT, True),
                (PyKCS11.CKA_LABEL, label),
            ]

        keygen = PyKCS11.Mechanism(PyKCS11.CKM_AES_KEY_GEN, None)
        key = session.generateKey(aes_template("kek-1"), mecha=keygen)
        before = sandbox_status()

        lock_down()
        r = {"before": before, "after": sandbox_status()}

        # (d) PKCS #11 keeps working through the session opened before.
        iv = bytes(session.generateRandom(12))
        r["random_len"] = len(iv)
        mech = PyKCS11.AES_GCM_Mechanism(iv, b"kms-aad", 128)
        plaintext = b"data encryption key material"
        ciphertext = bytes(session.encrypt(key, plaintext, mech))
        r["gcm_len_ok"] = len(ciphertext) == len(plaintext) + 16
        r["gcm_roundtrip"] = bytes(session.decrypt(key, ciphertext, mech)) == plaintext
        # Writing a token object (files in the token dir) works too.
        key2 = session.generateKey(aes_template("kek-2"), mecha=keygen)
        r["token_write"] = key2 is not None

        # (b) network families refused, (c) AF_UNIX fine.
        r["af_inet"] = attempt(lambda: make_socket(socket.AF_INET))
        r["af_inet_udp"] = attempt(lambda: make_socket(socket.AF_INET, socket.SOCK_DGRAM))
        r["af_inet6"] = attempt(lambda: make_socket(socket.AF_INET6))
        r["af_netlink"] = attempt(lambda: make_socket(socket.AF_NETLINK, socket.SOCK_RAW))
        r["af_packet"] = attempt(lambda: make_socket(socket.AF_PACKET, socket.SOCK_RAW))
        r["socketpair_inet"] = attempt(lambda: socket.socketpair(socket.AF_INET))
        a, b = socket.socketpair(socket.AF_UNIX)
        a.sendall(b"ping")
        r["socketpair_unix"] = b.recv(4).decode()
        path = os.path.join(PARAMS["tmp"], "s.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        conn, _ = server.accept()
        client.sendall(b"pong")
        r["unix_stream"] = conn.recv(4).decode()

        # (f) undumpable, no core files, and dumpable cannot be switched back on.
        r["dumpable"] = prctl(3)  # PR_GET_DUMPABLE
        r["set_dumpable_1"] = prctl(4, 1)
        r["rlimit_core"] = list(resource.getrlimit(resource.RLIMIT_CORE))
        # PTRACE_PEEKDATA on our (untraced) parent: ESRCH if ptrace were allowed.
        ptrace_ret = _libc.ptrace(2, os.getppid(), None, None)
        r["ptrace"] = ptrace_ret == -1 and errno.errorcode[ctypes.get_errno()]

        # (a) last: if these succeeded the child would become /bin/true.
        r["subprocess"] = attempt(lambda: subprocess.run(["/bin/true"], check=False))
        r["execv"] = attempt(lambda: os.execv("/bin/true", ["true"]))
        emit(r)
        """,
        {
            "lib": SOFTHSM_LIB,
            "so_pin": "12345678",
            "user_pin": "87654321",
            "label": "keysealer-test",
            "tmp": str(tmp_path),
        },
    )
    assert result["before"]["Seccomp"] == "0"
    # (e)
    assert result["after"]["Seccomp"] == "2"
    assert result["after"]["NoNewPrivs"] == "1"
    # (d)
    assert result["random_len"] == 12
    assert result["gcm_len_ok"] is True
    assert result["gcm_roundtrip"] is True
    assert result["token_write"] is True
    # (b)
    assert result["af_inet"] == "EAFNOSUPPORT"
    assert result["af_inet_udp"] == "EAFNOSUPPORT"
    assert result["af_inet6"] == "EAFNOSUPPORT"
    assert result["af_netlink"] == "EAFNOSUPPORT"
    assert result["af_packet"] == "EAFNOSUPPORT"
    assert result["socketpair_inet"] == "EAFNOSUPPORT"
    # (c)
    assert result["socketpair_unix"] == "ping"
    assert result["unix_stream"] == "pong"
    # (f)
    assert result["dumpable"] == 0
    assert result["set_dumpable_1"] == "errno:EPERM"
    assert result["rlimit_core"] == [0, 0]
    assert result["ptrace"] == "EPERM"
    # (a)
    assert result["subprocess"] == "EPERM"
    assert result["execv"] == "EPERM"


def test_fork_still_works_and_child_is_confined(child_env: dict[str, str]) -> None:
    result = run_child(
        child_env,
        """
        from keysealer.shared.sandbox import lock_down, sandbox_status

        lock_down()
        lock_down()  # a second call stacks another filter instead of failing
        r = {"parent": sandbox_status()}
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            child = {
                "status": sandbox_status(),
                "af_inet": attempt(lambda: make_socket(socket.AF_INET)),
            }
            child["execv"] = attempt(lambda: os.execv("/bin/true", ["true"]))
            os.write(write_end, json.dumps(child).encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as fh:
            data = fh.read()
        _, status = os.waitpid(pid, 0)
        r["child"] = json.loads(data) if data else None
        r["child_exit"] = os.waitstatus_to_exitcode(status)
        emit(r)
        """,
    )
    assert result["parent"]["Seccomp"] == "2"
    if "Seccomp_filters" in result["parent"]:
        assert result["parent"]["Seccomp_filters"] == "2"
    assert result["child_exit"] == 0
    assert result["child"] is not None, "forked child produced nothing: did its exec succeed?"
    assert result["child"]["status"]["Seccomp"] == "2"
    assert result["child"]["status"]["NoNewPrivs"] == "1"
    assert result["child"]["af_inet"] == "EAFNOSUPPORT"
    assert result["child"]["execv"] == "EPERM"


def test_allow_inet_permits_ip_sockets_but_not_exec(child_env: dict[str, str]) -> None:
    result = run_child(
        child_env,
        """
        from keysealer.shared.sandbox import lock_down

        ipv6_before = attempt(lambda: make_socket(socket.AF_INET6))
        lock_down(allow_inet=True)
        r = {"ipv6_before": ipv6_before}
        r["af_inet"] = attempt(lambda: make_socket(socket.AF_INET))
        r["af_inet6"] = attempt(lambda: make_socket(socket.AF_INET6))
        r["af_unix"] = attempt(lambda: make_socket(socket.AF_UNIX))
        r["af_netlink"] = attempt(lambda: make_socket(socket.AF_NETLINK, socket.SOCK_RAW))
        r["af_packet"] = attempt(lambda: make_socket(socket.AF_PACKET, socket.SOCK_RAW))
        # Loopback only: a listener and a connection to it.
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname(), timeout=5)
        conn, _ = server.accept()
        client.sendall(b"tcp")
        r["loopback_tcp"] = conn.recv(3).decode()
        r["execv"] = attempt(lambda: os.execv("/bin/true", ["true"]))
        emit(r)
        """,
    )
    assert result["af_inet"] == "ok"
    assert result["af_inet6"] == result["ipv6_before"]  # "ok" unless the kernel lacks IPv6
    assert result["af_unix"] == "ok"
    assert result["af_netlink"] == "EAFNOSUPPORT"
    assert result["af_packet"] == "EAFNOSUPPORT"
    assert result["loopback_tcp"] == "tcp"
    assert result["execv"] == "EPERM"


def test_threads_started_before_lockdown_are_confined(child_env: dict[str, str], tmp_path: Path) -> None:
    pytest.importorskip("zmq")
    result = run_child(
        child_env,
        """
        import threading
        import zmq
        from keysealer.shared.sandbox import lock_down

        # ZeroMQ I/O threads and a Python thread exist before the lockdown.
        ctx = zmq.Context()
        endpoint = "ipc://" + os.path.join(PARAMS["tmp"], "zmq.sock")
        rep = ctx.socket(zmq.PAIR)
        rep.bind(endpoint)
        req = ctx.socket(zmq.PAIR)
        req.connect(endpoint)
        req.send(b"warm-up")
        rep.recv()

        go = threading.Event()
        seen = {}

        def worker():
            go.wait(10)
            with open("/proc/thread-self/status") as fh:
                seen["seccomp"] = next(l.split()[1] for l in fh if l.startswith("Seccomp:"))
            seen["af_inet"] = attempt(lambda: make_socket(socket.AF_INET))
            seen["execv"] = attempt(lambda: os.execv("/bin/true", ["true"]))

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        lock_down()

        tasks = {}
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as fh:
                name = fh.read().strip()
            with open(f"/proc/self/task/{tid}/status") as fh:
                tasks[f"{tid}:{name}"] = next(l.split()[1] for l in fh if l.startswith("Seccomp:"))
        go.set()
        thread.join(10)
        # ZeroMQ keeps working through its (now filtered) I/O thread.
        req.send(b"after-lockdown")
        r = {"tasks": tasks, "thread": seen, "zmq": rep.recv().decode()}
        req.close(0)
        rep.close(0)
        ctx.term()
        emit(r)
        """,
        {"tmp": str(tmp_path)},
    )
    # main + Python thread + ZeroMQ's I/O and reaper threads
    assert len(result["tasks"]) >= 4, result["tasks"]
    assert set(result["tasks"].values()) == {"2"}, result["tasks"]
    assert result["thread"] == {"seccomp": "2", "af_inet": "EAFNOSUPPORT", "execv": "EPERM"}
    assert result["zmq"] == "after-lockdown"


def test_lockdown_failure_raises_sandbox_error(child_env: dict[str, str]) -> None:
    """A kernel refusal surfaces as SandboxError naming the step, not a ctypes traceback."""
    result = run_child(
        child_env,
        """
        import pyseccomp
        from keysealer.shared.errors import SandboxError
        from keysealer.shared.sandbox import lock_down

        # An outer sandbox that forbids installing further seccomp filters.
        outer = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        outer.add_rule(pyseccomp.ERRNO(errno.EPERM), "seccomp")
        outer.load()
        try:
            lock_down()
        except SandboxError as exc:
            is_runtime = isinstance(exc, RuntimeError)
            emit({"error": type(exc).__name__, "message": str(exc), "is_runtime": is_runtime})
        else:
            emit({"error": None})
        """,
    )
    assert result["error"] == "SandboxError"
    assert result["is_runtime"] is True
    assert "seccomp filter" in result["message"]


@pytest.mark.skipif(not IS_ROOT, reason="drop_privileges needs root to drop from")
def test_drop_privileges_as_root(child_env: dict[str, str]) -> None:
    nobody = pwd.getpwnam("nobody")
    result = run_child(
        child_env,
        """
        from keysealer.shared.errors import SandboxError
        from keysealer.shared.sandbox import drop_privileges

        r = {}
        try:
            drop_privileges(None)
        except SandboxError as exc:
            r["none_error"] = str(exc)
        try:
            drop_privileges("root")
        except SandboxError as exc:
            r["root_error"] = str(exc)
        drop_privileges("nobody")
        r["resuid"] = list(os.getresuid())
        r["resgid"] = list(os.getresgid())
        r["groups"] = os.getgroups()
        r["setuid0"] = attempt(lambda: os.setuid(0))
        r["setgid0"] = attempt(lambda: os.setgid(0))
        r["setgroups0"] = attempt(lambda: os.setgroups([0]))
        # Now non-root: the same user is a no-op, another one is refused.
        drop_privileges("nobody")
        drop_privileges(None)
        try:
            drop_privileges("daemon")
        except SandboxError as exc:
            r["other_user_error"] = str(exc)
        emit(r)
        """,
    )
    assert "running as root" in result["none_error"]
    assert "uid 0" in result["root_error"]
    assert result["resuid"] == [nobody.pw_uid] * 3
    assert result["resgid"] == [nobody.pw_gid] * 3
    assert result["groups"] == [nobody.pw_gid]
    assert result["setuid0"] == "EPERM"
    assert result["setgid0"] == "EPERM"
    assert result["setgroups0"] == "EPERM"
    assert "cannot switch to user 'daemon'" in result["other_user_error"]


@pytest.mark.skipif(not IS_ROOT, reason="drop_privileges needs root to drop from")
def test_drop_privileges_extra_groups(child_env: dict[str, str]) -> None:
    nobody = pwd.getpwnam("nobody")
    daemon_gid = grp.getgrnam("daemon").gr_gid
    result = run_child(
        child_env,
        """
        from keysealer.shared.sandbox import drop_privileges

        drop_privileges("nobody", extra_groups=["daemon"])
        emit({"groups": sorted(os.getgroups()), "egid": os.getegid()})
        """,
    )
    assert result["groups"] == sorted({nobody.pw_gid, daemon_gid})
    assert result["egid"] == nobody.pw_gid


def test_drop_privileges_without_root_is_strict(child_env: dict[str, str]) -> None:
    """As non-root there is nothing to drop: only None or the current user pass."""
    if IS_ROOT:
        pytest.skip("runs as root: covered by test_drop_privileges_as_root after the drop")
    me = pwd.getpwuid(os.geteuid()).pw_name
    other = "root"
    result = run_child(
        child_env,
        """
        from keysealer.shared.errors import SandboxError
        from keysealer.shared.sandbox import drop_privileges

        drop_privileges(None)
        drop_privileges(PARAMS["me"])
        try:
            drop_privileges(PARAMS["other"])
        except SandboxError as exc:
            emit({"error": str(exc)})
        else:
            emit({"error": None})
        """,
        {"me": me, "other": other},
    )
    assert result["error"] is not None
    assert "cannot switch to user" in result["error"]
