"""`keysealer dev`, run the way a new user runs it: the console script, a fresh directory, Ctrl-C."""

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import yaml
from harness import child_pids

READY_SECONDS = 60.0


def _start_dev(state_dir: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(["keysealer", "dev", "--state-dir", str(state_dir)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    # A thread, not select(): the text wrapper buffers lines that select() can no longer see.
    threading.Thread(target=lambda: lines.extend(process.stdout or ()), daemon=True).start()
    deadline = time.monotonic() + READY_SECONDS
    while "timeout: 3s" not in "".join(lines) and time.monotonic() < deadline:
        time.sleep(0.1)
    output = "".join(lines)
    assert "KeySealer is ready." in output and "timeout: 3s" in output, output
    return process, output


def _stop(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGINT)
    return process.wait(timeout=30)


def test_dev_serves_a_healthy_socket_and_prints_a_usable_encryption_config(state_dir: Path) -> None:
    process, output = _start_dev(state_dir)
    try:
        socket_path = state_dir / "kms.sock"
        assert f"socket: {socket_path}" in output
        config = yaml.safe_load(output.split("---\n", 1)[1])
        provider = config["resources"][0]["providers"][0]["kms"]
        assert provider == {"apiVersion": "v2", "name": "keysealer", "endpoint": f"unix://{socket_path}",
                            "timeout": "3s"}
        for name in ("broker.yaml", "frontend.yaml", "kms.sock", "pin"):
            assert (state_dir / name).exists(), name
        assert (state_dir / "pin").stat().st_mode & 0o077 == 0
        status = subprocess.run(["keysealer", "status", "--socket", str(socket_path)], capture_output=True,
                                text=True, check=True)
        assert "healthz: ok" in status.stdout
        key_id = re.search(r"key_id:\s+(\S+)", status.stdout)
        assert key_id is not None and key_id.group(1) in output
        listing = subprocess.run(["keysealer", "keys", "list", "--config", str(state_dir / "broker.yaml")],
                                 capture_output=True, text=True, check=True)
        assert key_id.group(1) in listing.stdout and "current" in listing.stdout
        children = child_pids(process.pid)
        assert len(children) == 2
    finally:
        assert _stop(process) == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists(), "dev left a child running"
    assert not (state_dir / "kms.sock").exists()

    again, output_again = _start_dev(state_dir)
    try:
        assert f"key_id: {key_id.group(1)}" in output_again  # same token, same key
    finally:
        assert _stop(again) == 0


def test_dev_restarts_a_broker_that_died(state_dir: Path) -> None:
    process, _ = _start_dev(state_dir)
    try:
        broker = next(pid for pid in child_pids(process.pid)
                      if "hsm_broker" in Path(f"/proc/{pid}/cmdline").read_text())
        os.kill(broker, signal.SIGKILL)
        deadline = time.monotonic() + 20
        healthy = False
        while time.monotonic() < deadline and not healthy:
            time.sleep(0.3)
            status = subprocess.run(["keysealer", "status", "--socket", str(state_dir / "kms.sock")],
                                    capture_output=True, text=True, check=False)
            healthy = "healthz: ok" in status.stdout and broker not in child_pids(process.pid)
        assert healthy
    finally:
        assert _stop(process) == 0
