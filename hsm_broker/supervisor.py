"""The broker supervisor: binds the broker's sockets, runs the workers, and answers health.

It never loads PKCS #11 and no request passes through it (docs/architecture.md, "Request path"). It binds
the frontend-facing sockets before it drops privileges and locks down: its own (health only) and one per
worker slot, which it holds across worker restarts and hands to each new worker at the fork. It forks and
replaces workers, kills a worker that overruns a call (seen on the call board, not in messages), decides
the one key every wrap uses once every ready worker knows it, and tells the workers.
"""

import contextlib
import logging
import os
import pwd
import resource
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from keysealer.hsm_broker import worker_protocol
from keysealer.hsm_broker.call_board import CallBoard
from keysealer.hsm_broker.config import BrokerConfig
from keysealer.hsm_broker.ipc_auth import ZAP_ENDPOINT, PeerPolicy, zap_reply
from keysealer.hsm_broker.listener import BACKLOG, SEND_HWM, WorkerSeat, secure_listener, take_request
from keysealer.hsm_broker.rate_limit import RateLimit
from keysealer.hsm_broker.worker_protocol import ProtocolViolation, WorkerStatus, worker_routing_id
from keysealer.shared import ipc_schema
from keysealer.shared.broker_stats import BrokerStats, TokenStats
from keysealer.shared.errors import ErrorCode, SandboxError, UsageError
from keysealer.shared.ipc_keys import KeyPair, load_keypair, load_public_key
from keysealer.shared.ipc_schema import MAX_COUNT, WorkerState
from keysealer.shared.open_files import raise_open_file_limit
from keysealer.shared.process import EXIT_BAD_PIN, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, error_for_exit_code
from keysealer.shared.safe_paths import SocketDirectory, owner_of_created, prepare_directory, service_account
from keysealer.shared.sandbox import become_configured_user, lock_down, require_user_if_root
from keysealer.shared.socket_path import worker_socket_path

log = logging.getLogger(__name__)

POLL_MS = 100
RESTART_FIRST_SECONDS = 0.5
RESTART_MAX_SECONDS = 30.0
# A worker that served this long is healthy again: its next crash restarts it without delay.
STABLE_SECONDS = 60.0
STOP_GRACE_SECONDS = 2.0
# A worker still holding a call this long after its deadline is hung (a PKCS #11 call that never returns,
# a frozen process): it is killed and replaced, so it cannot hold capacity forever.
STUCK_GRACE_SECONDS = 5.0
# A ready worker goes round its loop at least once a second; one silent this long between calls is frozen
# or hung (in a key-set read, say) and would leave the calls sent to it unanswered: killed and replaced too.
SILENT_LIMIT_SECONDS = 10.0
# A loop turn this much later than its poll allows means we ourselves were stopped (SIGSTOP, a paused VM,
# a starved machine): workers are then judged only on time we saw pass since (they were stopped too).
OWN_GAP_SECONDS = 1.0
# Exit codes after which restarting a worker cannot help and could lock the token.
FATAL_WORKER_EXITS = frozenset({EXIT_BAD_PIN, EXIT_USAGE})
STARTING = worker_protocol.WorkerStatus(WorkerState.STARTING, "starting", "", ())
# Health is answered at once; this many per second, in bursts up to the same number, are answered in full
# (the frontend needs about one a second), the rest get a short `busy`.
HEALTH_PER_SECOND = 50


@dataclass
class WorkerSlot:
    index: int
    listener: socket.socket | None = None  # the frontend's way to this slot's worker, whoever it is now
    pid: int = 0
    started: float = 0.0
    restart_delay: float = RESTART_FIRST_SECONDS
    restart_at: float = 0.0
    status: WorkerStatus = STARTING
    told_key: str | None = None  # the wrap key this worker was last told (None: nothing yet)
    killed: bool = False

    @property
    def routing_id(self) -> bytes:
        return worker_routing_id(self.pid)


@dataclass(frozen=True, slots=True)
class WorkerMessageKind:
    """One row of the worker channel's table: how a kind decodes, who handles it, when it may arrive."""

    decode: Callable[[list[bytes]], Any]  # raises ProtocolViolation
    handle: Callable[[WorkerSlot, Any], None]


@dataclass
class Supervisor:
    config: BrokerConfig
    _stopping: bool = False
    _exit_code: int = EXIT_OK

    def __post_init__(self) -> None:
        self._slots = [WorkerSlot(index) for index in range(self.config.workers.count)]
        self._board = CallBoard(len(self._slots))  # before any fork: every worker shares it
        self._server: KeyPair | None = None
        self._context = zmq.Context()
        self._front = self._context.socket(zmq.ROUTER)
        self._back = self._context.socket(zmq.ROUTER)
        self._zap = self._context.socket(zmq.REP)
        self._policy = PeerPolicy(frozenset(), frozenset())  # set in run(), once we run as our own user
        self._dirs: list[SocketDirectory] = []  # held open: sockets are claimed and removed relative to them
        self._bound: list[tuple[SocketDirectory, str]] = []
        self._current_key_id = ""
        self._pending_control: list[bytes] = []
        self._health_limit = RateLimit(HEALTH_PER_SECOND)
        # The broker's measurements since it started: workers' tallies added up (so they outlive the
        # worker that counted them), and the busy time of workers that exited.
        self._token_stats = TokenStats()
        self._busy_us_before = 0
        self._by_routing_id: dict[bytes, WorkerSlot] = {}  # live workers
        self._worker_messages = {
            worker_protocol.STATUS: WorkerMessageKind(worker_protocol.decode_status, self._on_status),
            worker_protocol.STATS: WorkerMessageKind(worker_protocol.decode_stats, self._on_stats),
        }
        self._backend = f"ipc://{self.config.ipc.worker_socket}"
        self._last_turn = self._watching_since = time.monotonic()

    def run(self) -> int:
        try:
            require_user_if_root(self.config.user)
        except SandboxError as exc:
            raise UsageError(str(exc)) from None
        try:
            raise_open_file_limit()  # before any listener: 1,024 idle connections must not starve us
            self._bind()
            self._confine()
            signal.signal(signal.SIGTERM, self._request_stop)
            signal.signal(signal.SIGINT, self._request_stop)
            signal.signal(signal.SIGHUP, self._refresh_all_keys)
            log.info("broker listening on %s with %d workers", self.config.ipc.socket, len(self._slots))
            self._serve()
        finally:
            self._shutdown()
        return self._exit_code

    # -- setup and teardown --------------------------------------------------------------------------

    def _bind(self) -> None:
        socket_path, worker_socket = self.config.ipc.socket, self.config.ipc.worker_socket
        # Started by root to become `user`: what we create must belong to that user, or the workers
        # (running as it) could not reach their socket. Each directory is created and checked on its
        # descriptor (safe_paths): this user may have replaced anything inside them since the last start.
        account = service_account(self.config.user)
        owner = owner_of_created(account, self.config.ipc.group, "ipc.group")
        worker_owner = owner_of_created(account, None, "")
        socket_dir = prepare_directory(socket_path.parent, 0o750, owner)
        worker_dir = prepare_directory(worker_socket.parent, 0o700, worker_owner, socket_dir)
        self._dirs = [SocketDirectory(socket_path.parent, socket_dir), SocketDirectory(worker_socket.parent,
                                                                                       worker_dir)]
        front_dir, back_dir = self._dirs
        slot_names = [worker_socket_path(socket_path, slot.index).name for slot in self._slots]
        for name in (socket_path.name, *slot_names):
            front_dir.claim(name)
        back_dir.claim(worker_socket.name)
        # Only our own workers (socket 0600 in a 0700 directory) speak on the back socket: no bound needed.
        self._back.setsockopt(zmq.RCVHWM, 100_000)
        self._back.setsockopt(zmq.SNDHWM, 100_000)
        self._back.setsockopt(zmq.LINGER, 0)
        # Every connection is authenticated (CURVE key and peer uid) by zap_reply before any message.
        self._zap.bind(ZAP_ENDPOINT)
        self._server = load_keypair(self.config.ipc.server_key)
        secure_listener(self._front, self._server, SEND_HWM)
        with front_dir.creating(socket_path.name, 0o660, owner) as path:
            self._front.bind(f"ipc://{path}")
        self._bound.append((front_dir, socket_path.name))
        # Each worker slot's socket is bound and listened on here, with the same owner and mode, and kept
        # across worker restarts: a new worker takes it over (ZMQ_USE_FD) without any bind of its own.
        for slot, name in zip(self._slots, slot_names, strict=True):
            slot.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with front_dir.creating(name, 0o660, owner) as path:
                slot.listener.bind(path)
            slot.listener.listen(BACKLOG)
            self._bound.append((front_dir, name))
        with back_dir.creating(worker_socket.name, 0o600, worker_owner) as path:
            self._back.bind(f"ipc://{path}")
        self._bound.append((back_dir, worker_socket.name))

    def _confine(self) -> None:
        """Sockets are bound: become the service user, then lock down before the first worker exists, so
        every worker inherits the filter from its first instruction."""
        try:
            if become_configured_user(self.config.user, self.config.groups):
                log.warning("running as root, as configured (user: root)")
            lock_down(allow_inet=self.config.sandbox.allow_inet)
        except SandboxError as exc:
            raise UsageError(f"cannot sandbox the broker: {exc}") from None
        self._policy = _peer_policy(self.config)  # "the broker's own user" means the user we now run as

    def _serve(self) -> None:
        poller = zmq.Poller()
        for sock in (self._front, self._back, self._zap):
            poller.register(sock, zmq.POLLIN)
        while not self._stopping:
            self._spawn_due_workers()
            events = dict(poller.poll(POLL_MS))
            if self._zap in events:
                self._drain(self._zap, self._answer_zap)
            if self._back in events:
                self._drain(self._back, self._on_worker_message)
                self._send_control()  # workers hear of a new agreed key before any health answer names it
            if self._front in events:
                self._drain(self._front, self._on_client_message)
            self._kill_stuck_workers()
            self._reap_workers()
            self._send_control()

    def _request_stop(self, signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        self._stopping = True

    def _shutdown(self) -> None:
        for slot in self._slots:
            if slot.pid:
                _signal(slot.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while any(slot.pid for slot in self._slots) and time.monotonic() < deadline:
            self._reap_workers(restart=False)
            time.sleep(0.02)
        for slot in self._slots:
            if slot.pid:
                _signal(slot.pid, signal.SIGKILL)
                os.waitpid(slot.pid, 0)
        self._context.destroy(linger=0)
        for slot in self._slots:
            if slot.listener is not None:
                slot.listener.close()
        for directory, name in self._bound:  # only ours: never a socket another live broker serves
            directory.remove(name)
        for directory in self._dirs:
            os.close(directory.fd)

    # -- workers -------------------------------------------------------------------------------------

    def _spawn_due_workers(self) -> None:
        # One worker logs in at a time: SoftHSM rewrites its token file on login, and a wrong PIN
        # must cost one failed login, not one per worker.
        if any(slot.pid and slot.status.state in (WorkerState.STARTING, WorkerState.FATAL) for slot in self._slots):
            return
        now = time.monotonic()
        for slot in self._slots:
            if not slot.pid and now >= slot.restart_at:
                self._fork_worker(slot)
                return

    def _fork_worker(self, slot: WorkerSlot) -> None:
        supervisor_pid = os.getpid()
        assert slot.listener is not None and self._server is not None  # bound before any fork
        self._board.clear(slot.index, time.monotonic())
        seat = WorkerSeat(slot.index, slot.listener.fileno(), str(worker_socket_path(self.config.ipc.socket,
                                                                                     slot.index)),
                          self._server, self._policy, self._board)
        pid = os.fork()
        if pid == 0:
            code = EXIT_FAILURE
            try:
                # The supervisor's other listening sockets and ZeroMQ's internal descriptors are not the
                # worker's to hold (a worker holding broker.sock's listener would keep it accepting
                # connections nobody serves); the worker keeps its own slot's listener only.
                limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
                os.closerange(3, seat.listener_fd)
                os.closerange(seat.listener_fd + 1, limit)
                # Imported only here, in the child: the supervisor itself never loads PyKCS11.
                from keysealer.hsm_broker.worker import worker_main

                code = worker_main(self.config, self._backend, supervisor_pid, seat)
            except BaseException:
                log.exception("worker crashed")
            finally:
                os._exit(code)  # never run the supervisor's cleanup in a child
        self._adopt(slot, pid)
        log.info("started worker %d", pid)

    def _adopt(self, slot: WorkerSlot, pid: int) -> None:
        """From now on, `slot` is the process `pid`: what arrives under its routing id is its message."""
        slot.pid, slot.started, slot.status, slot.told_key, slot.killed = pid, time.monotonic(), STARTING, None, False
        self._by_routing_id[slot.routing_id] = slot

    def _kill_stuck_workers(self) -> None:
        now = time.monotonic()
        if now - self._last_turn > POLL_MS / 1000 + OWN_GAP_SECONDS:
            self._watching_since = now
        self._last_turn = now
        watched = now - self._watching_since
        for slot in self._slots:
            if not slot.pid or slot.killed:
                continue
            overrun = min(self._board.overrun(slot.index, now), watched)
            silent = self._board.silent(slot.index, now) if slot.status.state is not WorkerState.STARTING else 0.0
            silent = min(silent, watched)
            if overrun > STUCK_GRACE_SECONDS:
                self._kill(slot, f"held a call {overrun:.0f}s past its deadline")
            elif silent > SILENT_LIMIT_SECONDS:
                self._kill(slot, f"has not gone round its loop for {silent:.0f}s")

    def _kill(self, slot: WorkerSlot, why: str) -> None:
        """SIGKILL a worker that cannot be trusted to go on. Its connections close with it, so the frontend
        runs its calls again on another worker; reaping it starts a new one."""
        log.warning("worker %d %s: killing it", slot.pid, why)
        _signal(slot.pid, signal.SIGKILL)
        slot.killed = True

    def _reap_workers(self, restart: bool = True) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self._slots if s.pid == pid), None)
            if slot is not None:
                self._on_worker_exit(slot, os.waitstatus_to_exitcode(wait_status), restart)

    def _on_worker_exit(self, slot: WorkerSlot, code: int, restart: bool) -> None:
        fatal = restart and code in FATAL_WORKER_EXITS
        if fatal:
            self._drain(self._back, self._on_worker_message)  # collect its last report, if any
        routing_id = slot.routing_id
        del self._by_routing_id[routing_id]
        slot.pid = 0
        self._busy_us_before += self._board.busy_us(slot.index, time.monotonic())  # its row is cleared at the next fork
        self._refresh_current_key()
        if not restart:
            return
        if fatal:
            reason = slot.status.reason if slot.status.state is WorkerState.FATAL else f"worker exited with code {code}"
            raise error_for_exit_code(code, reason)
        log.warning("worker %s exited with code %d", routing_id.decode(), code)
        now = time.monotonic()
        if now - slot.started > STABLE_SECONDS:
            slot.restart_delay = RESTART_FIRST_SECONDS
        slot.restart_at = now + slot.restart_delay
        slot.restart_delay = min(slot.restart_delay * 2, RESTART_MAX_SECONDS)
        slot.status = WorkerStatus(WorkerState.FAILED, f"worker exited with code {code}", "", ())

    def _send_control(self) -> None:
        # Sent from the loop, not the signal handler: ZeroMQ sockets are not reentrant.
        while self._pending_control:
            routing_id = self._pending_control.pop()
            if routing_id in self._by_routing_id:
                self._back.send_multipart([routing_id, worker_protocol.REFRESH_KEYS])
        # Every ready worker wraps with the agreed key; a worker starts serving when first told it.
        for slot in self._slots:
            if slot.pid and not slot.killed and slot.status.state is WorkerState.READY \
                    and slot.told_key != self._current_key_id:
                self._back.send_multipart([slot.routing_id, *worker_protocol.encode_use_key(self._current_key_id)])
                slot.told_key = self._current_key_id

    def _refresh_current_key(self) -> None:
        self._current_key_id = worker_protocol.agreed_current_key([s.status for s in self._slots if s.pid])

    def _refresh_all_keys(self, _signum: int, _frame: object) -> None:
        # SIGHUP (systemctl reload): every worker re-reads the token's key set now, not within 5 s.
        for slot in self._slots:
            if slot.pid:
                self._pending_control.append(slot.routing_id)

    def _on_worker_message(self, frames: list[bytes]) -> None:
        routing_id, *message = frames
        slot = self._by_routing_id.get(routing_id)
        if slot is None or slot.killed:
            return  # from a worker already reaped or being killed: nothing it says counts any more
        try:
            kind = self._worker_messages.get(message[0]) if message else None
            if kind is None:
                raise ProtocolViolation("unknown message kind")
            kind.handle(slot, kind.decode(message))
        except ProtocolViolation as exc:
            # A broken or subverted worker: never trust what else it says, never let it stop the broker.
            self._kill(slot, f"broke the worker protocol ({exc})")

    def _on_status(self, slot: WorkerSlot, status: WorkerStatus) -> None:
        slot.status = status
        self._refresh_current_key()

    def _on_stats(self, _slot: WorkerSlot, stats: TokenStats) -> None:
        self._token_stats.add(stats)

    # -- clients -------------------------------------------------------------------------------------

    def _answer_zap(self, frames: list[bytes]) -> None:
        self._zap.send_multipart(zap_reply(frames, self._policy))

    def _on_client_message(self, frames: list[bytes]) -> None:
        taken = take_request(self._front, frames, ipc_schema.Endpoint.SUPERVISOR)
        if taken is None:
            return
        client, request = taken
        # Bounded here: a peer asking in a loop gets short refusals, not full reports.
        if not self._health_limit.allow():
            reply: ipc_schema.Reply = ipc_schema.ErrorReply(request.id, ErrorCode.BUSY, "too many health requests")
        else:
            reply = self._health(request.id)
        self._front.send_multipart([client, ipc_schema.encode_reply(reply, request.op)])

    def _health(self, request_id: int) -> ipc_schema.HealthResult:
        ready = [s.status for s in self._slots if s.status.state is WorkerState.READY]
        key_ids = list(dict.fromkeys(k for s in ready for k in s.key_ids))  # newest first, as workers list them
        workers = tuple(ipc_schema.WorkerHealth(s.status.state.value, s.status.reason) for s in self._slots)
        return ipc_schema.HealthResult(request_id, self._current_key_id, tuple(key_ids), workers, self._stats())

    def _stats(self) -> BrokerStats:
        now = time.monotonic()
        live = [s for s in self._slots if s.pid]
        busy = sum(self._board.busy(s.index) for s in live)
        idle = sum(s.status.state is WorkerState.READY and not self._board.busy(s.index) for s in live)
        # Calls still running count up to now, so the total never goes down when they finish. The rows are
        # written by workers: clamped, so a bad one cannot break the report.
        busy_us = self._busy_us_before + sum(self._board.busy_us(s.index, now) for s in live)
        return BrokerStats(self._token_stats, busy, idle, min(busy_us, MAX_COUNT))

    @staticmethod
    def _drain(sock: zmq.Socket[bytes], handle: Callable[[list[bytes]], None]) -> None:
        # Bounded, so a flood on one socket cannot starve the other.
        for _ in range(1000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            handle(frames)


def _peer_policy(config: BrokerConfig) -> PeerPolicy:
    user = config.ipc.frontend_user
    try:
        # A numeric uid needs no passwd entry (containers often lack one for the other container's user).
        uid = os.geteuid() if user is None else int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
    except KeyError:
        raise UsageError(f"ipc.frontend_user: no user named {user!r}") from None
    keys = frozenset(load_public_key(path) for path in config.ipc.client_keys)
    return PeerPolicy(client_keys=keys, allowed_uids=frozenset({uid}))


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
