"""The frontend's side of the IPC: many calls in flight over one ZeroMQ connection, matched by id.

ZeroMQ reconnects by itself when the broker restarts. While no broker is connected a call fails at once
(ZMQ_IMMEDIATE: nothing is queued for a peer that is not there), and calls in flight when the connection
drops fail at once too, so the apiserver gets UNAVAILABLE instead of waiting out its deadline.

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
from pathlib import Path
from typing import TypeVar, cast

import zmq
from zmq.utils.monitor import parse_monitor_message

from keysealer.frontend.metrics import Metrics
from keysealer.shared import ipc_schema
from keysealer.shared.errors import ErrorCode, KeySealerError
from keysealer.shared.ipc_keys import KeyPair

log = logging.getLogger(__name__)

_NOT_CONNECTED = "broker unreachable"
REFUSED_RETRY_FIRST_SECONDS = 1.0
REFUSED_RETRY_MAX_SECONDS = 30.0
FAILED_HANDSHAKES_BEFORE_REPORTING = 3
R = TypeVar("R")


class BrokerClient:
    def __init__(self, socket_path: Path, own_key: KeyPair, broker_public_key: bytes, metrics: Metrics) -> None:
        self._metrics = metrics
        self._endpoint = f"ipc://{socket_path}"
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)
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
        self._pending: dict[int, asyncio.Future[ipc_schema.Reply]] = {}
        self._ids = itertools.count(1)
        self.connected = False
        self.refused = False  # the broker rejected our credentials at the last handshake
        self._refused_backoff = REFUSED_RETRY_FIRST_SECONDS
        self._retry: asyncio.Task[None] | None = None
        self._failed_handshakes = 0
        # Counts lost connections: a health probe only vouches for the connection it ran on.
        self.connection_epoch = 0

    async def start(self) -> None:
        self._socket.connect(self._endpoint)
        loop = asyncio.get_running_loop()
        loop.add_reader(self._socket.FD, self._read_replies)
        loop.add_reader(self._monitor.FD, self._read_events)
        # A ZeroMQ descriptor signals new arrivals only: read what is already there (connect() may have
        # taken the signal).
        loop.call_soon(self._read_events)
        self._schedule_read()

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._socket.FD)
        loop.remove_reader(self._monitor.FD)
        # destroy() closes every socket of the context, the monitor's PAIR socket included; term() alone
        # would wait for it forever.
        self._socket.disable_monitor()
        self._context.destroy(linger=0)

    async def wrap(self, plaintext: bytes, timeout: float) -> ipc_schema.WrapResult:
        reply = await self._call(lambda i, ttl: ipc_schema.WrapRequest(i, ttl, plaintext), timeout, "wrap")
        return _expect(reply, ipc_schema.WrapResult)

    async def unwrap(self, ciphertext: bytes, key_id: str, timeout: float) -> ipc_schema.UnwrapResult:
        reply = await self._call(lambda i, ttl: ipc_schema.UnwrapRequest(i, ttl, ciphertext, key_id), timeout,
                                 "unwrap")
        return _expect(reply, ipc_schema.UnwrapResult)

    async def health(self, timeout: float) -> ipc_schema.HealthResult:
        reply = await self._call(ipc_schema.HealthRequest, timeout, "health")
        return _expect(reply, ipc_schema.HealthResult)

    async def _call(self, build: Callable[[int, int], ipc_schema.Request], timeout: float,
                    operation: str) -> ipc_schema.Reply:
        """Send one request; raises KeySealerError, or TimeoutError when no reply came in time."""
        request_id = next(self._ids)
        frame = ipc_schema.encode_request(build(request_id, max(1, int(timeout * 1000))))
        future: asyncio.Future[ipc_schema.Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            try:
                self._socket.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                raise KeySealerError(ErrorCode.BROKER_UNAVAILABLE, _NOT_CONNECTED) from None
            # Sending may have consumed the descriptor's signal for replies that arrived meanwhile.
            self._schedule_read()
            started = time.monotonic()
            async with asyncio.timeout(timeout):
                reply = await future
            self._metrics.broker_seconds.labels(operation).observe(time.monotonic() - started)
            return reply
        finally:
            # A reply arriving after this is discarded by _read_replies: nobody waits for it.
            self._pending.pop(request_id, None)

    def _schedule_read(self) -> None:
        """Read replies once the loop is free: one read serves every send of this loop iteration."""
        if not self._read_scheduled:
            self._read_scheduled = True
            asyncio.get_running_loop().call_soon(self._read_replies)

    def _read_replies(self) -> None:
        self._read_scheduled = False
        while _readable(self._socket):
            frame = self._socket.recv(zmq.NOBLOCK)
            try:
                reply = ipc_schema.decode_reply(frame)
            except ipc_schema.SchemaError as exc:
                log.warning("dropped a malformed reply from the broker: %s", exc)
                continue
            future = self._pending.pop(reply.id, None)
            if future is not None and not future.done():
                future.set_result(reply)

    def _read_events(self) -> None:
        while _readable(self._monitor):
            self._on_event(parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))["event"])

    def _on_event(self, event: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.connected = True
            self.refused = False
            self._refused_backoff = REFUSED_RETRY_FIRST_SECONDS
            self._failed_handshakes = 0
            log.info("connected to the broker")
        elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
            if not self.refused:
                log.error("the broker refused this frontend's IPC credentials (CURVE key or user)")
            self.refused = True
            # libzmq does not reconnect after a refused handshake: try again ourselves, slowly, so
            # fixing the broker's config is enough.
            if self._retry is None or self._retry.done():
                self._retry = asyncio.create_task(self._reconnect_later())
        elif event == zmq.EVENT_DISCONNECTED:
            if self.connected:  # once per lost connection, not once per failed reconnect
                log.warning("lost the connection to the broker")
                self._failed_handshakes = 0
            else:
                self._note_failed_handshake()
            self.connected = False
            self.connection_epoch += 1
            self._fail_pending("lost the connection to the broker")

    def _note_failed_handshake(self) -> None:
        """A connection that closes before its handshake completed: the broker could not read our CURVE
        hello, which means broker.server_key is not the broker's key (a refusal by the broker's ZAP handler
        is reported as such instead)."""
        self._failed_handshakes += 1
        if self._failed_handshakes == FAILED_HANDSHAKES_BEFORE_REPORTING and not self.refused:
            log.error("the CURVE handshake with the broker keeps failing: check that broker.server_key is the "
                      "broker's public key")
            self.refused = True

    async def _reconnect_later(self) -> None:
        await asyncio.sleep(self._refused_backoff)
        self._refused_backoff = min(self._refused_backoff * 2, REFUSED_RETRY_MAX_SECONDS)
        self._socket.disconnect(self._endpoint)
        self._socket.connect(self._endpoint)
        self._schedule_read()

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(KeySealerError(ErrorCode.BROKER_UNAVAILABLE, reason))


def _readable(socket: zmq.Socket[bytes]) -> bool:
    """Whether a message waits (False once closed: a read scheduled before close() may run after it).
    Asking also processes ZeroMQ's pending commands, which resets the descriptor, so a drain that ends
    here is signalled again by the next arrival."""
    return not socket.closed and bool(cast(int, socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN)


def _expect(reply: ipc_schema.Reply, kind: type[R]) -> R:
    if isinstance(reply, ipc_schema.ErrorReply):
        raise KeySealerError(reply.code, reply.message)
    if not isinstance(reply, kind):
        raise KeySealerError(ErrorCode.INTERNAL, "broker answered with the wrong operation")
    return reply
