"""The integration suite, run against every provider in tests/providers.py: the real plugin (broker and
frontend processes, real sockets) serving from that provider's token, set up by its deploy/providers script."""

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from harness import Load, Plugin, child_pids, created_key_id, short_tmp_dir
from providers import PROVIDERS, Provider

from keysealer.frontend.kmsv2 import api_pb2

SEED_SIZES = (1, 32, 256)  # the apiserver sends 32; the bounds of what the plugin accepts
KEY_REFRESH_WAIT_SECONDS = 12.0  # two of the workers' 5 s key refreshes, with slack


@dataclass
class ProviderPlugin:
    provider: Provider
    token_dir: Path
    plugin: Plugin

    def rotate(self) -> str:
        """A new current key; waits until Status announces it."""
        key_id = created_key_id(self.provider.create_key(self.token_dir, self.plugin.layout.broker_config))
        assert self.plugin.broker is not None
        os.kill(self.plugin.broker.pid, signal.SIGHUP)  # re-read the keys now, not within 5 s
        self.plugin.wait_for_status_key(key_id)
        return key_id


@pytest.fixture(scope="module", params=PROVIDERS, ids=lambda p: p.name)
def served(request: pytest.FixtureRequest) -> Iterator[ProviderPlugin]:
    provider: Provider = request.param
    token_dir, root = short_tmp_dir(), short_tmp_dir()
    try:
        provider.setup(token_dir)
        plugin = Plugin(root)
        plugin.use_token(token_dir)
        provider.create_key(token_dir, plugin.layout.broker_config)
        plugin.start()
        try:
            yield ProviderPlugin(provider, token_dir, plugin)
        finally:
            plugin.stop()
    finally:
        provider.stop(token_dir)
        shutil.rmtree(token_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def test_seeds_round_trip_under_the_current_key(served: ProviderPlugin) -> None:
    plugin = served.plugin
    key_id = plugin.status().key_id
    for size in SEED_SIZES:
        seed = os.urandom(size)
        encrypted = plugin.encrypt(seed)
        assert encrypted.key_id == key_id
        assert len(encrypted.ciphertext) <= 1024
        assert plugin.decrypt(encrypted) == seed
    assert f" {served.provider.mechanism} " in plugin.keys("list").stdout


def test_tampered_ciphertexts_are_refused_and_the_plugin_stays_healthy(served: ProviderPlugin) -> None:
    plugin = served.plugin
    encrypted = plugin.encrypt(os.urandom(32))
    for position in (1, 20, len(encrypted.ciphertext) - 1):  # mechanism byte, body start, body end
        tampered = bytearray(encrypted.ciphertext)
        tampered[position] ^= 0x01
        with pytest.raises(grpc.RpcError) as failure:
            plugin.stub.Decrypt(api_pb2.DecryptRequest(ciphertext=bytes(tampered), key_id=encrypted.key_id),
                                timeout=3)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, position
    assert plugin.status().healthz == "ok"


def test_rotation_keeps_old_ciphertexts_decrypting(served: ProviderPlugin) -> None:
    plugin = served.plugin
    seed = os.urandom(32)
    before = plugin.encrypt(seed)
    new_key = served.rotate()
    assert new_key != before.key_id
    after = plugin.encrypt(seed)
    assert after.key_id == new_key
    assert plugin.decrypt(before) == seed and plugin.decrypt(after) == seed


def test_a_killed_worker_loses_no_encrypted_seed(served: ProviderPlugin) -> None:
    plugin = served.plugin
    assert plugin.broker is not None
    load = Load(plugin, callers=4)
    try:
        plugin.wait_healthy()
        os.kill(child_pids(plugin.broker.pid)[0], signal.SIGKILL)
        plugin.wait_healthy()
    finally:
        load.check(deadline=10.0)
    assert load.ledger, "no Encrypt succeeded"


def test_a_restarted_broker_decrypts_what_it_sealed_before(served: ProviderPlugin) -> None:
    plugin = served.plugin
    seed = os.urandom(32)
    encrypted = plugin.encrypt(seed)
    assert plugin.stop_broker() == 0
    plugin.start_broker()
    plugin.wait_healthy()
    assert plugin.decrypt(encrypted) == seed


def test_doctor_passes_every_check(served: ProviderPlugin) -> None:
    plugin = served.plugin
    doctor = subprocess.run(["keysealer", "doctor", "--config", str(plugin.layout.broker_config),
                             "--frontend-config", str(plugin.layout.frontend_config)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "FAIL" not in doctor.stdout and served.provider.mechanism in doctor.stdout


def test_a_key_imported_under_the_current_label_never_becomes_current(served: ProviderPlugin) -> None:
    """Someone with the PIN imports an AES key whose value they know, sensitive and non-extractable, as a
    newer version of the current label: the plugin must go on sealing under the token's own key."""
    import PyKCS11

    from keysealer.hsm_broker.config import load_broker_config
    from keysealer.hsm_broker.key_naming import new_token_object_id
    from keysealer.hsm_broker.token import find_slot, load_module, open_user_session

    plugin = served.plugin
    real_key = plugin.encrypt(os.urandom(32)).key_id
    config = load_broker_config(plugin.layout.broker_config)
    lib = load_module(config.token)
    session = open_user_session(lib, find_slot(lib, config.token),
                                bytearray((served.token_dir / "pin").read_bytes().strip()), rw=True)
    try:
        session.createObject([
            (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY), (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
            (PyKCS11.CKA_TOKEN, True), (PyKCS11.CKA_PRIVATE, True), (PyKCS11.CKA_SENSITIVE, True),
            (PyKCS11.CKA_EXTRACTABLE, False), (PyKCS11.CKA_ENCRYPT, True), (PyKCS11.CKA_DECRYPT, True),
            (PyKCS11.CKA_LABEL, config.keys.current_label), (PyKCS11.CKA_ID, new_token_object_id()),
            (PyKCS11.CKA_VALUE, b"k" * 32),
        ])
    except PyKCS11.PyKCS11Error as exc:
        pytest.skip(f"{served.provider.name} refuses to import a secret key ({exc}): nothing to plant")
    finally:
        session.logout()
        session.closeSession()
    assert plugin.broker is not None
    os.kill(plugin.broker.pid, signal.SIGHUP)
    deadline = time.monotonic() + KEY_REFRESH_WAIT_SECONDS
    while time.monotonic() < deadline:  # long enough for every worker to re-read the keys, twice
        seed = os.urandom(32)
        encrypted = plugin.encrypt(seed)
        assert encrypted.key_id == real_key
        assert plugin.decrypt(encrypted) == seed
        time.sleep(0.2)
