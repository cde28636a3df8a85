"""The etcd value parser against protoc's own encoder of the apiserver's EncryptedObject, and on any bytes."""

import os
from pathlib import Path

import pytest
from apiserver_values import AES_GCM_KEY, HKDF_SEED, ApiserverValues
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from keysealer.frontend.kmsv2 import api_pb2
from keysealer.shared.stored_values import EncryptedSeed, ValueKind, classify, resource_of


@pytest.fixture(scope="module")
def values(tmp_path_factory: pytest.TempPathFactory) -> ApiserverValues:
    return ApiserverValues(Path(tmp_path_factory.mktemp("proto")))


domain = st.from_regex(r"[a-z]{1,8}\.[a-z]{2,6}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(key_id=st.text(min_size=1, max_size=300).filter(lambda s: len(s.encode()) <= 1024),
       ciphertext=st.binary(min_size=1, max_size=1024),
       annotations=st.dictionaries(domain, st.binary(max_size=64), max_size=3),
       source_type=st.sampled_from([AES_GCM_KEY, HKDF_SEED]),
       provider=st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True))
def test_what_the_apiserver_writes_is_read_back_exactly(values: ApiserverValues, *, key_id: str, ciphertext: bytes,
                                                        annotations: dict[str, bytes], source_type: int,
                                                        provider: str) -> None:
    seed = api_pb2.EncryptResponse(ciphertext=ciphertext, key_id=key_id, annotations=annotations)
    stored = classify(values.kms_v2(provider, seed, source_type=source_type))
    assert stored.kind is ValueKind.KMS_V2 and stored.provider == provider
    assert stored.seed == EncryptedSeed(key_id, ciphertext, tuple(sorted(annotations.items())), source_type)


@settings(max_examples=500, deadline=None)
@given(tail=st.binary(max_size=200), prefix=st.sampled_from([b"k8s:enc:kms:v2:p:", b"k8s:enc:kms:v2:", b""]))
def test_any_bytes_are_classified_never_raised(tail: bytes, prefix: bytes) -> None:
    assert classify(prefix + tail).kind in set(ValueKind)


def reference_reading(values: ApiserverValues, body: bytes) -> EncryptedSeed | None:
    """What the apiserver makes of `body`: protobuf's own parser, then ValidateEncryptedObject's rules."""
    try:
        message = values.message_class.FromString(body)
    except DecodeError:
        return None
    if not (message.encryptedData and 0 < len(message.encryptedDEKSource) <= 1024
            and 0 < len(message.keyID.encode()) <= 1024 and message.encryptedDEKSourceType in (0, 1)):
        return None
    return EncryptedSeed(message.keyID, message.encryptedDEKSource, tuple(sorted(message.annotations.items())),
                         message.encryptedDEKSourceType)


def test_every_cut_of_a_valid_value_is_read_as_the_apiserver_would(values: ApiserverValues) -> None:
    seed = api_pb2.EncryptResponse(ciphertext=os.urandom(78), key_id="ks1-" + "0" * 32,
                                   annotations={"format.keysealer.io": b"1"})
    prefix = b"k8s:enc:kms:v2:keysealer:"
    whole = values.kms_v2("keysealer", seed) + b"\x48\x01"  # and an unknown field (9, varint)
    outcomes = set()
    for cut in range(len(prefix), len(whole) + 1):
        expected, stored = reference_reading(values, whole[len(prefix):cut]), classify(whole[:cut])
        assert stored.seed == expected, cut
        assert stored.kind is (ValueKind.UNPARSABLE if expected is None else ValueKind.KMS_V2), cut
        outcomes.add(stored.kind)
    assert outcomes == {ValueKind.UNPARSABLE, ValueKind.KMS_V2}


def test_resources_are_named_as_an_encryption_configuration_names_them() -> None:
    assert resource_of(b"/registry/secrets/ns/name", b"/registry/") == "secrets"
    assert resource_of(b"/registry/example.com/widgets/ns/w", b"/registry/") == "widgets.example.com"
    assert resource_of(b"/registry/namespaces/default", b"/registry/") == "namespaces"
