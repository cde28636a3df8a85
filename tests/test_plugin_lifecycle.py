"""Starting, stopping, restarting and faulting the real plugin processes."""

import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from harness import Load, Plugin, child_pids, frozen_broker, running_plugin

from keysealer.shared.process import EXIT_BAD_PIN, EXIT_USAGE

# The frontend's call deadline (frontend.yaml limits.call_timeout_seconds, default 2.5 s) plus scheduling slack.
DEADLINE_SLACK = 0.5


def _process_pids(plugin: Plugin) -> dict[str, list[int]]:
    assert plugin.broker is not None and plugin.frontend is not None
    return {"frontend": [plugin.frontend.pid], "broker": [plugin.broker.pid, *child_pids(plugin.broker.pid)]}


def test_key_id_is_stable_across_a_restart_of_both_processes(plugin: Plugin) -> None:
    seed = os.urandom(32)
    encrypted = plugin.encrypt(seed)
    key_id = plugin.status().key_id
    plugin.stop()
    plugin.start()
    assert plugin.status().key_id == key_id
    assert plugin.decrypt(encrypted) == seed


def test_older_key_still_decrypts_after_a_newer_key_becomes_current(plugin: Plugin) -> None:
    seed = os.urandom(32)
    old = plugin.encrypt(seed)
    created = subprocess.run([sys.executable, "-m", "keysealer.tools.cli", "keys", "create", "--label",
                              "next-kek", "--config", str(plugin.layout.broker_config)],
                             capture_output=True, text=True, check=True)
    assert "created key" in created.stdout
    plugin.stop()
    plugin.configure(broker={"keys": {"current_label": "next-kek"}})
    plugin.start()
    new_key_id = plugin.status().key_id
    assert new_key_id != old.key_id and new_key_id in created.stdout
    newer = plugin.encrypt(seed)
    assert newer.key_id == new_key_id
    assert plugin.decrypt(old) == seed
    assert plugin.decrypt(newer) == seed


def test_broker_stopped_answers_unavailable_within_the_deadline_then_recovers(plugin: Plugin) -> None:
    seed = os.urandom(32)
    encrypted = plugin.encrypt(seed)
    plugin.stop_broker(signal.SIGKILL)
    for call in (lambda: plugin.encrypt(os.urandom(32), timeout=10), lambda: plugin.decrypt(encrypted, timeout=10)):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as failure:
            call()
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 2.5 + DEADLINE_SLACK
    deadline = time.monotonic() + 5
    while plugin.status().healthz == "ok" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert plugin.status().healthz in ("broker unreachable", "lost the connection to the broker")
    plugin.start_broker()
    plugin.wait_healthy()
    assert plugin.decrypt(encrypted) == seed


def test_calls_in_flight_when_the_broker_dies_fail_fast_and_none_hang(plugin: Plugin) -> None:
    assert plugin.broker is not None
    ok: list[tuple[bytes, object]] = []

    def call(seed: bytes) -> tuple[str, float]:
        started = time.monotonic()
        try:
            ok.append((seed, plugin.encrypt(seed, timeout=10)))
            return "OK", time.monotonic() - started
        except grpc.RpcError as exc:
            return exc.code().name, time.monotonic() - started

    with ThreadPoolExecutor(max_workers=32) as pool:
        futures = [pool.submit(call, os.urandom(32)) for _ in range(2000)]
        time.sleep(0.3)
        plugin.stop_broker(signal.SIGKILL)
        outcomes = [f.result() for f in futures]
    assert {code for code, _ in outcomes} <= {"OK", "UNAVAILABLE"}
    assert "UNAVAILABLE" in {code for code, _ in outcomes}
    assert max(elapsed for _, elapsed in outcomes) < 2.5 + DEADLINE_SLACK + 1.0  # thread-pool queueing
    plugin.start_broker()
    plugin.wait_healthy()
    for seed, encrypted in ok:  # the ledger: every Encrypt that returned OK still decrypts
        assert plugin.decrypt(encrypted) == seed  # type: ignore[arg-type]


def test_frozen_broker_fails_calls_within_deadline_and_in_flight_bound_refuses_excess(state_dir: Path) -> None:
    with running_plugin(state_dir, frontend={"limits": {"max_in_flight": 4, "call_timeout_seconds": 1.0},
                                             "health": {"probe_interval_seconds": 0.5}}) as plugin:
        assert plugin.broker is not None
        load = Load(plugin, callers=12)
        time.sleep(0.5)
        with frozen_broker(plugin):
            deadline = time.monotonic() + 10
            while plugin.status().healthz == "ok":  # Status keeps answering, and says why
                assert time.monotonic() < deadline, "Status stayed ok with the broker frozen"
                time.sleep(0.1)
            assert plugin.status().healthz == "broker not answering"
        plugin.wait_healthy()
        time.sleep(0.5)
        # Late replies to calls that timed out are discarded: every answer after the thaw is right.
        load.check(1.0 + DEADLINE_SLACK + 0.5, allowed=frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"}))
        assert {"UNAVAILABLE", "RESOURCE_EXHAUSTED"} <= set(load.failures())
        assert "OK" in {code for code, _ in load.outcomes[-10:]}


def test_frontend_started_before_the_broker_becomes_healthy_by_itself(state_dir: Path) -> None:
    plugin = Plugin(state_dir)
    plugin.start_frontend()
    try:
        deadline = time.monotonic() + 10
        while not plugin.layout.kms_socket.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        status = plugin.status()
        assert status.healthz != "ok"
        assert "broker" in status.healthz or "starting" in status.healthz
        plugin.start_broker()
        plugin.wait_healthy()
    finally:
        plugin.stop()


def test_sigterm_stops_cleanly_and_removes_sockets(plugin: Plugin) -> None:
    assert plugin.stop_frontend() == 0
    assert not plugin.layout.kms_socket.exists()
    assert plugin.stop_broker() == 0
    assert not plugin.layout.broker_socket.exists()


def test_stale_sockets_are_taken_over_and_live_ones_never_are(plugin: Plugin) -> None:
    # A live frontend's socket is refused by a second frontend with the same config.
    second = subprocess.run([sys.executable, "-m", "keysealer.frontend.main", "--config",
                             str(plugin.layout.frontend_config)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert second.returncode == EXIT_USAGE
    assert "served by another live process" in second.stderr
    second_broker = subprocess.run([sys.executable, "-m", "keysealer.hsm_broker.main", "--config",
                                    str(plugin.layout.broker_config)],
                                   capture_output=True, text=True, timeout=30, check=False)
    assert second_broker.returncode == EXIT_USAGE
    # The refused processes left the live sockets in place (an open connection would hide an unlink).
    assert stat.S_ISSOCK(plugin.layout.kms_socket.lstat().st_mode)
    assert stat.S_ISSOCK(plugin.layout.broker_socket.lstat().st_mode)
    assert plugin.status().healthz == "ok"
    # Crash both: the sockets stay behind, and the next start takes them over.
    plugin.stop_frontend(signal.SIGKILL)
    plugin.stop_broker(signal.SIGKILL)
    assert stat.S_ISSOCK(plugin.layout.kms_socket.lstat().st_mode)
    plugin.start()
    assert plugin.status().healthz == "ok"


def test_socket_permissions(plugin: Plugin) -> None:
    assert stat.S_IMODE(plugin.layout.kms_socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(plugin.layout.broker_socket.stat().st_mode) == 0o660
    assert stat.S_IMODE(plugin.layout.broker_socket.parent.stat().st_mode) == 0o750


def test_frontend_never_maps_pkcs11_nor_opens_the_pin_and_every_process_is_confined(plugin: Plugin) -> None:
    plugin.decrypt(plugin.encrypt(os.urandom(32)))
    pids = _process_pids(plugin)
    module = os.path.realpath(plugin.broker_config()["token"]["module"])
    frontend_maps = Path(f"/proc/{pids['frontend'][0]}/maps").read_text()
    assert module not in frontend_maps and "PyKCS11" not in frontend_maps
    frontend_files = {os.path.realpath(f"/proc/{pids['frontend'][0]}/fd/{fd}")
                      for fd in os.listdir(f"/proc/{pids['frontend'][0]}/fd")}
    assert str(plugin.layout.pin) not in frontend_files
    supervisor, *workers = pids["broker"]
    assert len(workers) == 2
    assert module not in Path(f"/proc/{supervisor}/maps").read_text()
    for worker in workers:
        assert module in Path(f"/proc/{worker}/maps").read_text()
    for pid in (*pids["frontend"], *pids["broker"]):
        fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
        assert fields["Seccomp"].strip() == "2", pid
        assert fields["NoNewPrivs"].strip() == "1", pid


def test_a_killed_worker_is_replaced_and_the_others_keep_serving(plugin: Plugin) -> None:
    assert plugin.broker is not None
    victim, survivor = child_pids(plugin.broker.pid)
    os.kill(victim, signal.SIGKILL)
    seed = os.urandom(32)
    assert plugin.decrypt(plugin.encrypt(seed)) == seed
    deadline = time.monotonic() + 10
    while (len(replaced := child_pids(plugin.broker.pid)) < 2 or victim in replaced) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert survivor in replaced and victim not in replaced and len(replaced) == 2


def test_a_frozen_idle_worker_is_killed_and_replaced(plugin: Plugin) -> None:
    """A worker frozen between calls answers nothing sent to it: the supervisor sees it stop going round its
    loop (the call board) and replaces it, as it does a worker stuck in a call."""
    assert plugin.broker is not None
    victim, _ = child_pids(plugin.broker.pid)
    os.kill(victim, signal.SIGSTOP)
    deadline = time.monotonic() + 10 + 15  # the supervisor's silence limit, then slack for a loaded machine
    while victim in (workers := child_pids(plugin.broker.pid)) or len(workers) < 2:
        assert time.monotonic() < deadline, "the frozen worker was not replaced"
        time.sleep(0.2)
    assert f"worker {victim} has not gone round its loop" in plugin.log("broker.log")
    plugin.wait_healthy()
    for _ in range(4):  # both workers, the new one too
        seed = os.urandom(32)
        assert plugin.decrypt(plugin.encrypt(seed, timeout=10), timeout=10) == seed


def test_a_broker_frozen_whole_for_longer_than_the_silence_limit_keeps_its_workers(plugin: Plugin) -> None:
    """A paused machine or a stopped cgroup freezes the supervisor with its workers: on thaw it must not take
    the workers' silence (which it did not see pass) for a hang and kill them all."""
    assert plugin.broker is not None
    workers = child_pids(plugin.broker.pid)
    with frozen_broker(plugin):
        time.sleep(10 + 2)  # past the supervisor's silence limit
        os.kill(plugin.broker.pid, signal.SIGCONT)  # the supervisor first: it looks before any worker beats
        time.sleep(0.5)
    time.sleep(3)  # several of its loop turns, and the workers' own
    assert child_pids(plugin.broker.pid) == workers
    assert "has not gone round its loop" not in plugin.log("broker.log")
    seed = os.urandom(32)
    assert plugin.decrypt(plugin.encrypt(seed, timeout=10), timeout=10) == seed


def test_wrong_pin_exits_with_its_own_code_once_without_retrying(plugin: Plugin) -> None:
    plugin.stop()
    plugin.layout.pin.write_text("not-the-pin\n")
    result = subprocess.run([sys.executable, "-m", "keysealer.hsm_broker.main", "--config",
                             str(plugin.layout.broker_config)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == EXIT_BAD_PIN
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("keysealer-broker: error: token login failed: CKR_PIN_INCORRECT")
    assert "Traceback" not in result.stderr
    assert result.stderr.count("started worker") == 1  # one login attempt, not one per worker


def test_the_broker_opens_no_network_socket(plugin: Plugin) -> None:
    plugin.decrypt(plugin.encrypt(os.urandom(32)))
    inet_inodes = set()
    for table in ("tcp", "tcp6", "udp", "udp6", "raw", "raw6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            inet_inodes.add(line.split()[9])
    for pid in _process_pids(plugin)["broker"]:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                assert target[8:-1] not in inet_inodes, (pid, target)
    assert socket.AF_UNIX  # the only family the sandbox leaves the broker


@pytest.mark.skipif(os.geteuid() != 0, reason="the root refusal needs root")
@pytest.mark.parametrize("program", ["keysealer.hsm_broker.main", "keysealer.frontend.main"])
def test_started_as_root_without_a_user_each_process_refuses_to_run(state_dir: Path, program: str) -> None:
    plugin = Plugin(state_dir)
    plugin.configure(broker={"user": None}, frontend={"user": None})
    config = plugin.layout.broker_config if "broker" in program else plugin.layout.frontend_config
    result = subprocess.run([sys.executable, "-m", program, "--config", str(config)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.strip().splitlines()[-1].endswith(
        "running as root: set 'user' in the config to the account to drop to")
    assert "Traceback" not in result.stderr


def test_the_pin_comes_from_the_systemd_credential_when_present(state_dir: Path) -> None:
    plugin = Plugin(state_dir)
    credentials = state_dir / "credentials"
    credentials.mkdir(mode=0o700)
    plugin.layout.pin.rename(credentials / "pin")
    plugin.configure(broker={"token": {"pin_file": str(state_dir / "no-such-pin")}})
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(credentials)}
    plugin.broker = subprocess.Popen([sys.executable, "-m", "keysealer.hsm_broker.main", "--config",
                                      str(plugin.layout.broker_config)], env=env,
                                     stdout=(state_dir / "broker.log").open("ab"), stderr=subprocess.STDOUT)
    plugin.start_frontend()
    try:
        plugin.wait_healthy()
        seed = os.urandom(32)
        assert plugin.decrypt(plugin.encrypt(seed)) == seed
    finally:
        plugin.stop()


def test_a_pin_file_others_can_read_is_refused(plugin: Plugin) -> None:
    plugin.stop()
    plugin.layout.pin.chmod(0o644)
    result = subprocess.run([sys.executable, "-m", "keysealer.hsm_broker.main", "--config",
                             str(plugin.layout.broker_config)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.strip().splitlines()[-1] == (
        f"keysealer-broker: error: PIN file {plugin.layout.pin}: mode 0644 lets others read it; use 0400 or 0600")


def test_liveness_holds_through_a_broker_outage_while_readiness_fails(plugin: Plugin) -> None:
    def status_exit(*flags: str) -> int:
        return subprocess.run(["keysealer", "status", "--socket", str(plugin.layout.kms_socket), *flags],
                              capture_output=True, text=True, timeout=30, check=False).returncode

    assert status_exit() == 0 and status_exit("--liveness") == 0
    plugin.stop_broker(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while status_exit() == 0:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status_exit("--liveness") == 0  # an HSM outage must not restart the plugin in a loop
    plugin.stop_frontend()
    assert status_exit("--liveness") != 0


def test_the_pin_is_never_in_any_process_arguments_or_environment(plugin: Plugin) -> None:
    assert plugin.broker is not None and plugin.frontend is not None
    pin = plugin.layout.pin.read_bytes().strip()
    for pid in (plugin.frontend.pid, plugin.broker.pid, *child_pids(plugin.broker.pid)):
        for name in ("cmdline", "environ"):
            assert pin not in Path(f"/proc/{pid}/{name}").read_bytes(), (pid, name)


def test_a_broker_started_before_its_token_exists_becomes_healthy_by_itself(state_dir: Path) -> None:
    plugin = Plugin(state_dir)
    plugin.configure(broker={"token": {"token_label": "arrives-later"}})
    plugin.start_broker()
    plugin.start_frontend()
    try:
        deadline, healthz = time.monotonic() + 20, ""
        while "arrives-later" not in healthz:  # Status says why
            assert time.monotonic() < deadline, healthz
            time.sleep(0.2)
            with contextlib.suppress(grpc.RpcError):  # the frontend's socket may not exist yet
                healthz = plugin.status().healthz
        for args in (["init-token", "--so-pin-file", str(plugin.layout.so_pin)], ["create"]):
            subprocess.run(["keysealer", "keys", *args, "--config", str(plugin.layout.broker_config)],
                           check=True, capture_output=True, timeout=60)
        plugin.wait_healthy(40)  # no restart: the worker's retries find the token
        seed = os.urandom(32)
        assert plugin.decrypt(plugin.encrypt(seed)) == seed
    finally:
        plugin.stop()
