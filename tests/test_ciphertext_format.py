"""Unit tests for the ciphertext envelope (keysealer.shared.ciphertext), key id derivation
(keysealer.shared.key_ids) and how KeySealer names its keys in the token (keysealer.hsm_broker.key_naming).

Ciphertexts and key ids end up in etcd: their layout and derivation must never change silently, so some
tests pin known answers.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import re
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
from hypothesis import given, settings
from hypothesis import strategies as st

from keysealer.hsm_broker import key_naming
from keysealer.hsm_broker.key_naming import (
    ID_MAGIC,
    LEGACY_ID_MAGIC,
    KeyIdentity,
    KeyVersion,
    current_version,
    is_keysealer_object_id,
    new_token_object_id,
    newest_with_label,
)
from keysealer.shared import ciphertext, ipc_schema
from keysealer.shared.ciphertext import (
    BODY_BOUNDS,
    FORMAT_V1,
    HEADER_LEN,
    MAX_LEN,
    MIN_LEN,
    Envelope,
    Mechanism,
    header_for,
    parse,
)
from keysealer.shared.errors import ErrorCode, KeySealerError
from keysealer.shared.key_ids import KEY_REF_LEN, is_well_formed_key_id, key_id_for_ref, key_ref_for, key_ref_for_id

KEY_REF = bytes(range(0x10, 0x10 + KEY_REF_LEN))
MECHANISMS = list(Mechanism)
UNKNOWN_MECHANISMS = [0, 6, 0x7F, 0xFF]
# The documented bounds, written out rather than read from BODY_BOUNDS so a changed bound fails here.
EXPECTED_BODY_BOUNDS = {
    Mechanism.AES_256_GCM: (29, 284),  # IV 12 | 1..256 | tag 16
    Mechanism.AES_256_CBC_HMAC_SHA256: (64, 320),  # IV 16 | 16..272 padded | HMAC 32
    Mechanism.AES_256_KEY_WRAP_PAD: (16, 272),  # RFC 5649 of a 2-byte length + seed: 8 + that rounded up to 8
    Mechanism.RSA_3072_OAEP_SHA256: (384, 384),
    Mechanism.RSA_3072_OAEP_SHA1: (384, 384),
}


def low(mechanism: Mechanism) -> int:
    return BODY_BOUNDS[mechanism][0]


def high(mechanism: Mechanism) -> int:
    return BODY_BOUNDS[mechanism][1]


def body_of(length: int) -> bytes:
    """A body that is not constant, so a field taken from the wrong offset shows."""
    return bytes((0x40 + i) % 256 for i in range(length))


def well_formed(mechanism: Mechanism, body: bytes, key_ref: bytes = KEY_REF) -> bytes:
    return bytes((FORMAT_V1, mechanism)) + key_ref + body


def refused(data: bytes | bytearray) -> KeySealerError:
    with pytest.raises(KeySealerError) as info:
        parse(data)
    assert info.value.code is ErrorCode.BAD_CIPHERTEXT
    return info.value


# --- the envelope --------------------------------------------------------------------------------------

def test_format_constants_match_the_documented_layout() -> None:
    assert FORMAT_V1 == 1
    assert KEY_REF_LEN == 16
    assert HEADER_LEN == 18
    assert MAX_LEN == 1024  # the apiserver refuses longer ciphertexts
    assert ciphertext.RSA_3072_BYTES == 384


def test_mechanism_bytes_are_pinned() -> None:
    # Stored in byte 1 of every ciphertext and in every KS2 CKA_ID: the values must never change.
    assert {m.name: int(m) for m in Mechanism} == {
        "AES_256_GCM": 1,
        "AES_256_CBC_HMAC_SHA256": 2,
        "AES_256_KEY_WRAP_PAD": 3,
        "RSA_3072_OAEP_SHA256": 4,
        "RSA_3072_OAEP_SHA1": 5,
    }


def test_body_bounds_are_pinned_for_every_mechanism() -> None:
    assert set(BODY_BOUNDS) == set(Mechanism)
    assert dict(BODY_BOUNDS) == EXPECTED_BODY_BOUNDS


def test_min_len_is_the_smallest_envelope() -> None:
    assert MIN_LEN == HEADER_LEN + 16 == 34  # an AES key wrap of a 1-byte seed
    assert min(HEADER_LEN + lo for lo, _ in EXPECTED_BODY_BOUNDS.values()) == MIN_LEN


def test_every_mechanism_fits_max_len() -> None:
    for mechanism, (lo, hi) in BODY_BOUNDS.items():
        assert 0 < lo <= hi, mechanism
        assert HEADER_LEN + hi <= MAX_LEN, mechanism


def _model_body_len(mechanism: Mechanism, seed_len: int) -> int:
    """How long each mechanism's body is for a seed, from the layouts in the ciphertext.py docstring."""
    if mechanism is Mechanism.AES_256_GCM:
        return 12 + seed_len + 16
    if mechanism is Mechanism.AES_256_CBC_HMAC_SHA256:
        return 16 + (seed_len // 16 + 1) * 16 + 32  # PKCS #7 always adds 1..16 bytes
    if mechanism is Mechanism.AES_256_KEY_WRAP_PAD:
        return 8 + -(-(2 + seed_len) // 8) * 8  # the wrapped value is a 2-byte length and the seed
    return 384


def test_body_bounds_cover_exactly_the_seeds_the_ipc_schema_allows() -> None:
    seeds = range(1, ipc_schema.MAX_PLAINTEXT + 1)
    assert ipc_schema.MAX_PLAINTEXT == 256
    for mechanism in Mechanism:
        lengths = [_model_body_len(mechanism, n) for n in seeds]
        assert (min(lengths), max(lengths)) == BODY_BOUNDS[mechanism], mechanism


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def _real_body(mechanism: Mechanism, seed: bytes, rsa_key: rsa.RSAPrivateKey) -> bytes:
    """The body as mechanisms.py lays it out, made with real primitives instead of a token."""
    aes_key, header = bytes(range(32)), header_for(mechanism, KEY_REF)
    if mechanism is Mechanism.AES_256_GCM:
        iv = os.urandom(12)
        return iv + AESGCM(aes_key).encrypt(iv, seed, header)
    if mechanism is Mechanism.AES_256_CBC_HMAC_SHA256:
        iv, pad = os.urandom(16), 16 - len(seed) % 16
        encryptor = Cipher(algorithms.AES(aes_key), modes.CBC(iv)).encryptor()
        encrypted = encryptor.update(seed + bytes([pad]) * pad) + encryptor.finalize()
        return iv + encrypted + hmac.digest(aes_key, header + iv + encrypted, hashlib.sha256)
    if mechanism is Mechanism.AES_256_KEY_WRAP_PAD:
        return aes_key_wrap_with_padding(aes_key, len(seed).to_bytes(2, "big") + seed)
    algorithm = hashes.SHA256() if mechanism is Mechanism.RSA_3072_OAEP_SHA256 else hashes.SHA1()
    return rsa_key.public_key().encrypt(seed, padding.OAEP(padding.MGF1(algorithm), algorithm, None))


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_real_bodies_parse_and_reach_both_bounds(mechanism: Mechanism, rsa_key: rsa.RSAPrivateKey) -> None:
    seeds = [1, 2, 7, 8, 9, 15, 16, 17, 32, 255, 256]
    if not mechanism.name.startswith("RSA"):
        seeds = list(range(1, ipc_schema.MAX_PLAINTEXT + 1))
    lengths = set()
    for n in seeds:
        body = _real_body(mechanism, os.urandom(n), rsa_key)
        assert len(body) == _model_body_len(mechanism, n), (mechanism, n)
        assert parse(well_formed(mechanism, body)) == Envelope(mechanism, KEY_REF, body)
        lengths.add(len(body))
    assert (min(lengths), max(lengths)) == BODY_BOUNDS[mechanism]


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
@pytest.mark.parametrize("edge", ["smallest", "largest"])
def test_parse_well_formed_envelope(mechanism: Mechanism, edge: str) -> None:
    body = body_of(low(mechanism) if edge == "smallest" else high(mechanism))
    data = well_formed(mechanism, body)
    envelope = parse(data)
    assert envelope == Envelope(mechanism=mechanism, key_ref=KEY_REF, body=body)
    assert type(envelope.mechanism) is Mechanism
    assert envelope.mechanism is mechanism
    assert type(envelope.key_ref) is bytes
    assert type(envelope.body) is bytes
    assert envelope.header == data[:HEADER_LEN]
    assert envelope.to_bytes() == data


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_parse_accepts_every_body_length_in_bounds(mechanism: Mechanism) -> None:
    for length in range(low(mechanism), high(mechanism) + 1):
        body = body_of(length)
        assert parse(well_formed(mechanism, body)).body == body


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
@pytest.mark.parametrize("edge", ["one below smallest", "one above largest"])
def test_parse_refuses_body_just_outside_bounds(mechanism: Mechanism, edge: str) -> None:
    length = low(mechanism) - 1 if edge == "one below smallest" else high(mechanism) + 1
    error = refused(well_formed(mechanism, body_of(length)))
    assert "does not fit" in error.message
    assert mechanism.name in error.message


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_parse_refuses_every_other_body_length_up_to_max_len(mechanism: Mechanism) -> None:
    lo, hi = BODY_BOUNDS[mechanism]
    for length in itertools.chain(range(lo), range(hi + 1, MAX_LEN - HEADER_LEN + 1)):
        assert "does not fit" in refused(well_formed(mechanism, body_of(length))).message, length


def test_parse_accepts_bytearray_and_copies_the_fields() -> None:
    data = bytearray(well_formed(Mechanism.AES_256_GCM, body_of(60)))
    envelope = parse(bytes(data))
    assert parse(data) == envelope
    copied = parse(data)
    data[2] ^= 0xFF  # the parsed fields must not alias the caller's buffer
    data[-1] ^= 0xFF
    assert copied.key_ref == KEY_REF
    assert copied.body == body_of(60)
    assert type(copied.key_ref) is bytes
    assert type(copied.body) is bytes


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_parse_refuses_header_only_and_every_shorter_prefix(mechanism: Mechanism) -> None:
    data = well_formed(mechanism, body_of(low(mechanism)))
    for length in range(HEADER_LEN):
        assert "too short" in refused(data[:length]).message, length
    # The header alone is long enough to read, but carries no body.
    assert "does not fit" in refused(data[:HEADER_LEN]).message


def test_parse_refuses_below_min_len_whatever_the_mechanism_byte() -> None:
    for mechanism, length in itertools.product(MECHANISMS, range(MIN_LEN)):
        refused(well_formed(mechanism, body_of(max(0, length - HEADER_LEN)))[:length])


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
@pytest.mark.parametrize("length", [MAX_LEN + 1, MAX_LEN + 100, 4096])
def test_parse_refuses_over_max_len(mechanism: Mechanism, length: int) -> None:
    error = refused(well_formed(mechanism, body_of(length - HEADER_LEN)))
    assert "too long" in error.message


def test_parse_max_len_itself_is_not_too_long() -> None:
    # No mechanism makes a 1024-byte ciphertext, but the length check itself must allow it.
    for mechanism in Mechanism:
        error = refused(well_formed(mechanism, body_of(MAX_LEN - HEADER_LEN)))
        assert "too long" not in error.message
        assert "does not fit" in error.message


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
@pytest.mark.parametrize("version", [0, 2, 0x7F, 0xFF])
def test_parse_refuses_wrong_version_byte(mechanism: Mechanism, version: int) -> None:
    data = bytearray(well_formed(mechanism, body_of(low(mechanism))))
    data[0] = version
    assert "format" in refused(bytes(data)).message


@pytest.mark.parametrize("mechanism", UNKNOWN_MECHANISMS)
@pytest.mark.parametrize("body_len", sorted({lo for lo, _ in EXPECTED_BODY_BOUNDS.values()} | {100, 384}))
def test_parse_refuses_unknown_mechanism(mechanism: int, body_len: int) -> None:
    data = bytes((FORMAT_V1, mechanism)) + KEY_REF + body_of(body_len)
    assert "mechanism" in refused(data).message


@pytest.mark.parametrize("data", [b"\xff" * 64, b"\x00" * 64, b"k8s:enc:kms:v2:keysealer:" + b"x" * 40,
                                  b"\x01" * 10, b"\x01\x04" + b"x" * 100, os.urandom(MAX_LEN + 1)],
                         ids=range(6))
def test_parse_refuses_garbage(data: bytes) -> None:
    refused(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=MAX_LEN + 16))
def test_parse_either_round_trips_or_refuses_with_bad_ciphertext(data: bytes) -> None:
    try:
        envelope = parse(data)
    except KeySealerError as exc:
        assert exc.code is ErrorCode.BAD_CIPHERTEXT
        return
    assert envelope.to_bytes() == data
    assert envelope.header == data[:HEADER_LEN]
    assert data[0] == FORMAT_V1
    assert envelope.mechanism == data[1]
    assert low(envelope.mechanism) <= len(data) - HEADER_LEN <= high(envelope.mechanism)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MECHANISMS), st.binary(min_size=KEY_REF_LEN, max_size=KEY_REF_LEN),
       st.integers(0, 255), st.integers(0, MAX_LEN - HEADER_LEN))
def test_parse_accepts_exactly_the_bodies_in_bounds(mechanism: Mechanism, key_ref: bytes, fill: int,
                                                    length: int) -> None:
    data = well_formed(mechanism, bytes([fill]) * length, key_ref)
    if low(mechanism) <= length <= high(mechanism):
        assert parse(data) == Envelope(mechanism, key_ref, bytes([fill]) * length)
    else:
        assert "does not fit" in refused(data).message


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_header_for_layout(mechanism: Mechanism) -> None:
    header = header_for(mechanism, KEY_REF)
    assert header == bytes((0x01, int(mechanism))) + KEY_REF
    assert len(header) == HEADER_LEN
    assert type(header) is bytes


def test_header_for_known_answers() -> None:
    assert header_for(Mechanism.AES_256_GCM, KEY_REF).hex() == "0101" + KEY_REF.hex()
    assert header_for(Mechanism.RSA_3072_OAEP_SHA1, KEY_REF).hex() == "0105" + KEY_REF.hex()
    # Different mechanisms give different headers, so a header edited to another mechanism fails in the token.
    assert len({header_for(m, KEY_REF) for m in Mechanism}) == len(Mechanism)


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_envelope_to_bytes_layout_and_round_trip(mechanism: Mechanism) -> None:
    body = body_of(high(mechanism))
    envelope = Envelope(mechanism, KEY_REF, body)
    data = envelope.to_bytes()
    assert type(data) is bytes
    assert data[0] == FORMAT_V1
    assert data[1] == mechanism
    assert data[2:18] == KEY_REF
    assert data[18:] == body
    assert envelope.header == header_for(mechanism, KEY_REF) == data[:HEADER_LEN]
    assert parse(data) == envelope


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    mechanism = draw(st.sampled_from(MECHANISMS))
    key_ref = draw(st.binary(min_size=KEY_REF_LEN, max_size=KEY_REF_LEN))
    body = draw(st.binary(min_size=low(mechanism), max_size=high(mechanism)))
    return Envelope(mechanism, key_ref, body)


@settings(max_examples=300, deadline=None)
@given(envelopes())
def test_envelope_round_trip_property(envelope: Envelope) -> None:
    data = envelope.to_bytes()
    assert data == header_for(envelope.mechanism, envelope.key_ref) + envelope.body
    assert MIN_LEN <= len(data) <= MAX_LEN
    assert parse(data) == envelope


def test_ciphertext_limits_fit_the_ipc_schema() -> None:
    assert ciphertext.MAX_LEN + 64 < ipc_schema.MAX_REQUEST_FRAME


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_every_parseable_size_passes_the_ipc_schema(mechanism: Mechanism) -> None:
    # The broker must be able to receive (unwrap) and return (wrap) every envelope parse accepts.
    for length in BODY_BOUNDS[mechanism]:
        data = well_formed(mechanism, body_of(length))
        request = ipc_schema.decode_request(ipc_schema.encode_request(ipc_schema.UnwrapRequest(1, 1000, data, "k")))
        assert isinstance(request, ipc_schema.UnwrapRequest)
        assert request.ciphertext == data
        result = ipc_schema.WrapResult(1, data, "k")
        reply = ipc_schema.decode_reply(ipc_schema.encode_reply(result, ipc_schema.Op.WRAP))
        assert isinstance(reply, ipc_schema.WrapResult)
        assert reply.ciphertext == data


# --- key ids ------------------------------------------------------------------------------------------

OBJECT_ID = b"KS1" + struct.pack(">Q", 1_700_000_000) + bytes(range(16))  # a legacy (pre-mechanism) CKA_ID


def test_key_ref_for_is_deterministic_and_16_bytes() -> None:
    assert key_ref_for(OBJECT_ID) == key_ref_for(bytes(OBJECT_ID))
    assert len(key_ref_for(OBJECT_ID)) == KEY_REF_LEN == 16
    assert type(key_ref_for(OBJECT_ID)) is bytes


def test_key_ref_for_known_answer() -> None:
    # Stored in every ciphertext and, as the key_id, in etcd: the derivation must never change.
    assert key_ref_for(OBJECT_ID).hex() == "e4a6791f66e6b98881618e65ca2c544c"
    assert key_id_for_ref(key_ref_for(OBJECT_ID)) == "ks1-e4a6791f66e6b98881618e65ca2c544c"


def test_key_ref_for_documented_example() -> None:
    # The worked example in docs/ciphertext-format.md.
    cka_id = bytes.fromhex("4b5331000000006b0391a679dbf3e47f407e2f0c3f549db87b373b")
    assert KeyIdentity(cka_id, "keysealer-kek").key_id == "ks1-3fa982cec72c373ae5fc50d832646141"
    assert KeyIdentity(cka_id, "keysealer-kek").created == 1795396006


def test_key_ref_for_differs_for_different_ids() -> None:
    ids = [OBJECT_ID, OBJECT_ID[:-1] + b"\x00", OBJECT_ID[:-1], b"", b"\x00", b"\x00\x00", os.urandom(27),
           b"KS2" + OBJECT_ID[3:], b"KS2\x01" + OBJECT_ID[3:]]
    refs = [key_ref_for(i) for i in ids]
    assert len(set(refs)) == len(ids)


def test_key_ref_is_not_the_raw_token_id() -> None:
    for object_id in (OBJECT_ID, b"KS2\x01" + OBJECT_ID[3:]):
        ref = key_ref_for(object_id)
        assert ref not in object_id
        assert object_id[-16:].hex() not in key_id_for_ref(ref)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.binary(max_size=64))
def test_key_ref_for_differs_for_different_ids_property(a: bytes, b: bytes) -> None:
    assert (key_ref_for(a) == key_ref_for(b)) == (a == b)


def test_key_id_for_ref_format() -> None:
    key_id = key_id_for_ref(KEY_REF)
    assert key_id == "ks1-" + KEY_REF.hex()
    assert re.fullmatch(r"ks1-[0-9a-f]{32}", key_id)
    assert is_well_formed_key_id(key_id)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=KEY_REF_LEN, max_size=KEY_REF_LEN))
def test_every_derived_key_id_is_well_formed(ref: bytes) -> None:
    key_id = key_id_for_ref(ref)
    assert is_well_formed_key_id(key_id)
    assert bytes.fromhex(key_id.removeprefix("ks1-")) == ref
    assert key_ref_for_id(key_id) == ref


GOOD_ID = "ks1-" + "0123456789abcdef" * 2
BAD_IDS = [
    "",
    "ks1-",
    GOOD_ID.upper(),
    "ks1-" + "0123456789ABCDEF" * 2,
    "KS1-" + "0123456789abcdef" * 2,
    GOOD_ID[:-1],  # 31 hex digits
    GOOD_ID + "0",  # 33
    "ks2-" + GOOD_ID[4:],
    "ks1_" + GOOD_ID[4:],
    "ks1" + GOOD_ID[4:],
    GOOD_ID[4:],
    GOOD_ID + "\n",
    GOOD_ID + " ",
    " " + GOOD_ID,
    "\n" + GOOD_ID,
    GOOD_ID[:-1] + "g",
    "ks1-" + "\u0660" * 32,  # Arabic-Indic digits are digits, but not hex
    "ks1-" + "\uff10" * 32,  # full-width zero
    GOOD_ID + "\x00",
]


def test_is_well_formed_key_id_accepts_derived_ids() -> None:
    assert is_well_formed_key_id(GOOD_ID)


@pytest.mark.parametrize("key_id", BAD_IDS, ids=repr)
def test_is_well_formed_key_id_refuses_variants(key_id: str) -> None:
    assert not is_well_formed_key_id(key_id)
    assert key_ref_for_id(key_id) is None


# --- key naming in the token --------------------------------------------------------------------------

def ks2_id(mechanism: int, created: int, tail: bytes = bytes(range(16))) -> bytes:
    return b"KS2" + bytes([mechanism]) + struct.pack(">Q", created) + tail


def ks1_id(created: int, tail: bytes = bytes(range(16))) -> bytes:
    return b"KS1" + struct.pack(">Q", created) + tail


def test_id_magics_are_pinned() -> None:
    assert ID_MAGIC == b"KS2" == bytes.fromhex("4b5332")
    assert LEGACY_ID_MAGIC == b"KS1" == bytes.fromhex("4b5331")


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_new_token_object_id_layout(mechanism: Mechanism, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(key_naming.time, "time", lambda: 1_700_000_123.9)
    object_id = new_token_object_id(mechanism)
    assert type(object_id) is bytes
    assert len(object_id) == 3 + 1 + 8 + 16
    assert object_id[:3] == b"KS2"
    assert object_id[3] == int(mechanism)
    assert object_id[4:12] == struct.pack(">Q", 1_700_000_123)
    identity = KeyIdentity(object_id, "kek")
    assert identity.mechanism is mechanism
    assert identity.created == 1_700_000_123
    assert is_keysealer_object_id(object_id)


def test_new_token_object_id_defaults_to_aes_gcm() -> None:
    object_id = new_token_object_id()
    assert object_id[:4] == b"KS2\x01"
    assert KeyIdentity(object_id, "kek").mechanism is Mechanism.AES_256_GCM


def test_new_token_object_id_uses_the_current_time() -> None:
    import time

    before = int(time.time())
    created = KeyIdentity(new_token_object_id(Mechanism.RSA_3072_OAEP_SHA256), "kek").created
    assert before <= created <= int(time.time())


def test_a_new_version_is_newer_than_the_one_it_follows_even_within_one_second() -> None:
    """Versions of a label are ordered by creation second, ties by the random part: a rotation made in
    the same second as (or, with a clock set back, before) the previous version must still come after it."""
    import time

    previous = KeyIdentity(new_token_object_id(), "kek")
    for _ in range(5):  # each made well within one second of the previous
        following = KeyIdentity(new_token_object_id(newer_than=previous), "kek")
        assert newest_with_label([previous, following], "kek") == following
        previous = following
    ahead = KeyIdentity(ID_MAGIC + bytes((Mechanism.AES_256_GCM,)) + (int(time.time()) + 3600).to_bytes(8, "big")
                        + bytes(16), "kek")
    assert KeyIdentity(new_token_object_id(newer_than=ahead), "kek").created == ahead.created + 1


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_new_token_object_id_random_part_differs(mechanism: Mechanism) -> None:
    ids = [new_token_object_id(mechanism) for _ in range(50)]
    assert len({i[12:] for i in ids}) == 50
    assert len({KeyIdentity(i, "kek").key_id for i in ids}) == 50


@pytest.mark.parametrize("mechanism", MECHANISMS, ids=lambda m: m.name)
def test_ks2_identity_reads_mechanism_and_created(mechanism: Mechanism) -> None:
    for created in (0, 1, 1_700_000_000, 2**40 + 5, 2**64 - 1):
        identity = KeyIdentity(ks2_id(mechanism, created), "x")
        assert identity.mechanism is mechanism
        assert type(identity.mechanism) is Mechanism
        assert identity.created == created
        assert type(identity.created) is int


def test_legacy_ks1_identity_is_aes_gcm_and_reads_created_from_byte_3() -> None:
    identity = KeyIdentity(OBJECT_ID, "kek")
    assert identity.mechanism is Mechanism.AES_256_GCM
    assert identity.created == 1_700_000_000
    # Byte 3 of a legacy id is the top byte of the time, not a mechanism: 0x04 there must not mean RSA.
    for created in (1, 2**40 + 5, 0x04 << 56 | 7, 0x05 << 56, 2**64 - 1):
        legacy = KeyIdentity(ks1_id(created), "x")
        assert legacy.mechanism is Mechanism.AES_256_GCM, hex(created)
        assert legacy.created == created, hex(created)


def test_is_keysealer_object_id_accepts_both_layouts() -> None:
    assert is_keysealer_object_id(new_token_object_id())
    assert is_keysealer_object_id(OBJECT_ID)
    assert is_keysealer_object_id(ks1_id(0, bytes(16)))
    assert is_keysealer_object_id(ks1_id(2**64 - 1, b"\xff" * 16))
    for mechanism in Mechanism:
        assert is_keysealer_object_id(ks2_id(mechanism, 1_700_000_000))
        assert is_keysealer_object_id(ks2_id(mechanism, 2**64 - 1, b"\xff" * 16))


KS2_ID = ks2_id(Mechanism.AES_256_GCM, 1_700_000_000)
NOT_KEYSEALER_IDS = [
    b"",
    b"KS1",
    b"KS2",
    b"KS2\x01",
    OBJECT_ID[:-1],  # legacy, 26 bytes
    OBJECT_ID + b"\x00",  # legacy, 28 bytes
    KS2_ID[:-1],  # 27 bytes: the legacy length, but KS2
    KS2_ID + b"\x00",  # 29 bytes
    b"KS2" + OBJECT_ID[3:],  # a legacy id relabelled KS2 without a mechanism byte
    *(ks2_id(m, 1_700_000_000) for m in UNKNOWN_MECHANISMS),
    b"ks1" + OBJECT_ID[3:],
    b"ks2" + KS2_ID[3:],
    b"KS3" + KS2_ID[3:],
    b"KS0" + OBJECT_ID[3:],
    b"XKS2" + KS2_ID[4:],
    b"\x00" * 27,
    b"\x00" * 28,
    os.urandom(16),
]


@pytest.mark.parametrize("object_id", NOT_KEYSEALER_IDS, ids=range(len(NOT_KEYSEALER_IDS)))
def test_is_keysealer_object_id_refuses_others(object_id: bytes) -> None:
    assert not is_keysealer_object_id(object_id)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40))
def test_is_keysealer_object_id_matches_the_documented_layouts(object_id: bytes) -> None:
    legacy = len(object_id) == 27 and object_id[:3] == b"KS1"
    current = len(object_id) == 28 and object_id[:3] == b"KS2" and 1 <= object_id[3] <= 5
    assert is_keysealer_object_id(object_id) == (legacy or current)


@pytest.mark.parametrize("object_id", [OBJECT_ID, KS2_ID, ks2_id(Mechanism.RSA_3072_OAEP_SHA1, 5)],
                         ids=["KS1", "KS2-gcm", "KS2-rsa-sha1"])
def test_key_identity_properties(object_id: bytes) -> None:
    identity = KeyIdentity(object_id, "kek")
    assert identity.key_ref == key_ref_for(object_id)
    assert identity.key_id == key_id_for_ref(key_ref_for(object_id))
    assert is_well_formed_key_id(identity.key_id)


def test_the_mechanism_byte_changes_the_key_id() -> None:
    ids = {KeyIdentity(ks2_id(m, 1_700_000_000), "kek").key_id for m in Mechanism}
    ids.add(KeyIdentity(ks1_id(1_700_000_000), "kek").key_id)
    assert len(ids) == len(Mechanism) + 1


def key(created: int, label: str, tail: int = 0, mechanism: Mechanism = Mechanism.AES_256_GCM) -> KeyIdentity:
    return KeyIdentity(ks2_id(mechanism, created, bytes([tail]) * 16), label)


def legacy_key(created: int, label: str, tail: int = 0) -> KeyIdentity:
    return KeyIdentity(ks1_id(created, bytes([tail]) * 16), label)


def test_newest_with_label_picks_the_newest() -> None:
    old, mid, new = key(100, "kek"), key(200, "kek", mechanism=Mechanism.RSA_3072_OAEP_SHA256), key(300, "kek")
    other_newer = key(900, "other")
    for order in itertools.permutations([old, mid, new, other_newer]):
        assert newest_with_label(list(order), "kek") is new
    assert newest_with_label([old, mid, new, other_newer], "other") is other_newer


def test_newest_with_label_none_when_no_key_has_the_label() -> None:
    assert newest_with_label([], "kek") is None
    assert newest_with_label([key(1, "other"), key(2, "kek2"), key(3, "KEK")], "kek") is None


def test_newest_with_label_breaks_ties_by_id_whatever_the_order() -> None:
    tied = [key(500, "kek", tail) for tail in (3, 9, 1, 7)]
    winners = {newest_with_label(list(order), "kek") for order in itertools.permutations(tied)}
    assert winners == {key(500, "kek", 9)}


def test_newest_with_label_ties_compare_the_whole_cka_id() -> None:
    # Ties go to the larger CKA_ID as a whole: a KS2 id beats a KS1 id of the same second, and a larger
    # mechanism byte beats a smaller one, whatever the random tails.
    legacy, ks2 = legacy_key(1_700_000_000, "kek", 0xFF), key(1_700_000_000, "kek", 0x00)
    assert newest_with_label([legacy, ks2], "kek") is ks2
    assert newest_with_label([ks2, legacy], "kek") is ks2
    gcm, sha1 = key(7, "kek", 0xFF, Mechanism.AES_256_GCM), key(7, "kek", 0x00, Mechanism.RSA_3072_OAEP_SHA1)
    assert newest_with_label([gcm, sha1], "kek") is sha1
    assert newest_with_label([sha1, gcm], "kek") is sha1


def test_newest_with_label_prefers_time_over_id() -> None:
    newer_small_id = key(501, "kek", 0)
    older_big_id = key(500, "kek", 255, Mechanism.RSA_3072_OAEP_SHA1)
    assert newest_with_label([older_big_id, newer_small_id], "kek") == newer_small_id


def test_newest_with_label_orders_legacy_and_new_ids_by_time() -> None:
    # b"KS2..." sorts after b"KS1...": only the creation time may decide between the layouts.
    newer_legacy, older_ks2 = legacy_key(1_700_000_100, "kek"), key(1_700_000_000, "kek", 0xFF)
    assert newest_with_label([older_ks2, newer_legacy], "kek") is newer_legacy
    assert newest_with_label([newer_legacy, older_ks2], "kek") is newer_legacy
    newer_ks2 = key(1_700_000_200, "kek")
    assert newest_with_label([newer_legacy, newer_ks2, older_ks2], "kek") is newer_ks2


# --- which version is current -------------------------------------------------------------------------

def version(created: int, label: str = "kek", *, retired: bool = False, tail: int = 0,
            mechanism: Mechanism = Mechanism.AES_256_GCM) -> KeyVersion:
    return KeyVersion(key(created, label, tail, mechanism), retired)


def current_in_every_order(versions: list[KeyVersion], label: str = "kek") -> set[KeyVersion | None]:
    return {current_version(list(order), label) for order in itertools.permutations(versions)}


def test_current_version_is_the_newest() -> None:
    old, mid, new = version(100), version(200, mechanism=Mechanism.AES_256_KEY_WRAP_PAD), version(300)
    for order in itertools.permutations([old, mid, new, version(900, "other")]):
        assert current_version(list(order), "kek") is new


def test_current_version_returns_the_version_itself() -> None:
    new = version(300)
    result = current_version([version(100), new], "kek")
    assert result is new
    assert result.retired is False


def test_current_version_ignores_retired_older_versions() -> None:
    new = version(300)
    assert current_in_every_order([version(100, retired=True), version(200, retired=True), new]) == {new}


def test_current_version_none_when_the_newest_is_retired() -> None:
    # An older key never becomes current again: a key_id must not come back (no A -> B -> A).
    older = [version(100), version(200)]
    newest_retired = version(300, retired=True)
    assert current_in_every_order([*older, newest_retired]) == {None}
    assert current_version([newest_retired], "kek") is None


def test_current_version_none_when_every_version_is_retired() -> None:
    assert current_in_every_order([version(100, retired=True), version(200, retired=True)]) == {None}


def test_current_version_none_without_the_label() -> None:
    assert current_version([], "kek") is None
    assert current_version([version(1, "other"), version(2, "kek2"), version(3, "KEK")], "kek") is None


def test_current_version_ignores_other_labels() -> None:
    new = version(300)
    # Newer versions under other labels, retired or not, change nothing.
    others = [version(900, "other", retired=True), version(950, "other2"), version(999, "KEK", retired=True)]
    assert current_in_every_order([version(100), new, *others]) == {new}
    # And a retired newest under this label is not rescued by a usable key under another label.
    assert current_in_every_order([version(300, retired=True), version(900, "other")]) == {None}
    # Nor does the other label's retired newest spoil this one.
    assert current_version([version(300, "other"), version(900, "other", retired=True), new], "other") is None
    assert current_version([version(300, "other"), version(900, "other", retired=True), new], "kek") is new


def test_current_version_breaks_ties_by_id_whatever_the_order() -> None:
    tied = [version(500, tail=tail) for tail in (3, 9, 1, 7)]
    assert current_in_every_order(tied) == {version(500, tail=9)}


def test_current_version_tie_winner_retired_means_none() -> None:
    # The tie is broken first; the losers of the tie do not stand in for a retired winner.
    tied = [version(500, tail=3), version(500, tail=9, retired=True), version(500, tail=1)]
    assert current_in_every_order(tied) == {None}


def test_current_version_prefers_time_over_id() -> None:
    newer_small_id = version(501, tail=0)
    older_big_id = version(500, tail=255, mechanism=Mechanism.RSA_3072_OAEP_SHA1)
    assert current_in_every_order([older_big_id, newer_small_id]) == {newer_small_id}


def test_current_version_with_legacy_keys() -> None:
    legacy_new = KeyVersion(legacy_key(1_700_000_100, "kek"), retired=False)
    ks2_old = version(1_700_000_000, tail=0xFF)
    assert current_in_every_order([ks2_old, legacy_new]) == {legacy_new}
    legacy_retired = KeyVersion(legacy_key(1_700_000_100, "kek"), retired=True)
    assert current_in_every_order([ks2_old, legacy_retired]) == {None}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["kek", "other"]), st.integers(0, 3), st.booleans()),
                max_size=8, unique_by=lambda t: (t[0], t[2])))
def test_current_version_property(specs: list[tuple[int, str, int, bool]]) -> None:
    versions = [version(created, label, retired=retired, tail=tail) for created, label, tail, retired in specs]
    result = current_version(versions, "kek")
    mine = [v for v in versions if v.identity.label == "kek"]
    assert current_version(list(reversed(versions)), "kek") == result
    if result is None:
        # Either nothing has the label, or some version at least as new as every other is retired.
        assert not mine or any(v.retired and all(v.identity.created >= w.identity.created for w in mine)
                               for v in mine)
        return
    assert result in versions
    assert result.identity.label == "kek"
    assert not result.retired
    # Nothing with the label is newer, whether retired or not.
    order = (result.identity.created, result.identity.token_object_id)
    assert all((v.identity.created, v.identity.token_object_id) <= order for v in mine)
