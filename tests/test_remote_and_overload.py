"""A remote token that goes away (p11-kit server), and far more calls than the plugin admits."""

import os
import subprocess
import threading
import time
from pathlib import Path

from harness import Load, Plugin, rss_kib, running_plugin
from remote_token import RemoteToken, client_module

DEADLINE = 3.5  # the frontend's 2.5 s call deadline plus scheduling slack
RECOVERY_SECONDS = 30.0


def test_a_remote_token_outage_turns_the_plugin_unhealthy_and_it_recovers_by_itself(state_dir: Path) -> None:
    plugin = Plugin(state_dir)
    # Debian bookworm's p11-kit 0.24 client forwards RSA-OAEP with SHA-1 but not AES-GCM.
    subprocess.run(["keysealer", "keys", "rotate", "--mechanism", "rsa-oaep-sha1", "--config",
                    str(plugin.layout.broker_config)], check=True, capture_output=True, timeout=120)
    remote = RemoteToken(state_dir / "p11kit.sock", "keysealer-dev",
                         {"SOFTHSM2_CONF": str(plugin.layout.softhsm_conf)})
    remote.start()
    plugin.configure(broker={"token": {"module": str(client_module()), "module_env": remote.client_env()}})
    plugin.start()
    try:
        load = Load(plugin, callers=4)
        time.sleep(1)
        remote.kill()  # the server and every p11-kit-remote child serving a connection
        deadline = time.monotonic() + RECOVERY_SECONDS
        while plugin.status().healthz == "ok":
            assert time.monotonic() < deadline, "Status stayed ok with the remote token gone"
            time.sleep(0.2)
        time.sleep(2)
        remote.start()
        plugin.wait_healthy(RECOVERY_SECONDS)
        time.sleep(1)
        load.check(DEADLINE)
        assert "OK" in {code for code, _ in load.outcomes[-10:]}, "no call succeeded after the token came back"
    finally:
        plugin.stop()
        remote.stop()


def test_overload_is_refused_at_once_while_admitted_calls_and_status_keep_their_deadlines(state_dir: Path) -> None:
    with running_plugin(state_dir, frontend={"limits": {"max_in_flight": 16}},
                        broker={"workers": {"count": 1, "queue_limit": 8}}) as plugin:
        assert plugin.frontend is not None
        memory_before = rss_kib(plugin.frontend.pid)
        load = Load(plugin, callers=96, timeout=10.0)
        statuses: list[float] = []

        def poll_status() -> None:
            end = time.monotonic() + 4
            while time.monotonic() < end:
                started = time.monotonic()
                plugin.status(timeout=3.0)
                statuses.append(time.monotonic() - started)
                time.sleep(0.05)

        poller = threading.Thread(target=poll_status)
        poller.start()
        poller.join()
        load.check(DEADLINE, allowed=frozenset({"RESOURCE_EXHAUSTED"}))
        refused = [seconds for code, seconds in load.outcomes if code == "RESOURCE_EXHAUSTED"]
        assert refused, "the bounds never refused anything: the load was too light to test them"
        assert max(refused) < 1.0  # refused at once, not after queueing
        assert sorted(statuses)[int(len(statuses) * 0.99)] < 1.0
        assert rss_kib(plugin.frontend.pid) < memory_before + 30 * 1024
        seed = os.urandom(32)
        assert plugin.decrypt(plugin.encrypt(seed)) == seed
