"""The KeySealer ciphertext format (documented in docs/ciphertext-format.md).

    offset  size  field
    0       1     format version (1)
    1       1     mechanism (see Mechanism): how the body was made, chosen per key
    2       16    key reference (see key_ids.key_ref_for)
    18      n     body, laid out by the mechanism:
                    AES-256-GCM           IV (12) | encrypted seed | tag (16)
                    AES-256-CBC + HMAC    IV (16) | encrypted padded seed | HMAC-SHA-256 (32)
                    AES-256 key wrap pad  RFC 5649 wrapping of (2-byte big-endian length | seed)
                    RSA-3072 OAEP         RSA ciphertext (384)

The 18-byte header is authenticated wherever the mechanism allows: GCM's associated data, the HMAC's
input. A header edited to point at another key or mechanism fails in the token either way.
"""

from dataclasses import dataclass
from enum import IntEnum

from keysealer.shared.errors import ErrorCode, KeySealerError
from keysealer.shared.key_ids import KEY_REF_LEN

FORMAT_V1 = 1
HEADER_LEN = 2 + KEY_REF_LEN
# The apiserver refuses ciphertexts over 1024 bytes.
MAX_LEN = 1024


class Mechanism(IntEnum):
    AES_256_GCM = 1
    AES_256_CBC_HMAC_SHA256 = 2
    AES_256_KEY_WRAP_PAD = 3
    RSA_3072_OAEP_SHA256 = 4
    RSA_3072_OAEP_SHA1 = 5


RSA_3072_BYTES = 384
# Smallest and largest body each mechanism makes for a seed of 1 to 256 bytes (ipc_schema.MAX_PLAINTEXT).
BODY_BOUNDS = {
    Mechanism.AES_256_GCM: (12 + 1 + 16, 12 + 256 + 16),
    Mechanism.AES_256_CBC_HMAC_SHA256: (16 + 16 + 32, 16 + 272 + 32),
    Mechanism.AES_256_KEY_WRAP_PAD: (16, 264 + 8),  # wraps a 2-byte length and the seed, padded to 8
    Mechanism.RSA_3072_OAEP_SHA256: (RSA_3072_BYTES, RSA_3072_BYTES),
    Mechanism.RSA_3072_OAEP_SHA1: (RSA_3072_BYTES, RSA_3072_BYTES),
}
MIN_LEN = HEADER_LEN + min(low for low, _ in BODY_BOUNDS.values())


@dataclass(frozen=True, slots=True)
class Envelope:
    mechanism: Mechanism
    key_ref: bytes
    body: bytes

    @property
    def header(self) -> bytes:
        return header_for(self.mechanism, self.key_ref)

    def to_bytes(self) -> bytes:
        return self.header + self.body


def header_for(mechanism: Mechanism, key_ref: bytes) -> bytes:
    return bytes((FORMAT_V1, mechanism)) + key_ref


def parse(data: bytes) -> Envelope:
    """Split a ciphertext into its fields; refuse anything that is not a well-formed v1 envelope."""
    if len(data) > MAX_LEN:
        raise KeySealerError(ErrorCode.BAD_CIPHERTEXT, f"ciphertext too long ({len(data)} bytes)")
    if len(data) < HEADER_LEN:
        raise KeySealerError(ErrorCode.BAD_CIPHERTEXT, f"ciphertext too short ({len(data)} bytes)")
    if data[0] != FORMAT_V1:
        raise KeySealerError(ErrorCode.BAD_CIPHERTEXT, f"unknown ciphertext format {data[0]}")
    try:
        mechanism = Mechanism(data[1])
    except ValueError:
        raise KeySealerError(ErrorCode.BAD_CIPHERTEXT, f"unknown mechanism {data[1]}") from None
    low, high = BODY_BOUNDS[mechanism]
    body = bytes(data[HEADER_LEN:])
    if not low <= len(body) <= high:
        raise KeySealerError(ErrorCode.BAD_CIPHERTEXT,
                             f"ciphertext body of {len(body)} bytes does not fit {mechanism.name}")
    return Envelope(mechanism, bytes(data[2:HEADER_LEN]), body)
