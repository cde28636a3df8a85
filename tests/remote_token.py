"""A SoftHSM token served over a Unix socket by `p11-kit server`, for tests of a remote token.

    token = RemoteToken.create(tmp)            # a fresh SoftHSM token (label, PIN) in tmp, not started
    with token:                                # start() ... kill()
        env = token.client_env()               # P11_KIT_SERVER_ADDRESS for p11-kit-client.so
        # load client_module() with env, e.g. in a broker (token.module / token.module_env)
        token.kill()                           # server and every connection it serves, at once (SIGKILL)
        token.start()                          # same socket again: clients recover by C_Finalize+C_Initialize
        token.kill_server_only()               # what `kill $P11_KIT_SERVER_PID` does: no new connection, but
                                               # the existing ones go on being served by their children

How p11-kit (0.24, Debian bookworm) does it: `p11-kit server -f -n SOCKET --provider MODULE pkcs11:token=L`
listens on SOCKET and prints `P11_KIT_SERVER_ADDRESS=unix:path=SOCKET; ...` and its pid. For each client
connection it forks `p11-kit-remote --provider MODULE pkcs11:token=L`, which serves that connection to its
end: killing the server alone leaves them serving. They stay in the server's process group (we start the
server as a session leader), so kill() signals the whole group.

On the client side, p11-kit-client.so reads P11_KIT_SERVER_ADDRESS; with the server gone its calls answer
CKR_DEVICE_ERROR for good, even once a new server listens on the same socket: only C_Finalize+C_Initialize
connect again (while no server listens, C_Initialize succeeds with no slot).

Mechanisms: the bookworm client only forwards mechanisms whose parameters its RPC can serialise; see
test_fault_tooling.py's probe (CKM_AES_GCM is not forwarded: KeySealer cannot run through it).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import time
import urllib.parse
from pathlib import Path

SOFTHSM_MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                   "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so")
CLIENT_MODULES = ("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
                  "/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so",
                  "/usr/lib64/pkcs11/p11-kit-client.so", "/usr/lib/pkcs11/p11-kit-client.so")
START_SECONDS = 10.0
PACKAGES_HINT = "install the Debian packages in deploy/packages/faults.txt (p11-kit, p11-kit-modules, softhsm2)"


def _first(paths: tuple[str, ...], what: str) -> Path:
    for path in paths:
        if Path(path).is_file():
            return Path(path)
    raise FileNotFoundError(f"no {what} in {', '.join(paths)}: {PACKAGES_HINT}")


def softhsm_module() -> Path:
    return _first(SOFTHSM_MODULES, "libsofthsm2.so")


def client_module() -> Path:
    """p11-kit's client module: a PKCS #11 module that forwards to P11_KIT_SERVER_ADDRESS."""
    return _first(CLIENT_MODULES, "p11-kit-client.so")


def p11_kit() -> str:
    found = shutil.which("p11-kit")
    if found is None:
        raise FileNotFoundError(f"no p11-kit command: {PACKAGES_HINT}")
    return found


def make_softhsm_token(root: Path, label: str, pin: str, so_pin: str) -> dict[str, str]:
    """A SoftHSM token store in root with one initialised token; the env that selects it (SOFTHSM2_CONF)."""
    tokens = root / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
                    "slots.removable = false\n")
    env = {"SOFTHSM2_CONF": str(conf)}
    util = shutil.which("softhsm2-util")
    if util is None:
        raise FileNotFoundError(f"no softhsm2-util: {PACKAGES_HINT}")
    subprocess.run([util, "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin],
                   env={**os.environ, **env}, check=True, capture_output=True)
    return env


def process_group_members(pgid: int) -> list[int]:
    """Every live process in process group pgid (zombies left out)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(proc.name))
    return sorted(found)


class RemoteToken:
    """`p11-kit server` exporting one token of a PKCS #11 module (SoftHSM by default) on a Unix socket."""

    def __init__(self, socket: Path, token_label: str, module_env: dict[str, str], *, pin: str = "",
                 provider: Path | None = None, log: Path | None = None) -> None:
        self.socket = socket
        self.token_label = token_label
        self.module_env = module_env  # the provider's environment (SOFTHSM2_CONF)
        self.pin = pin
        self.provider = provider or softhsm_module()
        self.log = log or socket.with_suffix(".log")
        self.server: subprocess.Popen[bytes] | None = None
        self.address = ""

    @classmethod
    def create(cls, root: Path, token_label: str = "remote-test", pin: str = "1234",
               so_pin: str = "123456") -> RemoteToken:
        """A new SoftHSM token under root, exported (once started) on root/p11kit.sock."""
        env = make_softhsm_token(root, token_label, pin, so_pin)
        return cls(root / "p11kit.sock", token_label, env, pin=pin)

    @property
    def uri(self) -> str:
        return "pkcs11:token=" + urllib.parse.quote(self.token_label, safe="")

    def client_env(self) -> dict[str, str]:
        """What a process loading p11-kit-client.so needs to reach this server."""
        return {"P11_KIT_SERVER_ADDRESS": f"unix:path={self.socket}"}

    @property
    def pid(self) -> int | None:
        return self.server.pid if self.server is not None and self.server.poll() is None else None

    def start(self) -> None:
        """Start the server (again, on the same socket) and wait until it announces its address."""
        if self.pid is not None:
            raise RuntimeError("p11-kit server already running")
        self._reap()
        self.socket.unlink(missing_ok=True)  # left behind by a killed server: the new one could not bind
        argv = [p11_kit(), "server", "-f", "-n", str(self.socket), "--provider", str(self.provider), self.uri]
        with self.log.open("ab") as log:
            self.server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
                                           env={**os.environ, **self.module_env})
        self.address = self._read_address()
        deadline = time.monotonic() + START_SECONDS
        while not self.socket.exists():
            if time.monotonic() > deadline or self.server.poll() is not None:
                raise RuntimeError(f"p11-kit server did not create {self.socket}: {self.log.read_text()}")
            time.sleep(0.01)

    def _read_address(self) -> str:
        assert self.server is not None and self.server.stdout is not None
        out = self.server.stdout
        deadline = time.monotonic() + START_SECONDS
        text = b""
        while b"P11_KIT_SERVER_PID=" not in text:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([out], [], [], left)[0]:
                raise RuntimeError(f"p11-kit server printed no address: {text!r} {self.log.read_text()}")
            chunk = os.read(out.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"p11-kit server exited ({self.server.wait()}): {self.log.read_text()}")
            text += chunk
        for part in text.decode().replace("\n", ";").split(";"):
            if part.strip().startswith("P11_KIT_SERVER_ADDRESS="):
                address = part.strip().split("=", 1)[1]
                if address != f"unix:path={self.socket}":
                    raise RuntimeError(f"p11-kit server listens on {address}, not {self.socket}")
                return address
        raise RuntimeError(f"no P11_KIT_SERVER_ADDRESS in {text!r}")

    def connections(self) -> list[int]:
        """The p11-kit-remote processes serving client connections (alive even if the server is not)."""
        if self.server is None:
            return []
        return [pid for pid in process_group_members(self.server.pid) if pid != self.server.pid]

    def kill(self) -> list[int]:
        """SIGKILL the server and every connection it serves: clients' next call fails (CKR_DEVICE_ERROR).
        The pids killed."""
        return self._signal_group(signal.SIGKILL)

    def stop(self) -> list[int]:
        """SIGTERM the server and its connections, then make sure they are gone."""
        killed = self._signal_group(signal.SIGTERM, grace=5.0)
        return killed

    def kill_server_only(self) -> int | None:
        """SIGKILL the listening server alone: new connections fail, existing ones go on being served."""
        pid = self.pid
        if pid is not None and self.server is not None:
            self.server.kill()
            self.server.wait()
        return pid

    def restart(self, graceful: bool = False) -> None:
        if graceful:
            self.stop()
        else:
            self.kill()
        self.start()

    def _signal_group(self, signum: int, grace: float = 2.0) -> list[int]:
        if self.server is None:
            return []
        pgid = self.server.pid
        members = process_group_members(pgid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signum)
        deadline = time.monotonic() + grace
        while process_group_members(pgid) and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.01)
        if process_group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self._reap()
        return members

    def _reap(self) -> None:
        if self.server is not None and self.server.poll() is not None and self.server.stdout is not None:
            self.server.stdout.close()

    def __enter__(self) -> RemoteToken:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self.socket.unlink(missing_ok=True)
