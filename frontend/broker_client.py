"""The frontend's side of the IPC: health from the broker's supervisor, wraps and unwraps straight to workers.

The broker's supervisor answers health on the broker's socket; each worker takes wraps and unwraps on its
own socket next to it (shared/socket_path.worker_socket_path), with the same CURVE key and checks. The
frontend learns how many worker slots there are from the health answers and keeps one connection to each,
with many calls in flight on each, matched by id. It sends each call to the ready worker with the fewest
calls outstanding, and runs a call once more on another worker when its worker dies (its connection drops)
or answers that it lost the token: wrap and unwrap are idempotent.

ZeroMQ reconnects by itself when the broker or a worker restarts. While nothing is connected a call fails at
once (ZMQ_IMMEDIATE: nothing is queued for a peer that is not there), and calls in flight when a connection
drops are run again or fail at once, so the apiserver gets UNAVAILABLE instead of waiting out its deadline.

The sockets are plain (not zmq.asyncio) and read from the event loop's own reader callbacks: pyzmq's
asyncio layer spends a future, a timer handle and several EVENTS checks per message, which cost this
process about a tenth of its CPU per call (docs/benchmarks.md).
"""

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import zmq
from zmq.utils.monitor import parse_monitor_message

from keysealer.frontend.metrics import Metrics
from keysealer.shared import ipc_schema
from keysealer.shared.errors import ErrorCode, KeySealerError
from keysealer.shared.ipc_keys import KeyPair
from keysealer.shared.ipc_schema import WorkerState
from keysealer.shared.socket_path import worker_socket_path
from keysealer.shared.zmq_readiness import message_waiting

log = logging.getLogger(__name__)

_NOT_CONNECTED = "broker unreachable"
REFUSED_RETRY_FIRST_SECONDS = 1.0
REFUSED_RETRY_MAX_SECONDS = 30.0
FAILED_HANDSHAKES_BEFORE_REPORTING = 3
# A worker's connection just made is given this long to complete its handshake before a call that finds no
# worker fails: the first calls after start-up should not fail merely because the dialling is under way.
FIRST_CONNECT_WAIT_SECONDS = 1.0
FIRST_CONNECT_POLL_SECONDS = 0.01
# A worker's answers that mean "not run here, may run elsewhere": the call goes once to another worker.
_RUN_ELSEWHERE = frozenset({ErrorCode.TOKEN_UNAVAILABLE})
_SUPERVISOR_LOST = "lost the connection to the broker"
_WORKER_LOST = "broker worker exited during the call"
R = TypeVar("R")


@dataclass(eq=False)
class _Call:
    op: ipc_schema.Op
    future: asyncio.Future[ipc_schema.Reply]


class _Link:
    """One connection to one broker socket (the supervisor's or a worker's), watched by its own monitor."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], endpoint: str, own_key: KeyPair,
                 broker_public_key: bytes, *, lost: tuple[ErrorCode, str], reports: bool) -> None:
        self._endpoint = endpoint
        self._lost = lost  # what its calls fail with when the connection drops under them
        self._reports = reports  # the supervisor's link speaks for all: workers' links do not log
        self._socket = context.socket(zmq.DEALER)
        self._socket.curve_publickey = own_key.public
        self._socket.curve_secretkey = own_key.secret
        # Only a broker holding the secret half of this key completes the handshake.
        self._socket.curve_serverkey = broker_public_key
        for option, value in (
            (zmq.LINGER, 0),
            (zmq.IMMEDIATE, 1),
            (zmq.MAXMSGSIZE, ipc_schema.zmq_max_msgsize(ipc_schema.MAX_REPLY_FRAME)),
            (zmq.RECONNECT_IVL, 100),
            (zmq.RECONNECT_IVL_MAX, 1000),
            (zmq.SNDHWM, 100_000),
            (zmq.RCVHWM, 100_000),
        ):
            self._socket.setsockopt(option, value)
        self._monitor = self._socket.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        self._read_scheduled = False
        self.calls: dict[int, _Call] = {}
        self.created = time.monotonic()
        self.connected = False
        # A worker opens its socket only once it is ready: a fresh connection vouches for it, until a health
        # answer says otherwise or it answers that it lost the token.
        self.vouched = False
        self.refused = False  # the broker rejected our credentials at the last handshake
        self._refused_backoff = REFUSED_RETRY_FIRST_SECONDS
        self._retry: asyncio.Task[None] | None = None
        self._failed_handshakes = 0
        # Counts lost connections: a health probe only vouches for the connection it ran on.
        self.epoch = 0

    def lost(self) -> KeySealerError:
        return KeySealerError(*self._lost)  # a fresh one each time: a raised exception keeps its traceback

    def start(self) -> None:
        self._socket.connect(self._endpoint)
        loop = asyncio.get_running_loop()
        loop.add_reader(self._socket.FD, self._read_replies)
        loop.add_reader(self._monitor.FD, self._read_events)
        # A ZeroMQ descriptor signals new arrivals only: read what is already there (connect() may have
        # taken the signal).
        loop.call_soon(self._read_events)
        self.schedule_read()

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._socket.FD)
        loop.remove_reader(self._monitor.FD)
        self._socket.disable_monitor()  # the context's destroy() closes the rest

    def send(self, frame: bytes) -> None:
        """Raises zmq.Again when the frame cannot leave now (no connection)."""
        self._socket.send(frame, zmq.NOBLOCK)
        # Sending may have consumed the descriptor's signal for replies that arrived meanwhile.
        self.schedule_read()

    def schedule_read(self) -> None:
        """Read replies once the loop is free: one read serves every send of this loop iteration."""
        if not self._read_scheduled:
            self._read_scheduled = True
            asyncio.get_running_loop().call_soon(self._read_replies)

    def _read_replies(self) -> None:
        self._read_scheduled = False
        while message_waiting(self._socket):
            frame = self._socket.recv(zmq.NOBLOCK)
            try:
                reply, op = ipc_schema.decode_reply_and_op(frame)
            except ipc_schema.SchemaError as exc:
                log.warning("dropped a malformed reply from the broker: %s", exc)
                continue
            call = self.calls.pop(reply.id, None)
            if call is None or call.future.done():
                continue  # its caller gave up already
            if op is not call.op:
                call.future.set_exception(KeySealerError(ErrorCode.INTERNAL, "broker answered another operation"))
            else:
                call.future.set_result(reply)

    def _read_events(self) -> None:
        while message_waiting(self._monitor):
            self._on_event(parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))["event"])

    def _on_event(self, event: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.connected = self.vouched = True
            self.refused = False
            self._refused_backoff = REFUSED_RETRY_FIRST_SECONDS
            self._failed_handshakes = 0
            if self._reports:
                log.info("connected to the broker")
        elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
            if not self.refused and self._reports:
                log.error("the broker refused this frontend's IPC credentials (CURVE key or user)")
            self.refused = True
            # libzmq does not reconnect after a refused handshake: try again ourselves, slowly, so
            # fixing the broker's config is enough.
            if self._retry is None or self._retry.done():
                self._retry = asyncio.create_task(self._reconnect_later())
        elif event == zmq.EVENT_DISCONNECTED:
            if self.connected:  # once per lost connection, not once per failed reconnect
                if self._reports:
                    log.warning("lost the connection to the broker")
                self._failed_handshakes = 0
            else:
                self._note_failed_handshake()
            self.connected = False
            self.epoch += 1
            calls, self.calls = self.calls, {}
            for call in calls.values():
                if not call.future.done():
                    call.future.set_exception(self.lost())

    def _note_failed_handshake(self) -> None:
        """A connection that closes before its handshake completed: the broker could not read our CURVE
        hello, which means broker.server_key is not the broker's key (a refusal by the broker's ZAP handler
        is reported as such instead)."""
        self._failed_handshakes += 1
        if self._failed_handshakes == FAILED_HANDSHAKES_BEFORE_REPORTING and not self.refused:
            if self._reports:
                log.error("the CURVE handshake with the broker keeps failing: check that broker.server_key is "
                          "the broker's public key")
            self.refused = True

    async def _reconnect_later(self) -> None:
        await asyncio.sleep(self._refused_backoff)
        self._refused_backoff = min(self._refused_backoff * 2, REFUSED_RETRY_MAX_SECONDS)
        self._socket.disconnect(self._endpoint)
        self._socket.connect(self._endpoint)
        self.schedule_read()


class BrokerClient:
    def __init__(self, socket_path: Path, own_key: KeyPair, broker_public_key: bytes, metrics: Metrics) -> None:
        self._metrics = metrics
        self._socket_path = socket_path
        self._own_key = own_key
        self._broker_key = broker_public_key
        self.context = zmq.Context()
        self._supervisor = _Link(self.context, f"ipc://{socket_path}", own_key, broker_public_key,
                                 lost=(ErrorCode.BROKER_UNAVAILABLE, _SUPERVISOR_LOST), reports=True)
        self._workers: list[_Link] = []  # one per slot the broker reported, in slot order
        self._worker_states: tuple[ipc_schema.WorkerHealth, ...] = ()  # as the last health answer gave them
        self._ids = itertools.count(1)
        self._started = False

    @property
    def connected(self) -> bool:
        return self._supervisor.connected

    @property
    def refused(self) -> bool:
        return self._supervisor.refused

    @property
    def connection_epoch(self) -> int:
        return self._supervisor.epoch

    async def start(self) -> None:
        self._started = True
        self._supervisor.start()

    async def close(self) -> None:
        for link in (self._supervisor, *self._workers):
            await link.close()
        self.context.destroy(linger=0)

    async def wrap(self, plaintext: bytes, timeout: float) -> ipc_schema.WrapResult:
        reply = await self._call_worker(lambda i, ttl: ipc_schema.WrapRequest(i, ttl, plaintext), timeout, "wrap")
        return _expect(reply, ipc_schema.WrapResult)

    async def unwrap(self, ciphertext: bytes, key_id: str, timeout: float) -> ipc_schema.UnwrapResult:
        reply = await self._call_worker(lambda i, ttl: ipc_schema.UnwrapRequest(i, ttl, ciphertext, key_id),
                                        timeout, "unwrap")
        return _expect(reply, ipc_schema.UnwrapResult)

    async def health(self, timeout: float) -> ipc_schema.HealthResult:
        started = time.monotonic()
        reply = await self._exchange(self._supervisor, ipc_schema.HealthRequest, started + timeout)
        self._metrics.broker_seconds.labels("health").observe(time.monotonic() - started)
        result = _expect(reply, ipc_schema.HealthResult)
        self._learn_workers(result.workers)
        return result

    def _learn_workers(self, workers: tuple[ipc_schema.WorkerHealth, ...]) -> None:
        """Connect to every worker slot the broker reports (slots only change with a broker restart), and
        take its word on which are ready."""
        self._worker_states = workers
        while self._started and len(self._workers) < len(workers):
            path = worker_socket_path(self._socket_path, len(self._workers))
            link = _Link(self.context, f"ipc://{path}", self._own_key, self._broker_key,
                         lost=(ErrorCode.WORKER_LOST, _WORKER_LOST), reports=False)
            link.start()
            self._workers.append(link)
        for link, worker in zip(self._workers, workers, strict=False):
            link.vouched = worker.state == WorkerState.READY

    async def _call_worker(self, build: Callable[[int, int], ipc_schema.Request], timeout: float,
                           operation: str) -> ipc_schema.Reply:
        """One wrap or unwrap, run once more on another worker if its own could not run it; raises
        KeySealerError, or TimeoutError when no reply came in time."""
        started = time.monotonic()
        deadline = started + timeout
        tried: _Link | None = None
        while True:
            link = await self._worker_for(tried, deadline)
            try:
                reply = await self._exchange(link, build, deadline)
            except KeySealerError as exc:
                # Only a dropped connection says worker_lost here (a worker's own answers are replies).
                if exc.code is not ErrorCode.WORKER_LOST or tried is not None or time.monotonic() >= deadline:
                    raise
                tried = link
                continue
            if isinstance(reply, ipc_schema.ErrorReply) and reply.code in _RUN_ELSEWHERE:
                link.vouched = False  # until it reconnects or a health answer says it is ready again
                if tried is None and self._has_worker(avoid=link):
                    tried = link
                    continue
            self._metrics.broker_seconds.labels(operation).observe(time.monotonic() - started)
            return reply

    async def _worker_for(self, avoid: _Link | None, deadline: float) -> _Link:
        while True:
            try:
                return self._pick_worker(avoid)
            except KeySealerError:
                if time.monotonic() >= deadline or not any(self._dialling(link) for link in self._workers):
                    raise
            await asyncio.sleep(FIRST_CONNECT_POLL_SECONDS)

    @staticmethod
    def _dialling(link: _Link) -> bool:
        """Still making its first connection (never connected, never refused), and only just begun."""
        fresh = time.monotonic() - link.created < FIRST_CONNECT_WAIT_SECONDS
        return fresh and not link.connected and not link.refused and link.epoch == 0

    def _has_worker(self, avoid: _Link) -> bool:
        return any(link.connected and link.vouched for link in self._workers if link is not avoid)

    def _pick_worker(self, avoid: _Link | None) -> _Link:
        """The vouched-for worker with the fewest calls outstanding (`avoid`: the one that could not run it).
        With none vouched for, any connected one: a worker that lost the token answers at once either way,
        and one that has recovered serves before the next health answer says so."""
        connected = [link for link in self._workers if link is not avoid and link.connected]
        candidates = [link for link in connected if link.vouched] or connected
        if candidates:
            return min(candidates, key=lambda link: len(link.calls))
        if avoid is not None:
            raise KeySealerError(ErrorCode.WORKER_LOST, _WORKER_LOST)
        if not self.connected:
            raise KeySealerError(ErrorCode.BROKER_UNAVAILABLE, _NOT_CONNECTED)
        reasons = [w.reason for w in self._worker_states
                   if w.state in (WorkerState.FAILED, WorkerState.FATAL) and w.reason]
        if reasons:
            raise KeySealerError(ErrorCode.TOKEN_UNAVAILABLE, reasons[0])
        if any(w.state == WorkerState.READY for w in self._worker_states):
            raise KeySealerError(ErrorCode.BROKER_UNAVAILABLE, "no broker worker connected yet")
        raise KeySealerError(ErrorCode.TOKEN_UNAVAILABLE, "broker starting: no worker has opened the token yet")

    async def _exchange(self, link: _Link, build: Callable[[int, int], ipc_schema.Request],
                        deadline: float) -> ipc_schema.Reply:
        """Send one request on `link` and wait for its reply until `deadline`; raises `link.lost` when the
        connection drops first."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        request = build(next(self._ids), max(1, int(remaining * 1000)))
        frame = ipc_schema.encode_request(request)
        future: asyncio.Future[ipc_schema.Reply] = asyncio.get_running_loop().create_future()
        link.calls[request.id] = _Call(request.op, future)
        try:
            try:
                link.send(frame)
            except zmq.Again:
                # With ZMQ_IMMEDIATE and our high-water mark far above any load the frontend admits, this
                # means the connection is gone even if its monitor has not told us yet.
                if link is self._supervisor:
                    raise KeySealerError(ErrorCode.BROKER_UNAVAILABLE, _NOT_CONNECTED) from None
                raise link.lost() from None
            async with asyncio.timeout(remaining):
                return await future
        finally:
            # A reply arriving after this is discarded by _read_replies: nobody waits for it.
            link.calls.pop(request.id, None)


def _expect(reply: ipc_schema.Reply, kind: type[R]) -> R:
    if isinstance(reply, ipc_schema.ErrorReply):
        raise KeySealerError(reply.code, reply.message)
    if not isinstance(reply, kind):
        raise KeySealerError(ErrorCode.INTERNAL, "broker answered with the wrong operation")
    return reply
