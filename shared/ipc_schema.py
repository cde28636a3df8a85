"""The frontend <-> broker IPC schema, version 1: the only messages that cross the process boundary.

Each ZeroMQ message is one msgpack map. Requests carry an id that the reply repeats, so many calls share
one connection. There are three operations and nothing else: wrap a seed, unwrap a ciphertext, report
health (with the broker's own measurements, broker_stats.py). Both ends decode with the same strict rules:
exact types, bounded sizes, unknown fields refused.
"""

import re
from collections.abc import Sized
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, cast

import msgpack

from keysealer.shared import ciphertext
from keysealer.shared.broker_stats import (
    LATENCY_BUCKETS,
    OTHER_ERROR,
    BrokerStats,
    Histogram,
    TokenOperation,
    TokenStats,
)
from keysealer.shared.errors import ErrorCode

SCHEMA_VERSION = 1
# Largest request the broker accepts; ZeroMQ drops a peer that sends more (ZMQ_MAXMSGSIZE). Requests come
# from the less trusted side, so their bound is tight.
MAX_REQUEST_FRAME = 4096
# Replies are bounded too, but must hold a health report listing every key.
MAX_REPLY_FRAME = 128 * 1024
MAX_KEY_IDS_REPORTED = 1024
# What CURVE adds to each message (RFC 26): the command name "\x07MESSAGE" (8), the nonce (8), the flags
# byte (1) and the box's authenticator (16).
CURVE_MESSAGE_OVERHEAD = 8 + 8 + 1 + 16
# The apiserver sends 32-byte seeds; anything far larger is not a seed.
MAX_PLAINTEXT = 256
MAX_KEY_ID_LEN = 64
MAX_MESSAGE_LEN = 200
MAX_TTL_MS = 60_000
MAX_REQUEST_ID = 2**63 - 1
MAX_WORKERS_REPORTED = 64
# The broker's measurements: latency series (wrap and unwrap under 5 mechanisms, login, find_keys: 12) and
# CKR names (about 100) are small fixed sets; the bounds only keep a faulty sender from growing the report.
MAX_LATENCY_SERIES = 32
MAX_ERROR_NAMES = 128
MAX_COUNT = 2**63 - 1
_MECHANISM_LABEL = re.compile(r"[a-z0-9-]{1,16}")
_ERROR_LABEL = re.compile(rf"CKR_[A-Z0-9_]{{1,40}}|{OTHER_ERROR}")
_OPERATIONS = frozenset(op.value for op in TokenOperation)


class Op(StrEnum):
    WRAP = "wrap"
    UNWRAP = "unwrap"
    HEALTH = "health"


class Endpoint(StrEnum):
    """The broker's two kinds of socket the frontend speaks to."""

    SUPERVISOR = "the broker's socket"
    WORKER = "a worker's socket"


# Where each operation may arrive (OpenSSH monitor style): wraps and unwraps go to a worker's own socket,
# health to the supervisor's. A request anywhere else is refused there, never served.
ARRIVES_AT: dict[Op, Endpoint] = {Op.WRAP: Endpoint.WORKER, Op.UNWRAP: Endpoint.WORKER,
                                  Op.HEALTH: Endpoint.SUPERVISOR}


class WorkerState(StrEnum):
    STARTING = "starting"  # opening the token, logging in
    READY = "ready"  # serving
    FAILED = "failed"  # cannot serve now, retrying
    FATAL = "fatal"  # about to exit for good (wrong PIN, bad PIN file): the broker stops


class SchemaError(ValueError):
    """A frame that does not follow the schema. request_id is set when the frame named one."""

    def __init__(self, message: str, request_id: int | None = None, op: "Op | None" = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.op = op


@dataclass(frozen=True, slots=True)
class WrapRequest:
    op: ClassVar[Op] = Op.WRAP
    id: int
    ttl_ms: int
    plaintext: bytes


@dataclass(frozen=True, slots=True)
class UnwrapRequest:
    op: ClassVar[Op] = Op.UNWRAP
    id: int
    ttl_ms: int
    ciphertext: bytes
    key_id: str


@dataclass(frozen=True, slots=True)
class HealthRequest:
    op: ClassVar[Op] = Op.HEALTH
    id: int
    ttl_ms: int


Request = WrapRequest | UnwrapRequest | HealthRequest


@dataclass(frozen=True, slots=True)
class WrapResult:
    op: ClassVar[Op] = Op.WRAP
    id: int
    ciphertext: bytes
    key_id: str


@dataclass(frozen=True, slots=True)
class UnwrapResult:
    op: ClassVar[Op] = Op.UNWRAP
    id: int
    plaintext: bytes


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    state: str  # "ready", "starting", "failed"
    reason: str  # short, never secret: shown in the apiserver's health output


@dataclass(frozen=True, slots=True)
class HealthResult:
    op: ClassVar[Op] = Op.HEALTH
    id: int
    current_key_id: str  # "" while no worker has found the current key
    key_ids: tuple[str, ...]
    workers: tuple[WorkerHealth, ...]
    stats: BrokerStats


@dataclass(frozen=True, slots=True)
class ErrorReply:
    id: int
    code: ErrorCode
    message: str


Reply = WrapResult | UnwrapResult | HealthResult | ErrorReply

# (type, smallest, largest): sizes for bytes/str/list, values for int.
_FieldSpec = tuple[type, int, int]
_ENVELOPE: dict[str, _FieldSpec] = {
    "v": (int, SCHEMA_VERSION, SCHEMA_VERSION),
    "id": (int, 0, MAX_REQUEST_ID),
    "op": (str, 1, 16),
}
_REQUEST_FIELDS: dict[Op, dict[str, _FieldSpec]] = {
    Op.WRAP: {"ttl": (int, 1, MAX_TTL_MS), "pt": (bytes, 1, MAX_PLAINTEXT)},
    Op.UNWRAP: {
        "ttl": (int, 1, MAX_TTL_MS),
        "ct": (bytes, ciphertext.MIN_LEN, ciphertext.MAX_LEN),
        "kid": (str, 1, MAX_KEY_ID_LEN),
    },
    Op.HEALTH: {"ttl": (int, 1, MAX_TTL_MS)},
}
_RESULT_FIELDS: dict[Op, dict[str, _FieldSpec]] = {
    Op.WRAP: {"ok": (bool, 1, 1), "ct": (bytes, ciphertext.MIN_LEN, ciphertext.MAX_LEN),
              "kid": (str, 1, MAX_KEY_ID_LEN)},
    Op.UNWRAP: {"ok": (bool, 1, 1), "pt": (bytes, 1, MAX_PLAINTEXT)},
    Op.HEALTH: {"ok": (bool, 1, 1), "kid": (str, 0, MAX_KEY_ID_LEN), "kids": (list, 0, MAX_KEY_IDS_REPORTED),
                "workers": (list, 0, MAX_WORKERS_REPORTED), "stats": (dict, 0, 16)},
}
# What a worker counted (also sent from worker to supervisor), and what the health reply adds to it.
_TOKEN_STATS_FIELDS: dict[str, _FieldSpec] = {
    "lat": (list, 0, MAX_LATENCY_SERIES),
    "err": (list, 0, MAX_ERROR_NAMES),
    "relogin": (int, 0, MAX_COUNT),
    "reinit": (int, 0, MAX_COUNT),
    "session": (int, 0, MAX_COUNT),
}
_BROKER_STATS_FIELDS: dict[str, _FieldSpec] = {
    **_TOKEN_STATS_FIELDS,
    "busy": (int, 0, MAX_WORKERS_REPORTED),
    "idle": (int, 0, MAX_WORKERS_REPORTED),
    "busy_us": (int, 0, MAX_COUNT),
}
_ERROR_FIELDS: dict[str, _FieldSpec] = {
    "ok": (bool, 0, 0),
    "err": (str, 1, 32),
    "msg": (str, 0, MAX_MESSAGE_LEN),
}


def _unpack(frame: bytes, limit: int) -> dict[str, Any]:
    if len(frame) > limit:
        raise SchemaError(f"frame of {len(frame)} bytes exceeds {limit}")
    try:
        obj = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            max_bin_len=limit,
            max_str_len=limit,
            max_array_len=MAX_KEY_IDS_REPORTED,
            max_map_len=16,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many types for malformed input; all mean the same here
        raise SchemaError("frame is not valid msgpack") from exc
    if not isinstance(obj, dict):
        raise SchemaError("frame is not a map")
    return obj


def _check(message: dict[str, Any], spec: dict[str, _FieldSpec], request_id: int | None) -> None:
    unknown = message.keys() - spec.keys()
    if unknown:
        raise SchemaError(f"unknown field {sorted(map(str, unknown))[0]!r}", request_id)
    for name, (kind, low, high) in spec.items():
        if name not in message:
            raise SchemaError(f"missing field {name!r}", request_id)
        value: Any = message[name]
        # `type is` rather than isinstance: a bool must not pass for an int.
        if type(value) is not kind:
            raise SchemaError(f"field {name!r} must be {kind.__name__}", request_id)
        size: int = value if isinstance(value, int) else len(cast(Sized, value))
        if not low <= size <= high:
            raise SchemaError(f"field {name!r} out of range", request_id)


def _open_envelope(frame: bytes, limit: int) -> tuple[dict[str, Any], Op, int]:
    message = _unpack(frame, limit)
    raw_id = message.get("id")
    request_id = raw_id if type(raw_id) is int and 0 <= raw_id <= MAX_REQUEST_ID else None
    _check({name: message[name] for name in _ENVELOPE if name in message}, _ENVELOPE, request_id)
    try:
        op = Op(message["op"])
    except ValueError:
        raise SchemaError("unknown operation", request_id) from None
    fields = {k: v for k, v in message.items() if k not in _ENVELOPE}
    return fields, op, message["id"]


def decode_request(frame: bytes) -> Request:
    fields, op, request_id = _open_envelope(frame, MAX_REQUEST_FRAME)
    try:
        _check(fields, _REQUEST_FIELDS[op], request_id)
    except SchemaError as exc:
        exc.op = op  # lets the receiver answer with an error reply for this request
        raise
    if op is Op.WRAP:
        return WrapRequest(request_id, fields["ttl"], fields["pt"])
    if op is Op.UNWRAP:
        return UnwrapRequest(request_id, fields["ttl"], fields["ct"], fields["kid"])
    return HealthRequest(request_id, fields["ttl"])


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request not to serve: the error reply to send (None when the frame named no id and operation)."""

    reply: bytes | None


def admit_request(frame: bytes, endpoint: Endpoint) -> Request | Refusal:
    """Decode a request arriving at `endpoint`; a bad frame or one meant for the other endpoint is refused."""
    try:
        request = decode_request(frame)
    except SchemaError as exc:
        if exc.request_id is None or exc.op is None:
            return Refusal(None)  # nobody to answer
        return Refusal(encode_reply(ErrorReply(exc.request_id, ErrorCode.INVALID_REQUEST, str(exc)), exc.op))
    if ARRIVES_AT[request.op] is not endpoint:
        message = f"{request.op.value} is served on {ARRIVES_AT[request.op].value}, not on {endpoint.value}"
        return Refusal(encode_reply(ErrorReply(request.id, ErrorCode.INVALID_REQUEST, message), request.op))
    return request


def encode_request(request: Request) -> bytes:
    body: dict[str, Any]
    if isinstance(request, WrapRequest):
        body = {"op": Op.WRAP.value, "pt": request.plaintext}
    elif isinstance(request, UnwrapRequest):
        body = {"op": Op.UNWRAP.value, "ct": request.ciphertext, "kid": request.key_id}
    else:
        body = {"op": Op.HEALTH.value}
    return _pack({"v": SCHEMA_VERSION, "id": request.id, "ttl": request.ttl_ms, **body}, MAX_REQUEST_FRAME)


def zmq_max_msgsize(frame_limit: int) -> int:
    """ZMQ_MAXMSGSIZE for a frame limit: ZeroMQ checks the CURVE command carrying the frame, not the frame."""
    return frame_limit + CURVE_MESSAGE_OVERHEAD


def _pack(message: dict[str, Any], limit: int = MAX_REPLY_FRAME) -> bytes:
    frame: bytes = msgpack.packb(message, use_bin_type=True)
    if len(frame) > limit:
        raise SchemaError(f"frame of {len(frame)} bytes exceeds {limit}")
    return frame


def encode_reply(reply: Reply, op: Op) -> bytes:
    head: dict[str, Any] = {"v": SCHEMA_VERSION, "id": reply.id, "op": op.value}
    if isinstance(reply, ErrorReply):
        return _pack({**head, "ok": False, "err": reply.code.value, "msg": reply.message[:MAX_MESSAGE_LEN]})
    if isinstance(reply, WrapResult):
        return _pack({**head, "ok": True, "ct": reply.ciphertext, "kid": reply.key_id})
    if isinstance(reply, UnwrapResult):
        return _pack({**head, "ok": True, "pt": reply.plaintext})
    workers = [[w.state, w.reason[:MAX_MESSAGE_LEN]] for w in reply.workers[:MAX_WORKERS_REPORTED]]
    # Bounded so the report always fits a frame, however many keys the token holds.
    key_ids = list(reply.key_ids[:MAX_KEY_IDS_REPORTED])
    stats = {**token_stats_to_wire(reply.stats.token), "busy": reply.stats.busy_workers,
             "idle": reply.stats.idle_workers, "busy_us": reply.stats.busy_us}
    return _pack({**head, "ok": True, "kid": reply.current_key_id, "kids": key_ids, "workers": workers,
                  "stats": stats})


def decode_reply(frame: bytes) -> Reply:
    return decode_reply_and_op(frame)[0]


def decode_reply_and_op(frame: bytes) -> tuple[Reply, Op]:
    """A reply and the operation it answers (an error reply names it in its envelope only)."""
    fields, op, reply_id = _open_envelope(frame, MAX_REPLY_FRAME)
    return _reply_fields(fields, op, reply_id), op


def _reply_fields(fields: dict[str, Any], op: Op, reply_id: int) -> Reply:
    if fields.get("ok") is False:
        _check(fields, _ERROR_FIELDS, reply_id)
        try:
            code = ErrorCode(fields["err"])
        except ValueError:
            code = ErrorCode.INTERNAL
        return ErrorReply(reply_id, code, fields["msg"])
    _check(fields, _RESULT_FIELDS[op], reply_id)
    if op is Op.WRAP:
        return WrapResult(reply_id, fields["ct"], fields["kid"])
    if op is Op.UNWRAP:
        return UnwrapResult(reply_id, fields["pt"])
    return HealthResult(
        reply_id,
        fields["kid"],
        tuple(_key_ids(fields["kids"], reply_id)),
        tuple(_workers(fields["workers"], reply_id)),
        _broker_stats(fields["stats"], reply_id),
    )


def _key_ids(values: list[Any], reply_id: int) -> list[str]:
    if not all(type(v) is str and 0 < len(v) <= MAX_KEY_ID_LEN for v in values):
        raise SchemaError("field 'kids' must hold key ids", reply_id)
    return values


def _workers(values: list[Any], reply_id: int) -> list[WorkerHealth]:
    workers = []
    for value in values:
        if not (type(value) is list and len(value) == 2 and all(type(x) is str for x in value)):
            raise SchemaError("field 'workers' must hold [state, reason] pairs", reply_id)
        workers.append(WorkerHealth(value[0][:16], value[1][:MAX_MESSAGE_LEN]))
    return workers


def token_stats_to_wire(stats: TokenStats) -> dict[str, Any]:
    # Cut like the key ids, so a report always decodes; honest workers never reach the bounds.
    latency = [[op.value, mechanism, histogram.counts, histogram.sum_us]
               for (op, mechanism), histogram in stats.latency.items()]
    errors = [[name, count] for name, count in stats.errors.items()]
    return {"lat": latency[:MAX_LATENCY_SERIES], "err": errors[:MAX_ERROR_NAMES], "relogin": stats.relogins,
            "reinit": stats.reinitializations, "session": stats.session_replacements}


def token_stats_from_wire(value: Any, reply_id: int | None = None) -> TokenStats:
    """A worker's tally, checked as strictly as any field: it ends up in every health reply."""
    _check_stats(value, _TOKEN_STATS_FIELDS, reply_id)
    return _token_stats(value, reply_id)


def _broker_stats(value: dict[str, Any], reply_id: int) -> BrokerStats:
    _check_stats(value, _BROKER_STATS_FIELDS, reply_id)
    return BrokerStats(_token_stats(value, reply_id), value["busy"], value["idle"], value["busy_us"])


def _check_stats(value: Any, spec: dict[str, _FieldSpec], reply_id: int | None) -> None:
    if type(value) is not dict:
        raise SchemaError("field 'stats' must be a map", reply_id)
    try:
        _check(value, spec, reply_id)
    except SchemaError as exc:
        raise SchemaError(f"field 'stats': {exc}", reply_id) from None


def _token_stats(value: dict[str, Any], reply_id: int | None) -> TokenStats:
    stats = TokenStats(relogins=value["relogin"], reinitializations=value["reinit"],
                       session_replacements=value["session"])
    for entry in value["lat"]:
        if not _is_latency_series(entry) or (TokenOperation(entry[0]), entry[1]) in stats.latency:
            raise SchemaError("field 'stats' must hold distinct [operation, mechanism, bucket counts, sum] "
                              "latency series", reply_id)
        stats.latency[TokenOperation(entry[0]), entry[1]] = Histogram(entry[2], entry[3])
    for entry in value["err"]:
        if not _is_error_count(entry) or entry[0] in stats.errors:
            raise SchemaError("field 'stats' must hold distinct [CKR name, count] errors", reply_id)
        stats.errors[entry[0]] = entry[1]
    return stats


def _is_latency_series(entry: Any) -> bool:
    return (type(entry) is list and len(entry) == 4
            and type(entry[0]) is str and entry[0] in _OPERATIONS
            and type(entry[1]) is str and _MECHANISM_LABEL.fullmatch(entry[1]) is not None
            and type(entry[2]) is list and len(entry[2]) == len(LATENCY_BUCKETS) + 1 and all(map(_is_count, entry[2]))
            and _is_count(entry[3]))


def _is_error_count(entry: Any) -> bool:
    return (type(entry) is list and len(entry) == 2 and type(entry[0]) is str
            and _ERROR_LABEL.fullmatch(entry[0]) is not None and _is_count(entry[1]))


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_COUNT
