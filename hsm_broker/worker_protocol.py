"""Messages between the broker's supervisor and its workers (private to the broker).

A worker sends [STATUS, packed status] when its state changes, and [REPLY, client, reply frame] for each
request; a worker that replied is idle again. The supervisor sends [client, request frame].
"""

from dataclasses import dataclass

import msgpack

STATUS = b"S"
REPLY = b"R"


def worker_routing_id(pid: int) -> bytes:
    """A worker's ZeroMQ name, derived from its pid so the supervisor can match messages to processes."""
    return b"w%d" % pid


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    state: str  # "starting", "ready", "failed" (retrying) or "fatal" (about to exit; never restart it)
    reason: str  # short, public: why the worker is not ready
    current_key_id: str
    key_ids: tuple[str, ...]


def encode_status(status: WorkerStatus) -> bytes:
    packed: bytes = msgpack.packb(
        [status.state, status.reason, status.current_key_id, list(status.key_ids)], use_bin_type=True)
    return packed


def decode_status(frame: bytes) -> WorkerStatus:
    state, reason, current, key_ids = msgpack.unpackb(frame, raw=False)
    return WorkerStatus(str(state), str(reason), str(current), tuple(str(k) for k in key_ids))
