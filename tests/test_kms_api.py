"""The KMS v2 API on the real socket, against a real broker and SoftHSM token."""

import os
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from harness import Plugin

from keysealer.frontend.kmsv2 import api_pb2

# The apiserver's rule for annotation keys: a lowercase RFC 1123 subdomain with at least two labels.
FQDN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+")


def test_status_reports_v2_healthy_with_a_hashed_key_id(shared_plugin: Plugin) -> None:
    status = shared_plugin.status()
    assert status.version == "v2"
    assert status.healthz == "ok"
    assert re.fullmatch(r"ks1-[0-9a-f]{32}", status.key_id)


def test_encrypt_decrypt_round_trip_of_seeds(shared_plugin: Plugin) -> None:
    status_key = shared_plugin.status().key_id
    for _ in range(20):
        seed = os.urandom(32)
        encrypted = shared_plugin.encrypt(seed)
        assert encrypted.key_id == status_key
        assert 0 < len(encrypted.ciphertext) <= 1024
        assert seed not in encrypted.ciphertext
        assert shared_plugin.decrypt(encrypted) == seed


def test_ciphertexts_are_randomised(shared_plugin: Plugin) -> None:
    seed = os.urandom(32)
    first, second = shared_plugin.encrypt(seed), shared_plugin.encrypt(seed)
    assert first.ciphertext != second.ciphertext
    assert shared_plugin.decrypt(first) == shared_plugin.decrypt(second) == seed


def test_annotations_are_fully_qualified_domain_names_within_limits(shared_plugin: Plugin) -> None:
    encrypted = shared_plugin.encrypt(os.urandom(32))
    assert encrypted.annotations
    for key in encrypted.annotations:
        assert FQDN.fullmatch(key) and "/" not in key
    assert sum(len(k) + len(v) for k, v in encrypted.annotations.items()) <= 32 * 1024


def _decrypt_code(plugin: Plugin, request: api_pb2.DecryptRequest) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failure:
        plugin.stub.Decrypt(request, timeout=3)
    return failure.value.code()


def test_tampered_ciphertexts_are_refused(shared_plugin: Plugin) -> None:
    encrypted = shared_plugin.encrypt(os.urandom(32))
    data = encrypted.ciphertext
    # Every byte of the header, IV, sealed seed and tag is covered: flip one in each region.
    for position in (0, 1, 5, 20, 35, len(data) - 1):
        tampered = bytearray(data)
        tampered[position] ^= 0x01
        request = api_pb2.DecryptRequest(ciphertext=bytes(tampered), key_id=encrypted.key_id,
                                         annotations=encrypted.annotations)
        assert _decrypt_code(shared_plugin, request) == grpc.StatusCode.INVALID_ARGUMENT, position
    truncated = api_pb2.DecryptRequest(ciphertext=data[:-1], key_id=encrypted.key_id)
    assert _decrypt_code(shared_plugin, truncated) == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_missing_or_mismatched_key_ids_are_refused(shared_plugin: Plugin) -> None:
    encrypted = shared_plugin.encrypt(os.urandom(32))
    for key_id in ("", "ks1-" + "0" * 32, "some-other-plugin-key", encrypted.key_id + "x"):
        request = api_pb2.DecryptRequest(ciphertext=encrypted.ciphertext, key_id=key_id)
        assert _decrypt_code(shared_plugin, request) == grpc.StatusCode.INVALID_ARGUMENT, key_id


def test_a_well_formed_ciphertext_under_a_key_the_token_lacks_is_refused(shared_plugin: Plugin) -> None:
    from keysealer.shared.key_ids import key_id_for_ref

    encrypted = shared_plugin.encrypt(os.urandom(32))
    foreign_ref = bytes(16)
    forged = encrypted.ciphertext[:2] + foreign_ref + encrypted.ciphertext[18:]
    request = api_pb2.DecryptRequest(ciphertext=forged, key_id=key_id_for_ref(foreign_ref))
    with pytest.raises(grpc.RpcError) as failure:
        shared_plugin.stub.Decrypt(request, timeout=3)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a key this plugin holds" in (failure.value.details() or "")


def test_foreign_annotations_are_refused(shared_plugin: Plugin) -> None:
    encrypted = shared_plugin.encrypt(os.urandom(32))
    for annotations in ({"evil.example.com": b"1"}, {"format.keysealer.io": b"9"}):
        request = api_pb2.DecryptRequest(ciphertext=encrypted.ciphertext, key_id=encrypted.key_id,
                                         annotations=annotations)
        assert _decrypt_code(shared_plugin, request) == grpc.StatusCode.INVALID_ARGUMENT


def test_empty_and_oversized_inputs_are_refused(shared_plugin: Plugin) -> None:
    for plaintext in (b"", os.urandom(257), os.urandom(4096)):
        with pytest.raises(grpc.RpcError) as failure:
            shared_plugin.encrypt(plaintext)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    encrypted = shared_plugin.encrypt(os.urandom(32))
    for data in (b"", encrypted.ciphertext + os.urandom(1024)):
        request = api_pb2.DecryptRequest(ciphertext=data, key_id=encrypted.key_id)
        assert _decrypt_code(shared_plugin, request) == grpc.StatusCode.INVALID_ARGUMENT
    # Beyond any legitimate message: gRPC refuses it before our code reads it.
    with pytest.raises(grpc.RpcError) as failure:
        shared_plugin.encrypt(os.urandom(100 * 1024))
    assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_largest_accepted_seed_stays_under_the_ciphertext_limit(shared_plugin: Plugin) -> None:
    seed = os.urandom(256)
    encrypted = shared_plugin.encrypt(seed)
    assert len(encrypted.ciphertext) <= 1024
    assert shared_plugin.decrypt(encrypted) == seed


def test_unknown_methods_answer_unimplemented(shared_plugin: Plugin) -> None:
    channel = grpc.insecure_channel(f"unix:{shared_plugin.layout.kms_socket}")
    for method in ("/v2.KeyManagementService/Rotate", "/v1beta1.KeyManagementService/Version",
                   "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"):
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as failure:
            call(b"", timeout=3)
        assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
    channel.close()


def test_hundreds_of_concurrent_calls_are_all_correct(shared_plugin: Plugin) -> None:
    seeds = [os.urandom(32) for _ in range(400)]

    def round_trip(seed: bytes) -> bool:
        return shared_plugin.decrypt(shared_plugin.encrypt(seed, timeout=10), timeout=10) == seed

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(round_trip, seeds))
    assert results == [True] * len(seeds)
