"""Messages between the broker's supervisor and its workers (private to the broker).

A worker sends [STATUS, packed status] when its state changes, [REPLY, client, reply frame] for each
request (a worker that replied is idle again), and [STATS, packed tally] at most once a second with what
it counted since its last tally. The supervisor sends [client, request frame, wrap key id] (the key every
wrap must use, chosen by the supervisor so all workers agree) or [REFRESH_KEYS].
"""

from dataclasses import dataclass

import msgpack

from keysealer.shared import ipc_schema
from keysealer.shared.broker_stats import TokenStats

STATUS = b"S"
REPLY = b"R"
STATS = b"M"
REFRESH_KEYS = b"K"
# "I lost the token before I could start on the request you gave me: give it to another worker."
RETURN_JOB = b"B"


def worker_routing_id(pid: int) -> bytes:
    """A worker's ZeroMQ name, derived from its pid so the supervisor can match messages to processes."""
    return b"w%d" % pid


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    state: str  # "starting", "ready", "failed" (retrying) or "fatal" (about to exit; never restart it)
    reason: str  # short, public: why the worker is not ready
    current_key_id: str
    key_ids: tuple[str, ...]  # usable keys (retired ones excluded)
    current_created: int = 0  # orders the current keys that different workers report


def encode_status(status: WorkerStatus) -> bytes:
    packed: bytes = msgpack.packb(
        [status.state, status.reason, status.current_key_id, list(status.key_ids), status.current_created],
        use_bin_type=True)
    return packed


def decode_status(frame: bytes) -> WorkerStatus:
    state, reason, current, key_ids, created = msgpack.unpackb(frame, raw=False)
    return WorkerStatus(str(state), str(reason), str(current), tuple(str(k) for k in key_ids), int(created))


def encode_stats(stats: TokenStats) -> bytes:
    packed: bytes = msgpack.packb(ipc_schema.token_stats_to_wire(stats), use_bin_type=True)
    return packed


def decode_stats(frame: bytes) -> TokenStats:
    """Checked with the health reply's rules: a tally that would break the report is refused here."""
    return ipc_schema.token_stats_from_wire(msgpack.unpackb(frame, raw=False))


def agreed_current_key(statuses: list[WorkerStatus]) -> str:
    """The key every wrap uses: the newest current key that every ready worker already knows.

    After a rotation, workers notice the new key at different moments; until all know it, wraps stay on
    the old one, so Status never announces a key that some worker could not yet wrap under.
    """
    ready = [s for s in statuses if s.state == "ready"]
    created = {s.current_key_id: s.current_created for s in ready if s.current_key_id}
    known_by_all = [k for k in created if all(k in s.key_ids for s in ready)]
    return max(known_by_all, key=lambda k: (created[k], k), default="")
