"""Starts the real plugin for tests: a SoftHSM token made by `keysealer dev`'s own setup code, the broker
and the frontend as separate processes, and a gRPC client generated from proto/ on the real Unix socket."""

import base64
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import grpc
import yaml

from keysealer.frontend.kmsv2 import api_pb2, api_pb2_grpc
from keysealer.shared.ipc_keys import SECRET_SUFFIX, load_keypair
from keysealer.tools.dev import DevLayout, prepare

READY_SECONDS = 30.0
KEY_SWITCH_SECONDS = 20.0  # worker key refresh (5 s) + frontend probe (5 s) + slack
T = TypeVar("T")


def short_tmp_dir() -> Path:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be too deep.
    return Path(tempfile.mkdtemp(prefix="ks-", dir="/tmp"))


def deep_update(target: dict[str, Any], changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            deep_update(target[key], value)
        else:
            target[key] = value


class KmsClient:
    """kube-apiserver's side of a KMS v2 socket: Status, Encrypt, Decrypt over real gRPC."""

    def __init__(self, socket: Path) -> None:
        self.kms_socket = socket
        self._channel: grpc.Channel | None = None

    @property
    def stub(self) -> api_pb2_grpc.KeyManagementServiceStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix:{self.kms_socket}")
        return api_pb2_grpc.KeyManagementServiceStub(self._channel)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def status(self, timeout: float = 3.0) -> api_pb2.StatusResponse:
        response: api_pb2.StatusResponse = self.stub.Status(api_pb2.StatusRequest(), timeout=timeout)
        return response

    def encrypt(self, plaintext: bytes, timeout: float = 3.0) -> api_pb2.EncryptResponse:
        response: api_pb2.EncryptResponse = self.stub.Encrypt(
            api_pb2.EncryptRequest(plaintext=plaintext, uid="test"), timeout=timeout)
        return response

    def decrypt(self, encrypted: api_pb2.EncryptResponse, timeout: float = 3.0) -> bytes:
        response: api_pb2.DecryptResponse = self.stub.Decrypt(api_pb2.DecryptRequest(
            ciphertext=encrypted.ciphertext, key_id=encrypted.key_id, uid="test",
            annotations=encrypted.annotations), timeout=timeout)
        return bytes(response.plaintext)

    def check_alive(self) -> None:
        """Raises when what serves the socket is known to be gone (the plugin's processes)."""

    def describe(self) -> str:
        """What to show when the socket never turns healthy (logs)."""
        return ""

    def wait_healthy(self, timeout: float = READY_SECONDS) -> api_pb2.StatusResponse:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                status = self.status(timeout=1.0)
                if status.healthz == "ok":
                    return status
                last = status.healthz
            except grpc.RpcError as exc:
                last = f"{exc.code().name}"
            time.sleep(0.1)
        raise AssertionError(f"plugin not healthy after {timeout}s: {last}\n{self.describe()}")

    def wait_for_status_key(self, key_id: str, timeout: float = KEY_SWITCH_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while self.status().key_id != key_id:
            assert time.monotonic() < deadline, f"Status never reported {key_id}"
            time.sleep(0.1)


class Plugin(KmsClient):
    """Broker and frontend of one plugin instance, each a real process with its log in the state dir."""

    def __init__(self, root: Path) -> None:
        self.layout = DevLayout(root)
        prepare(self.layout)
        super().__init__(self.layout.kms_socket)
        self.broker: subprocess.Popen[bytes] | None = None
        self.frontend: subprocess.Popen[bytes] | None = None
        # Everything that must never appear in a log: checked every time the plugin stops.
        self.secrets: set[bytes] = {self.layout.pin.read_bytes().strip(), self.layout.so_pin.read_bytes().strip()}
        for name in ("broker", "frontend"):
            self.secrets.add(load_keypair(self.layout.ipc_key(name, SECRET_SUFFIX)).secret)

    # -- configuration -------------------------------------------------------------------------------

    def configure(self, broker: dict[str, Any] | None = None, frontend: dict[str, Any] | None = None) -> None:
        for path, changes in ((self.layout.broker_config, broker), (self.layout.frontend_config, frontend)):
            if changes:
                data = yaml.safe_load(path.read_text())
                deep_update(data, changes)
                path.write_text(yaml.safe_dump(data))

    def use_token(self, provider_state: Path) -> None:
        """Serve from the token a deploy/providers/NAME/setup.sh made: its token.yaml is the token section."""
        data = self.broker_config()
        data["token"] = yaml.safe_load((provider_state / "token.yaml").read_text())
        self.layout.broker_config.write_text(yaml.safe_dump(data))
        self.secrets.add((provider_state / "pin").read_bytes().strip())

    def keys(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`keysealer keys ARGS --config` on this plugin's broker config."""
        return subprocess.run(["keysealer", "keys", *args, "--config", str(self.layout.broker_config)],
                              capture_output=True, text=True, timeout=120, check=check)

    def broker_config(self) -> dict[str, Any]:
        data: dict[str, Any] = yaml.safe_load(self.layout.broker_config.read_text())
        return data

    # -- processes -----------------------------------------------------------------------------------

    def _spawn(self, module: str, config: Path, log_name: str, open_files: int | None) -> subprocess.Popen[bytes]:
        log = (self.layout.root / log_name).open("ab")
        # prlimit sets the soft open-file limit only, as systemd's default (1,024) would, then execs.
        limit = ["prlimit", f"--nofile={open_files}:"] if open_files is not None else []
        return subprocess.Popen([*limit, sys.executable, "-m", module, "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT)

    def start_broker(self, open_files: int | None = None) -> None:
        """open_files: the soft open-file limit to start it with (default: this process's)."""
        self.broker = self._spawn("keysealer.hsm_broker.main", self.layout.broker_config, "broker.log", open_files)

    def start_frontend(self, open_files: int | None = None) -> None:
        self.frontend = self._spawn("keysealer.frontend.main", self.layout.frontend_config, "frontend.log",
                                    open_files)

    def start(self) -> None:
        self.start_broker()
        self.start_frontend()
        self.wait_healthy()

    def stop_broker(self, signum: int = signal.SIGTERM) -> int:
        return _stop(self.broker, signum)

    def stop_frontend(self, signum: int = signal.SIGTERM) -> int:
        return _stop(self.frontend, signum)

    def stop(self) -> None:
        self.close()
        self.stop_frontend()
        self.stop_broker()
        self.assert_logs_hold_no_secret()

    def assert_logs_hold_no_secret(self) -> None:
        logs = b"".join(path.read_bytes() for path in self.layout.root.glob("*.log"))
        for secret in tuple(self.secrets):  # a load thread of a failed test may still be adding
            for form in (secret, secret.hex().encode(), base64.b64encode(secret), repr(secret).encode()):
                assert form not in logs, f"a secret ({len(secret)} bytes) appears in the logs of {self.layout.root}"

    def log(self, name: str) -> str:
        path = self.layout.root / name
        return path.read_text(errors="replace") if path.exists() else ""

    # -- the gRPC side -------------------------------------------------------------------------------

    def encrypt(self, plaintext: bytes, timeout: float = 3.0) -> api_pb2.EncryptResponse:
        if len(plaintext) >= 16:  # shorter ones could appear by chance
            self.secrets.add(plaintext)
        return super().encrypt(plaintext, timeout)

    def check_alive(self) -> None:
        for process, name in ((self.broker, "broker"), (self.frontend, "frontend")):
            if process is not None and process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{self.log(name + '.log')}")

    def describe(self) -> str:
        return f"{self.log('broker.log')}\n{self.log('frontend.log')}"


def _stop(process: subprocess.Popen[bytes] | None, signum: int) -> int:
    if process is None:
        return 0
    if process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def created_key_id(output: str) -> str:
    """The key_id in what `keysealer keys create/rotate` printed."""
    found = re.search(r"created key (ks1-[0-9a-f]{32})", output)
    assert found, output
    return found.group(1)


def child_pids(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@contextmanager
def frozen_broker(plugin: "Plugin") -> Iterator[None]:
    """SIGSTOP the broker's supervisor and its workers (which take calls themselves), SIGCONT them after."""
    assert plugin.broker is not None
    frozen = [plugin.broker.pid, *child_pids(plugin.broker.pid)]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in frozen:
            with suppress(ProcessLookupError):  # killed meanwhile: the test says whether it should have been
                os.kill(pid, signal.SIGCONT)


@contextmanager
def running_plugin(root: Path | None = None, **config: Any) -> Iterator[Plugin]:
    plugin = Plugin(root or short_tmp_dir())
    plugin.configure(**config)
    plugin.start()
    try:
        yield plugin
    finally:
        plugin.stop()





class Load:
    """Callers doing Encrypt then Decrypt in a loop, recording every outcome, for fault tests.

    check() asserts the invariant every fault test owes: every Encrypt that returned OK still decrypts to
    its plaintext, no call outlived its deadline, and every failure has an expected code.
    """

    def __init__(self, plugin: KmsClient, callers: int = 8, timeout: float = 10.0) -> None:
        self._plugin = plugin
        self._timeout = timeout
        self._stop = threading.Event()
        self.ledger: list[tuple[bytes, api_pb2.EncryptResponse]] = []
        self.outcomes: list[tuple[str, float]] = []  # (gRPC code name, seconds)
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(callers)]
        for thread in self._threads:
            thread.start()

    def _timed(self, call: Callable[..., T], *args: Any) -> T | None:
        started = time.monotonic()
        try:
            result = call(*args, timeout=self._timeout)
        except grpc.RpcError as exc:
            self.outcomes.append((exc.code().name, time.monotonic() - started))
            return None
        self.outcomes.append(("OK", time.monotonic() - started))
        return result

    def _run(self) -> None:
        while not self._stop.is_set():
            seed = os.urandom(32)
            encrypted = self._timed(self._plugin.encrypt, seed)
            if encrypted is not None:
                self.ledger.append((seed, encrypted))
                self._timed(self._plugin.decrypt, encrypted)
            else:
                time.sleep(0.01)  # a failing plugin fails fast: do not spin

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def failures(self) -> list[str]:
        return [code for code, _ in self.outcomes if code != "OK"]

    def check(self, deadline: float, allowed: frozenset[str] = frozenset({"UNAVAILABLE"})) -> None:
        self.stop()
        assert self.outcomes, "the load made no call"
        assert set(self.failures()) <= allowed, set(self.failures())
        slowest = max(seconds for _, seconds in self.outcomes)
        assert slowest <= deadline, f"a call took {slowest:.2f}s, past the {deadline}s deadline"
        for seed, encrypted in self.ledger:
            assert self._plugin.decrypt(encrypted) == seed


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")
