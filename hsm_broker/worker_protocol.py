"""Messages between the broker's supervisor and its workers (private to the broker): one closed table.

Requests do not pass here: the frontend sends them to each worker's own socket (docs/architecture.md,
"Request path"). This channel carries what the supervisor needs to supervise. Every message is a ZeroMQ
multipart message whose first frame names its kind. Each kind has one strict decoder here; the supervisor
pairs each worker kind with its handler (supervisor.py, `_worker_messages`). A frame that is not in the
table, or does not decode, is a broken or subverted worker: the supervisor kills and replaces it
(ProtocolViolation), it never guesses. The worker treats a bad control message the same way: it exits.

Worker -> supervisor:
    [STATUS, packed status]      when its state or key set changes; any time
    [STATS, packed tally]        what it counted since its last tally, at most once a second; any time
Supervisor -> worker:
    [USE_KEY, key id]            the key every wrap must use, chosen by the supervisor so all workers agree
                                 ("" while there is none); a worker serves nothing before the first one
    [REFRESH_KEYS]               re-read the token's key set now (SIGHUP)
"""

from dataclasses import dataclass
from typing import Any

import msgpack

from keysealer.shared import ipc_schema
from keysealer.shared.broker_stats import TokenStats
from keysealer.shared.ipc_schema import MAX_KEY_ID_LEN, MAX_MESSAGE_LEN, WorkerState

STATUS = b"S"
STATS = b"M"
USE_KEY = b"U"
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
class UseKey:
    key_id: str


@dataclass(frozen=True, slots=True)
class RefreshKeys:
    pass


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


def encode_stats(stats: TokenStats) -> list[bytes]:
    return [STATS, msgpack.packb(ipc_schema.token_stats_to_wire(stats), use_bin_type=True)]


def decode_stats(frames: list[bytes]) -> TokenStats:
    """Checked with the health reply's rules: a tally that would break the report is refused here."""
    (frame,) = _frames(frames, 2, STATS)
    try:
        return ipc_schema.token_stats_from_wire(_unpack(frame, ipc_schema.MAX_REPLY_FRAME))
    except ipc_schema.SchemaError as exc:
        raise ProtocolViolation(str(exc)) from None


def encode_use_key(key_id: str) -> list[bytes]:
    return [USE_KEY, key_id.encode()]


def decode_control(frames: list[bytes]) -> UseKey | RefreshKeys:
    """What the supervisor tells a worker; anything else is a bug in the supervisor, and the worker exits."""
    if frames == [REFRESH_KEYS]:
        return RefreshKeys()
    if len(frames) == 2 and frames[0] == USE_KEY and len(frames[1]) <= MAX_KEY_ID_LEN:
        try:
            return UseKey(frames[1].decode())
        except UnicodeDecodeError:
            pass
    raise ProtocolViolation("not a control message")


def agreed_current_key(statuses: list[WorkerStatus]) -> str:
    """The key every wrap uses: the newest current key that every ready worker already knows.

    After a rotation, workers notice the new key at different moments; until all know it, wraps stay on
    the old one, so Status never announces a key that some worker could not yet wrap under.
    """
    ready = [s for s in statuses if s.state is WorkerState.READY]
    created = {s.current_key_id: s.current_created for s in ready if s.current_key_id}
    known_by_all = [k for k in created if all(k in s.key_ids for s in ready)]
    return max(known_by_all, key=lambda k: (created[k], k), default="")
