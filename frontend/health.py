"""The health the frontend reports in Status, from real wrap/unwrap probes through broker and token.

A background task probes every few seconds; Status only reads the cached result, so polling and load never
hammer the token and a Status call never waits behind a slow probe.
"""

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass

from keysealer.frontend.broker_client import BrokerClient
from keysealer.frontend.config import HealthConfig
from keysealer.frontend.metrics import Metrics
from keysealer.shared.errors import ErrorCode, KeySealerError
from keysealer.shared.ipc_schema import MAX_KEY_IDS_REPORTED, WorkerState

log = logging.getLogger(__name__)

PROBE_SEED_BYTES = 32
# Failures that say nothing about the token, only that the broker is loaded: tolerated up to max_age.
_SOFT_FAILURES = frozenset({ErrorCode.BUSY})
# A missing key_id is looked up again at most this often, so bad requests cannot flood the broker.
KEY_REFRESH_MIN_SECONDS = 1.0
UNHEALTHY_RETRY_SECONDS = 0.5
HARD_TIMEOUTS = 2
FIRST_PROBE_WAIT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Health:
    healthy: bool
    reason: str  # "ok", or why not: shown by the apiserver, so short and never secret
    key_id: str


class HealthMonitor:
    def __init__(self, client: BrokerClient, config: HealthConfig, call_timeout: float, metrics: Metrics) -> None:
        self._client = client
        self._metrics = metrics
        self._config = config
        self._timeout = call_timeout
        self._key_id = ""
        self._known_key_ids: frozenset[str] = frozenset()
        # The broker reports at most MAX_KEY_IDS_REPORTED ids, the newest: a full list may leave keys out.
        self._key_list_cut = False
        self._keys_refreshed = 0.0
        self._last_success = float("-inf")
        self._success_epoch = -1
        self._failure: str | None = "starting: first health probe pending"
        self._failure_is_soft = False
        self._timeouts_in_a_row = 0
        self._refresh: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def current(self) -> Health:
        if not self._client.connected:
            reason = "broker refused our IPC credentials" if self._client.refused else "broker unreachable"
            return Health(False, reason, self._key_id)
        if self._failure is not None and not self._failure_is_soft:
            return Health(False, self._failure, self._key_id)
        if self._success_epoch != self._client.connection_epoch:
            return Health(False, "reconnected to the broker; health probe pending", self._key_id)
        if time.monotonic() - self._last_success <= self._config.max_age_seconds:
            return Health(True, "ok", self._key_id)
        # Only slow probes since the last success (or one still running): the broker is not keeping up.
        return Health(False, self._failure or "broker not answering", self._key_id)

    async def is_known_key(self, key_id: str) -> bool:
        """Whether the token holds this key; an id not seen yet triggers one coalesced lookup (rotation).

        Raises TOKEN_UNAVAILABLE when the broker's key set cannot be vouched for (broker unreachable, no
        worker ready): "unknown key" would then be a wrong answer to a request that may be fine.
        """
        if key_id in self._known_key_ids:
            return True
        if time.monotonic() - self._keys_refreshed >= KEY_REFRESH_MIN_SECONDS:
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.create_task(self._refresh_keys())
            with contextlib.suppress(KeySealerError, TimeoutError):
                await asyncio.shield(self._refresh)
        if key_id in self._known_key_ids:
            return True
        trusted = time.monotonic() - self._keys_refreshed <= self._config.max_age_seconds
        if not (trusted and self._client.connected):
            raise KeySealerError(ErrorCode.TOKEN_UNAVAILABLE, f"cannot check the key_id: {self.current().reason}")
        # An older key left out of a cut list: the broker, which checks every id itself, decides.
        return self._key_list_cut

    async def _run(self) -> None:
        # The first probe waits (briefly) for the handshake, rather than report a broker that is merely
        # still being dialled as unreachable.
        deadline = time.monotonic() + FIRST_PROBE_WAIT_SECONDS
        while not self._client.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        while True:
            await self.probe()
            interval = self._config.probe_interval_seconds
            # While unhealthy, look again soon: recovery should show without waiting a full interval.
            await asyncio.sleep(interval if self.current().healthy else min(interval, UNHEALTHY_RETRY_SECONDS))

    async def probe(self) -> None:
        epoch = self._client.connection_epoch
        try:
            await self._refresh_keys()
            seed = os.urandom(PROBE_SEED_BYTES)
            wrapped = await self._client.wrap(seed, self._timeout)
            unwrapped = await self._client.unwrap(wrapped.ciphertext, wrapped.key_id, self._timeout)
            if unwrapped.plaintext != seed:
                raise KeySealerError(ErrorCode.INTERNAL, "health probe unwrapped a wrong plaintext")
        except KeySealerError as exc:
            self._record_failure(exc.message, soft=exc.code in _SOFT_FAILURES)
        except TimeoutError:
            # One slow probe may be a burst of load; two in a row mean the broker is stuck (or frozen).
            self._timeouts_in_a_row += 1
            self._record_failure("broker not answering", soft=self._timeouts_in_a_row < HARD_TIMEOUTS)
        else:
            if self._failure is not None:
                log.info("health probe succeeded: healthy")
            self._failure, self._failure_is_soft = None, False
            self._timeouts_in_a_row = 0
            self._last_success = time.monotonic()
            self._success_epoch = epoch
            self._metrics.last_healthy_probe.set_to_current_time()

    async def _refresh_keys(self) -> None:
        health = await self._client.health(self._timeout)
        self._metrics.set_workers([w.state for w in health.workers])
        self._metrics.broker.last = health.stats
        self._metrics.set_current_key(health.current_key_id)
        if any(w.state == WorkerState.READY for w in health.workers):  # a key set from ready workers: trustworthy
            self._known_key_ids = frozenset(health.key_ids)
            self._key_list_cut = len(health.key_ids) >= MAX_KEY_IDS_REPORTED
            self._keys_refreshed = time.monotonic()
        if health.current_key_id:
            self._key_id = health.current_key_id
        else:
            reason = next((w.reason for w in health.workers if w.reason), "no current key")
            raise KeySealerError(ErrorCode.TOKEN_UNAVAILABLE, reason)

    def _record_failure(self, reason: str, soft: bool) -> None:
        if reason != self._failure:
            log.warning("health probe failed: %s", reason)
        self._failure, self._failure_is_soft = reason, soft
