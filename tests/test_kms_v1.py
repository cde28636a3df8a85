"""KMS v1beta1 on the same socket, for clusters moving from KMS v1 to v2 (off by default)."""

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from harness import Plugin, running_plugin

from keysealer.frontend.kmsv1 import api_pb2 as v1
from keysealer.frontend.kmsv1 import api_pb2_grpc as v1_grpc
from keysealer.frontend.kmsv2 import api_pb2 as v2


@pytest.fixture
def v1_plugin(state_dir: Path) -> Iterator[tuple[Plugin, v1_grpc.KeyManagementServiceStub]]:
    with running_plugin(state_dir, frontend={"kms_v1beta1": True}) as plugin:
        channel = grpc.insecure_channel(f"unix:{plugin.layout.kms_socket}")
        yield plugin, v1_grpc.KeyManagementServiceStub(channel)
        channel.close()


def test_version_names_the_api_and_the_runtime(v1_plugin: tuple[Plugin, v1_grpc.KeyManagementServiceStub]) -> None:
    _, stub = v1_plugin
    answer = stub.Version(v1.VersionRequest(version="v1beta1"), timeout=3)
    assert (answer.version, answer.runtime_name) == ("v1beta1", "KeySealer")
    assert answer.runtime_version


def test_v1_round_trip_and_the_same_ciphertext_serves_v2(v1_plugin: tuple[Plugin, v1_grpc.KeyManagementServiceStub]
                                                         ) -> None:
    plugin, stub = v1_plugin
    seed = os.urandom(32)
    plugin.secrets.add(seed)
    cipher = stub.Encrypt(v1.EncryptRequest(version="v1beta1", plain=seed), timeout=3).cipher
    assert 0 < len(cipher) <= 1024 and seed not in cipher
    assert stub.Decrypt(v1.DecryptRequest(version="v1beta1", cipher=cipher), timeout=3).plain == seed
    # Moving to v2: the apiserver keeps reading v1 data through v1 while writing v2; both reach one key set.
    key_id = plugin.status().key_id
    assert plugin.stub.Decrypt(v2.DecryptRequest(ciphertext=cipher, key_id=key_id), timeout=3).plaintext == seed
    encrypted = plugin.encrypt(seed)
    assert stub.Decrypt(v1.DecryptRequest(version="v1beta1", cipher=encrypted.ciphertext), timeout=3).plain == seed


def test_v1_refuses_bad_input(v1_plugin: tuple[Plugin, v1_grpc.KeyManagementServiceStub]) -> None:
    _, stub = v1_plugin
    cipher = stub.Encrypt(v1.EncryptRequest(version="v1beta1", plain=os.urandom(32)), timeout=3).cipher
    tampered = bytes([*cipher[:-1], cipher[-1] ^ 1])
    for call, request in ((stub.Decrypt, v1.DecryptRequest(version="v1beta1", cipher=tampered)),
                          (stub.Decrypt, v1.DecryptRequest(version="v1beta1", cipher=b"")),
                          (stub.Decrypt, v1.DecryptRequest(version="v9", cipher=cipher)),
                          (stub.Encrypt, v1.EncryptRequest(version="v1beta1", plain=b"")),
                          (stub.Encrypt, v1.EncryptRequest(version="v1beta1", plain=os.urandom(300)))):
        with pytest.raises(grpc.RpcError) as failure:
            call(request, timeout=3)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
