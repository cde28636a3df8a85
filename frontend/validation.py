"""Checks every request against the apiserver's limits before anything crosses to the broker."""

from collections.abc import Mapping

from keysealer.shared import ciphertext, ipc_schema
from keysealer.shared.errors import ErrorCode, KeySealerError
from keysealer.shared.key_ids import is_well_formed_key_id, key_id_for_ref

# The one annotation KeySealer returns: which KeySealer ciphertext format the seed is in. The key is a
# fully qualified domain name, as the apiserver requires; it is stored in plaintext in etcd.
FORMAT_ANNOTATION = "format.keysealer.io"
FORMAT_ANNOTATION_VALUE = b"1"
ANNOTATIONS = {FORMAT_ANNOTATION: FORMAT_ANNOTATION_VALUE}
MAX_UID_LEN = 256


def _invalid(message: str) -> KeySealerError:
    return KeySealerError(ErrorCode.INVALID_REQUEST, message)


def check_encrypt(plaintext: bytes, uid: str) -> None:
    if not plaintext:
        raise _invalid("plaintext is empty")
    if len(plaintext) > ipc_schema.MAX_PLAINTEXT:
        raise _invalid(f"plaintext of {len(plaintext)} bytes is larger than {ipc_schema.MAX_PLAINTEXT}: "
                       "KMS v2 sends 32-byte seeds")
    _check_uid(uid)


def check_decrypt(data: bytes, uid: str, key_id: str, annotations: Mapping[str, bytes]) -> None:
    """Shape checks; whether the key exists is asked of the broker's key set by the caller."""
    _check_uid(uid)
    if not key_id:
        raise _invalid("key_id is empty")
    if not is_well_formed_key_id(key_id):
        raise _invalid("key_id is not a KeySealer key id")
    if key_id_of(data) != key_id:
        raise _invalid("key_id does not match the key the ciphertext was made with")
    for name, value in annotations.items():
        if name != FORMAT_ANNOTATION:
            raise _invalid(f"annotation {name[:64]!r} was not set by KeySealer")
        if value != FORMAT_ANNOTATION_VALUE:
            raise _invalid(f"annotation {FORMAT_ANNOTATION} has an unknown value")


def key_id_of(data: bytes) -> str:
    """The key_id a well-formed ciphertext was made under."""
    if not data:
        raise _invalid("ciphertext is empty")
    try:
        envelope = ciphertext.parse(data)
    except KeySealerError as exc:
        raise _invalid(exc.message) from None
    return key_id_for_ref(envelope.key_ref)


def check_v1_version(version: str) -> None:
    # The apiserver's KMS v1 client sends "v1beta1"; an empty version is tolerated as proto3's default.
    if version not in ("", "v1beta1"):
        raise _invalid(f"unsupported KMS API version {version[:16]!r}")


def _check_uid(uid: str) -> None:
    if len(uid) > MAX_UID_LEN:
        raise _invalid(f"uid longer than {MAX_UID_LEN} characters")
