"""Token faults, injected on cue by a PKCS #11 wrapper in front of the real SoftHSM (tests/pkcs11_faults),
under load: the broker recovers by itself and the invariant holds throughout."""

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import Load, Plugin, child_pids, rss_kib
from pkcs11_faults import FaultControl, install

from keysealer.frontend.kmsv2 import api_pb2
from keysealer.shared.process import EXIT_BAD_PIN

# The frontend's call deadline (2.5 s) plus scheduling slack on a loaded 2-core machine.
DEADLINE_SLACK = 1.0
DEADLINE = 2.5 + DEADLINE_SLACK
RECOVERY_SECONDS = 20.0
# The broker's promise: a worker still holding a call this long past the call's deadline is killed.
STUCK_GRACE_SECONDS = 5.0
STUCK_SLACK_SECONDS = 10.0  # the broker's poll, SIGKILL and reaping on a loaded machine


@contextlib.contextmanager
def faulty_plugin(state_dir: Path, **config: Any) -> Iterator[tuple[Plugin, FaultControl]]:
    """The real plugin, its broker's token behind the fault wrapper; config as Plugin.configure takes it."""
    plugin = Plugin(state_dir)
    faults = install(plugin, state_dir / "faults")
    plugin.configure(**config)
    plugin.start()
    try:
        yield plugin, faults
    finally:
        plugin.stop()


@pytest.fixture
def faulty(state_dir: Path) -> Iterator[tuple[Plugin, FaultControl]]:
    with faulty_plugin(state_dir) as running:
        yield running


def _under_load(plugin: Plugin, faults: FaultControl, function: str, rv: str, **cue: object) -> tuple[Load, int]:
    """Load, then the fault for 1.5 s; returns the load and how often the fault fired."""
    load = Load(plugin)
    time.sleep(0.5)
    faults.set(function, rv, **cue)
    time.sleep(1.5)
    fired = faults.fired(function)
    faults.clear()
    time.sleep(0.5)
    return load, fired


@pytest.mark.parametrize(("function", "rv"), [
    ("C_Decrypt", "CKR_SESSION_HANDLE_INVALID"),
    ("C_Encrypt", "CKR_SESSION_CLOSED"),
    ("C_EncryptInit", "CKR_OPERATION_ACTIVE"),
])
def test_session_faults_cost_no_call(faulty: tuple[Plugin, FaultControl], function: str, rv: str) -> None:
    plugin, faults = faulty
    # One session goes bad (the wrapper fails one call; the fresh session the broker opens works).
    load, fired = _under_load(plugin, faults, function, rv, count=1)
    assert fired == 1
    load.check(DEADLINE, allowed=frozenset())  # retried once on a fresh session: nobody sees the fault


def test_a_session_left_with_an_active_operation_is_replaced(faulty: tuple[Plugin, FaultControl]) -> None:
    plugin, faults = faulty
    # As tpm2-pkcs11 does: a failed decrypt leaves the operation active on its session.
    faults.set("C_Decrypt", sticky_operation=True, always=True)
    encrypted = plugin.encrypt(b"s" * 32)
    tampered = encrypted.ciphertext[:-1] + bytes([encrypted.ciphertext[-1] ^ 1])
    for _ in range(4):  # reach both workers
        with pytest.raises(grpc.RpcError) as failure:
            plugin.stub.Decrypt(api_pb2.DecryptRequest(ciphertext=tampered, key_id=encrypted.key_id), timeout=3)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    load = Load(plugin)
    time.sleep(1.5)
    load.check(DEADLINE, allowed=frozenset())


def test_lost_login_costs_at_most_one_call_per_worker(faulty: tuple[Plugin, FaultControl]) -> None:
    plugin, faults = faulty
    load, fired = _under_load(plugin, faults, "C_Encrypt", "CKR_USER_NOT_LOGGED_IN", count=1)
    plugin.wait_healthy(RECOVERY_SECONDS)
    load.check(DEADLINE)
    # Only the call that hit the fault: requests already queued at that worker go to the other one.
    assert fired == 1 and len(load.failures()) <= 1


def test_device_gone_then_back_unhealthy_meanwhile_then_recovered(faulty: tuple[Plugin, FaultControl]) -> None:
    plugin, faults = faulty
    assert plugin.frontend is not None
    memory_before = rss_kib(plugin.frontend.pid)
    load = Load(plugin)
    faults.set("*", "CKR_DEVICE_REMOVED", always=True)
    deadline = time.monotonic() + RECOVERY_SECONDS
    while plugin.status().healthz == "ok":
        assert time.monotonic() < deadline, "Status stayed ok with the token gone"
        time.sleep(0.2)
    reason = plugin.status().healthz
    assert "CKR_DEVICE_REMOVED" in reason or "token" in reason
    time.sleep(1)
    faults.clear()
    plugin.wait_healthy(RECOVERY_SECONDS)
    time.sleep(0.5)
    load.check(DEADLINE)
    assert "OK" in {code for code, _ in load.outcomes[-20:]}  # served again after the fault
    assert rss_kib(plugin.frontend.pid) < memory_before + 20 * 1024


def test_a_module_that_needs_reinitializing_is_reinitialized(faulty: tuple[Plugin, FaultControl]) -> None:
    plugin, faults = faulty
    # p11-kit's remote client after its server went away: CKR_DEVICE_ERROR until C_Finalize + C_Initialize.
    load = Load(plugin)
    faults.set("C_Decrypt", "CKR_DEVICE_ERROR", count=1, reinit_required=True)
    time.sleep(2)
    faults.clear()
    plugin.wait_healthy(RECOVERY_SECONDS)
    time.sleep(0.5)
    load.check(DEADLINE)
    assert "OK" in {code for code, _ in load.outcomes[-20:]}


def test_a_killed_worker_under_load_loses_no_call(faulty: tuple[Plugin, FaultControl]) -> None:
    plugin, _ = faulty
    assert plugin.broker is not None
    load = Load(plugin)
    time.sleep(0.5)
    victim = child_pids(plugin.broker.pid)[0]
    plugin_pid = plugin.broker.pid
    os.kill(victim, signal.SIGKILL)
    time.sleep(1.5)
    # Its call in flight was run again on the other worker: wrap and unwrap are idempotent.
    load.check(DEADLINE, allowed=frozenset({"UNAVAILABLE"}))
    assert len(load.failures()) <= 1
    deadline = time.monotonic() + RECOVERY_SECONDS
    while len(child_pids(plugin_pid)) < 2 or victim in child_pids(plugin_pid):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_worker_hung_in_the_token_is_killed_and_replaced(state_dir: Path) -> None:
    call_timeout, count = 1.0, 2  # short, so the hung worker overruns its call's deadline by 5 s soon
    with faulty_plugin(state_dir, broker={"workers": {"count": count}},
                       frontend={"limits": {"call_timeout_seconds": call_timeout}}) as (plugin, faults):
        assert plugin.broker is not None
        broker_pid = plugin.broker.pid
        deadline = time.monotonic() + RECOVERY_SECONDS
        while len(workers := child_pids(broker_pid)) < count:  # workers log in one at a time
            assert time.monotonic() < deadline, "the broker never started its workers"
            time.sleep(0.1)
        load = Load(plugin, callers=2)  # few: every OK Encrypt is decrypted again and looked for in the logs
        time.sleep(0.5)
        faults.set("C_Encrypt", delay_ms=60_000, count=1)  # one call never comes back (for a minute)
        deadline = time.monotonic() + call_timeout + STUCK_GRACE_SECONDS + STUCK_SLACK_SECONDS
        while set(child_pids(broker_pid)) >= set(workers):
            assert time.monotonic() < deadline, "the worker hung in C_Encrypt was not killed in time"
            time.sleep(0.1)
        assert faults.fired("C_Encrypt") == 1
        (victim,) = set(workers) - set(child_pids(broker_pid))
        deadline = time.monotonic() + RECOVERY_SECONDS
        while len(child_pids(broker_pid)) < count:  # replaced
            assert time.monotonic() < deadline, "the killed worker was never replaced"
            time.sleep(0.1)
        plugin.wait_healthy(RECOVERY_SECONDS)
        time.sleep(0.5)
        # The hung call failed at its deadline, and no call outlived its own.
        load.check(call_timeout + DEADLINE_SLACK)
        assert "UNAVAILABLE" in load.failures()
        assert "OK" in {code for code, _ in load.outcomes[-20:]}
        killed = [line for line in plugin.log("broker.log").splitlines() if "past its deadline" in line]
        assert len(killed) == 1 and str(victim) in killed[0], killed
        for _ in range(4):  # reach both workers, the new one too
            seed = os.urandom(32)
            assert plugin.decrypt(plugin.encrypt(seed)) == seed


SLEEP_SYSCALLS = frozenset({35, 230})  # nanosleep, clock_nanosleep (x86-64): the wrapper's delay


def _sleeping_in_the_token(pids: list[int]) -> list[int]:
    """The workers whose main thread sleeps in the fault wrapper's delay (an idle worker polls its sockets)."""
    found = []
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            if int(Path(f"/proc/{pid}/task/{pid}/syscall").read_text().split()[0]) in SLEEP_SYSCALLS:
                found.append(pid)
    return found


def test_a_call_whose_worker_dies_under_it_runs_again_on_another(state_dir: Path) -> None:
    """The frontend knows which worker holds each call: when that worker dies mid-call, the call runs once
    more on another worker and its caller sees nothing but a slower answer."""
    with faulty_plugin(state_dir, broker={"workers": {"count": 2}},
                       frontend={"limits": {"call_timeout_seconds": 8.0},
                                 # no probe's unwrap may take the delayed C_Decrypt instead of the test's
                                 "health": {"probe_interval_seconds": 300.0}}) as (plugin, faults):
        assert plugin.broker is not None
        deadline = time.monotonic() + RECOVERY_SECONDS
        while len(workers := child_pids(plugin.broker.pid)) < 2:
            assert time.monotonic() < deadline, "the broker never started its workers"
            time.sleep(0.1)
        seed = os.urandom(32)
        sealed = plugin.encrypt(seed)
        faults.set("C_Decrypt", delay_ms=30_000, count=1)  # the next Decrypt stays in the token
        started = time.monotonic()
        call = plugin.stub.Decrypt.future(api_pb2.DecryptRequest(ciphertext=sealed.ciphertext, key_id=sealed.key_id,
                                                                 uid="test", annotations=sealed.annotations),
                                          timeout=8.0)
        deadline = time.monotonic() + 5
        while not (holding := _sleeping_in_the_token(workers)):
            assert time.monotonic() < deadline, "no worker took the call"
            time.sleep(0.01)
        os.kill(holding[0], signal.SIGKILL)
        assert call.result().plaintext == seed  # the retry: without it, UNAVAILABLE "worker exited"
        assert time.monotonic() - started < 8.0 + DEADLINE_SLACK
        assert faults.fired("C_Decrypt") == 1  # the delay held the test's call, and only it


def test_a_lone_worker_that_lost_the_token_serves_again_once_it_reopened(state_dir: Path) -> None:
    """A worker answers token_unavailable when the token fails under it, then reopens it within its backoff.
    The frontend, told nothing new by health meanwhile (a long probe interval), must not keep refusing."""
    with faulty_plugin(state_dir, broker={"workers": {"count": 1}},
                       frontend={"health": {"probe_interval_seconds": 300.0}}) as (plugin, faults):
        seed = os.urandom(32)
        sealed = plugin.encrypt(seed)
        faults.set("C_Decrypt", "CKR_DEVICE_ERROR", count=1)  # the worker drops its login and reopens
        with pytest.raises(grpc.RpcError) as failure:
            plugin.decrypt(sealed)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        deadline = time.monotonic() + RECOVERY_SECONDS / 2  # the worker's backoff is 0.5 s
        while True:
            try:
                assert plugin.decrypt(sealed) == seed
                break
            except grpc.RpcError as exc:
                assert time.monotonic() < deadline, f"still refused: {exc.details()}"
                time.sleep(0.2)


def test_a_pin_refused_on_relogin_stops_the_broker_after_one_attempt(faulty: tuple[Plugin, FaultControl]) -> None:
    plugin, faults = faulty
    assert plugin.broker is not None
    logins_before = faults.fired("C_Login")
    faults.set("C_Login", "CKR_PIN_INCORRECT", always=True)
    faults.set("C_Encrypt", "CKR_USER_NOT_LOGGED_IN", count=1)  # forces a re-login
    with contextlib.suppress(grpc.RpcError):  # the call that hits the lost login
        plugin.encrypt(b"p" * 32)
    assert plugin.broker.wait(timeout=RECOVERY_SECONDS) == EXIT_BAD_PIN
    assert faults.fired("C_Login") - logins_before == 1  # exactly one refused login: the token cannot lock
    assert "CKR_PIN_INCORRECT" in plugin.log("broker.log")


def test_a_pin_refused_when_a_changed_store_restarts_the_module_is_tried_once(state_dir: Path) -> None:
    """token.reinitialize_when_changed (the TPM provider): a changed store makes the worker restart the
    module and log in again. A refused PIN there stops the broker after that one login, as at any login."""
    plugin = Plugin(state_dir)
    faults = install(plugin, state_dir / "faults")
    store = state_dir / "store"
    store.write_bytes(b"before")
    plugin.configure(broker={"token": {"reinitialize_when_changed": str(store)}, "workers": {"count": 1}})
    plugin.start()
    try:
        assert plugin.broker is not None
        logins_before = faults.fired("C_Login")
        faults.set("C_Login", "CKR_PIN_INCORRECT", always=True)
        store.write_bytes(b"after")
        plugin.broker.send_signal(signal.SIGHUP)  # re-read the key set now: the store changed
        assert plugin.broker.wait(timeout=RECOVERY_SECONDS) == EXIT_BAD_PIN
        assert faults.fired("C_Login") - logins_before == 1
        assert "CKR_PIN_INCORRECT" in plugin.log("broker.log")
    finally:
        plugin.stop()
