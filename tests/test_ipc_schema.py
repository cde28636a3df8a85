"""Unit tests for keysealer.shared.ipc_schema: the only messages that cross the frontend/broker boundary.

Round trips of every request and reply, then strictness: every malformed frame is refused with SchemaError
(never another exception), and SchemaError carries the request id and operation when the frame named
them, because the broker answers with them.
"""

from __future__ import annotations

import os
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keysealer.shared import ciphertext
from keysealer.shared.broker_stats import LATENCY_BUCKETS, BrokerStats, Histogram, TokenOperation, TokenStats
from keysealer.shared.errors import ErrorCode
from keysealer.shared.ipc_schema import (
    MAX_COUNT,
    MAX_ERROR_NAMES,
    MAX_KEY_ID_LEN,
    MAX_KEY_IDS_REPORTED,
    MAX_LATENCY_SERIES,
    MAX_MESSAGE_LEN,
    MAX_PLAINTEXT,
    MAX_REPLY_FRAME,
    MAX_REQUEST_FRAME,
    MAX_REQUEST_ID,
    MAX_TTL_MS,
    MAX_WORKERS_REPORTED,
    SCHEMA_VERSION,
    ErrorReply,
    HealthRequest,
    HealthResult,
    Op,
    SchemaError,
    UnwrapRequest,
    UnwrapResult,
    WorkerHealth,
    WrapRequest,
    WrapResult,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
    token_stats_from_wire,
    token_stats_to_wire,
)

KEY_ID = "ks1-" + "0123456789abcdef" * 2
CT = bytes(range(ciphertext.MIN_LEN))
REQUEST_TYPES = (WrapRequest, UnwrapRequest, HealthRequest)
BUCKETS = len(LATENCY_BUCKETS) + 1  # with +Inf
NO_STATS = BrokerStats()
NO_STATS_WIRE = {"lat": [], "err": [], "relogin": 0, "reinit": 0, "session": 0, "busy": 0, "idle": 0, "busy_us": 0}
REPLY_TYPES = (WrapResult, UnwrapResult, HealthResult, ErrorReply)


def pack(message: Any) -> bytes:
    frame: bytes = msgpack.packb(message, use_bin_type=True)
    return frame


def base_request(op: Op, request_id: int = 42) -> dict[str, Any]:
    """A valid request frame's map, as the frontend would send it."""
    message: dict[str, Any] = {"v": SCHEMA_VERSION, "id": request_id, "op": op.value, "ttl": 1000}
    if op is Op.WRAP:
        message["pt"] = b"\x01" * 32
    elif op is Op.UNWRAP:
        message.update(ct=CT, kid=KEY_ID)
    return message


def base_result(op: Op, reply_id: int = 42) -> dict[str, Any]:
    """A valid success reply's map, as the broker would send it."""
    message: dict[str, Any] = {"v": SCHEMA_VERSION, "id": reply_id, "op": op.value, "ok": True}
    if op is Op.WRAP:
        message.update(ct=CT, kid=KEY_ID)
    elif op is Op.UNWRAP:
        message["pt"] = b"\x01" * 32
    else:
        message.update(kid=KEY_ID, kids=[KEY_ID], workers=[["ready", ""]], stats=NO_STATS_WIRE)
    return message


def base_error(op: Op = Op.WRAP, reply_id: int = 42) -> dict[str, Any]:
    return {"v": SCHEMA_VERSION, "id": reply_id, "op": op.value, "ok": False, "err": "busy", "msg": "queue full"}


def refused_request(message: dict[str, Any]) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        decode_request(pack(message))
    return info.value


def refused_reply(message: dict[str, Any]) -> SchemaError:
    with pytest.raises(SchemaError) as info:
        decode_reply(pack(message))
    return info.value


# --- round trips -------------------------------------------------------------------------------------

REQUESTS = [
    WrapRequest(id=1, ttl_ms=2500, plaintext=os.urandom(32)),
    WrapRequest(id=0, ttl_ms=1, plaintext=b"\x00"),
    WrapRequest(id=MAX_REQUEST_ID, ttl_ms=MAX_TTL_MS, plaintext=b"\xff" * MAX_PLAINTEXT),
    UnwrapRequest(id=7, ttl_ms=1000, ciphertext=CT, key_id=KEY_ID),
    UnwrapRequest(id=8, ttl_ms=MAX_TTL_MS, ciphertext=b"\xaa" * ciphertext.MAX_LEN, key_id="k" * MAX_KEY_ID_LEN),
    UnwrapRequest(id=9, ttl_ms=1, ciphertext=CT, key_id="k"),
    HealthRequest(id=3, ttl_ms=500),
    HealthRequest(id=MAX_REQUEST_ID, ttl_ms=MAX_TTL_MS),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_request_round_trip(request_: WrapRequest | UnwrapRequest | HealthRequest) -> None:
    frame = encode_request(request_)
    assert len(frame) <= MAX_REQUEST_FRAME
    decoded = decode_request(frame)
    assert type(decoded) is type(request_)
    assert decoded == request_


def test_every_request_type_names_its_operation() -> None:
    assert WrapRequest(1, 1, b"x").op is Op.WRAP
    assert UnwrapRequest(1, 1, CT, KEY_ID).op is Op.UNWRAP
    assert HealthRequest(1, 1).op is Op.HEALTH


def test_encoded_request_is_the_documented_map() -> None:
    frame = encode_request(UnwrapRequest(id=5, ttl_ms=900, ciphertext=CT, key_id=KEY_ID))
    assert msgpack.unpackb(frame, raw=False) == {
        "v": SCHEMA_VERSION, "id": 5, "op": "unwrap", "ttl": 900, "ct": CT, "kid": KEY_ID,
    }


def some_token_stats() -> TokenStats:
    stats = TokenStats(relogins=2, reinitializations=1, session_replacements=3)
    for seconds in (0.0001, 0.003, 7.0):
        stats.observe(TokenOperation.WRAP, "aes-gcm", seconds)
    stats.observe(TokenOperation.UNWRAP, "rsa-oaep-sha1", 0.02)
    stats.observe(TokenOperation.LOGIN, "none", 0.2)
    stats.count_error("CKR_DEVICE_ERROR")
    stats.count_error("other")
    return stats


REPLIES: list[tuple[WrapResult | UnwrapResult | HealthResult | ErrorReply, Op]] = [
    (WrapResult(id=1, ciphertext=CT, key_id=KEY_ID), Op.WRAP),
    (WrapResult(id=MAX_REQUEST_ID, ciphertext=b"\x01" * ciphertext.MAX_LEN, key_id="k" * MAX_KEY_ID_LEN), Op.WRAP),
    (UnwrapResult(id=2, plaintext=os.urandom(32)), Op.UNWRAP),
    (UnwrapResult(id=0, plaintext=b"\x00" * MAX_PLAINTEXT), Op.UNWRAP),
    (HealthResult(id=3, current_key_id=KEY_ID, key_ids=(KEY_ID, "ks1-" + "f" * 32),
                  workers=(WorkerHealth("ready", ""), WorkerHealth("failed", "token not reachable")),
                  stats=BrokerStats(some_token_stats(), busy_workers=1, idle_workers=0, busy_us=12_345)), Op.HEALTH),
    (HealthResult(id=4, current_key_id="", key_ids=(), workers=(), stats=NO_STATS), Op.HEALTH),
    (HealthResult(id=5, current_key_id="", key_ids=(), workers=(WorkerHealth("starting", "logging in"),),
                  stats=NO_STATS), Op.HEALTH),
]
REPLIES += [(ErrorReply(id=10 + i, code=code, message=f"because {code}"), op)
            for i, code in enumerate(ErrorCode) for op in Op]


@pytest.mark.parametrize(("reply", "op"), REPLIES, ids=lambda x: type(x).__name__ if not isinstance(x, Op) else x)
def test_reply_round_trip(reply: WrapResult | UnwrapResult | HealthResult | ErrorReply, op: Op) -> None:
    frame = encode_reply(reply, op)
    assert len(frame) <= MAX_REPLY_FRAME
    decoded = decode_reply(frame)
    assert type(decoded) is type(reply)
    assert decoded == reply


def test_error_reply_message_is_cut_to_the_limit() -> None:
    decoded = decode_reply(encode_reply(ErrorReply(1, ErrorCode.INTERNAL, "x" * (MAX_MESSAGE_LEN + 50)), Op.WRAP))
    assert decoded == ErrorReply(1, ErrorCode.INTERNAL, "x" * MAX_MESSAGE_LEN)


def test_error_reply_with_an_unknown_code_becomes_internal() -> None:
    message = base_error()
    message["err"] = "no_such_code"
    assert decode_reply(pack(message)) == ErrorReply(42, ErrorCode.INTERNAL, "queue full")


def test_health_result_with_many_keys_round_trips() -> None:
    key_ids = tuple(f"ks1-{i:032x}" for i in range(64))
    reply = HealthResult(1, key_ids[-1], key_ids, (WorkerHealth("ready", ""),) * 8, NO_STATS)
    assert decode_reply(encode_reply(reply, Op.HEALTH)) == reply


def full_stats() -> BrokerStats:
    """Every series and error name the schema allows, with the largest numbers."""
    most = Histogram([MAX_COUNT] * BUCKETS, MAX_COUNT)
    latency = {(TokenOperation.WRAP, f"m{i:015d}"): most for i in range(MAX_LATENCY_SERIES)}
    errors = {f"CKR_{i:040d}": MAX_COUNT for i in range(MAX_ERROR_NAMES)}
    return BrokerStats(TokenStats(latency, errors, MAX_COUNT, MAX_COUNT, MAX_COUNT), MAX_WORKERS_REPORTED, 0,
                       MAX_COUNT)


def test_health_result_at_the_schema_limits_round_trips() -> None:
    # A token with every reportable key and every worker failing with a long reason, and the largest
    # measurements: the report still fits.
    key_ids = tuple(f"ks1-{i:032x}" for i in range(MAX_KEY_IDS_REPORTED))
    workers = (WorkerHealth("failed", "r" * MAX_MESSAGE_LEN),) * MAX_WORKERS_REPORTED
    reply = HealthResult(1, "k" * MAX_KEY_ID_LEN, key_ids, workers, full_stats())
    frame = encode_reply(reply, Op.HEALTH)
    assert MAX_REQUEST_FRAME < len(frame) <= MAX_REPLY_FRAME
    assert decode_reply(frame) == reply


def test_health_result_beyond_the_limits_is_cut_on_encode() -> None:
    key_ids = tuple(f"ks1-{i:032x}" for i in range(MAX_KEY_IDS_REPORTED + 10))
    workers = tuple(WorkerHealth("ready", f"w{i}") for i in range(MAX_WORKERS_REPORTED + 3))
    decoded = decode_reply(encode_reply(HealthResult(1, key_ids[0], key_ids, workers, NO_STATS), Op.HEALTH))
    assert decoded == HealthResult(1, key_ids[0], key_ids[:MAX_KEY_IDS_REPORTED], workers[:MAX_WORKERS_REPORTED],
                                   NO_STATS)


def test_health_result_decode_refuses_more_than_the_limits() -> None:
    too_many_keys = [f"ks1-{i:032x}" for i in range(MAX_KEY_IDS_REPORTED + 1)]
    refused_reply({**base_result(Op.HEALTH), "kids": too_many_keys})
    refused_reply({**base_result(Op.HEALTH), "workers": [["ready", ""]] * (MAX_WORKERS_REPORTED + 1)})


def test_encode_refuses_a_frame_over_the_limit() -> None:
    with pytest.raises(SchemaError, match="exceeds"):
        encode_request(WrapRequest(id=1, ttl_ms=1, plaintext=b"x" * (MAX_REQUEST_FRAME + 1)))
    with pytest.raises(SchemaError, match="exceeds"):
        encode_reply(UnwrapResult(id=1, plaintext=b"x" * (MAX_REPLY_FRAME + 1)), Op.UNWRAP)


# --- strictness: field sets ---------------------------------------------------------------------------

@pytest.mark.parametrize("op", list(Op))
def test_request_with_unknown_field_is_refused(op: Op) -> None:
    error = refused_request({**base_request(op), "extra": 1})
    assert "unknown field" in str(error)
    assert "extra" in str(error)
    assert error.request_id == 42
    assert error.op is op


def test_request_with_a_reply_field_is_refused() -> None:
    # "ok" belongs to replies; a request carrying it is not a request.
    assert "unknown field" in str(refused_request({**base_request(Op.HEALTH), "ok": True}))


def test_request_with_a_non_string_key_is_refused() -> None:
    message: dict[Any, Any] = {**base_request(Op.HEALTH), b"ttl2": 1}
    with pytest.raises(SchemaError):
        decode_request(pack(message))


@pytest.mark.parametrize(("op", "field"), [(op, f) for op in Op for f in base_request(op)])
def test_request_with_missing_field_is_refused(op: Op, field: str) -> None:
    message = base_request(op)
    del message[field]
    error = refused_request(message)
    if field != "id":
        assert error.request_id == 42
    if field not in ("v", "id", "op"):
        assert "missing field" in str(error)
        assert error.op is op


@pytest.mark.parametrize("op", list(Op))
def test_reply_with_unknown_field_is_refused(op: Op) -> None:
    assert "unknown field" in str(refused_reply({**base_result(op), "extra": 1}))
    assert "unknown field" in str(refused_reply({**base_error(op), "extra": 1}))


@pytest.mark.parametrize(("op", "field"), [(op, f) for op in Op for f in base_result(op)])
def test_result_with_missing_field_is_refused(op: Op, field: str) -> None:
    message = base_result(op)
    del message[field]
    refused_reply(message)


@pytest.mark.parametrize("field", ["err", "msg"])
def test_error_reply_with_missing_field_is_refused(field: str) -> None:
    message = base_error()
    del message[field]
    assert "missing field" in str(refused_reply(message))


def test_request_is_not_a_reply_and_a_reply_is_not_a_request() -> None:
    with pytest.raises(SchemaError):
        decode_reply(pack(base_request(Op.WRAP)))
    with pytest.raises(SchemaError):
        decode_request(pack(base_result(Op.WRAP)))


# --- strictness: types ---------------------------------------------------------------------------------

WRONG_TYPES = [
    # (op, field, wrong value)
    *[(op, field, value) for op in Op for field in ("v", "id", "ttl") for value in (True, False, 1.0, "1", b"1", None)],
    (Op.WRAP, "pt", "x" * 32),  # str for bytes
    (Op.WRAP, "pt", [1, 2, 3]),
    (Op.WRAP, "pt", None),
    (Op.UNWRAP, "ct", CT.decode("latin-1")),  # str for bytes
    (Op.UNWRAP, "kid", KEY_ID.encode()),  # bytes for str
    (Op.UNWRAP, "kid", 7),
    (Op.WRAP, "op", b"wrap"),
    (Op.WRAP, "op", 1),
]


@pytest.mark.parametrize(("op", "field", "value"), WRONG_TYPES, ids=repr)
def test_request_field_of_wrong_type_is_refused(op: Op, field: str, value: Any) -> None:
    message = {**base_request(op), field: value}
    error = refused_request(message)
    assert f"field {field!r} must be" in str(error)


def test_bool_does_not_pass_for_an_int_even_when_equal() -> None:
    # True == 1 in Python; the schema must still refuse it as a version, id or ttl.
    error = refused_request({**base_request(Op.HEALTH), "ttl": True})
    assert "must be int" in str(error)
    assert error.request_id == 42


def test_int_does_not_pass_for_a_bool_in_replies() -> None:
    assert "must be bool" in str(refused_reply({**base_result(Op.UNWRAP), "ok": 1}))


@pytest.mark.parametrize("kids", [[b"ks1"], [1], [""], ["k" * (MAX_KEY_ID_LEN + 1)], [None], [[KEY_ID]]], ids=repr)
def test_health_result_with_bad_key_ids_is_refused(kids: list[Any]) -> None:
    assert "kids" in str(refused_reply({**base_result(Op.HEALTH), "kids": kids}))


@pytest.mark.parametrize(
    "workers",
    [[["ready"]], [["ready", "", ""]], [[b"ready", ""]], [["ready", 1]], ["ready"], [None], [{"state": "ready"}]],
    ids=repr,
)
def test_health_result_with_bad_workers_is_refused(workers: list[Any]) -> None:
    assert "workers" in str(refused_reply({**base_result(Op.HEALTH), "workers": workers}))


def test_health_result_with_too_many_workers_is_refused() -> None:
    refused_reply({**base_result(Op.HEALTH), "workers": [["ready", ""]] * 65})


# --- the broker's measurements (stats) ----------------------------------------------------------------

def series(op: str = "wrap", mechanism: str = "aes-gcm", counts: Any = None, sum_us: Any = 0) -> list[Any]:
    return [op, mechanism, [0] * BUCKETS if counts is None else counts, sum_us]


def test_histogram_buckets_hold_values_up_to_their_bound() -> None:
    histogram = Histogram()
    for seconds in (LATENCY_BUCKETS[0], LATENCY_BUCKETS[0] * 1.01, LATENCY_BUCKETS[-1] * 2):
        histogram.observe(seconds)
    assert histogram.counts == [1, 1] + [0] * (BUCKETS - 3) + [1]  # the last one only in +Inf
    assert histogram.sum_us == round((LATENCY_BUCKETS[0] * 2.01 + LATENCY_BUCKETS[-1] * 2) * 1e6)


def test_tallies_add_up_series_by_series() -> None:
    total = some_token_stats()
    total.add(some_token_stats())
    total.add(TokenStats())
    assert total.latency[TokenOperation.WRAP, "aes-gcm"].counts[-1] == 2  # 7 s, twice
    assert sum(total.latency[TokenOperation.WRAP, "aes-gcm"].counts) == 6
    assert total.errors == {"CKR_DEVICE_ERROR": 2, "other": 2}
    assert (total.relogins, total.reinitializations, total.session_replacements) == (4, 2, 6)
    assert not TokenStats() and total


def test_a_worker_tally_round_trips_and_carries_no_worker_activity() -> None:
    stats = some_token_stats()
    assert token_stats_from_wire(pack_and_unpack(token_stats_to_wire(stats))) == stats
    with pytest.raises(SchemaError, match="unknown field 'busy'"):
        token_stats_from_wire({**token_stats_to_wire(stats), "busy": 1})


def pack_and_unpack(value: Any) -> Any:
    return msgpack.unpackb(pack(value), raw=False)


def test_stats_beyond_the_limits_are_cut_on_encode() -> None:
    latency = {(TokenOperation.UNWRAP, f"m{i}"): Histogram() for i in range(MAX_LATENCY_SERIES + 5)}
    errors = {f"CKR_{i}": 1 for i in range(MAX_ERROR_NAMES + 5)}
    reply = HealthResult(1, "", (), (), BrokerStats(TokenStats(latency, errors)))
    decoded = decode_reply(encode_reply(reply, Op.HEALTH))
    assert isinstance(decoded, HealthResult)
    assert len(decoded.stats.token.latency) == MAX_LATENCY_SERIES
    assert len(decoded.stats.token.errors) == MAX_ERROR_NAMES


BAD_STATS = [
    # (what is wrong, the stats map)
    ("not a map", [["wrap"]]),
    ("unknown field", {**NO_STATS_WIRE, "extra": 1}),
    ("unknown field (free text)", {**NO_STATS_WIRE, "CKR_DEVICE_ERROR": 1}),
    *[(f"missing {name}", {k: v for k, v in NO_STATS_WIRE.items() if k != name}) for name in NO_STATS_WIRE],
    ("too many series", {**NO_STATS_WIRE, "lat": [series(mechanism=f"m{i}") for i in range(MAX_LATENCY_SERIES + 1)]}),
    ("too many errors", {**NO_STATS_WIRE, "err": [[f"CKR_{i}", 1] for i in range(MAX_ERROR_NAMES + 1)]}),
    ("unknown operation", {**NO_STATS_WIRE, "lat": [series(op="encrypt")]}),
    ("operation as bytes", {**NO_STATS_WIRE, "lat": [series(op=b"wrap")]}),
    ("free-text mechanism", {**NO_STATS_WIRE, "lat": [series(mechanism="AES GCM")]}),
    ("long mechanism", {**NO_STATS_WIRE, "lat": [series(mechanism="m" * 17)]}),
    ("empty mechanism", {**NO_STATS_WIRE, "lat": [series(mechanism="")]}),
    ("a bucket short", {**NO_STATS_WIRE, "lat": [series(counts=[0] * (BUCKETS - 1))]}),
    ("a bucket over", {**NO_STATS_WIRE, "lat": [series(counts=[0] * (BUCKETS + 1))]}),
    ("negative count", {**NO_STATS_WIRE, "lat": [series(counts=[-1] + [0] * (BUCKETS - 1))]}),
    ("bool count", {**NO_STATS_WIRE, "lat": [series(counts=[True] + [0] * (BUCKETS - 1))]}),
    ("float sum", {**NO_STATS_WIRE, "lat": [series(sum_us=1.5)]}),
    ("count over the limit", {**NO_STATS_WIRE, "lat": [series(sum_us=MAX_COUNT + 1)]}),
    ("series of 3", {**NO_STATS_WIRE, "lat": [series()[:3]]}),
    ("same series twice", {**NO_STATS_WIRE, "lat": [series(), series()]}),
    ("error as free text", {**NO_STATS_WIRE, "err": [["token went away", 1]]}),
    ("lowercase CKR name", {**NO_STATS_WIRE, "err": [["ckr_device_error", 1]]}),
    ("bare CKR_", {**NO_STATS_WIRE, "err": [["CKR_", 1]]}),
    ("long CKR name", {**NO_STATS_WIRE, "err": [["CKR_" + "X" * 41, 1]]}),
    ("negative error count", {**NO_STATS_WIRE, "err": [["CKR_DEVICE_ERROR", -1]]}),
    ("same error twice", {**NO_STATS_WIRE, "err": [["other", 1], ["other", 2]]}),
    ("error as a map", {**NO_STATS_WIRE, "err": [{"CKR_DEVICE_ERROR": 1}]}),
    ("negative counter", {**NO_STATS_WIRE, "relogin": -1}),
    ("bool counter", {**NO_STATS_WIRE, "reinit": True}),
    ("more busy workers than reportable", {**NO_STATS_WIRE, "busy": MAX_WORKERS_REPORTED + 1}),
    ("float busy time", {**NO_STATS_WIRE, "busy_us": 0.5}),
]


@pytest.mark.parametrize(("case", "stats"), BAD_STATS, ids=[case for case, _ in BAD_STATS])
def test_health_result_with_bad_stats_is_refused(case: str, stats: Any) -> None:
    assert "stats" in str(refused_reply({**base_result(Op.HEALTH), "stats": stats})), case


# --- strictness: sizes ---------------------------------------------------------------------------------

OUT_OF_RANGE = [
    (Op.WRAP, "pt", b""),
    (Op.WRAP, "pt", b"x" * (MAX_PLAINTEXT + 1)),
    (Op.UNWRAP, "ct", b"x" * (ciphertext.MIN_LEN - 1)),
    (Op.UNWRAP, "ct", b""),
    (Op.UNWRAP, "ct", b"x" * (ciphertext.MAX_LEN + 1)),
    (Op.UNWRAP, "kid", ""),
    (Op.UNWRAP, "kid", "k" * (MAX_KEY_ID_LEN + 1)),
    *[(op, "ttl", value) for op in Op for value in (0, -1, MAX_TTL_MS + 1)],
]


@pytest.mark.parametrize(("op", "field", "value"), OUT_OF_RANGE,
                         ids=lambda x: repr(x)[:20] if isinstance(x, bytes | str) else repr(x))
def test_request_field_out_of_range_is_refused(op: Op, field: str, value: Any) -> None:
    error = refused_request({**base_request(op), field: value})
    assert str(error) == f"field {field!r} out of range"
    assert error.request_id == 42
    assert error.op is op


@pytest.mark.parametrize("bad_id", [-1, -(2**63), MAX_REQUEST_ID + 1, 2**64 - 1])
def test_request_id_out_of_range_is_refused_without_an_id(bad_id: int) -> None:
    error = refused_request({**base_request(Op.WRAP), "id": bad_id})
    assert "'id'" in str(error)
    assert error.request_id is None


@pytest.mark.parametrize(("field", "value"), [("ct", b"x" * (ciphertext.MIN_LEN - 1)),
                                              ("ct", b"x" * (ciphertext.MAX_LEN + 1)),
                                              ("kid", ""), ("kid", "k" * (MAX_KEY_ID_LEN + 1))])
def test_wrap_result_out_of_range_is_refused(field: str, value: Any) -> None:
    assert "out of range" in str(refused_reply({**base_result(Op.WRAP), field: value}))


@pytest.mark.parametrize("value", [b"", b"x" * (MAX_PLAINTEXT + 1)])
def test_unwrap_result_out_of_range_is_refused(value: bytes) -> None:
    assert "out of range" in str(refused_reply({**base_result(Op.UNWRAP), "pt": value}))


def test_error_reply_message_over_the_limit_is_refused() -> None:
    refused_reply({**base_error(), "msg": "m" * (MAX_MESSAGE_LEN + 1)})
    refused_reply({**base_error(), "err": ""})


# --- strictness: envelope, framing ----------------------------------------------------------------------

@pytest.mark.parametrize("version", [0, 2, SCHEMA_VERSION + 100, -1])
def test_wrong_schema_version_is_refused(version: int) -> None:
    error = refused_request({**base_request(Op.WRAP), "v": version})
    assert "'v'" in str(error)
    assert error.request_id == 42
    assert error.op is None
    refused_reply({**base_result(Op.WRAP), "v": version})


@pytest.mark.parametrize("op", ["rewrap", "WRAP", "", "x" * 17, "encrypt"])
def test_unknown_op_is_refused(op: str) -> None:
    error = refused_request({**base_request(Op.WRAP), "op": op})
    assert error.request_id == 42
    assert error.op is None
    refused_reply({**base_result(Op.WRAP), "op": op})


def test_request_frame_over_its_limit_is_refused_before_unpacking() -> None:
    # Requests come from the less trusted side: a well-formed map that is simply too large.
    big = pack({**base_request(Op.WRAP), "pt": b"x" * MAX_REQUEST_FRAME})
    assert MAX_REQUEST_FRAME < len(big) < MAX_REPLY_FRAME
    with pytest.raises(SchemaError, match="exceeds"):
        decode_request(big)
    with pytest.raises(SchemaError, match="exceeds"):
        decode_request(b"\x00" * (MAX_REQUEST_FRAME + 1))
    # The same frame is under the reply limit: refused for its content, not its size.
    with pytest.raises(SchemaError) as info:
        decode_reply(big)
    assert "exceeds" not in str(info.value)


def test_reply_frame_over_its_limit_is_refused_before_unpacking() -> None:
    big = pack({**base_result(Op.UNWRAP), "pt": b"x" * MAX_REPLY_FRAME})
    assert len(big) > MAX_REPLY_FRAME
    with pytest.raises(SchemaError, match="exceeds"):
        decode_reply(big)
    with pytest.raises(SchemaError, match="exceeds"):
        decode_reply(b"\x00" * (MAX_REPLY_FRAME + 1))


def frame_of_exactly(limit: int, message: dict[str, Any]) -> bytes:
    """message plus an unknown padding field, packed to exactly limit bytes."""
    room = limit - len(pack({**message, "x": ""}))
    frames = [pack({**message, "x": "p" * size}) for size in range(room - 4, room + 1)]
    return next(f for f in frames if len(f) == limit)


def test_frame_of_exactly_the_limit_passes_the_size_check() -> None:
    # Got past the size check: refused for the padding field instead.
    with pytest.raises(SchemaError, match="unknown field"):
        decode_request(frame_of_exactly(MAX_REQUEST_FRAME, base_request(Op.HEALTH)))
    with pytest.raises(SchemaError, match="unknown field"):
        decode_reply(frame_of_exactly(MAX_REPLY_FRAME, base_result(Op.UNWRAP)))


GARBAGE = [
    b"",
    b"\xc1",  # a msgpack byte that is never used
    b"\xff" * 16,
    b"\x85\xa1v",  # a map announced, then cut short
    pack(base_request(Op.WRAP))[:-1],  # truncated
    pack(base_request(Op.WRAP)) + b"\x00",  # trailing data
    pack(base_request(Op.WRAP)) * 2,
    b"\xd4\x01\x00",  # an ext type
    b"\xd6\xff\x00\x00\x00\x00",  # a msgpack timestamp
    b"hello world",
    os.urandom(64),
]


@pytest.mark.parametrize("frame", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_is_refused(frame: bytes) -> None:
    for decode in (decode_request, decode_reply):
        with pytest.raises(SchemaError) as info:
            decode(frame)
        assert info.value.request_id is None
        assert info.value.op is None


@pytest.mark.parametrize("obj", [[1, 2], 1, "wrap", b"wrap", None, True, 1.5, [base_request(Op.WRAP)]], ids=repr)
def test_msgpack_non_map_is_refused(obj: Any) -> None:
    for decode in (decode_request, decode_reply):
        with pytest.raises(SchemaError, match="not a map"):
            decode(pack(obj))


def test_map_with_non_string_keys_is_refused() -> None:
    for decode in (decode_request, decode_reply):
        with pytest.raises(SchemaError):
            decode(pack({1: 2}))
        with pytest.raises(SchemaError):
            decode(pack({"v": 1, "id": 1, "op": "health", "ttl": 1, "nested": {(1, 2): 3}}))


# --- SchemaError names the request when it can ------------------------------------------------------------

def test_schema_error_names_request_and_op_for_a_bad_body() -> None:
    error = refused_request({**base_request(Op.UNWRAP, request_id=9001), "kid": ""})
    assert error.request_id == 9001
    assert error.op is Op.UNWRAP


def test_schema_error_names_request_even_when_op_is_missing() -> None:
    message = base_request(Op.UNWRAP, request_id=77)
    del message["op"]
    error = refused_request(message)
    assert error.request_id == 77
    assert error.op is None


@pytest.mark.parametrize("bad_id", [True, "42", 42.0, None, b"\x2a"], ids=repr)
def test_schema_error_has_no_request_id_when_the_id_is_not_an_int(bad_id: Any) -> None:
    error = refused_request({**base_request(Op.WRAP), "id": bad_id, "pt": b""})
    assert error.request_id is None


def test_schema_error_names_reply_id() -> None:
    error = refused_reply({**base_result(Op.WRAP, reply_id=123), "kid": ""})
    assert error.request_id == 123


def test_schema_error_is_a_value_error() -> None:
    # Callers that catch ValueError (e.g. around msgpack) must not miss it, and it keeps its message.
    error = SchemaError("boom", 1, Op.WRAP)
    assert isinstance(error, ValueError)
    assert (str(error), error.request_id, error.op) == ("boom", 1, Op.WRAP)
    assert (SchemaError("x").request_id, SchemaError("x").op) == (None, None)


# --- properties -------------------------------------------------------------------------------------------

FIELD_NAMES = ["v", "id", "op", "ttl", "pt", "ct", "kid", "ok", "err", "msg", "kids", "workers", "stats"]
leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.binary(max_size=24)
    | st.text(max_size=24)
)
keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=8) | st.binary(max_size=4) | st.integers(-5, 5)
structures = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=6),
    max_leaves=12,
)
# Per field: values just out of range or of a near-miss type.
WRONG_VALUES: dict[str, list[Any]] = {
    "v": [0, SCHEMA_VERSION + 1, True, 1.0, "1"],
    "id": [-1, MAX_REQUEST_ID + 1, True, "1", None],
    "op": ["", "x" * 17, "rewrap", b"wrap", 1],
    "ttl": [0, -1, MAX_TTL_MS + 1, True, 1.0],
    "pt": [b"", b"x" * (MAX_PLAINTEXT + 1), "x"],
    "ct": [b"x" * (ciphertext.MIN_LEN - 1), b"x" * (ciphertext.MAX_LEN + 1), "x" * ciphertext.MIN_LEN],
    "kid": ["", "k" * (MAX_KEY_ID_LEN + 1), b"k"],
    "ok": [1, 0, None, "true"],
    "err": ["", "e" * 33, 1],
    "msg": ["m" * (MAX_MESSAGE_LEN + 1), b"m"],
    "kids": [[1], [""], [b"k"], ["k" * (MAX_KEY_ID_LEN + 1)], "kids", [[KEY_ID]]],
    "workers": [[["ready"]], [[1, "x"]], [["ready", b""]], ["ready"], [None], [["a", "b", "c"]]],
    "stats": [stats for _, stats in BAD_STATS],
}


token_stats = st.builds(
    TokenStats,
    st.dictionaries(st.tuples(st.sampled_from(TokenOperation), st.from_regex(r"[a-z0-9-]{1,16}", fullmatch=True)),
                    st.builds(Histogram, st.lists(st.integers(0, MAX_COUNT), min_size=BUCKETS, max_size=BUCKETS),
                              st.integers(0, MAX_COUNT)), max_size=3),
    st.dictionaries(st.from_regex(r"CKR_[A-Z0-9_]{1,40}|other", fullmatch=True), st.integers(0, MAX_COUNT),
                    max_size=3),
    st.integers(0, MAX_COUNT), st.integers(0, MAX_COUNT), st.integers(0, MAX_COUNT),
)


@st.composite
def near_frames(draw: st.DrawFn) -> dict[Any, Any]:
    """A valid request, result or error map with random valid contents; then, most of the time, up to three
    mutations (mostly replacing a value with a near miss), so every check past the envelope is reached."""
    kind, op = draw(st.sampled_from(["request", "result", "error"])), draw(st.sampled_from(list(Op)))
    message: dict[Any, Any] = {"request": base_request, "result": base_result, "error": base_error}[kind](
        op, draw(st.integers(0, MAX_REQUEST_ID)))
    valid = {
        "ttl": st.integers(1, MAX_TTL_MS),
        "pt": st.binary(min_size=1, max_size=MAX_PLAINTEXT),
        "ct": st.binary(min_size=ciphertext.MIN_LEN, max_size=ciphertext.MIN_LEN + 32),
        "kid": st.text(min_size=1, max_size=MAX_KEY_ID_LEN),
        "kids": st.lists(st.text(min_size=1, max_size=MAX_KEY_ID_LEN), max_size=3),
        "workers": st.lists(st.lists(st.text(max_size=20), min_size=2, max_size=2), max_size=3),
        "err": st.sampled_from([c.value for c in ErrorCode]) | st.text(min_size=1, max_size=32),
        "msg": st.text(max_size=MAX_MESSAGE_LEN),
        "stats": st.builds(lambda stats: token_stats_to_wire(stats) | {"busy": 1, "idle": 0, "busy_us": 5},
                           token_stats),
    }
    for name, strategy in valid.items():
        if name in message:
            message[name] = draw(strategy)
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):
        mutation = draw(st.sampled_from(["drop", "add", "replace", "replace", "replace", "replace"]))
        if mutation == "add" or not message:
            message[draw(keys)] = draw(leaves)
            continue
        name = draw(st.sampled_from(sorted(message, key=repr)))
        if mutation == "drop":
            del message[name]
        elif draw(st.integers(0, 3)):
            message[name] = draw(st.sampled_from(WRONG_VALUES.get(name, [None])))
        else:
            message[name] = draw(structures)
    return message


PROPERTY = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Generating nested structures costs ~10 ms an example here; fewer of them keep the file at a few seconds.
PROPERTY_NESTED = settings(PROPERTY, max_examples=250)


def _reencode_reply(reply: WrapResult | UnwrapResult | HealthResult | ErrorReply) -> bytes:
    op = {WrapResult: Op.WRAP, UnwrapResult: Op.UNWRAP, HealthResult: Op.HEALTH}.get(type(reply), Op.WRAP)
    return encode_reply(reply, op)


def in_range(value: object, kind: type, low: int, high: int) -> bool:
    return type(value) is kind and low <= (value if isinstance(value, int) else len(value)) <= high  # type: ignore[arg-type]


def assert_valid_request(request: object) -> None:
    assert isinstance(request, REQUEST_TYPES)
    assert in_range(request.id, int, 0, MAX_REQUEST_ID)
    assert in_range(request.ttl_ms, int, 1, MAX_TTL_MS)
    if isinstance(request, WrapRequest):
        assert in_range(request.plaintext, bytes, 1, MAX_PLAINTEXT)
    if isinstance(request, UnwrapRequest):
        assert in_range(request.ciphertext, bytes, ciphertext.MIN_LEN, ciphertext.MAX_LEN)
        assert in_range(request.key_id, str, 1, MAX_KEY_ID_LEN)
    assert decode_request(encode_request(request)) == request


def assert_valid_reply(reply: object) -> None:
    assert isinstance(reply, REPLY_TYPES)
    assert in_range(reply.id, int, 0, MAX_REQUEST_ID)
    if isinstance(reply, WrapResult):
        assert in_range(reply.ciphertext, bytes, ciphertext.MIN_LEN, ciphertext.MAX_LEN)
        assert in_range(reply.key_id, str, 1, MAX_KEY_ID_LEN)
    elif isinstance(reply, UnwrapResult):
        assert in_range(reply.plaintext, bytes, 1, MAX_PLAINTEXT)
    elif isinstance(reply, HealthResult):
        assert in_range(reply.current_key_id, str, 0, MAX_KEY_ID_LEN)
        assert all(in_range(k, str, 1, MAX_KEY_ID_LEN) for k in reply.key_ids)
        assert all(type(w) is WorkerHealth and type(w.state) is str and type(w.reason) is str for w in reply.workers)
        assert len(reply.stats.token.latency) <= MAX_LATENCY_SERIES and len(reply.stats.token.errors) <= MAX_ERROR_NAMES
    else:
        assert type(reply.code) is ErrorCode
        assert in_range(reply.message, str, 0, MAX_MESSAGE_LEN)
    assert decode_reply(_reencode_reply(reply)) == reply


def assert_decodes_or_refuses(frame: bytes) -> None:
    """Either a valid object (in range, and encoding back to itself) or SchemaError; any other exception fails."""
    try:
        request = decode_request(frame)
    except SchemaError:
        pass
    else:
        assert_valid_request(request)
    try:
        reply = decode_reply(frame)
    except SchemaError:
        pass
    else:
        assert_valid_reply(reply)


@PROPERTY
@given(st.binary(max_size=MAX_REQUEST_FRAME + 8))
def test_decode_arbitrary_bytes_never_raises_anything_but_schema_error(frame: bytes) -> None:
    assert_decodes_or_refuses(frame)


@PROPERTY_NESTED
@given(structures)
def test_decode_arbitrary_msgpack_never_raises_anything_but_schema_error(obj: Any) -> None:
    assert_decodes_or_refuses(pack(obj))


@settings(PROPERTY, max_examples=300)
@given(near_frames())
def test_decode_near_valid_frames_never_raises_anything_but_schema_error(message: dict[Any, Any]) -> None:
    assert_decodes_or_refuses(pack(message))


request_strategy = st.one_of(
    st.builds(WrapRequest, st.integers(0, MAX_REQUEST_ID), st.integers(1, MAX_TTL_MS),
              st.binary(min_size=1, max_size=MAX_PLAINTEXT)),
    st.builds(UnwrapRequest, st.integers(0, MAX_REQUEST_ID), st.integers(1, MAX_TTL_MS),
              st.binary(min_size=ciphertext.MIN_LEN, max_size=ciphertext.MAX_LEN),
              st.text(min_size=1, max_size=MAX_KEY_ID_LEN)),
    st.builds(HealthRequest, st.integers(0, MAX_REQUEST_ID), st.integers(1, MAX_TTL_MS)),
)


@PROPERTY
@given(request_strategy)
def test_every_valid_request_round_trips(request_: WrapRequest | UnwrapRequest | HealthRequest) -> None:
    assert decode_request(encode_request(request_)) == request_


@PROPERTY
@given(token_stats)
def test_every_valid_tally_round_trips(stats: TokenStats) -> None:
    assert token_stats_from_wire(pack_and_unpack(token_stats_to_wire(stats))) == stats
