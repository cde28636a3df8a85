"""How KeySealer marks its keys in a token (documented in docs/ciphertext-format.md).

CKA_ID = b"KS2" + mechanism (1 byte, ciphertext.Mechanism) + creation time (8 bytes, big-endian Unix
seconds) + 16 random bytes. The prefix tells our keys from others sharing the token, the mechanism says
how the key is used, the time orders versions of one label, and the random part makes every key's derived
key_id unique, even for a re-created label. Objects that make one key (an AES key and its HMAC key, an RSA
key pair) share the CKA_ID. Keys made before mechanisms were recorded have b"KS1" and no mechanism byte:
they are AES-256-GCM keys.

Key versions of one label: the newest is current; a retired key (CKA_DECRYPT and CKA_UNWRAP set to false,
which the token itself enforces) serves nothing. If the newest is retired there is no current key: an
older key never becomes current again, so a key_id never comes back (no A -> B -> A).
"""

import os
import struct
import time
from dataclasses import dataclass

from keysealer.shared.ciphertext import Mechanism
from keysealer.shared.key_ids import key_id_for_ref, key_ref_for

ID_MAGIC = b"KS2"
LEGACY_ID_MAGIC = b"KS1"
_ID_LEN = len(ID_MAGIC) + 1 + 8 + 16
_LEGACY_ID_LEN = len(LEGACY_ID_MAGIC) + 8 + 16


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    token_object_id: bytes  # CKA_ID
    label: str

    @property
    def _legacy(self) -> bool:
        return self.token_object_id.startswith(LEGACY_ID_MAGIC)

    @property
    def mechanism(self) -> Mechanism:
        return Mechanism.AES_256_GCM if self._legacy else Mechanism(self.token_object_id[len(ID_MAGIC)])

    @property
    def created(self) -> int:
        start = len(LEGACY_ID_MAGIC) if self._legacy else len(ID_MAGIC) + 1
        (seconds,) = struct.unpack(">Q", self.token_object_id[start : start + 8])
        return int(seconds)

    @property
    def key_ref(self) -> bytes:
        return key_ref_for(self.token_object_id)

    @property
    def key_id(self) -> str:
        return key_id_for_ref(self.key_ref)


def new_token_object_id(mechanism: Mechanism = Mechanism.AES_256_GCM, newer_than: KeyIdentity | None = None) -> bytes:
    """A fresh id; with `newer_than`, its creation second is later than that key's even when both are made
    in the same second, so the new key is the newest version of its label (ties would go by random id)."""
    created = max(int(time.time()), newer_than.created + 1 if newer_than is not None else 0)
    return ID_MAGIC + bytes((mechanism,)) + struct.pack(">Q", created) + os.urandom(16)


def is_keysealer_object_id(token_object_id: bytes) -> bool:
    if len(token_object_id) == _LEGACY_ID_LEN and token_object_id.startswith(LEGACY_ID_MAGIC):
        return True
    if len(token_object_id) != _ID_LEN or not token_object_id.startswith(ID_MAGIC):
        return False
    return token_object_id[len(ID_MAGIC)] in set(Mechanism)


@dataclass(frozen=True, slots=True)
class KeyVersion:
    identity: KeyIdentity
    retired: bool


def current_version(versions: list[KeyVersion], label: str) -> KeyVersion | None:
    newest = newest_with_label([v.identity for v in versions], label)
    version = next((v for v in versions if v.identity == newest), None)
    return None if version is None or version.retired else version


def newest_with_label(keys: list[KeyIdentity], label: str) -> KeyIdentity | None:
    candidates = [k for k in keys if k.label == label]
    # Ties in the creation second are broken by the id so every broker picks the same key.
    return max(candidates, key=lambda k: (k.created, k.token_object_id), default=None)


def version_state(version: KeyVersion, current: KeyVersion | None) -> str:
    """What a key serves for: "current" (wraps and unwraps), "decrypt-only", or "retired" (nothing)."""
    if version.retired:
        return "retired"
    return "current" if current is not None and version.identity == current.identity else "decrypt-only"
