"""Three control-plane nodes: three brokers and three frontends (each pair as on its own node) on one token
shared through p11-kit remote (the network HSM case), and on replicated SoftHSM copies (an HSM cluster
whose operator copies the token files to every node). A rotation made on one node is used by every node,
no Decrypt fails, and a Decrypt naming a key_id a node has not seen yet succeeds."""

import filecmp
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
from harness import KEY_SWITCH_SECONDS, Plugin, created_key_id, short_tmp_dir
from remote_token import RemoteToken, client_module

from keysealer.frontend.kmsv2 import api_pb2

NODES = 3
Rotation = Callable[[], str]  # makes a new key where the test's nodes will find it; returns its key_id


class CrossLoad:
    """Callers that Encrypt on one node and Decrypt the result on every node, recording every failure."""

    def __init__(self, nodes: list[Plugin]) -> None:
        self.nodes = nodes
        self.ledger: list[tuple[bytes, api_pb2.EncryptResponse]] = []
        self.failures: list[str] = []
        self.decrypts = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(len(nodes))]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        while not self._stop.is_set():
            seed = os.urandom(32)
            try:
                encrypted = self.nodes[index].encrypt(seed)
            except grpc.RpcError as exc:
                self.failures.append(f"Encrypt on node {index}: {exc.code().name} {exc.details()}")
                continue
            self.ledger.append((seed, encrypted))
            for number, node in enumerate(self.nodes):
                try:
                    assert node.decrypt(encrypted) == seed
                    self.decrypts += 1
                except grpc.RpcError as exc:
                    self.failures.append(f"Decrypt of {encrypted.key_id} on node {number}: {exc.code().name} "
                                         f"{exc.details()}")
            time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def seconds_until_every_node_reports(nodes: list[Plugin], key_id: str, since: float) -> list[float]:
    """For each node, seconds from `since` until its Status reports key_id (polled every 0.1 s); the bound
    is the harness's, twice the documented 10 s (5 s token re-read + 5 s health probe)."""
    reported: dict[int, float] = {}
    deadline = since + KEY_SWITCH_SECONDS
    while len(reported) < len(nodes):
        for index, node in enumerate(nodes):
            if index not in reported and node.status().key_id == key_id:
                reported[index] = time.monotonic() - since
        assert time.monotonic() < deadline, f"nodes {set(range(len(nodes))) - set(reported)} never reported {key_id}"
        time.sleep(0.1)
    return [reported[i] for i in range(len(nodes))]


def rotate_everywhere_under_load(nodes: list[Plugin], rotate: Rotation) -> list[float]:
    """Rotate once while every node serves cross-node load; no call may fail."""
    old = nodes[0].status().key_id
    assert {node.status().key_id for node in nodes} == {old}
    load = CrossLoad(nodes)
    time.sleep(1)
    new = rotate()
    times = seconds_until_every_node_reports(nodes, new, time.monotonic())  # from when every token holds it
    time.sleep(1)  # load under the new key on every node
    load.stop()
    assert load.failures == []
    assert {encrypted.key_id for _, encrypted in load.ledger} == {old, new}
    for seed, encrypted in load.ledger[::10]:
        for node in nodes:
            assert node.decrypt(encrypted) == seed
    print(f"every node reported {new} after {', '.join(f'{t:.1f}' for t in times)} s")
    return times


class Frozen:
    """SIGSTOP a node's broker, its workers and its frontend: it sees nothing until thawed."""

    def __init__(self, node: Plugin) -> None:
        assert node.broker is not None and node.frontend is not None
        self.pids = [node.frontend.pid, node.broker.pid, *_children(node.broker.pid)]

    def __enter__(self) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)

    def __exit__(self, *_: object) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGCONT)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def decrypt_on_a_node_that_has_not_seen_the_key(nodes: list[Plugin], rotate: Rotation) -> None:
    """Node 2 is frozen while node 0 rotates, switches and encrypts: its first Decrypt names a key_id it
    has never seen, and succeeds."""
    with Frozen(nodes[2]):
        new = rotate()
        assert nodes[0].broker is not None
        os.kill(nodes[0].broker.pid, signal.SIGHUP)
        nodes[0].wait_for_status_key(new)
        seed = os.urandom(32)
        encrypted = nodes[0].encrypt(seed)
        assert encrypted.key_id == new
    assert nodes[2].decrypt(encrypted) == seed


@contextmanager
def started(nodes: list[Plugin], *cleanups: RemoteToken) -> Iterator[list[Plugin]]:
    try:
        for node in nodes:
            node.start_broker()
            node.start_frontend()
        for node in nodes:
            node.wait_healthy()
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        for remote in cleanups:
            remote.stop()
        for node in nodes:
            shutil.rmtree(node.layout.root, ignore_errors=True)


def keys_rotate(node: Plugin) -> str:
    return created_key_id(node.keys("rotate").stdout)


def test_three_nodes_on_one_token_through_p11_kit_remote() -> None:
    nodes = [Plugin(short_tmp_dir()) for _ in range(NODES)]
    home = nodes[0]
    # Debian bookworm's p11-kit 0.24 client forwards RSA-OAEP with SHA-1 but not AES-GCM.
    subprocess.run(["keysealer", "keys", "rotate", "--mechanism", "rsa-oaep-sha1", "--config",
                    str(home.layout.broker_config)], check=True, capture_output=True, timeout=120)
    remote = RemoteToken(home.layout.root / "p11kit.sock", "keysealer-dev",
                         {"SOFTHSM2_CONF": str(home.layout.softhsm_conf)})
    remote.start()
    for node in nodes:  # every node reaches the one token with the same PIN
        node.configure(broker={"token": {"module": str(client_module()), "module_env": remote.client_env(),
                                         "pin_file": str(home.layout.pin)}})
        node.secrets.add(home.layout.pin.read_bytes().strip())

    def on_node_1() -> str:
        return keys_rotate(nodes[1])  # through p11-kit remote, like the brokers

    with started(nodes, remote):
        rotate_everywhere_under_load(nodes, on_node_1)
        decrypt_on_a_node_that_has_not_seen_the_key(nodes, on_node_1)


def sync_token(source: Path, target: Path) -> None:
    """Make target's SoftHSM token directory a copy of source's, as an operator replicating an HSM would:
    new and changed object files first, each written aside and renamed into place, then the generation
    and token files (which tell SoftHSM to re-read the directory); lock files stay each node's own."""
    last = {"generation": 1, "token.object": 2}
    names = sorted((p.name for p in source.iterdir() if not p.name.endswith(".lock")),
                   key=lambda name: last.get(name, 0))
    for name in names:
        if not (target / name).exists() or not filecmp.cmp(source / name, target / name, shallow=False):
            shutil.copyfile(source / name, target / f".{name}.sync")
            os.replace(target / f".{name}.sync", target / name)
    for gone in {p.name for p in target.iterdir() if p.suffix == ".object"} - set(names):
        (target / gone).unlink()


def token_dir(node: Plugin) -> Path:
    (directory,) = [p for p in node.layout.tokens.iterdir() if p.is_dir()]
    return directory


def test_three_nodes_on_replicated_softhsm_copies() -> None:
    nodes = [Plugin(short_tmp_dir()) for _ in range(NODES)]
    staging = Plugin(short_tmp_dir())  # where rotations are made, off line: no broker serves it
    home = nodes[0]
    for copy in [*nodes[1:], staging]:  # every node gets the same token, and its PIN
        shutil.rmtree(copy.layout.tokens)
        shutil.copytree(home.layout.tokens, copy.layout.tokens)
        shutil.copyfile(home.layout.pin, copy.layout.pin)

    def in_staging_then_replicated() -> str:
        key_id = keys_rotate(staging)
        for node in nodes:
            sync_token(token_dir(staging), token_dir(node))
        return key_id

    try:
        with started(nodes):
            assert len({node.status().key_id for node in nodes}) == 1  # one key_id for the replicated key
            rotate_everywhere_under_load(nodes, in_staging_then_replicated)
            decrypt_on_a_node_that_has_not_seen_the_key(nodes, in_staging_then_replicated)
    finally:
        shutil.rmtree(staging.layout.root, ignore_errors=True)
