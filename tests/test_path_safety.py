"""Root-started processes never follow a path another user controls (issue 12, privilege escalation).

Each test plays a local adversary against the real broker, frontend, `keysealer dev` or `ipc-keygen`,
started by root (these tests run as root) with `user: nobody` where the production shape says so.
"""

import grp
import os
import pwd
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import Plugin, deep_update

from keysealer.shared.errors import UnsafePathError
from keysealer.shared.safe_paths import Owner, prepare_directory

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="plays root starting the plugin")

NOBODY = pwd.getpwnam("nobody")
DAEMON_GID = grp.getgrnam("daemon").gr_gid
BROKER = "keysealer.hsm_broker.main"
FRONTEND = "keysealer.frontend.main"


def _config(path: Path, changes: dict[str, Any]) -> Path:
    data = yaml.safe_load(path.read_text())
    deep_update(data, changes)
    path.write_text(yaml.safe_dump(data))
    return path


def _run(module: str, config: Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, "--config", str(config), "--log-text"], cwd=cwd,
                          capture_output=True, text=True, timeout=60, check=False)


def _keysealer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["keysealer", *args], capture_output=True, text=True, timeout=120, check=False)


def _one_line_refusal(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def _owned_by_nobody(path: Path, mode: int) -> Path:
    os.chmod(path.parent, 0o755)  # the service user reaches its own directory
    path.mkdir(mode=mode)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    os.chmod(path, mode)
    return path


def _victim(root: Path) -> tuple[Path, os.stat_result]:
    """A root-owned directory the adversary wants: its owner and mode must never change."""
    victim = root / "victim"
    victim.mkdir(mode=0o755)
    return victim, victim.stat()


def _unchanged(path: Path, before: os.stat_result) -> None:
    after = path.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)


@pytest.fixture
def plugin_files(state_dir: Path) -> Plugin:
    """A token, keys and configs made by `keysealer dev`'s setup; nothing started."""
    return Plugin(state_dir)


def test_broker_does_not_follow_a_workers_symlink_its_user_planted(plugin_files: Plugin, state_dir: Path) -> None:
    # The broker's user (compromised) owns its socket directory and swapped `workers` for a symlink.
    socket_dir = _owned_by_nobody(state_dir / "broker", 0o750)
    victim, before = _victim(state_dir)
    (socket_dir / "workers").symlink_to(victim)
    os.chown(socket_dir / "workers", NOBODY.pw_uid, NOBODY.pw_gid, follow_symlinks=False)
    config = _config(plugin_files.layout.broker_config, {"user": "nobody"})
    result = _run(BROKER, config)
    _one_line_refusal(result, f"{socket_dir}/workers: not a directory")
    _unchanged(victim, before)


def test_broker_refuses_a_socket_directory_someone_else_made_in_tmp(plugin_files: Plugin, state_dir: Path) -> None:
    # Another user got to /tmp/.../ipc first, with a symlink inside for the root-run broker to follow.
    planted = _owned_by_nobody(state_dir / "ipc", 0o777)
    victim, before = _victim(state_dir)
    (planted / "workers").symlink_to(victim)
    config = _config(plugin_files.layout.broker_config, {"ipc": {"socket": f"{planted}/broker.sock"}})
    result = _run(BROKER, config)
    _one_line_refusal(result, f"{planted}: owned by uid {NOBODY.pw_uid}", "refusing to use it")
    _unchanged(victim, before)
    assert (planted / "workers").is_symlink()


def test_broker_refuses_a_parent_directory_others_can_write(plugin_files: Plugin, state_dir: Path) -> None:
    shared = state_dir / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)  # no sticky bit: anyone may rename what is in it
    config = _config(plugin_files.layout.broker_config, {"ipc": {"socket": f"{shared}/ipc/broker.sock"}})
    result = _run(BROKER, config)
    _one_line_refusal(result, f"{shared}: mode 0777 lets others write it")
    assert not (shared / "ipc").exists()


def test_relative_ipc_socket_is_refused_before_the_working_directory_is_touched(
        plugin_files: Plugin, state_dir: Path) -> None:
    cwd = state_dir / "cwd"
    cwd.mkdir(mode=0o755)
    os.chmod(cwd, 0o755)
    before = cwd.stat()
    config = _config(plugin_files.layout.broker_config, {"ipc": {"socket": "broker.sock"}})
    result = _run(BROKER, config, cwd=cwd)
    _one_line_refusal(result, "ipc.socket: must be an absolute path")
    _unchanged(cwd, before)
    assert list(cwd.iterdir()) == []


def test_overlong_socket_path_is_refused_before_any_directory_is_created(
        plugin_files: Plugin, state_dir: Path) -> None:
    # broker.sock itself fits in 107 bytes; the workers' socket derived from it does not.
    deep = state_dir / ("d" * (100 - len(str(state_dir)) - len("/broker.sock")))
    config = _config(plugin_files.layout.broker_config, {"ipc": {"socket": f"{deep}/broker.sock"}})
    result = _run(BROKER, config)
    _one_line_refusal(result, "ipc.socket: socket path", "workers/backend.sock is longer than 107 bytes")
    assert not deep.exists()


def _start_frontend(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", FRONTEND, "--config", str(config), "--log-text"],
                            stderr=subprocess.PIPE, text=True)


def _stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    return stderr


def _wait_for_socket(path: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while not (path.exists() and stat.S_ISSOCK(path.lstat().st_mode)):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_root_started_frontend_sockets_belong_to_its_user_from_birth(plugin_files: Plugin, state_dir: Path) -> None:
    """kms.sock and metrics.sock get the service user, the configured group and mode at bind time (a
    root-started frontend's metrics.sock used to be root:root 0660, out of every scraper's reach)."""
    run_dir = _owned_by_nobody(state_dir / "run", 0o755)
    config = _config(plugin_files.layout.frontend_config, {
        "user": "nobody",
        "listen": {"socket": f"{run_dir}/kms.sock", "mode": "0660", "group": "daemon"},
        "metrics": {"socket": f"{run_dir}/metrics.sock", "group": "daemon"},
    })
    process = _start_frontend(config)
    try:
        _wait_for_socket(run_dir / "metrics.sock", process)
        for name in ("kms.sock", "metrics.sock"):
            info = (run_dir / name).lstat()
            assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (NOBODY.pw_uid, DAEMON_GID, 0o660), name
    finally:
        _stop(process)


def test_frontend_user_swapping_kms_sock_for_a_symlink_gains_nothing(plugin_files: Plugin, state_dir: Path) -> None:
    """The frontend's user owns the socket directory: it swaps kms.sock for a symlink to a root-only file
    the moment the socket appears. The file must keep its owner, group and mode."""
    run_dir = _owned_by_nobody(state_dir / "run", 0o755)
    target = state_dir / "root-only"
    target.write_text("secret\n")
    os.chmod(target, 0o600)
    before = target.stat()
    config = _config(plugin_files.layout.frontend_config, {
        "user": "nobody", "listen": {"socket": f"{run_dir}/kms.sock", "mode": "0660", "group": "daemon"},
        "metrics": {"socket": f"{run_dir}/metrics.sock"}})
    for attempt in range(3):  # the unfixed frontend lost on the first try
        _swap_when_bound(run_dir / "kms.sock", run_dir / f"link{attempt}", target, config)
        _unchanged(target, before)
        (run_dir / "kms.sock").unlink(missing_ok=True)


def _swap_when_bound(socket_path: Path, link: Path, target: Path, config: Path) -> None:
    """Start the frontend; the moment its socket exists, rename a symlink to `target` over it."""
    link.symlink_to(target)
    swapped, stop = threading.Event(), threading.Event()

    def swap() -> None:
        while not stop.is_set():
            try:
                if stat.S_ISSOCK(socket_path.lstat().st_mode):
                    os.rename(link, socket_path)
                    swapped.set()
                    return
            except FileNotFoundError:
                pass

    thread = threading.Thread(target=swap)
    thread.start()
    process = _start_frontend(config)
    try:
        assert swapped.wait(30), _stop(process)
        time.sleep(1.0)  # the frontend's own setup carries on after its bind
    finally:
        stop.set()
        thread.join()
        _stop(process)


def test_frontend_refuses_a_socket_directory_another_user_owns(plugin_files: Plugin, state_dir: Path) -> None:
    daemon_user = pwd.getpwnam("daemon")
    run_dir = state_dir / "run"
    run_dir.mkdir(mode=0o755)
    os.chown(run_dir, daemon_user.pw_uid, daemon_user.pw_gid)
    config = _config(plugin_files.layout.frontend_config, {"user": "nobody",
                                                           "listen": {"socket": f"{run_dir}/kms.sock"},
                                                           "metrics": {"socket": f"{run_dir}/metrics.sock"}})
    result = _run(FRONTEND, config)
    _one_line_refusal(result, f"{run_dir}: owned by uid {daemon_user.pw_uid}")
    assert list(run_dir.iterdir()) == []


def _fake_module(path: Path, marker: Path) -> None:
    """A 'PKCS #11 module' that leaves `marker` behind the moment anything loads it."""
    source = path.with_suffix(".c")
    source.write_text('#include <fcntl.h>\n#include <unistd.h>\n'
                      f'__attribute__((constructor)) static void ran(void) {{ close(creat("{marker}", 0644)); }}\n')
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(path), str(source)], check=True)


def test_dev_as_root_refuses_a_state_dir_another_user_made(state_dir: Path) -> None:
    """Another user prepared a state dir whose broker.yaml names their own module: root must not load it."""
    planted = _owned_by_nobody(state_dir / "planted", 0o755)
    marker = state_dir / "module-ran"
    module = planted / "evil.so"
    _fake_module(module, marker)
    (planted / "pin").write_text("1234\n")
    os.chmod(planted / "pin", 0o600)
    (planted / "broker.yaml").write_text(yaml.safe_dump({
        "token": {"module": str(module), "token_label": "t", "pin_file": str(planted / "pin")},
        "keys": {"current_label": "k"},
        "ipc": {"socket": f"{planted}/broker/broker.sock", "server_key": f"{planted}/ipc-keys/broker.key_secret",
                "client_keys": [f"{planted}/ipc-keys/frontend.key"]}}))
    for path in (module, planted / "broker.yaml", planted / "pin"):
        os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    result = _keysealer("dev", "--state-dir", str(planted))
    _one_line_refusal(result, f"{planted}: owned by uid {NOBODY.pw_uid}")
    assert not marker.exists()


@pytest.mark.parametrize("planted", ["broker.yaml", "tokens"])
def test_dev_as_root_refuses_an_entry_another_user_owns_in_its_state_dir(state_dir: Path, planted: str) -> None:
    Plugin(state_dir)  # a complete state dir, then one entry handed to another user
    os.chown(state_dir / planted, NOBODY.pw_uid, NOBODY.pw_gid)
    result = _keysealer("dev", "--state-dir", str(state_dir))
    _one_line_refusal(result, f"{state_dir / planted}: owned by uid {NOBODY.pw_uid}")


def test_dev_refuses_a_state_dir_others_can_write(state_dir: Path) -> None:
    os.chmod(state_dir, 0o777)
    result = _keysealer("dev", "--state-dir", str(state_dir))
    _one_line_refusal(result, f"{state_dir}: mode 0777 lets others write it")
    assert list(state_dir.iterdir()) == []


@pytest.mark.parametrize("shape", ["others-writable", "another-users"])
def test_ipc_keygen_refuses_a_directory_others_control(state_dir: Path, shape: str) -> None:
    keys = state_dir / "keys"
    if shape == "others-writable":
        keys.mkdir()
        os.chmod(keys, 0o777)
        why = "mode 0777 lets others write it"
    else:
        _owned_by_nobody(keys, 0o755)
        why = f"owned by uid {NOBODY.pw_uid}"
    result = _keysealer("ipc-keygen", "--dir", str(keys), "--name", "broker")
    _one_line_refusal(result, f"{keys}: {why}")
    assert list(keys.iterdir()) == []


def test_root_refuses_a_config_another_user_can_rewrite(plugin_files: Plugin, state_dir: Path) -> None:
    """The config names the module root loads and the user to become: only root may be able to change it."""
    config = plugin_files.layout.broker_config
    os.chown(config, NOBODY.pw_uid, NOBODY.pw_gid)
    result = _keysealer("keys", "list", "--config", str(config))
    _one_line_refusal(result, f"config {config}: owned by uid {NOBODY.pw_uid}, not by root")


def test_root_never_loads_a_module_another_user_can_replace(plugin_files: Plugin, state_dir: Path) -> None:
    modules = _owned_by_nobody(state_dir / "modules", 0o755)
    marker = state_dir / "module-ran"
    _fake_module(modules / "p11.so", marker)
    config = _config(plugin_files.layout.broker_config, {"token": {"module": str(modules / "p11.so")}})
    result = _keysealer("keys", "list", "--config", str(config))
    _one_line_refusal(result, f"token.module {modules / 'p11.so'}: {modules}: owned by uid {NOBODY.pw_uid}")
    assert not marker.exists()


def test_root_started_frontend_refuses_a_broker_key_another_user_could_swap(
        plugin_files: Plugin, state_dir: Path) -> None:
    """Whoever can replace broker.server_key can pass for the broker and receive every seed."""
    keys = _owned_by_nobody(state_dir / "keys", 0o755)
    public = plugin_files.layout.ipc_key("broker", ".key")
    (keys / public.name).write_bytes(public.read_bytes())
    config = _config(plugin_files.layout.frontend_config, {"broker": {"server_key": str(keys / public.name)}})
    result = _run(FRONTEND, config)
    _one_line_refusal(result, f"CURVE public key {keys / public.name}: {keys}: owned by uid {NOBODY.pw_uid}")


def test_root_started_frontend_says_in_one_line_when_its_user_cannot_create_the_socket(
        plugin_files: Plugin, state_dir: Path) -> None:
    """The socket is created as the service user: a directory only root can write is one clear line."""
    run_dir = state_dir / "run"
    run_dir.mkdir(mode=0o755)
    os.chmod(state_dir, 0o755)
    config = _config(plugin_files.layout.frontend_config, {"user": "nobody",
                                                           "listen": {"socket": f"{run_dir}/kms.sock"}})
    result = _run(FRONTEND, config)
    _one_line_refusal(result, f"{run_dir}/kms.sock: uid {NOBODY.pw_uid} cannot create it: no write access")


def test_directories_created_on_the_way_let_the_service_user_through_whatever_the_umask(
        plugin_files: Plugin, state_dir: Path) -> None:
    os.chmod(state_dir, 0o755)
    socket_dir = state_dir / "new" / "broker"
    config = _config(plugin_files.layout.broker_config, {"user": "nobody",
                                                         "ipc": {"socket": f"{socket_dir}/broker.sock"}})
    subprocess.run([sys.executable, "-m", BROKER, "--config", str(config)], capture_output=True, timeout=60,
                   check=False, preexec_fn=lambda: os.umask(0o077))
    assert stat.S_IMODE((state_dir / "new").stat().st_mode) == 0o755
    info = socket_dir.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (NOBODY.pw_uid, 0o750)
    workers = (socket_dir / "workers").stat()
    assert (workers.st_uid, stat.S_IMODE(workers.st_mode)) == (NOBODY.pw_uid, 0o700)


def test_root_refuses_a_pin_file_in_a_directory_another_user_controls(plugin_files: Plugin, state_dir: Path) -> None:
    """A PIN someone else can swap costs a failed login as root (and, repeated, a locked token)."""
    secrets = _owned_by_nobody(state_dir / "secrets", 0o755)
    pin = secrets / "pin"
    pin.write_bytes(plugin_files.layout.pin.read_bytes())
    os.chmod(pin, 0o600)
    config = _config(plugin_files.layout.broker_config, {"token": {"pin_file": str(pin)}})
    result = _keysealer("keys", "list", "--config", str(config))
    _one_line_refusal(result, f"PIN file {pin}: {secrets}: owned by uid {NOBODY.pw_uid}")


def test_a_broker_run_as_its_user_may_create_its_socket_directory_in_a_pod_emptydir(state_dir: Path) -> None:
    """A pod shares the broker's socket through an emptyDir (root-owned, 0777): a broker that is not root
    gains nothing from a redirected path, so its socket directory may go there (not so for root)."""
    empty_dir = state_dir / "pod"
    empty_dir.mkdir()
    os.chmod(empty_dir, 0o777)
    os.chmod(state_dir, 0o755)
    pid = os.fork()
    if pid == 0:  # the broker's setup code, run as its user (nobody cannot run this venv's python)
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
            prepare_directory(empty_dir / "ipc", 0o750, Owner(NOBODY.pw_uid, NOBODY.pw_gid))
            code = 0
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    info = (empty_dir / "ipc").stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (NOBODY.pw_uid, 0o750)
    with pytest.raises(UnsafePathError, match="mode 0777 lets others write it"):
        prepare_directory(empty_dir / "ipc-root", 0o750, Owner(0, 0))
