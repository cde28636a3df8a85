"""A broker worker: owns one token login and session, serves one request at a time from its own socket.

Workers are separate processes because PyKCS11 holds the GIL during every PKCS #11 call: threads would
serialise, and a slow token would stall the supervisor. A crash in the vendor library takes down one
worker, not the broker. The frontend sends wraps and unwraps to each worker's socket directly (the
supervisor bound it and hands it over at the fork); the worker authenticates every connection as the
supervisor's socket does, decodes every frame strictly before any PKCS #11 call, writes what it is doing
on the call board (so the supervisor can kill it when stuck) and wraps with the key the supervisor names.
"""

import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import PyKCS11
import zmq

from keysealer.hsm_broker import worker_protocol
from keysealer.hsm_broker.config import BrokerConfig
from keysealer.hsm_broker.ipc_auth import ZAP_ENDPOINT, zap_reply
from keysealer.hsm_broker.listener import WorkerSeat, secure_listener, take_request
from keysealer.hsm_broker.mechanisms import MECHANISMS
from keysealer.hsm_broker.pin import read_pin
from keysealer.hsm_broker.token import SESSION_ERRORS, UNKNOWN_KEY_MESSAGE, Token, TokenKey, open_token
from keysealer.shared import ipc_schema
from keysealer.shared.broker_stats import NO_MECHANISM, OTHER_ERROR, TokenOperation, TokenStats
from keysealer.shared.errors import BadPin, ErrorCode, KeySealerError, TokenUnavailable, UnusableFile
from keysealer.shared.ipc_schema import WorkerState
from keysealer.shared.process import exit_code_for
from keysealer.shared.sandbox import lock_down
from keysealer.shared.zmq_readiness import message_waiting

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 15.0
# SoftHSM rewrites its token file on login, so logins racing another process can fail spuriously.
LOGIN_ATTEMPTS_BEFORE_REPORTING = 3
LAST_WORDS_LINGER_MS = 2000
# How stale a worker's view of the token's key set may get, and how often an unknown key_id may make it
# look again (bounded, so bad requests cannot turn into a stream of C_FindObjects).
KEY_REFRESH_SECONDS = 5.0
UNKNOWN_KEY_REFRESH_SECONDS = 1.0
# How often a worker sends what it counted: never a message per request.
STATS_INTERVAL_SECONDS = 1.0
# Requests read per wake-up before the worker looks at its other sockets again.
DRAIN_LIMIT = 64
# The longest a worker waits between turns of its loop, each marked on the call board: the supervisor
# takes a worker silent for much longer for frozen or hung (supervisor.SILENT_LIMIT_SECONDS).
BEAT_SECONDS = 1.0


class Worker:
    def __init__(self, config: BrokerConfig, backend: str, seat: WorkerSeat) -> None:
        self._config = config
        self._seat = seat
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.DEALER)  # to the supervisor
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.ROUTING_ID, worker_protocol.worker_routing_id(os.getpid()))
        self._socket.connect(backend)
        self._zap = self._context.socket(zmq.REP)
        self._zap.bind(ZAP_ENDPOINT)  # before any listener: no connection is ever admitted unchecked
        self._requests: zmq.Socket[bytes] | None = None  # the frontend's, opened at the first USE_KEY
        self._poller = zmq.Poller()
        for sock in (self._socket, self._zap):
            self._poller.register(sock, zmq.POLLIN)
        self._wrap_key_id = ""  # the agreed current key, as the supervisor last named it
        self._token: Token | None = None
        self._locked = False
        self._keys_read_at = 0.0
        self._missing_key_read_at = 0.0  # the last look for a key_id we lacked: bounds those looks alone
        # Grows with every failed open or dropped token, shrinks back after a call succeeds: a token
        # that fails every call is not reopened in a tight loop.
        self._backoff = RETRY_FIRST_SECONDS
        self._opened_before = False  # every open after the first waits the backoff
        self._logged_in_before = False
        self._stats = TokenStats()  # counted since the last tally sent
        self._stats_sent_at = 0.0
        # The operations a worker performs, each with its handler (ipc_schema.ARRIVES_AT admits only these
        # here); the decoder pairs each operation with its request type.
        self._operations: dict[ipc_schema.Op, Callable[[Token, Any], ipc_schema.Reply]] = {
            ipc_schema.Op.WRAP: self._wrap, ipc_schema.Op.UNWRAP: self._unwrap}

    def run(self) -> int:
        failures = 0
        self._report(WorkerState.STARTING, "opening the token")
        while True:
            self._send_stats()
            if self._token is None:
                if self._opened_before:
                    self._wait_backoff()
                self._opened_before = True
                self._seat.board.beat(self._seat.slot, math.inf)  # a login has no bound of its own
                try:
                    with self._timed(TokenOperation.LOGIN, NO_MECHANISM):
                        self._token = self._open()
                except BadPin as exc:
                    return self._refused_pin(exc)
                except UnusableFile as exc:
                    return self._last_words(str(exc), exit_code_for(exc))
                except TokenUnavailable as exc:
                    self._count_error(exc)
                    failures += 1
                    if failures >= LOGIN_ATTEMPTS_BEFORE_REPORTING:
                        log.warning("token unavailable: %s; retrying in %.1fs", exc.reason, self._backoff)
                        self._report(WorkerState.FAILED, exc.reason)
                    continue
                failures = 0
                if self._logged_in_before:
                    self._stats.relogins += 1
                self._logged_in_before = True
                self._keys_read_at = time.monotonic()
                self._lock_down_once()
                self._report_ready()
            try:
                self._serve(self._poll_ms())
                self._refresh_keys(KEY_REFRESH_SECONDS)
            except BadPin as exc:  # at a module restart for a changed store (token.reinitialize_when_changed)
                return self._refused_pin(exc)

    def _lock_down_once(self) -> None:
        # After the module is loaded and logged in (what may need more), before serving any request.
        if not self._locked:
            lock_down(allow_inet=self._config.sandbox.allow_inet)
            self._locked = True

    def _open(self) -> Token:
        pin = read_pin(self._config.token.pin_file)
        try:
            return open_token(self._config.token, self._config.keys.current_label, pin)
        finally:
            pin[:] = bytes(len(pin))  # overwrite: the token has what it needs

    def _refused_pin(self, exc: BadPin) -> int:
        return self._last_words(f"{exc}; not retried: a token locks after a few failed logins", exit_code_for(exc))

    def _last_words(self, reason: str, exit_code: int) -> int:
        """Tell the supervisor why this worker exits, and make sure the message leaves before we do."""
        self._report(WorkerState.FATAL, reason)
        for sock in (self._zap, self._requests):
            if sock is not None:
                sock.close(linger=0)
        self._socket.close(linger=LAST_WORDS_LINGER_MS)
        self._context.term()
        return exit_code

    def _report_ready(self) -> None:
        token = self._token
        assert token is not None
        current = token.current.identity if token.current else None
        reason = "" if current else f"no usable key labelled {self._config.keys.current_label!r}"
        self._report(WorkerState.READY, reason, current.key_id if current else "", tuple(token.key_ids),
                     current.created if current else 0)

    def _report(self, state: WorkerState, reason: str, current: str = "", key_ids: tuple[str, ...] = (),
                created: int = 0) -> None:
        status = worker_protocol.WorkerStatus(state, reason, current, key_ids, created)
        self._socket.send_multipart(worker_protocol.encode_status(status))

    def _send_stats(self) -> None:
        """Send what we counted, at most once a second: the supervisor adds it to the broker's totals."""
        if self._stats and time.monotonic() - self._stats_sent_at >= STATS_INTERVAL_SECONDS:
            self._socket.send_multipart(worker_protocol.encode_stats(self._stats))
            self._stats, self._stats_sent_at = TokenStats(), time.monotonic()

    def _poll_ms(self) -> int:
        # Idle, wake up for the next key refresh; with a tally waiting, in time to send it.
        if not self._stats:
            return int(KEY_REFRESH_SECONDS * 1000)
        return max(0, int((self._stats_sent_at + STATS_INTERVAL_SECONDS - time.monotonic()) * 1000)) + 1

    @contextlib.contextmanager
    def _timed(self, operation: TokenOperation, mechanism: str) -> Iterator[None]:
        """Time a token operation, whether it succeeds or fails."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._stats.observe(operation, mechanism, time.perf_counter() - started)

    def _count_error(self, exc: TokenUnavailable) -> None:
        # Only the standard names: a vendor's own codes (or none) must not become a label each.
        name = PyKCS11.CKR.get(exc.ckr) if exc.ckr is not None else None
        self._stats.count_error(name if isinstance(name, str) else OTHER_ERROR)

    def _refresh_keys(self, older_than: float) -> bool:
        """Re-read the key set if our view is older than `older_than`; report it if it changed."""
        token = self._token
        if token is None or time.monotonic() - self._keys_read_at < older_than:
            return False
        before = (token.current, token.key_ids)
        try:
            with self._timed(TokenOperation.FIND_KEYS, NO_MECHANISM):
                token.refresh_keys()
        except TokenUnavailable as exc:
            self._drop_token(exc)
            self._report(WorkerState.FAILED, "token session lost; reopening")
            return False
        self._keys_read_at = time.monotonic()
        if (token.current, token.key_ids) != before:
            self._report_ready()
        return True

    def _look_again_for_missing_key(self) -> bool:
        """Re-read the key set for a key_id we lack: it may have been made (on another node, by the CLI)
        since our last read, however recent that was; such looks are bounded by their own clock, so a
        periodic read a moment before a rotation cannot make us refuse the new key for a second."""
        if time.monotonic() - self._missing_key_read_at < UNKNOWN_KEY_REFRESH_SECONDS:
            return False
        self._missing_key_read_at = time.monotonic()
        return self._refresh_keys(0.0)

    def _drop_token(self, exc: TokenUnavailable) -> None:
        """Give up this login: the next open starts from C_Initialize, logs in and finds the keys again
        (handles do not survive a re-login on every token)."""
        log.warning("token error, reinitializing the module: %s", exc.reason)
        self._count_error(exc)
        if self._token is not None:
            self._token.shut()
            self._stats.reinitializations += 1
        self._token = None

    def _wait_backoff(self) -> None:
        """Wait before reopening, answering whatever comes meanwhile: a request sent before the frontend
        learnt we lost the token gets a prompt refusal (it runs again on another worker), not a timeout."""
        deadline = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, RETRY_MAX_SECONDS)
        while (remaining := deadline - time.monotonic()) > 0:
            self._serve(int(remaining * 1000) + 1)

    def _serve(self, timeout_ms: int) -> None:
        """Wait up to `timeout_ms` for the supervisor, a connection to check, or requests; handle them."""
        self._seat.board.beat(self._seat.slot, time.monotonic())
        events = dict(self._poller.poll(min(timeout_ms, int(BEAT_SECONDS * 1000))))
        if self._socket in events:
            self._on_control()
        if self._zap in events:
            self._zap.send_multipart(zap_reply(self._zap.recv_multipart(), self._seat.policy))
        if self._requests is not None and self._requests in events:
            for _ in range(DRAIN_LIMIT):  # bounded: the supervisor's messages must not wait behind a flood
                try:
                    frames = self._requests.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if message_waiting(self._socket):
                    self._on_control()  # a new agreed key applies from the next request on
                self._serve_request(self._requests, frames)

    def _on_control(self) -> None:
        while message_waiting(self._socket):
            # Anything the supervisor sends outside the table is a bug: ProtocolViolation ends this worker.
            message = worker_protocol.decode_control(self._socket.recv_multipart())
            if isinstance(message, worker_protocol.RefreshKeys):
                self._refresh_keys(0.0)
                continue
            self._wrap_key_id = message.key_id
            if self._requests is None:
                self._open_requests()

    def _open_requests(self) -> None:
        """Start taking the frontend's connections: only now, so no wrap arrives before we know the key."""
        sock = self._context.socket(zmq.ROUTER)
        secure_listener(sock, self._seat.server, self._config.workers.queue_limit)
        sock.setsockopt(zmq.USE_FD, self._seat.listener_fd)  # the supervisor's listener: no bind() here
        sock.bind(f"ipc://{self._seat.path}")
        self._poller.register(sock, zmq.POLLIN)
        self._requests = sock

    def _serve_request(self, sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
        taken = take_request(sock, frames, ipc_schema.Endpoint.WORKER)
        if taken is None:
            return
        peer, request = taken
        board, slot = self._seat.board, self._seat.slot
        started = time.monotonic()
        board.begin(slot, started, started + request.ttl_ms / 1000)
        try:
            reply = self._handle(request)
        finally:
            board.end(slot, time.monotonic())
        sock.send_multipart([peer, ipc_schema.encode_reply(reply, request.op)])

    def _handle(self, request: ipc_schema.Request) -> ipc_schema.Reply:
        token = self._token
        if token is None:  # the frontend runs it again on another worker
            return ipc_schema.ErrorReply(request.id, ErrorCode.TOKEN_UNAVAILABLE, "broker worker lost the token")
        reply = self._perform(token, request)
        if self._token is None:
            self._report(WorkerState.FAILED, "token session lost; reopening")
        return reply

    def _perform(self, token: Token, request: ipc_schema.Request) -> ipc_schema.Reply:
        perform = self._operations[request.op]  # admit_request lets only these through
        try:
            try:
                reply = perform(token, request)
            except TokenUnavailable as exc:
                if exc.ckr not in SESSION_ERRORS:
                    raise  # counted where the token is dropped
                self._count_error(exc)
                # Wrap and unwrap are idempotent: once more on a fresh session, still logged in.
                token.replace_session()
                self._stats.session_replacements += 1
                reply = perform(token, request)
        except KeySealerError as exc:
            return ipc_schema.ErrorReply(request.id, exc.code, exc.message)
        except TokenUnavailable as exc:
            self._drop_token(exc)
            return ipc_schema.ErrorReply(request.id, ErrorCode.TOKEN_UNAVAILABLE, exc.reason)
        self._backoff = RETRY_FIRST_SECONDS
        return reply

    def _wrap(self, token: Token, request: ipc_schema.WrapRequest) -> ipc_schema.WrapResult:
        if not self._wrap_key_id:
            raise KeySealerError(ErrorCode.TOKEN_UNAVAILABLE,
                                 f"no usable key labelled {self._config.keys.current_label!r}")
        key = self._key(token, self._wrap_key_id, ErrorCode.TOKEN_UNAVAILABLE,
                        "the agreed current key is not usable in this worker")
        with self._timed(TokenOperation.WRAP, _mechanism_name(key)):
            return ipc_schema.WrapResult(request.id, token.wrap(key, request.plaintext), key.identity.key_id)

    def _unwrap(self, token: Token, request: ipc_schema.UnwrapRequest) -> ipc_schema.UnwrapResult:
        key = self._key(token, request.key_id, ErrorCode.UNKNOWN_KEY, UNKNOWN_KEY_MESSAGE)
        with self._timed(TokenOperation.UNWRAP, _mechanism_name(key)):
            return ipc_schema.UnwrapResult(request.id, token.unwrap(key, request.ciphertext))

    def _key(self, token: Token, key_id: str, code: ErrorCode, missing: str) -> TokenKey:
        """The usable key `key_id` names, looked up once per call. An unknown key is refused before any
        token call (nothing to time)."""
        key = token.key_by_id(key_id)
        if key is None and self._look_again_for_missing_key():
            key = token.key_by_id(key_id)
        if key is None:
            raise KeySealerError(code, missing)
        return key


def _mechanism_name(key: TokenKey) -> str:
    return MECHANISMS[key.identity.mechanism].name


def worker_main(config: BrokerConfig, backend: str, supervisor_pid: int, seat: WorkerSeat) -> int:
    """Entry point in a freshly forked child: never returns into the supervisor's code."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when workers stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # meant for the supervisor (reload), or a closed terminal
    _die_with_parent(supervisor_pid)
    return Worker(config, backend, seat).run()


def _die_with_parent(supervisor_pid: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != supervisor_pid:  # the supervisor died before prctl took effect
        os._exit(1)
