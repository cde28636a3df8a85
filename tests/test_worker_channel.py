"""The supervisor <-> worker channel: one closed table, strictly decoded; a worker that breaks it is killed
and replaced, its call runs once more, and the supervisor goes on.

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
from keysealer.hsm_broker.supervisor import Job, Supervisor
from keysealer.hsm_broker.worker_protocol import ProtocolViolation, WorkerStatus
from keysealer.shared import ipc_schema
from keysealer.shared.broker_stats import TokenStats
from keysealer.shared.ipc_schema import Op, WorkerState

KEY_ID = "ks1-" + "ab" * 16
CLIENT = b"client-1"
REQUEST = ipc_schema.encode_request(ipc_schema.WrapRequest(41, 5000, b"s" * 32))
WRAPPED = ipc_schema.encode_reply(ipc_schema.WrapResult(41, bytes(2) + b"r" * 16 + b"b" * 40, KEY_ID), Op.WRAP)
READY = WorkerStatus(WorkerState.READY, "", KEY_ID, (KEY_ID,), 1)


def _status(*fields: object) -> list[bytes]:
    return [worker_protocol.STATUS, msgpack.packb(list(fields))]


# Each is something no honest worker sends while holding request 41 (a wrap from CLIENT).
JUNK = {
    "unknown kind": [b"X", b"whatever"],
    "no kind": [b""],
    "status not msgpack": [worker_protocol.STATUS, b"\xc1"],
    "status with too few fields": _status("ready", "", KEY_ID, [KEY_ID]),
    "status with an unknown state": _status("dancing", "", KEY_ID, [KEY_ID], 1),
    "status with a number for a reason": _status("ready", 5, KEY_ID, [KEY_ID], 1),
    "status with an extra frame": [*worker_protocol.encode_status(READY), b"x"],
    "stats that break the schema": [worker_protocol.STATS, msgpack.packb({"lat": "x"})],
    "reply that breaks the schema": [worker_protocol.REPLY, CLIENT, b"\x81\xa1v\x01"],
    "reply to another request": worker_protocol.encode_reply(
        CLIENT, ipc_schema.encode_reply(ipc_schema.WrapResult(42, bytes(2) + b"r" * 16 + b"b" * 40, KEY_ID),
                                        Op.WRAP)),
    "reply of another operation": worker_protocol.encode_reply(
        CLIENT, ipc_schema.encode_reply(ipc_schema.UnwrapResult(41, b"p" * 32), Op.UNWRAP)),
    "reply to another client": worker_protocol.encode_reply(b"client-2", WRAPPED),
    "return_job with a frame": [worker_protocol.RETURN_JOB, b"x"],
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

    def hand_over_request(self) -> None:
        self.say(worker_protocol.encode_status(READY))
        self.supervisor._queue.append(Job(CLIENT, REQUEST, 41, Op.WRAP, time.monotonic() + 5))
        self.supervisor._dispatch()
        assert self.worker.poll(5000)
        assert self.worker.recv_multipart() == worker_protocol.encode_job(worker_protocol.Job(CLIENT, REQUEST,
                                                                                              KEY_ID))

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
        opened.hand_over_request()
        yield opened
    finally:
        opened.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("junk", JUNK.values(), ids=JUNK.keys())
def test_a_worker_that_breaks_the_protocol_is_killed_and_its_call_runs_again(channel: Channel,
                                                                              junk: list[bytes]) -> None:
    channel.say(junk)
    deadline = time.monotonic() + 5
    while channel.slot.pid:  # the supervisor's own reaping sees it die
        assert time.monotonic() < deadline, "the worker was not killed"
        time.sleep(0.01)
        channel.supervisor._reap_workers()
    queued = list(channel.supervisor._queue)
    assert [job.request_id for job in queued] == [41] and queued[0].retried  # runs once more elsewhere
    assert channel.slot.status.state is WorkerState.FAILED and channel.slot.restart_at > 0  # to be replaced
    # What it says afterwards is not heard: it is no worker of ours any more.
    channel.worker.send_multipart(worker_protocol.encode_reply(CLIENT, WRAPPED))
    time.sleep(0.05)
    channel.supervisor._drain(channel.supervisor._back, channel.supervisor._on_worker_message)
    assert not channel.client.poll(100)


def test_an_honest_reply_reaches_its_client_and_the_worker_lives_on(channel: Channel) -> None:
    channel.say(worker_protocol.encode_reply(CLIENT, WRAPPED))
    assert channel.client.poll(5000) and channel.client.recv_multipart() == [WRAPPED]
    assert os.waitpid(channel.pid, os.WNOHANG) == (0, 0)
    assert channel.slot.job is None and list(channel.supervisor._idle) == [channel.slot.routing_id]


def test_the_decoders_accept_what_the_encoders_make() -> None:
    assert worker_protocol.decode_status(worker_protocol.encode_status(READY)) == READY
    assert worker_protocol.decode_stats(worker_protocol.encode_stats(TokenStats(relogins=2))) == TokenStats(relogins=2)
    reply = worker_protocol.decode_reply(worker_protocol.encode_reply(CLIENT, WRAPPED))
    assert (reply.client, reply.request_id, reply.op) == (CLIENT, 41, Op.WRAP)
    job = worker_protocol.Job(CLIENT, REQUEST, KEY_ID)
    assert worker_protocol.decode_job(worker_protocol.encode_job(job)) == job
    with pytest.raises(ProtocolViolation):
        worker_protocol.decode_job([worker_protocol.JOB, CLIENT, REQUEST, b"\xff"])
