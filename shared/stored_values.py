"""What kube-apiserver stores in etcd, read without decrypting anything.

A KMS v2 value is `k8s:enc:kms:v2:<provider name>:` followed by a protobuf `EncryptedObject`
(k8s.io/apiserver, pkg/storage/value/encrypt/envelope/kmsv2/v2/api.proto):

    bytes encryptedData = 1; string keyID = 2; bytes encryptedDEKSource = 3;
    map<string, bytes> annotations = 4; EncryptedDEKSourceType encryptedDEKSourceType = 5;

The parser follows the apiserver's reader (proto.Unmarshal, then ValidateEncryptedObject): unknown fields
are skipped as Go's protobuf does (such an object still needs its key), while a truncated message, bad
UTF-8 in a string, an empty or oversized keyID or encryptedDEKSource, empty encryptedData, annotations
over 32 KiB or an unknown source type make the value unparsable. (Annotation keys are not checked for
being domain names: that would not change which key the object needs.)
"""

from dataclasses import dataclass
from enum import Enum

KMS_V2_PREFIX = b"k8s:enc:kms:v2:"
# Other providers' prefixes (k8s.io/apiserver, pkg/server/options/encryptionconfig/config.go).
OTHER_PREFIXES = (b"k8s:enc:aescbc:v1:", b"k8s:enc:aesgcm:v1:", b"k8s:enc:secretbox:v1:", b"k8s:enc:kms:v1:")
PROTOBUF_MAGIC = b"k8s\x00"

KEY_ID_MAX = 1024  # ValidateKeyID
DEK_SOURCE_MAX = 1024  # encryptedDEKSourceMaxSize
ANNOTATIONS_MAX = 32 * 1024  # annotationsMaxSize: keys plus values
PROVIDER_NAME_MAX = 256  # an EncryptionConfiguration name is short; this bounds the search for its ':'
SOURCE_TYPES = (0, 1)  # AES_GCM_KEY, HKDF_SHA256_XNONCE_AES_GCM_SEED


class ValueKind(Enum):
    KMS_V2 = "kms-v2"
    OTHER_PROVIDER = "other-provider"
    PLAINTEXT = "plaintext"
    UNPARSABLE = "unparsable"


@dataclass(frozen=True, slots=True)
class EncryptedSeed:
    """What the apiserver hands the plugin to decrypt an object's seed, and so what identifies the seed."""

    key_id: str
    ciphertext: bytes  # encryptedDEKSource
    annotations: tuple[tuple[str, bytes], ...]  # sorted by key, as the apiserver's cache key orders them
    source_type: int


@dataclass(frozen=True, slots=True)
class StoredValue:
    kind: ValueKind
    provider: str = ""  # the KMS v2 provider name, for KMS_V2
    seed: EncryptedSeed | None = None  # for KMS_V2


class Malformed(ValueError):
    """The bytes are not an EncryptedObject the apiserver would accept."""


_UNPARSABLE = StoredValue(ValueKind.UNPARSABLE)
_OTHER = StoredValue(ValueKind.OTHER_PROVIDER)
_PLAINTEXT = StoredValue(ValueKind.PLAINTEXT)


def classify(value: bytes) -> StoredValue:
    """Which provider wrote `value` and, for KMS v2, the seed it depends on. Never raises."""
    if value.startswith(KMS_V2_PREFIX):
        end = value.find(b":", len(KMS_V2_PREFIX), len(KMS_V2_PREFIX) + PROVIDER_NAME_MAX + 1)
        if end <= len(KMS_V2_PREFIX):
            return _UNPARSABLE
        try:
            provider = value[len(KMS_V2_PREFIX):end].decode()
            return StoredValue(ValueKind.KMS_V2, provider, parse_encrypted_object(memoryview(value)[end + 1:]))
        except (Malformed, UnicodeDecodeError):
            return _UNPARSABLE
    if value.startswith(OTHER_PREFIXES):
        return _OTHER
    if value.startswith(PROTOBUF_MAGIC) or value[:1] == b"{":
        return _PLAINTEXT
    return _UNPARSABLE


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise Malformed("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: memoryview) -> list[tuple[int, int, int | memoryview]]:
    """(field number, wire type, varint value or length-delimited bytes); fixed-width fields are skipped."""
    fields: list[tuple[int, int, int | memoryview]] = []
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise Malformed("field number 0")
        if wire_type == 0:
            value, pos = _varint(data, pos)
            fields.append((number, wire_type, value))
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise Malformed("truncated field")
            fields.append((number, wire_type, data[pos:pos + length]))
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            if pos > len(data):
                raise Malformed("truncated fixed field")
        else:
            raise Malformed(f"unsupported wire type {wire_type}")  # groups: never in this message
    return fields


def _map_entry(data: memoryview) -> tuple[str, bytes]:
    key, value = "", b""
    for number, wire_type, field in _fields(data):
        if wire_type == 2 and isinstance(field, memoryview):
            if number == 1:
                key = bytes(field).decode()
            elif number == 2:
                value = bytes(field)
    return key, value


def parse_encrypted_object(data: memoryview) -> EncryptedSeed:
    """The seed of a KMS v2 EncryptedObject; raises Malformed (or UnicodeDecodeError) for what the apiserver
    would refuse. A field with an unexpected wire type is an unknown field to Go's protobuf, so it is too."""
    encrypted_data_len, key_id, source, source_type = 0, "", b"", 0
    annotations: dict[str, bytes] = {}
    for number, wire_type, field in _fields(data):
        if wire_type == 2 and isinstance(field, memoryview):
            if number == 1:
                encrypted_data_len = len(field)
            elif number == 2:
                key_id = bytes(field).decode()
            elif number == 3:
                source = bytes(field)
            elif number == 4:
                key, value = _map_entry(field)
                annotations[key] = value
        elif wire_type == 0 and number == 5 and isinstance(field, int):
            source_type = field
    if source_type not in SOURCE_TYPES:
        raise Malformed(f"unknown encryptedDEKSourceType {source_type}")
    if encrypted_data_len == 0:
        raise Malformed("encryptedData is empty")
    if not 0 < len(source) <= DEK_SOURCE_MAX:
        raise Malformed("encryptedDEKSource is empty or too long")
    if not 0 < len(key_id.encode()) <= KEY_ID_MAX:
        raise Malformed("keyID is empty or too long")
    if sum(len(k.encode()) + len(v) for k, v in annotations.items()) > ANNOTATIONS_MAX:
        raise Malformed("annotations too large")
    return EncryptedSeed(key_id, source, tuple(sorted(annotations.items())), source_type)


def resource_of(key: bytes, prefix: bytes) -> str:
    """The resource an etcd key belongs to, as an EncryptionConfiguration names it: `secrets` for
    /registry/secrets/NS/NAME, `widgets.example.com` for /registry/example.com/widgets/NS/NAME."""
    parts = key[len(prefix):].lstrip(b"/").split(b"/", 2)
    first = parts[0].decode(errors="replace")
    if "." in first and len(parts) > 1:
        return f"{parts[1].decode(errors='replace')}.{first}"
    return first
