"""The supervisor <-> worker channel: one closed table, strictly decoded; a worker that breaks it is killed
and replaced, and the supervisor goes on. And where each request may arrive: wraps and unwraps at a worker's
socket, health at the supervisor's, nothing anywhere else.

The supervisor here is the real one with its real sockets; the "worker" is a real process (which the
supervisor must kill) whose place on the worker socket a test DEALER takes, to say what no worker would.
"""

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
from harness import short_tmp_dir

from keysealer.hsm_broker import worker_protocol
from keysealer.hsm_broker.config import BrokerConfig, IpcConfig, KeysConfig, TokenConfig, WorkersConfig
from keysealer.hsm_broker.supervisor import Supervisor
from keysealer.hsm_broker.worker_protocol import ProtocolViolation, WorkerStatus
from keysealer.shared import ipc_schema
from keysealer.shared.broker_stats import TokenStats
from keysealer.shared.errors import ErrorCode
from keysealer.shared.ipc_schema import Endpoint, Op, WorkerState

KEY_ID = "ks1-" + "ab" * 16
NEWER_KEY_ID = "ks1-" + "cd" * 16
CLIENT = b"client-1"
WRAPPED = ipc_schema.encode_reply(ipc_schema.WrapResult(41, bytes(2) + b"r" * 16 + b"b" * 40, KEY_ID), Op.WRAP)
READY = WorkerStatus(WorkerState.READY, "", KEY_ID, (KEY_ID,), 1)
NEWER = WorkerStatus(WorkerState.READY, "", NEWER_KEY_ID, (NEWER_KEY_ID, KEY_ID), 2)


def _status(*fields: object) -> list[bytes]:
    return [worker_protocol.STATUS, msgpack.packb(list(fields))]


# Each is something no honest worker sends.
JUNK = {
    "unknown kind": [b"X", b"whatever"],
    "no kind": [b""],
    "status not msgpack": [worker_protocol.STATUS, b"\xc1"],
    "status with too few fields": _status("ready", "", KEY_ID, [KEY_ID]),
    "status with an unknown state": _status("dancing", "", KEY_ID, [KEY_ID], 1),
    "status with a number for a reason": _status("ready", 5, KEY_ID, [KEY_ID], 1),
    "status with an extra frame": [*worker_protocol.encode_status(READY), b"x"],
    "stats that break the schema": [worker_protocol.STATS, msgpack.packb({"lat": "x"})],
    "stats with an extra frame": [*worker_protocol.encode_stats(TokenStats(relogins=1)), b"x"],
    # Requests and replies never pass through the supervisor any more: a worker sending one is broken.
    "a reply for a client": [b"R", CLIENT, WRAPPED],
    "a job handed back": [b"B"],
    "a control message (supervisor to worker only)": worker_protocol.encode_use_key(KEY_ID),
}

# Each is something the supervisor never sends a worker: the worker exits rather than guess.
BAD_CONTROL = {
    "unknown kind": [b"X"],
    "refresh with a frame": [worker_protocol.REFRESH_KEYS, b"x"],
    "use_key without a key frame": [worker_protocol.USE_KEY],
    "use_key with two key frames": [worker_protocol.USE_KEY, b"a", b"b"],
    "use_key not text": [worker_protocol.USE_KEY, b"\xff"],
    "use_key too long": [worker_protocol.USE_KEY, b"k" * (ipc_schema.MAX_KEY_ID_LEN + 1)],
    "a status (worker to supervisor only)": worker_protocol.encode_status(READY),
}


class Channel:
    """A real supervisor whose one worker slot is a live process (which it may kill and reap), a DEALER
    speaking on that worker's behalf, and a DEALER as the frontend, waiting for request 41's answer."""

    def __init__(self, root: Path) -> None:
        missing = root / "unused"
        config = BrokerConfig(TokenConfig(missing, missing), KeysConfig("k"),
                              IpcConfig(root / "broker.sock", missing, []), workers=WorkersConfig(count=1))
        self.supervisor = Supervisor(config)
        self.supervisor._front.bind(f"ipc://{root}/front.sock")
        self.supervisor._back.bind(f"ipc://{root}/backend.sock")
        # A child of this test process, so the supervisor's waitpid reaps it as it would a forked worker.
        self.pid = os.posix_spawn(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)"], os.environ)
        self.slot = self.supervisor._slots[0]
        self.supervisor._adopt(self.slot, self.pid)
        self.context = zmq.Context()
        self.worker = self._dealer(worker_protocol.worker_routing_id(self.pid), f"ipc://{root}/backend.sock")
        self.client = self._dealer(CLIENT, f"ipc://{root}/front.sock")

    def _dealer(self, routing_id: bytes, endpoint: str) -> zmq.Socket[bytes]:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.connect(endpoint)
        return sock

    def say(self, frames: list[bytes]) -> None:
        """The worker sends `frames`; the supervisor handles them as its loop would."""
        self.worker.send_multipart(frames)
        assert self.supervisor._back.poll(5000)
        self.supervisor._drain(self.supervisor._back, self.supervisor._on_worker_message)

    def told(self) -> list[bytes]:
        """What the supervisor's next loop turn tells the worker."""
        self.supervisor._send_control()
        assert self.worker.poll(5000), "the supervisor told the worker nothing"
        return self.worker.recv_multipart()

    def close(self) -> None:
        self.context.destroy(linger=0)
        self.supervisor._context.destroy(linger=0)
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)


@pytest.fixture
def channel() -> Iterator[Channel]:
    root = short_tmp_dir()
    opened = Channel(root)
    try:
        opened.say(worker_protocol.encode_status(READY))
        # A ready worker is told the key every wrap uses (and only then starts taking requests).
        assert opened.told() == worker_protocol.encode_use_key(KEY_ID)
        yield opened
    finally:
        opened.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("junk", JUNK.values(), ids=JUNK.keys())
def test_a_worker_that_breaks_the_protocol_is_killed_and_replaced(channel: Channel, junk: list[bytes]) -> None:
    channel.say(junk)
    deadline = time.monotonic() + 5
    while channel.slot.pid:  # the supervisor's own reaping sees it die
        assert time.monotonic() < deadline, "the worker was not killed"
        time.sleep(0.01)
        channel.supervisor._reap_workers()
    assert channel.slot.status.state is WorkerState.FAILED and channel.slot.restart_at > 0  # to be replaced
    # What it says afterwards is not heard: it is no worker of ours any more.
    channel.worker.send_multipart(worker_protocol.encode_status(NEWER))
    time.sleep(0.05)
    channel.supervisor._drain(channel.supervisor._back, channel.supervisor._on_worker_message)
    assert channel.slot.status.state is WorkerState.FAILED


def test_an_honest_status_moves_the_agreed_key_and_the_worker_lives_on(channel: Channel) -> None:
    channel.say(worker_protocol.encode_status(NEWER))
    assert channel.told() == worker_protocol.encode_use_key(NEWER_KEY_ID)
    assert os.waitpid(channel.pid, os.WNOHANG) == (0, 0)
    assert channel.supervisor._current_key_id == NEWER_KEY_ID


@pytest.mark.parametrize("junk", BAD_CONTROL.values(), ids=BAD_CONTROL.keys())
def test_a_worker_refuses_what_the_supervisor_never_sends(junk: list[bytes]) -> None:
    with pytest.raises(ProtocolViolation):
        worker_protocol.decode_control(junk)


def test_the_decoders_accept_what_the_encoders_make() -> None:
    assert worker_protocol.decode_status(worker_protocol.encode_status(READY)) == READY
    assert worker_protocol.decode_stats(worker_protocol.encode_stats(TokenStats(relogins=2))) == TokenStats(relogins=2)
    assert worker_protocol.decode_control(worker_protocol.encode_use_key(KEY_ID)) == worker_protocol.UseKey(KEY_ID)
    assert worker_protocol.decode_control(worker_protocol.encode_use_key("")) == worker_protocol.UseKey("")
    assert worker_protocol.decode_control([worker_protocol.REFRESH_KEYS]) == worker_protocol.RefreshKeys()


REQUESTS = {
    Op.WRAP: ipc_schema.WrapRequest(7, 1000, b"s" * 32),
    Op.UNWRAP: ipc_schema.UnwrapRequest(7, 1000, bytes(2) + b"r" * 16 + b"b" * 40, KEY_ID),
    Op.HEALTH: ipc_schema.HealthRequest(7, 1000),
}


@pytest.mark.parametrize("endpoint", list(Endpoint))
@pytest.mark.parametrize("op", list(Op))
def test_each_request_is_served_only_where_the_table_says(op: Op, endpoint: Endpoint) -> None:
    admitted = ipc_schema.admit_request(ipc_schema.encode_request(REQUESTS[op]), endpoint)
    if ipc_schema.ARRIVES_AT[op] is endpoint:
        assert admitted == REQUESTS[op]
        return
    assert isinstance(admitted, ipc_schema.Refusal) and admitted.reply is not None
    refusal, answered = ipc_schema.decode_reply_and_op(admitted.reply)
    assert answered is op and isinstance(refusal, ipc_schema.ErrorReply)
    assert refusal.code is ErrorCode.INVALID_REQUEST and refusal.id == 7


def test_the_supervisor_answers_health_and_refuses_a_wrap(channel: Channel) -> None:
    for request in (REQUESTS[Op.HEALTH], REQUESTS[Op.WRAP]):
        channel.client.send(ipc_schema.encode_request(request))
        assert channel.supervisor._front.poll(5000)
        channel.supervisor._drain(channel.supervisor._front, channel.supervisor._on_client_message)
        assert channel.client.poll(5000)
        reply, op = ipc_schema.decode_reply_and_op(channel.client.recv())
        assert op is request.op
        if request.op is Op.HEALTH:
            assert isinstance(reply, ipc_schema.HealthResult) and reply.current_key_id == KEY_ID
        else:
            assert isinstance(reply, ipc_schema.ErrorReply) and reply.code is ErrorCode.INVALID_REQUEST
