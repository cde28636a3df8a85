"""The broker's IPC sockets, spoken to directly: the supervisor's (health) and a worker's (wrap, unwrap).
The schema, the CURVE key and the peer's uid are enforced at each, not only in the frontend."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
from harness import Plugin, running_plugin
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keysealer.shared import ipc_schema
from keysealer.shared.errors import ErrorCode
from keysealer.shared.ipc_keys import PUBLIC_SUFFIX, SECRET_SUFFIX, KeyPair, load_keypair, load_public_key
from keysealer.shared.ipc_schema import Endpoint
from keysealer.shared.socket_path import worker_socket_path

REPLY_TIMEOUT_MS = 3000
QUIET_MS = 300


def _endpoint(plugin: Plugin, where: Endpoint) -> str:
    socket = plugin.layout.broker_socket
    return f"ipc://{socket if where is Endpoint.SUPERVISOR else worker_socket_path(socket, 0)}"


def _connect(context: zmq.Context[zmq.Socket[bytes]], plugin: Plugin, client: KeyPair | None,
             where: Endpoint = Endpoint.SUPERVISOR) -> zmq.Socket[bytes]:
    """A DEALER on one of the broker's sockets, with the given CURVE identity (None: plain, no CURVE)."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if client is not None:
        sock.curve_publickey, sock.curve_secretkey = client.public, client.secret
        sock.curve_serverkey = load_public_key(plugin.layout.ipc_key("broker", PUBLIC_SUFFIX))
    sock.connect(_endpoint(plugin, where))
    return sock


def _frontend_key(plugin: Plugin) -> KeyPair:
    return load_keypair(plugin.layout.ipc_key("frontend", SECRET_SUFFIX))


@pytest.fixture
def dealer(shared_plugin: Plugin) -> Iterator[zmq.Socket[bytes]]:
    """The frontend's identity on the supervisor's socket."""
    context = zmq.Context()
    yield _connect(context, shared_plugin, _frontend_key(shared_plugin))
    context.destroy(linger=0)


@pytest.fixture
def worker(shared_plugin: Plugin) -> Iterator[zmq.Socket[bytes]]:
    """The frontend's identity on worker 0's socket."""
    context = zmq.Context()
    yield _connect(context, shared_plugin, _frontend_key(shared_plugin), Endpoint.WORKER)
    context.destroy(linger=0)


@pytest.fixture(params=list(Endpoint), ids=["supervisor", "worker"])
def anywhere(request: pytest.FixtureRequest, shared_plugin: Plugin) -> Iterator[zmq.Socket[bytes]]:
    """The frontend's identity on each kind of broker socket in turn."""
    context = zmq.Context()
    yield _connect(context, shared_plugin, _frontend_key(shared_plugin), request.param)
    context.destroy(linger=0)


@pytest.mark.parametrize("where", list(Endpoint), ids=["supervisor", "worker"])
def test_only_an_admitted_curve_key_gets_an_answer(shared_plugin: Plugin, where: Endpoint) -> None:
    # Health at a worker's socket is refused with an answer: only an admitted peer gets even that.
    health = ipc_schema.encode_request(ipc_schema.HealthRequest(3, 1000))
    public, secret = zmq.curve_keypair()
    context = zmq.Context()
    try:
        for stranger in (None, KeyPair(public, secret)):
            assert _exchange(_connect(context, shared_plugin, stranger, where), health, QUIET_MS * 3) is None
        reply = _exchange(_connect(context, shared_plugin, _frontend_key(shared_plugin), where), health)
        if where is Endpoint.SUPERVISOR:
            assert isinstance(reply, ipc_schema.HealthResult)
        else:
            assert isinstance(reply, ipc_schema.ErrorReply) and reply.code is ErrorCode.INVALID_REQUEST
    finally:
        context.destroy(linger=0)


_CLIENT_AS_ANOTHER_USER = """
import os, sys, zmq
from pathlib import Path
from keysealer.shared import ipc_schema
from keysealer.shared.ipc_keys import load_keypair, load_public_key
key, server = load_keypair(Path(sys.argv[1])), load_public_key(Path(sys.argv[2]))
endpoint, uid = sys.argv[3], int(sys.argv[4])
os.setresuid(uid, uid, uid)  # keeps gid 0: the socket's group permissions still let it connect
sock = zmq.Context().socket(zmq.DEALER)
sock.linger = 0
sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = key.public, key.secret, server
sock.connect(endpoint)
sock.send(ipc_schema.encode_request(ipc_schema.HealthRequest(1, 1000)))
print("answered" if sock.poll(1500) else "silence")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client under another uid")
def test_the_frontends_key_from_another_uid_gets_no_answer(state_dir: Path) -> None:
    # Let any user traverse to the socket, so only the ZAP uid check stands between them and the broker.
    state_dir.chmod(0o711)
    with running_plugin(state_dir) as plugin:
        for where in Endpoint:
            arguments = [str(plugin.layout.ipc_key("frontend", SECRET_SUFFIX)),
                         str(plugin.layout.ipc_key("broker", PUBLIC_SUFFIX)), _endpoint(plugin, where)]
            outcomes = {}
            for uid in (0, 65534):
                result = subprocess.run([sys.executable, "-c", _CLIENT_AS_ANOTHER_USER, *arguments, str(uid)],
                                        capture_output=True, text=True, timeout=30, check=True)
                outcomes[uid] = result.stdout.strip()
            assert outcomes == {0: "answered", 65534: "silence"}, where
        # Once by the supervisor, once by the worker.
        assert plugin.log("broker.log").count("refused an IPC peer: uid 65534") == 2


def _exchange(sock: zmq.Socket[bytes], frame: bytes, wait_ms: int = REPLY_TIMEOUT_MS) -> ipc_schema.Reply | None:
    sock.send(frame)
    if not sock.poll(wait_ms):
        return None
    return ipc_schema.decode_reply(sock.recv())


def _round_trip(sock: zmq.Socket[bytes]) -> None:
    """The broker still serves correctly: wrap and unwrap a fresh seed."""
    seed = os.urandom(32)
    wrapped = _exchange(sock, ipc_schema.encode_request(ipc_schema.WrapRequest(1, 3000, seed)))
    assert isinstance(wrapped, ipc_schema.WrapResult)
    unwrapped = _exchange(sock, ipc_schema.encode_request(
        ipc_schema.UnwrapRequest(2, 3000, wrapped.ciphertext, wrapped.key_id)))
    assert isinstance(unwrapped, ipc_schema.UnwrapResult) and unwrapped.plaintext == seed


def test_health_reports_every_worker_and_the_current_key(dealer: zmq.Socket[bytes], shared_plugin: Plugin) -> None:
    reply = _exchange(dealer, ipc_schema.encode_request(ipc_schema.HealthRequest(7, 1000)))
    assert isinstance(reply, ipc_schema.HealthResult) and reply.id == 7
    assert reply.current_key_id == shared_plugin.status().key_id
    assert reply.current_key_id in reply.key_ids
    assert [w.state for w in reply.workers] == ["ready", "ready"]


def test_replies_match_requests_by_id_with_many_in_flight(worker: zmq.Socket[bytes]) -> None:
    seeds = {request_id: os.urandom(32) for request_id in range(100, 300)}
    for request_id, seed in seeds.items():
        worker.send(ipc_schema.encode_request(ipc_schema.WrapRequest(request_id, 5000, seed)))
    wrapped = {}
    for _ in seeds:
        assert worker.poll(REPLY_TIMEOUT_MS)
        reply = ipc_schema.decode_reply(worker.recv())
        assert isinstance(reply, ipc_schema.WrapResult)
        wrapped[reply.id] = reply
    assert wrapped.keys() == seeds.keys()
    for request_id, reply in wrapped.items():
        worker.send(ipc_schema.encode_request(
            ipc_schema.UnwrapRequest(request_id, 5000, reply.ciphertext, reply.key_id)))
    for _ in seeds:
        assert worker.poll(REPLY_TIMEOUT_MS)
        reply = ipc_schema.decode_reply(worker.recv())
        assert isinstance(reply, ipc_schema.UnwrapResult) and reply.plaintext == seeds[reply.id]


def test_schema_violations_with_an_id_get_an_error_reply(anywhere: zmq.Socket[bytes],
                                                         worker: zmq.Socket[bytes]) -> None:
    cases = [
        {"v": 1, "id": 5, "op": "wrap", "ttl": 1000, "pt": b"x" * 32, "extra": 1},  # unknown field
        {"v": 1, "id": 5, "op": "wrap", "ttl": True, "pt": b"x" * 32},  # bool for int
        {"v": 1, "id": 5, "op": "wrap", "ttl": 1000, "pt": "text"},  # str for bytes
        {"v": 1, "id": 5, "op": "wrap", "ttl": 1000, "pt": b"x" * 300},  # too large a seed
        {"v": 1, "id": 5, "op": "unwrap", "ttl": 1000, "ct": b"x" * 10, "kid": "k"},  # too short
    ]
    for case in cases:
        reply = _exchange(anywhere, msgpack.packb(case))
        assert isinstance(reply, ipc_schema.ErrorReply), case
        assert reply.id == 5 and reply.code is ErrorCode.INVALID_REQUEST
    _round_trip(worker)


def test_undecodable_frames_are_dropped_without_reply(anywhere: zmq.Socket[bytes], worker: zmq.Socket[bytes]) -> None:
    for frame in (b"", b"\xc1", b"garbage", msgpack.packb([1, 2, 3]),
                  msgpack.packb({"v": 2, "id": 1, "op": "wrap"}), msgpack.packb({"v": 1, "id": 1, "op": "list"})):
        assert _exchange(anywhere, frame, QUIET_MS) is None, frame
    anywhere.send_multipart([b"two", b"frames"])
    assert not anywhere.poll(QUIET_MS)
    _round_trip(worker)


@pytest.mark.parametrize("where", list(Endpoint), ids=["supervisor", "worker"])
def test_an_oversized_frame_disconnects_its_sender_but_not_the_broker(shared_plugin: Plugin, where: Endpoint) -> None:
    context = zmq.Context()
    try:
        rogue = _connect(context, shared_plugin, _frontend_key(shared_plugin), where)
        request = {"v": 1, "id": 1, "op": "health", "ttl": 1000, "pad": b"x" * (ipc_schema.MAX_REQUEST_FRAME + 1)}
        assert _exchange(rogue, msgpack.packb(request), QUIET_MS) is None
        _round_trip(_connect(context, shared_plugin, _frontend_key(shared_plugin), Endpoint.WORKER))
    finally:
        context.destroy(linger=0)
    assert shared_plugin.status().healthz == "ok"


def _request_of_exactly(size: int) -> bytes:
    """A wrap request padded with an unknown field to exactly `size` bytes: answered invalid_request if
    it gets through ZeroMQ's size limit."""
    base = {"v": 1, "id": 9, "op": "wrap", "ttl": 1000, "pt": b"x" * 32}
    room = size - len(msgpack.packb({**base, "x": b""}))
    frames = (msgpack.packb({**base, "x": b"p" * n}) for n in range(room - 4, room + 1))
    return next(f for f in frames if len(f) == size)


@pytest.mark.parametrize("where", list(Endpoint), ids=["supervisor", "worker"])
def test_the_documented_request_limit_is_the_real_one(shared_plugin: Plugin, where: Endpoint) -> None:
    """MAX_REQUEST_FRAME bytes reach the broker's schema check; one more byte disconnects the sender."""
    context = zmq.Context()
    try:
        sock = _connect(context, shared_plugin, _frontend_key(shared_plugin), where)
        at_limit = _exchange(sock, _request_of_exactly(ipc_schema.MAX_REQUEST_FRAME))
        assert isinstance(at_limit, ipc_schema.ErrorReply) and at_limit.id == 9, at_limit
        assert at_limit.code is ErrorCode.INVALID_REQUEST
        assert _exchange(sock, _request_of_exactly(ipc_schema.MAX_REQUEST_FRAME + 1), QUIET_MS) is None
    finally:
        context.destroy(linger=0)


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.binary(max_size=64)
    | st.text(max_size=16) | st.sampled_from(["wrap", "unwrap", "health"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=8,
)
_near_valid = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 2, True]), "id": st.integers(0, 2**63 - 1),
     "op": st.sampled_from(["wrap", "unwrap", "health"])},
    optional={"ttl": _values | st.integers(0, 70_000), "pt": _values, "ct": _values | st.binary(max_size=1100),
              "kid": _values, "x": _values},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=st.binary(max_size=256) | _values.map(msgpack.packb) | _near_valid.map(msgpack.packb))
def test_fuzzed_frames_never_yield_plaintext_or_stall_the_broker(anywhere: zmq.Socket[bytes], frame: bytes) -> None:
    anywhere.send(frame)
    if anywhere.poll(20):
        reply = ipc_schema.decode_reply(anywhere.recv())
        # A fuzzed frame may be a valid wrap or health request; it must never unwrap anything.
        assert not isinstance(reply, ipc_schema.UnwrapResult)


def test_broker_serves_correctly_after_the_fuzzing(anywhere: zmq.Socket[bytes], worker: zmq.Socket[bytes],
                                                   shared_plugin: Plugin) -> None:
    while anywhere.poll(QUIET_MS):
        anywhere.recv()  # replies to fuzzed requests still in flight
    _round_trip(worker)
    assert shared_plugin.broker is not None and shared_plugin.broker.poll() is None
    assert shared_plugin.status().healthz == "ok"


def test_a_frontend_with_the_wrong_broker_key_says_so(state_dir: Path) -> None:
    import contextlib

    import grpc

    plugin = Plugin(state_dir)
    # The frontend's own public key instead of the broker's: its CURVE hello cannot be read by the broker.
    plugin.configure(frontend={"broker": {"server_key": str(plugin.layout.ipc_key("frontend", PUBLIC_SUFFIX))}})
    plugin.start_broker()
    plugin.start_frontend()
    try:
        deadline, healthz = time.monotonic() + 20, ""
        while healthz != "broker refused our IPC credentials":
            assert time.monotonic() < deadline, healthz
            time.sleep(0.2)
            with contextlib.suppress(grpc.RpcError):
                healthz = plugin.status().healthz
        assert "check that broker.server_key is the broker's public key" in plugin.log("frontend.log")
    finally:
        plugin.stop()


def test_a_frontend_started_after_its_broker_logs_no_probe_failure(state_dir: Path) -> None:
    plugin = Plugin(state_dir)
    plugin.start_broker()
    deadline = time.monotonic() + 20
    while not plugin.layout.broker_socket.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    plugin.start_frontend()
    try:
        plugin.wait_healthy()
        assert "health probe failed" not in plugin.log("frontend.log")  # no false alarm while dialling
    finally:
        plugin.stop()
