"""Denial of service: every listener bounds what a peer can make it hold (descriptors, memory, threads).

Each test runs an attack against the real plugin and checks it still serves Status, Encrypt and Decrypt,
and that no process died or grew past a bound. Figures and reasons: docs/reliability.md.
"""

import contextlib
import os
import resource
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import zmq
from harness import Plugin, child_pids, created_key_id, peak_rss_kib, rss_kib

from keysealer.frontend.kmsv2 import api_pb2, api_pb2_grpc
from keysealer.shared import ipc_schema
from keysealer.shared.ipc_keys import PUBLIC_SUFFIX, SECRET_SUFFIX, load_keypair, load_public_key

# systemd's default soft RLIMIT_NOFILE, which the attacks of issue 12 exhausted.
SYSTEMD_SOFT_LIMIT = 1024
IDLE_CONNECTIONS = 1100
SUPERVISOR_GROWTH_BOUND_KIB = 16 * 1024
# Its sockets, ZeroMQ's internals and the workers' pipes (about 16), without the attack's connections.
BROKER_DESCRIPTOR_BOUND = 100
# Idle broker peers are dropped after 5 s; libzmq's default, which this must tell apart, is 30 s.
ATTACK_RECOVERY_SECONDS = 20.0


@pytest.fixture(autouse=True)
def enough_descriptors_to_attack() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < IDLE_CONNECTIONS + 200:
        pytest.skip(f"the test process may open only {hard} files")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, IDLE_CONNECTIONS + 200), hard))


@contextlib.contextmanager
def idle_connections(path: Path, count: int, preface: bytes = b"") -> Iterator[int]:
    """Open up to `count` connections that send `preface` and then nothing; yields how many opened."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sockets.append(sock)
            try:
                sock.connect(str(path))
                if preface:
                    sock.sendall(preface)
            except OSError:
                break  # the listener is gone or its backlog is full: what the test checks afterwards
        yield len(sockets)
    finally:
        for sock in sockets:
            sock.close()


def descriptors(process: subprocess.Popen[bytes] | None) -> int:
    assert process is not None
    return len(os.listdir(f"/proc/{process.pid}/fd"))


def wait_until(condition: Callable[[], bool], failure: str, timeout: float = ATTACK_RECOVERY_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, failure
        time.sleep(0.5)


def fresh_status(path: Path) -> bool:
    """Status on a new connection."""
    with grpc.insecure_channel(f"unix:{path}") as channel:
        try:
            api_pb2_grpc.KeyManagementServiceStub(channel).Status(api_pb2.StatusRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return True


def assert_serves(plugin: Plugin) -> None:
    assert plugin.status(timeout=5).healthz == "ok"
    seed = os.urandom(32)
    assert plugin.decrypt(plugin.encrypt(seed, timeout=5), timeout=5) == seed


def started_with_soft_limit(root: Path) -> Plugin:
    plugin = Plugin(root)
    plugin.start_broker(open_files=SYSTEMD_SOFT_LIMIT)
    plugin.start_frontend(open_files=SYSTEMD_SOFT_LIMIT)
    plugin.wait_healthy()
    return plugin


# -- the broker ----------------------------------------------------------------------------------------


def test_idle_connections_to_the_broker_before_authentication_kill_nothing(state_dir: Path) -> None:
    plugin = started_with_soft_limit(state_dir)
    try:
        assert plugin.broker is not None
        workers = child_pids(plugin.broker.pid)
        with idle_connections(plugin.layout.broker_socket, IDLE_CONNECTIONS):
            time.sleep(1)  # let the broker's I/O thread accept them all
            assert plugin.broker.poll() is None, plugin.log("broker.log")[-2000:]
            assert_serves(plugin)
            # Still held open by us, never authenticated: the broker drops them (after 5 s, not
            # libzmq's default 30 s).
            wait_until(lambda: descriptors(plugin.broker) < BROKER_DESCRIPTOR_BOUND, "the broker kept them")
        assert child_pids(plugin.broker.pid) == workers
    finally:
        plugin.stop()


def _listening_unix_inodes(paths: set[str]) -> set[str]:
    """Inodes of the listening Unix sockets bound to these paths (from /proc/net/unix)."""
    inodes = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        listening = int(fields[3], 16) & 0x10000  # __SO_ACCEPTCON
        if len(fields) == 8 and listening and fields[7] in paths:
            inodes.add(fields[6])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    links = (os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir())
    return {link[len("socket:["):-1] for link in links if link.startswith("socket:[")}


def test_workers_hold_none_of_the_supervisors_listening_sockets(shared_plugin: Plugin) -> None:
    assert shared_plugin.broker is not None
    layout = shared_plugin.layout
    listening = _listening_unix_inodes({str(layout.broker_socket),
                                        str(layout.broker_socket.parent / "workers" / "backend.sock")})
    assert len(listening) == 2 and listening <= _socket_inodes(shared_plugin.broker.pid)
    workers = child_pids(shared_plugin.broker.pid)
    assert len(workers) == 2
    for pid in workers:
        assert not _socket_inodes(pid) & listening


def test_a_peer_that_asks_for_health_and_never_reads_cannot_grow_the_broker(plugin: Plugin) -> None:
    # Only an authenticated peer gets this far: a compromised frontend, with the frontend's key.
    assert plugin.broker is not None
    key = load_keypair(plugin.layout.ipc_key("frontend", SECRET_SUFFIX))
    before = rss_kib(plugin.broker.pid)
    context = zmq.Context()
    sockets: list[zmq.Socket[bytes]] = []
    try:
        for _ in range(4):
            sock = context.socket(zmq.DEALER)
            sockets.append(sock)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 1)  # read nothing, let the broker hold every reply
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.curve_publickey, sock.curve_secretkey = key.public, key.secret
            sock.curve_serverkey = load_public_key(plugin.layout.ipc_key("broker", PUBLIC_SUFFIX))
            sock.connect(f"ipc://{plugin.layout.broker_socket}")
        request = ipc_schema.encode_request(ipc_schema.HealthRequest(1, 1000))
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            for sock in sockets:
                with contextlib.suppress(zmq.Again):
                    for _ in range(500):
                        sock.send(request, zmq.NOBLOCK)
        grown = rss_kib(plugin.broker.pid) - before
        assert grown < SUPERVISOR_GROWTH_BOUND_KIB, f"the supervisor grew by {grown} KiB"
        assert_serves(plugin)
    finally:
        context.destroy(linger=0)


def test_decrypt_under_a_key_retired_moments_ago_is_unknown_key_and_keeps_the_login(plugin: Plugin) -> None:
    seed = os.urandom(32)
    old = plugin.encrypt(seed)
    plugin.wait_for_status_key(created_key_id(plugin.keys("rotate").stdout))
    assert plugin.decrypt(old) == seed  # every worker holds both keys now
    plugin.keys("retire", old.key_id)
    for _ in range(2):  # before the workers' next key refresh (5 s): their view still lists the key
        with pytest.raises(grpc.RpcError) as refused:
            plugin.decrypt(old)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    assert "reinitializing the module" not in plugin.log("broker.log")
    assert_serves(plugin)


# -- the frontend's gRPC socket --------------------------------------------------------------------------

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, HEADERS, CONTINUATION = 0x4, 0x1, 0x9
FLOOD_CONNECTIONS = 32
FLOOD_SECONDS = 8.0
# Under the pod's and the unit's 256 MiB memory limit, with room for the frontend's own work.
FRONTEND_PEAK_BOUND_KIB = 200 * 1024
# What it may keep once the attackers are gone (it returns freed heap to the system every second).
FRONTEND_LEFTOVER_BOUND_KIB = 32 * 1024
# Its own files, sockets and gRPC's internals (about 30), plus at most 5 connections.
FRONTEND_DESCRIPTOR_BOUND = 100


def http2_frame(kind: int, stream: int, payload: bytes, flags: int = 0) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def hpack_literal(name: bytes, value: bytes) -> bytes:
    """A header field 'literal without indexing, new name' (RFC 7541 6.2.2), short strings only."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def continuation_flood(path: Path, until: float) -> None:
    """HEADERS without END_HEADERS, then CONTINUATION frames of fresh header fields until `until`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        start = b"\x83\x86" + hpack_literal(b":path", b"/v2.KeyManagementService/Status")
        fields = b"".join(hpack_literal(os.urandom(8).hex().encode(), b"v" * 100) for _ in range(100))
        with contextlib.suppress(OSError):  # refused, reset or stalled by the server: all fine here
            sock.connect(str(path))
            sock.sendall(HTTP2_PREFACE + http2_frame(SETTINGS, 0, b"") + http2_frame(HEADERS, 1, start))
            while time.monotonic() < until:
                sock.sendall(http2_frame(CONTINUATION, 1, fields))


def test_endless_header_blocks_cannot_grow_the_frontend_without_bound(plugin: Plugin) -> None:
    assert plugin.frontend is not None
    pid = plugin.frontend.pid
    before = rss_kib(pid)
    until = time.monotonic() + FLOOD_SECONDS
    threads = [threading.Thread(target=continuation_flood, args=(plugin.layout.kms_socket, until))
               for _ in range(FLOOD_CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    peak = peak_rss_kib(pid)  # the most it ever held, baseline included: what the memory limit sees
    assert peak < FRONTEND_PEAK_BOUND_KIB, f"the frontend peaked at {peak} KiB"
    assert_serves(plugin)  # on the connection the test opened before the attack, as the apiserver would
    wait_until(lambda: rss_kib(pid) - before < FRONTEND_LEFTOVER_BOUND_KIB,
               f"the frontend kept {rss_kib(pid) - before} KiB after the attack")


def test_idle_connections_to_kms_sock_do_not_starve_the_frontend(state_dir: Path) -> None:
    plugin = started_with_soft_limit(state_dir)
    try:
        assert plugin.frontend is not None
        half = IDLE_CONNECTIONS // 2
        path = plugin.layout.kms_socket
        with idle_connections(path, half), idle_connections(path, half, HTTP2_PREFACE + http2_frame(SETTINGS, 0, b"")):
            time.sleep(1)
            assert plugin.frontend.poll() is None, plugin.log("frontend.log")[-2000:]
            held = descriptors(plugin.frontend)
            assert held < FRONTEND_DESCRIPTOR_BOUND, f"the frontend holds {held} descriptors"
            assert_serves(plugin)  # on the connection opened before the attack, as the apiserver's
            # A client connecting afresh (an apiserver restarted) gets in too, ours still open.
            wait_until(lambda: fresh_status(plugin.layout.kms_socket), "no fresh connection got in")
    finally:
        plugin.stop()


# -- the metrics and health endpoint ----------------------------------------------------------------------


def http_get(path: Path, target: str, timeout: float = 3.0) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.settimeout(timeout)
        sock.sendall(f"GET {target} HTTP/1.0\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_an_idle_client_does_not_block_the_health_endpoints(shared_plugin: Plugin) -> None:
    path = shared_plugin.layout.metrics_socket
    with idle_connections(path, 3), idle_connections(path, 3, b"GET /livez HTTP/1.1\r\n"):  # never finished
        for target in ("/livez", "/readyz", "/metrics"):
            assert http_get(path, target).startswith(b"HTTP/1.0 200"), target


def test_a_client_that_hangs_up_leaves_no_traceback(shared_plugin: Plugin) -> None:
    path = shared_plugin.layout.metrics_socket
    for _ in range(10):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        # closed before the answer: the server's write fails
        assert http_get(path, "/livez").startswith(b"HTTP/1.0 200")
    assert "Traceback" not in shared_plugin.log("frontend.log")
