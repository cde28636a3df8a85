"""Metrics, health endpoints and audit logs of the running frontend."""

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import grpc
from harness import Plugin, running_plugin


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


def test_metrics_count_calls_by_method_and_code_with_bounded_labels(plugin: Plugin) -> None:
    from keysealer.frontend.kmsv2 import api_pb2

    secret_uid = "uid-that-must-not-become-a-label-4f1c"
    for _ in range(3):
        plugin.stub.Encrypt(api_pb2.EncryptRequest(plaintext=os.urandom(32), uid=secret_uid), timeout=3)
    encrypted = plugin.encrypt(os.urandom(32))
    plugin.decrypt(encrypted)
    with contextlib.suppress(grpc.RpcError):  # the refusal is what is counted below
        plugin.stub.Decrypt(api_pb2.DecryptRequest(ciphertext=b"x", key_id=encrypted.key_id), timeout=3)
    deadline = time.monotonic() + 20
    while True:  # the gauge follows the health probe: wait for it to have seen both workers ready
        status, text = get(plugin, "/metrics")
        assert status == 200
        if metric(text, "keysealer_broker_workers", state="ready") == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
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
