"""Messages between the broker's supervisor and its workers (private to the broker): one closed table.

Every message is a ZeroMQ multipart message whose first frame names its kind. Each kind has one strict
decoder here; the supervisor pairs each worker kind with its handler and with when it may arrive
(supervisor.py, `_WORKER_MESSAGES`). A frame that is not in the table, or does not decode, is a broken or
subverted worker: the supervisor kills and replaces it (ProtocolViolation), it never guesses.

Worker -> supervisor:
    [STATUS, packed status]      when its state or key set changes; any time
    [REPLY, client, reply]       the answer to the request it holds (then it is idle again)
    [RETURN_JOB]                 "I lost the token before I could start on the request you gave me"
    [STATS, packed tally]        what it counted since its last tally, at most once a second; any time
Supervisor -> worker:
    [JOB, client, request, wrap key id]   a request (already validated) and the key every wrap must use,
                                          chosen by the supervisor so all workers agree
    [REFRESH_KEYS]                        re-read the token's key set now (SIGHUP)
"""

from dataclasses import dataclass
from typing import Any

import msgpack

from keysealer.shared import ipc_schema
from keysealer.shared.broker_stats import TokenStats
from keysealer.shared.ipc_schema import MAX_KEY_ID_LEN, MAX_MESSAGE_LEN, WorkerState

STATUS = b"S"
REPLY = b"R"
RETURN_JOB = b"B"
STATS = b"M"
JOB = b"J"
REFRESH_KEYS = b"K"
# A worker lists every usable key of the token (the health reply keeps the newest 1024): generous, bounded.
MAX_KEYS_PER_WORKER = 65_536
MAX_STATUS_FRAME = MAX_KEYS_PER_WORKER * (MAX_KEY_ID_LEN + 2) + 1024


class ProtocolViolation(ValueError):
    """A message no honest peer sends: unknown kind, wrong shape, or not allowed now."""


def worker_routing_id(pid: int) -> bytes:
    """A worker's ZeroMQ name, derived from its pid so the supervisor can match messages to processes."""
    return b"w%d" % pid


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    state: WorkerState
    reason: str  # short, public: why the worker is not ready
    current_key_id: str
    key_ids: tuple[str, ...]  # usable keys (retired ones excluded), newest first
    current_created: int = 0  # orders the current keys that different workers report


@dataclass(frozen=True, slots=True)
class WorkerReply:
    client: bytes
    frame: bytes  # passed on to the client as it is, once checked
    request_id: int
    op: ipc_schema.Op


@dataclass(frozen=True, slots=True)
class Job:
    client: bytes
    frame: bytes
    wrap_key_id: str


def _unpack(frame: bytes, limit: int) -> Any:
    if len(frame) > limit:
        raise ProtocolViolation(f"frame of {len(frame)} bytes exceeds {limit}")
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0,
                               max_str_len=limit, max_array_len=MAX_KEYS_PER_WORKER, max_map_len=16)
    except Exception as exc:  # msgpack raises many types for malformed input; all mean the same here
        raise ProtocolViolation("frame is not valid msgpack") from exc


def _frames(frames: list[bytes], count: int, kind: bytes) -> list[bytes]:
    if len(frames) != count:
        raise ProtocolViolation(f"{kind!r} message of {len(frames)} frames, not {count}")
    return frames[1:]


def encode_status(status: WorkerStatus) -> list[bytes]:
    packed = msgpack.packb([status.state.value, status.reason[:MAX_MESSAGE_LEN], status.current_key_id,
                            list(status.key_ids[:MAX_KEYS_PER_WORKER]), status.current_created], use_bin_type=True)
    return [STATUS, packed]


def decode_status(frames: list[bytes]) -> WorkerStatus:
    (frame,) = _frames(frames, 2, STATUS)
    value = _unpack(frame, MAX_STATUS_FRAME)
    if not (type(value) is list and len(value) == 5 and all(type(v) is str for v in value[:3])
            and type(value[3]) is list and type(value[4]) is int):
        raise ProtocolViolation("status is not [state, reason, current key id, key ids, created]")
    state, reason, current, key_ids, created = value
    try:
        state = WorkerState(state)
    except ValueError:
        raise ProtocolViolation("status names no worker state") from None
    if not (len(reason) <= MAX_MESSAGE_LEN and len(current) <= MAX_KEY_ID_LEN and 0 <= created < 2**63
            and all(type(k) is str and 0 < len(k) <= MAX_KEY_ID_LEN for k in key_ids)):
        raise ProtocolViolation("status field out of range")
    return WorkerStatus(state, reason, current, tuple(key_ids), created)


def encode_reply(client: bytes, frame: bytes) -> list[bytes]:
    return [REPLY, client, frame]


def decode_reply(frames: list[bytes]) -> WorkerReply:
    """Checked by the schema's own reply decoder: the frontend must never get a frame it would refuse."""
    client, frame = _frames(frames, 3, REPLY)
    try:
        reply, op = ipc_schema.decode_reply_and_op(frame)
    except ipc_schema.SchemaError as exc:
        raise ProtocolViolation(f"reply breaks the schema: {exc}") from None
    return WorkerReply(client, frame, reply.id, op)


def decode_return_job(frames: list[bytes]) -> None:
    _frames(frames, 1, RETURN_JOB)


def encode_stats(stats: TokenStats) -> list[bytes]:
    return [STATS, msgpack.packb(ipc_schema.token_stats_to_wire(stats), use_bin_type=True)]


def decode_stats(frames: list[bytes]) -> TokenStats:
    """Checked with the health reply's rules: a tally that would break the report is refused here."""
    (frame,) = _frames(frames, 2, STATS)
    try:
        return ipc_schema.token_stats_from_wire(_unpack(frame, ipc_schema.MAX_REPLY_FRAME))
    except ipc_schema.SchemaError as exc:
        raise ProtocolViolation(str(exc)) from None


def encode_job(job: Job) -> list[bytes]:
    return [JOB, job.client, job.frame, job.wrap_key_id.encode()]


def decode_job(frames: list[bytes]) -> Job:
    client, frame, wrap_key_id = _frames(frames, 4, JOB)
    try:
        return Job(client, frame, wrap_key_id.decode())
    except UnicodeDecodeError:
        raise ProtocolViolation("wrap key id is not text") from None


def agreed_current_key(statuses: list[WorkerStatus]) -> str:
    """The key every wrap uses: the newest current key that every ready worker already knows.

    After a rotation, workers notice the new key at different moments; until all know it, wraps stay on
    the old one, so Status never announces a key that some worker could not yet wrap under.
    """
    ready = [s for s in statuses if s.state is WorkerState.READY]
    created = {s.current_key_id: s.current_created for s in ready if s.current_key_id}
    known_by_all = [k for k in created if all(k in s.key_ids for s in ready)]
    return max(known_by_all, key=lambda k: (created[k], k), default="")
