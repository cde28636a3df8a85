"""Key ids: public names for keys, derived by hashing the token's CKA_ID so no raw token identifier leaks.

The CKA_ID of every key KeySealer creates holds 16 random bytes, so the derived id is never reused for
another key, even when a label is re-created.
"""

import hashlib
import re

KEY_REF_LEN = 16
_KEY_ID_PREFIX = "ks1-"
_KEY_ID_PATTERN = re.compile(r"ks1-[0-9a-f]{32}")
_DERIVATION_CONTEXT = b"keysealer/key-ref/v1\x00"


def key_ref_for(token_object_id: bytes) -> bytes:
    """The 16-byte reference stored in every ciphertext made under this key."""
    return hashlib.sha256(_DERIVATION_CONTEXT + token_object_id).digest()[:KEY_REF_LEN]


def key_id_for_ref(key_ref: bytes) -> str:
    return _KEY_ID_PREFIX + key_ref.hex()


def key_ref_for_id(key_id: str) -> bytes | None:
    """The key reference a key id spells (the inverse of key_id_for_ref); None for a malformed id."""
    return bytes.fromhex(key_id[len(_KEY_ID_PREFIX):]) if is_well_formed_key_id(key_id) else None


def is_well_formed_key_id(key_id: str) -> bool:
    return _KEY_ID_PATTERN.fullmatch(key_id) is not None
