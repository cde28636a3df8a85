"""What the broker measures inside itself: token operation latency, recoveries and token errors, and how
busy its workers are. Workers tally their part, the supervisor adds the tallies up, and the health reply
carries the totals to the frontend, which exports them on /metrics (docs/ipc-protocol.md, `stats`).

Every label comes from a small fixed set (operations, mechanism names, CKR names): never free text.
"""

import bisect
from dataclasses import dataclass, field
from enum import StrEnum

# From a fraction of a millisecond (SoftHSM) to the apiserver's 3 s deadline; the frontend's own latency
# histograms use the same boundaries, so broker and round-trip figures line up.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The mechanism label of operations that use no key.
NO_MECHANISM = "none"
# The error label of an error without a standard CKR name (vendor-defined codes, or none at all).
OTHER_ERROR = "other"


def microseconds(seconds: float) -> int:
    # Whole microseconds: integers add up exactly and cross the IPC as plain msgpack ints.
    return round(seconds * 1_000_000)


class TokenOperation(StrEnum):
    WRAP = "wrap"
    UNWRAP = "unwrap"
    LOGIN = "login"  # opening the token: C_Initialize, C_OpenSession, C_Login and finding the keys
    FIND_KEYS = "find_keys"  # re-reading the token's key set


@dataclass(slots=True)
class Histogram:
    # Observations per bucket of LATENCY_BUCKETS, then the +Inf bucket; not cumulative, so tallies add.
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    sum_us: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum_us += microseconds(seconds)

    def add(self, other: "Histogram") -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum_us += other.sum_us


@dataclass(slots=True)
class TokenStats:
    """What workers count. A worker sends what it counted since its last report; the supervisor keeps the
    sum, which therefore survives the worker."""

    latency: dict[tuple[TokenOperation, str], Histogram] = field(default_factory=dict)  # by (op, mechanism)
    errors: dict[str, int] = field(default_factory=dict)  # by CKR name or OTHER_ERROR
    relogins: int = 0  # logins after a worker's first: it had lost the token and opened it again
    reinitializations: int = 0  # the module finalized after a token error, to be initialized afresh
    session_replacements: int = 0  # fresh sessions opened after a session error

    def observe(self, operation: TokenOperation, mechanism: str, seconds: float) -> None:
        self.latency.setdefault((operation, mechanism), Histogram()).observe(seconds)

    def count_error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1

    def add(self, other: "TokenStats") -> None:
        for labels, histogram in other.latency.items():
            self.latency.setdefault(labels, Histogram()).add(histogram)
        for name, count in other.errors.items():
            self.errors[name] = self.errors.get(name, 0) + count
        self.relogins += other.relogins
        self.reinitializations += other.reinitializations
        self.session_replacements += other.session_replacements

    def __bool__(self) -> bool:
        """Whether anything was counted (a worker sends nothing otherwise)."""
        return self != TokenStats()


@dataclass(frozen=True, slots=True)
class BrokerStats:
    """What the health reply carries: the token totals since the broker started, and its workers now."""

    token: TokenStats = field(default_factory=TokenStats)
    busy_workers: int = 0  # ready workers serving a request now
    idle_workers: int = 0  # ready workers waiting for one; each ready worker holds one token session
    busy_us: int = 0  # time workers spent serving requests, summed over workers, in microseconds
