"""Which key_ids Decrypt accepts: the broker's key set, as its health answers give it.

The rules (docs/architecture.md, "Request path"), in order:
1. an id in the last key set the broker's ready workers reported is accepted;
2. an id not in it makes the frontend ask the broker again, at most once a second (a rotation, a key made
   on another node), coalesced across callers;
3. still missing: if the frontend cannot vouch for its key set (not connected to the broker, or no key set
   from ready workers for `health.max_age_seconds`), the call fails UNAVAILABLE "cannot check the key_id",
   since "unknown" would then be a wrong answer to a request that may be good;
4. else, if the broker's list was cut (it reports the newest 1024), the id counts as known: the broker knows
   every key;
5. else the id is not known here. The caller (frontend/service.py) still lets the broker decide, since a key
   made moments ago on another node is not in any list yet, and words the broker's unknown_key as its own.
"""

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Protocol

from keysealer.shared.errors import ErrorCode, KeySealerError
from keysealer.shared.ipc_schema import MAX_KEY_IDS_REPORTED, HealthResult, WorkerState

# A missing key_id is looked up again at most this often, so bad requests cannot flood the broker.
KEY_REFRESH_MIN_SECONDS = 1.0


class HealthSource(Protocol):
    """What the key set needs of the broker client."""

    @property
    def connected(self) -> bool: ...

    async def health(self, timeout: float) -> HealthResult: ...


class BrokerKeySet:
    def __init__(self, client: HealthSource, max_age_seconds: float, call_timeout: float,
                 why_unhealthy: Callable[[], str]) -> None:
        self._client = client
        self._max_age = max_age_seconds
        self._timeout = call_timeout
        self._why_unhealthy = why_unhealthy  # the healthz reason, for "cannot check the key_id: ..."
        self._ids: frozenset[str] = frozenset()
        self._cut = False  # the broker reports at most MAX_KEY_IDS_REPORTED ids: a full list may leave keys out
        self._learnt_at = float("-inf")
        self._asked_at = float("-inf")
        self._asking: asyncio.Task[None] | None = None

    def learn(self, health: HealthResult) -> None:
        """Take the key set of a health answer, if it comes from ready workers (else it says nothing)."""
        if any(w.state == WorkerState.READY for w in health.workers):
            self._ids = frozenset(health.key_ids)
            self._cut = len(health.key_ids) >= MAX_KEY_IDS_REPORTED
            self._learnt_at = time.monotonic()

    async def accepts(self, key_id: str) -> bool:
        """True: a key the broker holds, or one only the broker can judge; False: not a key it holds.
        Raises TOKEN_UNAVAILABLE when the key set cannot be vouched for."""
        if key_id in self._ids:
            return True
        await self._ask_again()
        if key_id in self._ids:
            return True
        if not (self._client.connected and time.monotonic() - self._learnt_at <= self._max_age):
            raise KeySealerError(ErrorCode.TOKEN_UNAVAILABLE, f"cannot check the key_id: {self._why_unhealthy()}")
        return self._cut

    async def _ask_again(self) -> None:
        if self._asking is None or self._asking.done():
            # Only our own asks count: a probe's answer from just before a rotation must not keep us from
            # learning the key that Encrypt has just started to use.
            if time.monotonic() - self._asked_at < KEY_REFRESH_MIN_SECONDS:
                return
            self._asked_at = time.monotonic()
            self._asking = asyncio.create_task(self._ask())
        with contextlib.suppress(KeySealerError, TimeoutError):
            await asyncio.shield(self._asking)

    async def _ask(self) -> None:
        self.learn(await self._client.health(self._timeout))
