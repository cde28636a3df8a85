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
from keysealer.frontend.key_set import BrokerKeySet
from keysealer.frontend.metrics import Metrics
from keysealer.shared.errors import ErrorCode, KeySealerError

log = logging.getLogger(__name__)

PROBE_SEED_BYTES = 32
# Failures that say nothing about the token, only that the broker is loaded: tolerated up to max_age.
_SOFT_FAILURES = frozenset({ErrorCode.BUSY})
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
        # Which key_ids Decrypt accepts: fed by every probe, asked again on an id it has not seen.
        self.keys = BrokerKeySet(client, config.max_age_seconds, call_timeout, lambda: self.current().reason)
        self._metrics = metrics
        self._config = config
        self._timeout = call_timeout
        self._key_id = ""
        self._last_success = float("-inf")
        self._success_epoch = -1
        self._failure: str | None = "starting: first health probe pending"
        self._failure_is_soft = False
        self._timeouts_in_a_row = 0
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
            await self._read_health()
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

    async def _read_health(self) -> None:
        health = await self._client.health(self._timeout)
        self._metrics.set_workers([w.state for w in health.workers])
        self._metrics.broker.last = health.stats
        self._metrics.set_current_key(health.current_key_id)
        self.keys.learn(health)
        if health.current_key_id:
            self._key_id = health.current_key_id
        else:
            reason = next((w.reason for w in health.workers if w.reason), "no current key")
            raise KeySealerError(ErrorCode.TOKEN_UNAVAILABLE, reason)

    def _record_failure(self, reason: str, soft: bool) -> None:
        if reason != self._failure:
            log.warning("health probe failed: %s", reason)
        self._failure, self._failure_is_soft = reason, soft
