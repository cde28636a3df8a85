"""Unit tests for the ciphertext envelope (keysealer.shared.ciphertext), key id derivation
(keysealer.shared.key_ids) and how KeySealer names its keys in the token (keysealer.hsm_broker.key_naming).

Ciphertexts and key ids end up in etcd: their layout and derivation must never change silently, so some
tests pin known answers.
"""

from __future__ import annotations

import itertools
import os
import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keysealer.hsm_broker import key_naming
from keysealer.hsm_broker.key_naming import (
    ID_MAGIC,
    KeyIdentity,
    is_keysealer_object_id,
    new_token_object_id,
    newest_with_label,
)
from keysealer.shared import ciphertext
from keysealer.shared.ciphertext import (
    FORMAT_V1,
    HEADER_LEN,
    IV_LEN,
    MAX_LEN,
    MECH_AES_256_GCM,
    MIN_LEN,
    TAG_LEN,
    Envelope,
    header_for,
    parse,
)
from keysealer.shared.errors import ErrorCode, KeySealerError
from keysealer.shared.key_ids import KEY_REF_LEN, is_well_formed_key_id, key_id_for_ref, key_ref_for

KEY_REF = bytes(range(0x10, 0x10 + KEY_REF_LEN))
IV = bytes(range(0xA0, 0xA0 + IV_LEN))
SEALED = bytes(32) + bytes(range(TAG_LEN))  # a 32-byte seed and its tag


def well_formed(sealed: bytes = SEALED) -> bytes:
    return bytes((FORMAT_V1, MECH_AES_256_GCM)) + KEY_REF + IV + sealed


def refused(data: bytes) -> KeySealerError:
    with pytest.raises(KeySealerError) as info:
        parse(data)
    assert info.value.code is ErrorCode.BAD_CIPHERTEXT
    return info.value


# --- the envelope --------------------------------------------------------------------------------------

def test_format_constants_match_the_documented_layout() -> None:
    assert (FORMAT_V1, MECH_AES_256_GCM) == (1, 1)
    assert (KEY_REF_LEN, IV_LEN, TAG_LEN) == (16, 12, 16)
    assert HEADER_LEN == 18
    assert MIN_LEN == HEADER_LEN + IV_LEN + 1 + TAG_LEN == 47
    assert MAX_LEN == 1024  # the apiserver refuses longer ciphertexts


def test_parse_well_formed_envelope() -> None:
    envelope = parse(well_formed())
    assert envelope == Envelope(mechanism=MECH_AES_256_GCM, key_ref=KEY_REF, iv=IV, sealed=SEALED)
    assert type(envelope.key_ref) is bytes
    assert type(envelope.iv) is bytes
    assert type(envelope.sealed) is bytes


def test_parse_accepts_bytearray_and_copies_the_fields() -> None:
    data = bytearray(well_formed())
    envelope = parse(bytes(data))
    assert parse(data) == envelope
    data[2] ^= 0xFF  # the parsed fields must not alias the caller's buffer
    assert envelope.key_ref == KEY_REF


@pytest.mark.parametrize("length", [MIN_LEN, MIN_LEN + 1, 100, MAX_LEN])
def test_parse_accepts_every_length_in_range(length: int) -> None:
    sealed_len = length - HEADER_LEN - IV_LEN
    envelope = parse(well_formed(b"\x5a" * sealed_len))
    assert len(envelope.sealed) == sealed_len
    assert envelope.to_bytes() == well_formed(b"\x5a" * sealed_len)


def test_parse_refuses_every_truncation() -> None:
    data = well_formed(b"\x01" * (MIN_LEN - HEADER_LEN - IV_LEN))
    assert len(data) == MIN_LEN
    for length in range(MIN_LEN):
        error = refused(data[:length])
        assert "too short" in error.message


@pytest.mark.parametrize("length", [MAX_LEN + 1, MAX_LEN + 100, 4096])
def test_parse_refuses_over_max_len(length: int) -> None:
    error = refused(well_formed(b"\x01" * (length - HEADER_LEN - IV_LEN)))
    assert "too long" in error.message


@pytest.mark.parametrize("version", [0, 2, 0x7F, 0xFF])
def test_parse_refuses_wrong_version_byte(version: int) -> None:
    data = bytearray(well_formed())
    data[0] = version
    assert "format" in refused(bytes(data)).message


@pytest.mark.parametrize("mechanism", [0, 2, 0x10, 0xFF])
def test_parse_refuses_unknown_mechanism(mechanism: int) -> None:
    data = bytearray(well_formed())
    data[1] = mechanism
    assert "mechanism" in refused(bytes(data)).message


@pytest.mark.parametrize("data", [b"\xff" * 64, b"\x00" * 64, b"k8s:enc:kms:v2:keysealer:" + b"x" * 40,
                                  b"\x01" * 10, os.urandom(MAX_LEN + 1)], ids=range(5))
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


def test_header_for_layout() -> None:
    header = header_for(MECH_AES_256_GCM, KEY_REF)
    assert header == b"\x01\x01" + KEY_REF
    assert len(header) == HEADER_LEN


def test_envelope_to_bytes_layout_and_round_trip() -> None:
    envelope = Envelope(MECH_AES_256_GCM, KEY_REF, IV, SEALED)
    data = envelope.to_bytes()
    assert data[0] == FORMAT_V1
    assert data[1] == MECH_AES_256_GCM
    assert data[2:18] == KEY_REF
    assert data[18:30] == IV
    assert data[30:] == SEALED
    assert envelope.header == header_for(MECH_AES_256_GCM, KEY_REF) == data[:HEADER_LEN]
    assert parse(data) == envelope


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=KEY_REF_LEN, max_size=KEY_REF_LEN), st.binary(min_size=IV_LEN, max_size=IV_LEN),
       st.binary(min_size=1 + TAG_LEN, max_size=MAX_LEN - HEADER_LEN - IV_LEN))
def test_envelope_round_trip_property(key_ref: bytes, iv: bytes, sealed: bytes) -> None:
    envelope = Envelope(MECH_AES_256_GCM, key_ref, iv, sealed)
    assert parse(envelope.to_bytes()) == envelope


def test_ciphertext_limits_fit_the_ipc_schema() -> None:
    from keysealer.shared import ipc_schema

    assert ciphertext.MAX_LEN + 64 < ipc_schema.MAX_REQUEST_FRAME


# --- key ids ------------------------------------------------------------------------------------------

OBJECT_ID = b"KS1" + struct.pack(">Q", 1_700_000_000) + bytes(range(16))


def test_key_ref_for_is_deterministic_and_16_bytes() -> None:
    assert key_ref_for(OBJECT_ID) == key_ref_for(bytes(OBJECT_ID))
    assert len(key_ref_for(OBJECT_ID)) == KEY_REF_LEN == 16
    assert type(key_ref_for(OBJECT_ID)) is bytes


def test_key_ref_for_known_answer() -> None:
    # Stored in every ciphertext and, as the key_id, in etcd: the derivation must never change.
    assert key_ref_for(OBJECT_ID).hex() == "e4a6791f66e6b98881618e65ca2c544c"
    assert key_id_for_ref(key_ref_for(OBJECT_ID)) == "ks1-e4a6791f66e6b98881618e65ca2c544c"


def test_key_ref_for_differs_for_different_ids() -> None:
    ids = [OBJECT_ID, OBJECT_ID[:-1] + b"\x00", OBJECT_ID[:-1], b"", b"\x00", b"\x00\x00", os.urandom(27)]
    refs = [key_ref_for(i) for i in ids]
    assert len(set(refs)) == len(ids)


def test_key_ref_is_not_the_raw_token_id() -> None:
    ref = key_ref_for(OBJECT_ID)
    assert ref not in OBJECT_ID
    assert OBJECT_ID[11:].hex() not in key_id_for_ref(ref)


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


# --- key naming in the token --------------------------------------------------------------------------

def test_new_token_object_id_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(key_naming.time, "time", lambda: 1_700_000_123.9)
    object_id = new_token_object_id()
    assert len(object_id) == 3 + 8 + 16
    assert object_id[:3] == b"KS1" == ID_MAGIC
    assert object_id[3:11] == struct.pack(">Q", 1_700_000_123)
    assert KeyIdentity(object_id, "kek").created == 1_700_000_123


def test_new_token_object_id_uses_the_current_time() -> None:
    import time

    before = int(time.time())
    created = KeyIdentity(new_token_object_id(), "kek").created
    assert before <= created <= int(time.time())


def test_new_token_object_id_random_part_differs() -> None:
    ids = [new_token_object_id() for _ in range(50)]
    assert len({i[11:] for i in ids}) == 50
    assert len({KeyIdentity(i, "kek").key_id for i in ids}) == 50


def test_is_keysealer_object_id() -> None:
    assert is_keysealer_object_id(new_token_object_id())
    assert is_keysealer_object_id(OBJECT_ID)


@pytest.mark.parametrize("object_id", [b"", b"KS1", OBJECT_ID[:-1], OBJECT_ID + b"\x00", b"KS2" + OBJECT_ID[3:],
                                       b"ks1" + OBJECT_ID[3:], b"\x00" * 27, os.urandom(16)], ids=range(8))
def test_is_keysealer_object_id_refuses_others(object_id: bytes) -> None:
    assert not is_keysealer_object_id(object_id)


def test_key_identity_properties() -> None:
    identity = KeyIdentity(OBJECT_ID, "kek")
    assert identity.created == 1_700_000_000
    assert identity.key_ref == key_ref_for(OBJECT_ID)
    assert identity.key_id == key_id_for_ref(key_ref_for(OBJECT_ID))
    assert is_well_formed_key_id(identity.key_id)


def test_key_identity_created_reads_big_endian_seconds() -> None:
    assert KeyIdentity(b"KS1" + (1).to_bytes(8, "big") + bytes(16), "x").created == 1
    assert KeyIdentity(b"KS1" + (2**40 + 5).to_bytes(8, "big") + bytes(16), "x").created == 2**40 + 5


def key(created: int, label: str, tail: int = 0) -> KeyIdentity:
    return KeyIdentity(b"KS1" + struct.pack(">Q", created) + bytes([tail]) * 16, label)


def test_newest_with_label_picks_the_newest() -> None:
    old, mid, new = key(100, "kek"), key(200, "kek"), key(300, "kek")
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


def test_newest_with_label_prefers_time_over_id() -> None:
    newer_small_id = key(501, "kek", 0)
    older_big_id = key(500, "kek", 255)
    assert newest_with_label([older_big_id, newer_small_id], "kek") == newer_small_id
