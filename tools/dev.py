"""`keysealer dev`: the embedded default. A SoftHSM token, PIN, key and both configs under one directory,
created on first use and reused after; broker and frontend run as separate processes until SIGINT/SIGTERM.
"""

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from keysealer.shared.errors import FatalError, UsageError
from keysealer.shared.ipc_keys import PUBLIC_SUFFIX, SECRET_SUFFIX, generate
from keysealer.shared.process import EXIT_BAD_PIN, EXIT_OK, EXIT_USAGE, error_for_exit_code
from keysealer.shared.safe_paths import check_tree, open_own_directory
from keysealer.shared.sandbox import STAY_ROOT

SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
)
TOKEN_LABEL = "keysealer-dev"
KEY_LABEL = "keysealer-kek"
READY_TIMEOUT_SECONDS = 60.0
RESTART_FIRST_SECONDS = 0.5
RESTART_MAX_SECONDS = 10.0
# Exit codes after which a restart cannot help (bad config, wrong PIN).
NO_RESTART_EXITS = frozenset({EXIT_USAGE, EXIT_BAD_PIN})


@dataclass(frozen=True)
class DevLayout:
    root: Path

    @property
    def broker_config(self) -> Path:
        return self.root / "broker.yaml"

    @property
    def frontend_config(self) -> Path:
        return self.root / "frontend.yaml"

    @property
    def kms_socket(self) -> Path:
        return self.root / "kms.sock"

    @property
    def metrics_socket(self) -> Path:
        return self.root / "metrics.sock"

    @property
    def broker_socket(self) -> Path:
        return self.root / "broker" / "broker.sock"

    @property
    def pin(self) -> Path:
        return self.root / "pin"

    @property
    def so_pin(self) -> Path:
        return self.root / "so-pin"

    @property
    def ipc_keys(self) -> Path:
        return self.root / "ipc-keys"

    def ipc_key(self, name: str, suffix: str) -> Path:
        return self.ipc_keys / f"{name}{suffix}"

    @property
    def softhsm_conf(self) -> Path:
        return self.root / "softhsm2.conf"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"


def find_softhsm() -> Path:
    for candidate in SOFTHSM_MODULES:
        if Path(candidate).is_file():
            return Path(candidate)
    raise UsageError("SoftHSM is not installed (no libsofthsm2.so found); install the softhsm2 package")


def prepare(layout: DevLayout) -> None:
    """Create whatever is missing; keep what exists, so a second run reuses the token and key.

    What exists must be ours alone: run by root, the broker loads the module broker.yaml names.
    """
    state = open_own_directory(layout.root)
    try:
        check_tree(state, layout.root)
    finally:
        os.close(state)
    layout.tokens.mkdir(mode=0o700, exist_ok=True)
    _write_once(layout.softhsm_conf, f"directories.tokendir = {layout.tokens}\nobjectstore.backend = file\n"
                "log.level = ERROR\nslots.removable = false\n")
    for pin_file in (layout.pin, layout.so_pin):
        _write_once(pin_file, secrets.token_hex(16) + "\n")
    layout.ipc_keys.mkdir(mode=0o700, exist_ok=True)
    for name in ("broker", "frontend"):
        if not layout.ipc_key(name, SECRET_SUFFIX).exists():
            generate(layout.ipc_keys, name)
    # Started by root, dev says so explicitly: both processes refuse to run as root otherwise.
    user = {"user": STAY_ROOT} if os.geteuid() == 0 else {}
    _write_once(layout.broker_config, yaml.safe_dump({
        "token": {"module": str(find_softhsm()), "token_label": TOKEN_LABEL, "pin_file": str(layout.pin),
                  "module_env": {"SOFTHSM2_CONF": str(layout.softhsm_conf)}},
        "keys": {"current_label": KEY_LABEL},
        "ipc": {"socket": str(layout.broker_socket),
                "server_key": str(layout.ipc_key("broker", SECRET_SUFFIX)),
                "client_keys": [str(layout.ipc_key("frontend", PUBLIC_SUFFIX))]},
        "workers": {"count": 2},
        **user,
    }, sort_keys=False))
    _write_once(layout.frontend_config, yaml.safe_dump({
        "listen": {"socket": str(layout.kms_socket)},
        "broker": {"socket": str(layout.broker_socket),
                   "client_key": str(layout.ipc_key("frontend", SECRET_SUFFIX)),
                   "server_key": str(layout.ipc_key("broker", PUBLIC_SUFFIX))},
        "metrics": {"socket": str(layout.metrics_socket)},
        **user,
    }, sort_keys=False))
    config = str(layout.broker_config)
    _keysealer("keys", "init-token", "--config", config, "--so-pin-file", str(layout.so_pin))
    _keysealer("keys", "create", "--if-missing", "--config", config)


def _write_once(path: Path, content: str) -> None:
    if path.exists():
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(content)


def _keysealer(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "keysealer.tools.cli", *args],
                            capture_output=True, text=True, check=False)
    if result.returncode != EXIT_OK:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise error_for_exit_code(result.returncode, f"keysealer {' '.join(args[:2])} failed: {detail}")


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restart_delay: float = RESTART_FIRST_SECONDS
    restart_at: float = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_dev(state_dir: Path) -> int:
    # Made absolute without resolving symlinks: prepare() follows only those root or we own.
    layout = DevLayout(Path(os.path.abspath(state_dir)))
    prepare(layout)
    children = [
        Child("broker", [sys.executable, "-m", "keysealer.hsm_broker.main", "--config",
                         str(layout.broker_config)]),
        Child("frontend", [sys.executable, "-m", "keysealer.frontend.main", "--config",
                           str(layout.frontend_config)]),
    ]
    stopping = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    for child in children:
        child.start()
    try:
        _announce_when_ready(layout, lambda: stopping)
        while not stopping:
            for child in children:
                _keep_running(child)
            time.sleep(0.2)
    finally:
        for child in reversed(children):
            child.stop()
    return EXIT_OK


def _keep_running(child: Child) -> None:
    """Restart a child that died, with backoff; stop everything when a restart cannot help."""
    assert child.process is not None
    code = child.process.poll()
    if code is None:
        return
    if code in NO_RESTART_EXITS:
        raise error_for_exit_code(code, f"{child.name} exited with code {code}; not restarting it")
    now = time.monotonic()
    if child.restart_at == 0.0:
        print(f"keysealer dev: {child.name} exited with code {code}; restarting", file=sys.stderr, flush=True)
        child.restart_at = now + child.restart_delay
        child.restart_delay = min(child.restart_delay * 2, RESTART_MAX_SECONDS)
    elif now >= child.restart_at:
        child.restart_at = 0.0
        child.start()


def _announce_when_ready(layout: DevLayout, stopping: Callable[[], bool]) -> None:
    from keysealer.tools.status_cli import fetch_status

    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    healthz = "not started"
    while time.monotonic() < deadline and not stopping():
        try:
            status = fetch_status(layout.kms_socket, timeout=1.0)
            healthz = status.healthz
            if healthz == "ok":
                print(_ready_message(layout, status.key_id), flush=True)
                return
        except FatalError:
            pass
        time.sleep(0.2)
    if not stopping():
        raise FatalError(f"the plugin did not become healthy within {READY_TIMEOUT_SECONDS:.0f}s: {healthz}")


def _ready_message(layout: DevLayout, key_id: str) -> str:
    encryption_config = yaml.safe_dump({
        "apiVersion": "apiserver.config.k8s.io/v1",
        "kind": "EncryptionConfiguration",
        "resources": [{
            "resources": ["secrets"],
            "providers": [
                {"kms": {"apiVersion": "v2", "name": "keysealer",
                         "endpoint": f"unix://{layout.kms_socket}", "timeout": "3s"}},
                {"identity": {}},
            ],
        }],
    }, sort_keys=False)
    return (f"KeySealer is ready.\nsocket: {layout.kms_socket}\nkey_id: {key_id}\n"
            + (f"metrics and health: {layout.metrics_socket} (/metrics, /livez, /readyz)\n"
               if layout.metrics_socket.exists() else "")
            + f"broker config: {layout.broker_config}\nfrontend config: {layout.frontend_config}\n\n"
            f"EncryptionConfiguration for kube-apiserver (--encryption-provider-config):\n---\n"
            f"{encryption_config}")
