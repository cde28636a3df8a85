"""What a caller can make the frontend write: bad requests over the real socket, each one bounded audit
line with every caller-supplied string escaped; and an audit and metrics that say how a call really ended."""

import json
import os
import time
import unicodedata
from collections.abc import Callable

import grpc
import pytest
from harness import Plugin, frozen_broker
from test_observability import eventually, metric

from keysealer.frontend.kmsv2 import api_pb2

# An audit event is ~300 bytes; this leaves room for a bounded uid and key_id, not for a 60,000-character one.
MAX_BYTES_PER_BAD_REQUEST = 1024
RTL_OVERRIDE = "\u202e"


def _log_after(plugin: Plugin, act: Callable[[], None]) -> str:
    """What the frontend logged while `act` ran (its audit events written once each call is answered)."""
    before = len(plugin.log("frontend.log"))
    act()
    time.sleep(0.3)  # the audit event of the last call follows its answer
    return plugin.log("frontend.log")[before:]


def _assert_clean(text: str) -> None:
    assert "Traceback" not in text, text[:2000]
    for char in set(text) - {"\n"}:
        # Control, format (bidi overrides) and separator characters other than the space must arrive escaped.
        assert unicodedata.category(char)[0] not in "CZ" or char == " ", (hex(ord(char)), text[:2000])


def _audit_events(text: str) -> list[dict[str, object]]:
    return [entry["audit"] for entry in map(json.loads, text.splitlines()) if "audit" in entry]


def _refused(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    code: grpc.StatusCode = info.value.code()
    return code


def test_caller_strings_are_bounded_and_escaped_in_the_audit(shared_plugin: Plugin) -> None:
    encrypted = shared_plugin.encrypt(os.urandom(32))
    requests = 20
    key_id = RTL_OVERRIDE + "k" * 60_000
    uid = f"evil\n{RTL_OVERRIDE}\x1b[31m"

    def send() -> None:
        for _ in range(requests):
            code = _refused(lambda: shared_plugin.stub.Decrypt(api_pb2.DecryptRequest(
                ciphertext=encrypted.ciphertext, key_id=key_id, uid=uid), timeout=3))
            assert code is grpc.StatusCode.INVALID_ARGUMENT

    logged = _log_after(shared_plugin, send)
    _assert_clean(logged)
    events = _audit_events(logged)
    assert len(events) == requests and len(logged.splitlines()) == requests, logged[:2000]
    assert len(logged.encode()) <= requests * MAX_BYTES_PER_BAD_REQUEST
    assert all(str(e["key_id"]).startswith("\\u202ekkk") and str(e["uid"]).startswith("evil\\n") for e in events)


def test_a_malformed_protobuf_is_one_bounded_audit_line(shared_plugin: Plugin) -> None:
    frame = b"\xff\xff\xff\xff"  # field 31, wire type 7: no such wire type
    channel = grpc.insecure_channel(f"unix:{shared_plugin.layout.kms_socket}")
    raw = channel.unary_unary("/v2.KeyManagementService/Decrypt")  # bytes in, bytes out

    def send() -> None:
        assert _refused(lambda: raw(frame, timeout=3)) is grpc.StatusCode.INVALID_ARGUMENT

    try:
        logged = _log_after(shared_plugin, send)
    finally:
        channel.close()
    _assert_clean(logged)
    assert len(logged.splitlines()) == 1 and len(logged.encode()) <= MAX_BYTES_PER_BAD_REQUEST, logged[:2000]
    assert [(e["method"], e["code"]) for e in _audit_events(logged)] == [("Decrypt", "INVALID_ARGUMENT")]


def test_a_call_cancelled_by_its_caller_is_not_audited_as_ok(plugin: Plugin) -> None:
    """The caller gives up while the broker holds its Encrypt (stopped): audit and metrics say CANCELLED."""
    with frozen_broker(plugin):
        call = plugin.stub.Encrypt.future(api_pb2.EncryptRequest(plaintext=os.urandom(32), uid="test"), timeout=10)
        time.sleep(1.0)  # the frontend has sent it to the broker and waits
        assert call.cancel()
        time.sleep(0.5)
    text = eventually(plugin, lambda text: metric(text, "keysealer_requests_total", method="Encrypt",
                                                  code="CANCELLED") == 1)
    with pytest.raises(AssertionError, match="no keysealer_requests_total"):
        metric(text, "keysealer_requests_total", method="Encrypt", code="OK")
    events = _audit_events(plugin.log("frontend.log"))
    assert [(e["method"], e["code"], e["outcome"]) for e in events] == [("Encrypt", "CANCELLED", "error")]
