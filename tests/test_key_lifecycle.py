"""Key lifecycle on a real token with the plugin running: rotate in place, retire, destroy, re-create."""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from harness import KEY_SWITCH_SECONDS, Plugin, created_key_id


def states(plugin: Plugin) -> dict[str, str]:
    return {line.split()[0]: line.split()[-1] for line in plugin.keys("list").stdout.splitlines()[1:]}


def test_rotation_under_load_fails_no_call_and_status_never_leads_encrypt(plugin: Plugin) -> None:
    order = [plugin.status().key_id]  # key ids in creation order
    ledger: list[tuple[bytes, object]] = []
    encrypts: list[tuple[float, str]] = []  # (start time, key_id returned)
    statuses: list[tuple[float, str]] = []  # (time answered, key_id reported)
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            seed, started = os.urandom(32), time.monotonic()
            try:
                encrypted = plugin.encrypt(seed)
                encrypts.append((started, encrypted.key_id))
                ledger.append((seed, encrypted))
                assert plugin.decrypt(encrypted) == seed
            except grpc.RpcError as exc:
                failures.append(exc.code().name)

    def poll_status() -> None:
        while not stop.is_set():
            statuses.append((time.monotonic(), plugin.status().key_id))
            time.sleep(0.05)

    threads = [threading.Thread(target=load) for _ in range(8)] + [threading.Thread(target=poll_status)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(2):
            order.append(created_key_id(plugin.keys("rotate").stdout))
            plugin.wait_for_status_key(order[-1])
            time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert failures == []
    rank = {key_id: i for i, key_id in enumerate(order)}
    assert {key_id for _, key_id in encrypts} <= set(order)
    # Once Status announced a key, no Encrypt started afterwards returns an older one: the apiserver
    # would throw such a result away and mark the plugin unhealthy.
    for started, key_id in encrypts:
        announced = [k for t, k in statuses if t < started]
        if announced:
            assert rank[key_id] >= rank[announced[-1]]
    assert [rank[k] for _, k in statuses] == sorted(rank[k] for _, k in statuses)  # no flip-flop
    for seed, encrypted in ledger:
        assert plugin.decrypt(encrypted) == seed  # type: ignore[arg-type]


def test_old_ciphertexts_decrypt_after_several_rotations(plugin: Plugin) -> None:
    ledger = []
    for _ in range(3):
        seed = os.urandom(32)
        ledger.append((seed, plugin.encrypt(seed)))
        new_key = created_key_id(plugin.keys("rotate").stdout)
        assert plugin.broker is not None
        os.kill(plugin.broker.pid, signal.SIGHUP)  # switch now instead of within 5 s
        plugin.wait_for_status_key(new_key)
    assert len({encrypted.key_id for _, encrypted in ledger}) == 3
    for seed, encrypted in ledger:
        assert plugin.decrypt(encrypted) == seed
    listed = states(plugin)
    assert list(listed.values()).count("current") == 1 and list(listed.values()).count("decrypt-only") == 3


def test_retired_keys_refuse_and_the_current_key_needs_force(plugin: Plugin) -> None:
    seed = os.urandom(32)
    old = plugin.encrypt(seed)
    new_key = created_key_id(plugin.keys("rotate").stdout)
    refused = plugin.keys("retire", new_key, check=False)
    assert refused.returncode == 2 and "is the current key" in refused.stderr
    plugin.keys("retire", old.key_id)
    assert states(plugin) == {old.key_id: "retired", new_key: "current"}
    assert plugin.broker is not None
    os.kill(plugin.broker.pid, signal.SIGHUP)
    deadline = time.monotonic() + KEY_SWITCH_SECONDS
    while True:
        try:
            plugin.decrypt(old)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            break
        assert time.monotonic() < deadline, "a retired key still decrypts"
        time.sleep(0.2)


def test_retiring_the_current_key_never_falls_back_to_an_older_one(plugin: Plugin) -> None:
    first = plugin.status().key_id
    second = created_key_id(plugin.keys("rotate").stdout)
    assert plugin.broker is not None
    os.kill(plugin.broker.pid, signal.SIGHUP)
    plugin.wait_for_status_key(second)
    plugin.keys("retire", second, "--force")
    os.kill(plugin.broker.pid, signal.SIGHUP)
    deadline = time.monotonic() + KEY_SWITCH_SECONDS
    while plugin.status().healthz == "ok":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert plugin.status().key_id != first  # never A -> B -> A
    with pytest.raises(grpc.RpcError) as failure:
        plugin.encrypt(os.urandom(32))
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    third = created_key_id(plugin.keys("rotate").stdout)
    os.kill(plugin.broker.pid, signal.SIGHUP)
    plugin.wait_for_status_key(third)
    assert plugin.wait_healthy().key_id == third


def test_key_ids_are_unique_across_create_rotate_retire_and_recreate(plugin: Plugin) -> None:
    seen = [plugin.status().key_id]
    seen.append(created_key_id(plugin.keys("rotate").stdout))
    seen.append(created_key_id(plugin.keys("create", "--label", "spare").stdout))
    plugin.keys("retire", seen[-1], "--destroy", "--yes", "--unchecked")
    seen.append(created_key_id(plugin.keys("create", "--label", "spare").stdout))  # the same label again
    assert len(set(seen)) == len(seen)
    listed = states(plugin)
    assert seen[2] not in listed and listed[seen[3]] == "decrypt-only"


def test_destroy_without_confirmation_is_refused(plugin: Plugin, tmp_path: Path) -> None:
    spare = created_key_id(plugin.keys("create", "--label", "spare").stdout)
    result = subprocess.run(["keysealer", "keys", "retire", spare, "--destroy", "--unchecked", "--config",
                             str(plugin.layout.broker_config)], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "--yes" in result.stderr
    assert states(plugin)[spare] == "decrypt-only"


MECHANISMS_ON_SOFTHSM = ["aes-gcm", "aes-cbc-hmac", "aes-kwp", "rsa-oaep-sha1"]


def test_every_mechanism_round_trips_stays_under_the_limit_and_refuses_tampering(plugin: Plugin) -> None:
    from keysealer.frontend.kmsv2 import api_pb2

    ledger = []
    for mechanism in MECHANISMS_ON_SOFTHSM:
        key_id = created_key_id(plugin.keys("rotate", "--mechanism", mechanism).stdout)
        assert plugin.broker is not None
        os.kill(plugin.broker.pid, signal.SIGHUP)
        plugin.wait_for_status_key(key_id)
        for size in (1, 32, 256):  # the apiserver sends 32; the bounds of what the plugin accepts
            seed = os.urandom(size)
            encrypted = plugin.encrypt(seed)
            assert encrypted.key_id == key_id and len(encrypted.ciphertext) <= 1024, mechanism
            assert plugin.decrypt(encrypted) == seed
            ledger.append((seed, encrypted))
        for position in (1, 20, len(encrypted.ciphertext) - 1):  # mechanism byte, body start, body end
            tampered = bytearray(encrypted.ciphertext)
            tampered[position] ^= 0x01
            with pytest.raises(grpc.RpcError) as failure:
                plugin.stub.Decrypt(api_pb2.DecryptRequest(ciphertext=bytes(tampered), key_id=key_id), timeout=3)
            assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (mechanism, position)
    listed = plugin.keys("list").stdout
    for mechanism in MECHANISMS_ON_SOFTHSM:
        assert f" {mechanism} " in listed
    for seed, encrypted in ledger:  # a rotation may change the mechanism: every old key keeps working
        assert plugin.decrypt(encrypted) == seed


def test_a_mechanism_the_token_cannot_run_is_refused_and_leaves_no_key(plugin: Plugin) -> None:
    before = states(plugin)
    # SoftHSM 2.6 lists CKM_RSA_PKCS_OAEP but answers CKR_ARGUMENTS_BAD to OAEP with SHA-256.
    result = plugin.keys("create", "--label", "oaep", "--mechanism", "rsa-oaep", check=False)
    assert result.returncode != 0
    assert "failed its self-test (CKR_ARGUMENTS_BAD) and was removed" in result.stderr
    assert states(plugin) == before


def test_a_mechanism_the_token_does_not_offer_is_refused_naming_what_it_offers() -> None:
    import PyKCS11

    from keysealer.shared.errors import UsageError
    from keysealer.tools.keys_cli import _choose_mechanism

    offered = {PyKCS11.CKM_AES_CBC, PyKCS11.CKM_SHA256_HMAC, PyKCS11.CKM_AES_KEY_GEN, PyKCS11.CKM_RSA_PKCS_OAEP,
               PyKCS11.CKM_RSA_PKCS_KEY_PAIR_GEN}  # what tpm2-pkcs11 1.9 (TPM 2.0) lists of ours
    with pytest.raises(UsageError,
                       match=r"does not offer what aes-gcm needs; it offers: aes-cbc-hmac, rsa-oaep, rsa-oaep-sha1$"):
        _choose_mechanism(None, None, offered)
    # It can use aes-cbc-hmac keys but not generate them: the message says where they come from.
    with pytest.raises(UsageError, match=r"cannot generate aes-cbc-hmac keys \(it does not offer "
                                         r"CKM_GENERIC_SECRET_KEY_GEN\); .* deploy/providers/tpm2/create-key.sh$"):
        _choose_mechanism("aes-cbc-hmac", None, offered)
    generating = offered | {PyKCS11.CKM_GENERIC_SECRET_KEY_GEN}
    assert _choose_mechanism("aes-cbc-hmac", None, generating).name == "aes-cbc-hmac"


def test_a_planted_public_key_beside_a_real_rsa_key_is_never_sealed_to(plugin: Plugin) -> None:
    """Someone with the PIN adds an RSA public key of their own under the current key's CKA_ID: seeds must
    still be sealed to the token's own key pair, which the plugin alone can open."""
    import PyKCS11
    from cryptography.hazmat.primitives.asymmetric import rsa

    from keysealer.hsm_broker.mechanisms import MECHANISMS
    from keysealer.hsm_broker.token import find_keys
    from keysealer.shared.ciphertext import header_for

    key_id = created_key_id(plugin.keys("rotate", "--mechanism", "rsa-oaep-sha1").stdout)
    config = plugin.broker_config()
    os.environ.update(config["token"]["module_env"])
    lib = PyKCS11.PyKCS11Lib()
    lib.load(config["token"]["module"])
    slot = next(s for s in lib.getSlotList(tokenPresent=True)
                if lib.getTokenInfo(s).label.rstrip(" \x00") == config["token"]["token_label"])
    session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
    session.login(plugin.layout.pin.read_text().strip())
    real = next(k for k in find_keys(session) if k.identity.key_id == key_id)
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=3072).public_key().public_numbers()
    session.createObject([
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY), (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_RSA),
        (PyKCS11.CKA_TOKEN, True), (PyKCS11.CKA_ENCRYPT, True), (PyKCS11.CKA_LABEL, real.identity.label),
        (PyKCS11.CKA_ID, real.identity.token_object_id),
        (PyKCS11.CKA_MODULUS, attacker.n.to_bytes(384, "big")), (PyKCS11.CKA_PUBLIC_EXPONENT, b"\x01\x00\x01"),
    ])
    # The key as the broker finds it: sealed to the token's own public key, which the private half opens.
    found = next(k for k in find_keys(session) if k.identity.key_id == key_id)
    mechanism = MECHANISMS[found.identity.mechanism]
    header = header_for(found.identity.mechanism, found.identity.key_ref)
    sealed = mechanism.seal(session, found.objects, header, b"s" * 32)
    assert mechanism.open(session, found.objects, header, sealed) == b"s" * 32
    assert plugin.broker is not None
    os.kill(plugin.broker.pid, signal.SIGHUP)
    plugin.wait_for_status_key(key_id)
    time.sleep(1)  # both workers re-read the key set with the planted object in it
    for _ in range(6):
        seed = os.urandom(32)
        encrypted = plugin.encrypt(seed)
        assert encrypted.key_id == key_id
        assert plugin.decrypt(encrypted) == seed  # sealed to the token's pair, not the attacker's
    session.logout()
    session.closeSession()


def test_keys_older_than_the_newest_1024_still_decrypt(state_dir: Path) -> None:
    """The broker's health reply lists only the newest 1024 usable keys: a key left out of it must still
    decrypt (the frontend lets the broker, which knows every key, decide)."""
    from keysealer.frontend.kmsv2 import api_pb2
    from keysealer.hsm_broker.config import load_broker_config
    from keysealer.hsm_broker.key_naming import KeyIdentity, new_token_object_id
    from keysealer.hsm_broker.mechanisms import AesGcm
    from keysealer.hsm_broker.token import find_slot, load_module, open_user_session
    from keysealer.shared.ipc_schema import MAX_KEY_IDS_REPORTED

    plugin = Plugin(state_dir)
    plugin.start()
    seed = os.urandom(32)
    oldest = plugin.encrypt(seed)
    plugin.stop()
    config = load_broker_config(plugin.layout.broker_config)
    lib = load_module(config.token)
    session = open_user_session(lib, find_slot(lib, config.token), bytearray(plugin.layout.pin.read_bytes().strip()),
                                rw=True)
    try:
        for _ in range(MAX_KEY_IDS_REPORTED):  # newer keys of another label: the current key stays
            AesGcm().generate(session, KeyIdentity(new_token_object_id(), "filler"))
    finally:
        session.logout()
        session.closeSession()
    plugin.start()
    try:
        assert plugin.decrypt(oldest) == seed
        assert plugin.encrypt(seed).key_id == oldest.key_id
        with pytest.raises(grpc.RpcError) as unknown:  # an id the token does not hold is still refused
            plugin.decrypt(api_pb2.EncryptResponse(ciphertext=oldest.ciphertext, key_id="ks1-" + "0" * 32))
        assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        plugin.stop()
