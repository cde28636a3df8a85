"""Metrics, health endpoints and audit logs of the running frontend."""

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from harness import Plugin, child_pids, created_key_id, running_plugin
from pkcs11_faults import install


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=5)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self._path))


def get(plugin: Plugin, path: str) -> tuple[int, str]:
    connection = _UnixHTTPConnection(plugin.layout.metrics_socket)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample, whatever order the exposition lists its labels in."""
    for line in text.splitlines():
        found = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if found and found.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', found.group(2) or "")) == labels:
            return float(found.group(3))
    raise AssertionError(f"no {name}{labels} in /metrics")


# The broker's figures reach /metrics with the frontend's health probe: probe often, so tests wait less.
FAST_PROBES = {"health": {"probe_interval_seconds": 0.2}}
BROKER_METRICS_SECONDS = 20.0
MECHANISM_LABELS = {"aes-gcm", "aes-cbc-hmac", "aes-kwp", "rsa-oaep", "rsa-oaep-sha1", "none"}


def eventually(plugin: Plugin, check: Callable[[str], bool]) -> str:
    """/metrics as soon as `check` holds on it (workers send their tallies once a second); a sample not there
    yet (AssertionError from metric()) counts as not yet."""
    deadline = time.monotonic() + BROKER_METRICS_SECONDS
    while True:
        text = get(plugin, "/metrics")[1]
        with contextlib.suppress(AssertionError):
            if check(text):
                return text
        assert time.monotonic() < deadline, f"/metrics never got there: {broker_samples(text)}"
        time.sleep(0.2)


def broker_samples(text: str) -> dict[str, float]:
    """Every sample of the broker's counters and histograms, by its exposition line's name and labels."""
    found = re.findall(r"^(keysealer_broker_(?:token_|module_|session_|worker_busy)\S*) (\S+)$", text, re.MULTILINE)
    return {name: float(value) for name, value in found if not name.split("{")[0].endswith("_created")}


def logins(text: str) -> float:
    return metric(text, "keysealer_broker_token_operation_seconds_count", operation="login", mechanism="none")


def label_values(text: str, label: str) -> set[str]:
    return set(re.findall(rf'{label}="([^"]*)"', text))


def test_metrics_count_calls_by_method_and_code_with_bounded_labels(plugin: Plugin) -> None:
    from keysealer.frontend.kmsv2 import api_pb2

    secret_uid = "uid-that-must-not-become-a-label-4f1c"
    for _ in range(3):
        plugin.stub.Encrypt(api_pb2.EncryptRequest(plaintext=os.urandom(32), uid=secret_uid), timeout=3)
    encrypted = plugin.encrypt(os.urandom(32))
    plugin.decrypt(encrypted)
    with contextlib.suppress(grpc.RpcError):  # the refusal is what is counted below
        plugin.stub.Decrypt(api_pb2.DecryptRequest(ciphertext=b"x", key_id=encrypted.key_id), timeout=3)
    assert get(plugin, "/metrics")[0] == 200
    # The worker gauge follows the health probe: wait for it to have seen both workers ready. And a refusal
    # reaches the caller (context.abort) a moment before the call gate counts it.
    text = eventually(plugin, lambda text: metric(text, "keysealer_broker_workers", state="ready") == 2
                      and metric(text, "keysealer_requests_total", method="Decrypt", code="INVALID_ARGUMENT") == 1)
    assert metric(text, "keysealer_requests_total", method="Encrypt", code="OK") == 4
    assert metric(text, "keysealer_requests_total", method="Decrypt", code="OK") == 1
    assert metric(text, "keysealer_requests_total", method="Decrypt", code="INVALID_ARGUMENT") == 1
    assert metric(text, "keysealer_request_seconds_count", method="Encrypt") == 4
    assert metric(text, "keysealer_broker_roundtrip_seconds_count", operation="wrap") >= 4
    assert metric(text, "keysealer_current_key", key_id=plugin.status().key_id) == 1
    assert metric(text, "keysealer_broker_workers", state="ready") == 2
    assert metric(text, "keysealer_last_successful_probe_timestamp_seconds") > time.time() - 60
    assert secret_uid not in text and "not a KeySealer" not in text  # no uids, no error strings


def test_livez_stays_up_through_a_broker_outage_while_readyz_fails(plugin: Plugin) -> None:
    assert get(plugin, "/livez") == (200, "ok\n")
    assert get(plugin, "/readyz") == (200, "ok\n")
    plugin.stop_broker(signal.SIGKILL)
    deadline = time.monotonic() + 10
    while get(plugin, "/readyz")[0] == 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    status, reason = get(plugin, "/healthz")
    assert status == 503 and "broker" in reason
    assert get(plugin, "/livez") == (200, "ok\n")  # an outage must not get the plugin restarted
    assert get(plugin, "/nothing")[0] == 404


def test_every_encrypt_and_decrypt_leaves_one_json_audit_event(state_dir: Path) -> None:
    with running_plugin(state_dir) as plugin:
        encrypted = plugin.encrypt(os.urandom(32))
        plugin.decrypt(encrypted)
    events = []
    for line in plugin.log("frontend.log").splitlines():
        entry = json.loads(line)  # every line is JSON
        assert {"time", "program", "level", "logger", "message"} <= entry.keys()
        if "audit" in entry:
            events.append(entry["audit"])
    assert [(e["method"], e["code"], e["outcome"]) for e in events] == [("Encrypt", "OK", "ok"),
                                                                        ("Decrypt", "OK", "ok")]
    for event in events:
        assert event["uid"] == "test" and event["key_id"] == encrypted.key_id and event["latency_ms"] > 0


def test_metrics_can_listen_on_a_loopback_port_only(state_dir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with running_plugin(state_dir, frontend={"metrics": {"socket": None, "port": port}}) as plugin:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/readyz")
        assert connection.getresponse().status == 200
        connection.close()
        assert plugin.frontend is not None
        listening = Path("/proc/net/tcp").read_text()
        assert f"0100007F:{port:04X}" in listening  # bound to 127.0.0.1, not 0.0.0.0


def test_broker_reports_token_latency_by_operation_and_mechanism(state_dir: Path) -> None:
    calls = 5
    with running_plugin(state_dir, frontend=FAST_PROBES) as plugin:
        for _ in range(calls):
            plugin.decrypt(plugin.encrypt(os.urandom(32)))

        def counted_every_call(text: str) -> bool:
            return logins(text) == 2 and all(  # one login per worker
                metric(text, "keysealer_broker_token_operation_seconds_count", operation=operation,
                       mechanism="aes-gcm") >= calls for operation in ("wrap", "unwrap"))

        text = eventually(plugin, counted_every_call)
        wraps = metric(text, "keysealer_broker_token_operation_seconds_count", operation="wrap", mechanism="aes-gcm")
        assert metric(text, "keysealer_broker_token_operation_seconds_bucket", operation="wrap", mechanism="aes-gcm",
                      le="+Inf") == wraps
        assert metric(text, "keysealer_broker_token_operation_seconds_sum", operation="wrap", mechanism="aes-gcm") > 0
        assert metric(text, "keysealer_broker_worker_busy_seconds_total") > 0
        assert metric(text, "keysealer_broker_module_reinitializations_total") == 0

        # A key of another mechanism gets its own series.
        key_id = created_key_id(plugin.keys("rotate", "--mechanism", "aes-kwp").stdout)
        assert plugin.broker is not None
        os.kill(plugin.broker.pid, signal.SIGHUP)
        plugin.wait_for_status_key(key_id)
        plugin.decrypt(plugin.encrypt(os.urandom(32)))
        text = eventually(plugin, lambda text: metric(text, "keysealer_broker_token_operation_seconds_count",
                                                      operation="unwrap", mechanism="aes-kwp") >= 1)
        assert label_values(text, "mechanism") <= MECHANISM_LABELS
        assert label_values(text, "operation") <= {"wrap", "unwrap", "login", "find_keys", "health"}


def test_broker_counters_survive_a_killed_worker_and_workers_are_busy_or_idle(state_dir: Path) -> None:
    with running_plugin(state_dir, frontend=FAST_PROBES) as plugin:
        assert plugin.broker is not None
        for _ in range(3):
            plugin.decrypt(plugin.encrypt(os.urandom(32)))
        text = eventually(plugin, lambda text: logins(text) == 2 and metric(
            text, "keysealer_broker_token_operation_seconds_count", operation="unwrap", mechanism="aes-gcm") >= 3)
        # Every ready worker is either serving a request or waiting for one.
        assert (metric(text, "keysealer_broker_ready_workers", activity="busy")
                + metric(text, "keysealer_broker_ready_workers", activity="idle")) == 2
        before = broker_samples(text)
        assert before

        victim = child_pids(plugin.broker.pid)[0]
        os.kill(victim, signal.SIGKILL)
        plugin.wait_healthy()
        plugin.decrypt(plugin.encrypt(os.urandom(32)))
        # The replacement worker's login shows that reports from after the kill arrived.
        after = broker_samples(eventually(plugin, lambda text: logins(text) == 3))
        went_down = {name: (value, after.get(name)) for name, value in before.items() if after.get(name, -1) < value}
        assert not went_down


def test_token_errors_session_replacements_and_reinitializations_are_counted(state_dir: Path) -> None:
    plugin = Plugin(state_dir)
    faults = install(plugin, state_dir / "faults")
    plugin.configure(frontend=FAST_PROBES)
    plugin.start()
    try:
        text = eventually(plugin, lambda text: logins(text) == 2)
        assert metric(text, "keysealer_broker_session_replacements_total") == 0
        assert metric(text, "keysealer_broker_module_reinitializations_total") == 0
        assert metric(text, "keysealer_broker_token_relogins_total") == 0
        assert "keysealer_broker_token_errors_total{" not in text

        # A session error: the call is retried on a fresh session. A device error: the module is finalized
        # and initialized again (the wrapper insists, like p11-kit's client), then logged in again.
        faults.set("C_Decrypt", "CKR_SESSION_HANDLE_INVALID", count=1)
        plugin.decrypt(plugin.encrypt(os.urandom(32)))
        assert faults.fired("C_Decrypt") == 1
        faults.set("C_Encrypt", "CKR_DEVICE_ERROR", count=1, reinit_required=True)
        with contextlib.suppress(grpc.RpcError):  # the call that meets the fault may fail
            plugin.encrypt(os.urandom(32))
        plugin.wait_healthy()
        assert faults.fired("C_Encrypt") == 1

        def recovered(text: str) -> bool:
            return (metric(text, "keysealer_broker_token_errors_total", ckr="CKR_SESSION_HANDLE_INVALID") == 1
                    and metric(text, "keysealer_broker_session_replacements_total") == 1
                    and metric(text, "keysealer_broker_token_errors_total", ckr="CKR_DEVICE_ERROR") >= 1
                    and metric(text, "keysealer_broker_module_reinitializations_total") == 1
                    and metric(text, "keysealer_broker_token_relogins_total") == 1)

        text = eventually(plugin, recovered)
        assert label_values(text, "ckr") <= {"CKR_SESSION_HANDLE_INVALID", "CKR_DEVICE_ERROR"}
    finally:
        plugin.stop()
