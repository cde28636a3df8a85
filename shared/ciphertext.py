"""The KeySealer ciphertext format (documented in docs/ciphertext-format.md).

    offset  size  field
    0       1     format version (1)
    1       1     mechanism (1 = AES-256-GCM)
    2       16    key reference (see key_ids.key_ref_for)
    18      12    IV, random per call
    30      n+16  encrypted seed followed by the GCM tag

The 18-byte header is the GCM associated data, which binds the ciphertext to its key and format: a header
edited to point at another key or format fails authentication in the token.
"""

from dataclasses import dataclass

from keysealer.shared.errors import ErrorCode, KeySealerError
from keysealer.shared.key_ids import KEY_REF_LEN

FORMAT_V1 = 1
MECH_AES_256_GCM = 1
IV_LEN = 12
TAG_LEN = 16
HEADER_LEN = 2 + KEY_REF_LEN
MIN_LEN = HEADER_LEN + IV_LEN + 1 + TAG_LEN
# The apiserver refuses ciphertexts over 1024 bytes.
MAX_LEN = 1024


@dataclass(frozen=True, slots=True)
class Envelope:
    mechanism: int
    key_ref: bytes
    iv: bytes
    sealed: bytes  # encrypted seed with the tag appended

    @property
    def header(self) -> bytes:
        return header_for(self.mechanism, self.key_ref)

    def to_bytes(self) -> bytes:
        return self.header + self.iv + self.sealed


def header_for(mechanism: int, key_ref: bytes) -> bytes:
    return bytes((FORMAT_V1, mechanism)) + key_ref


def parse(data: bytes) -> Envelope:
    """Split a ciphertext into its fields; refuse anything that is not a well-formed v1 envelope."""
    if len(data) < MIN_LEN:
        raise KeySealerError(ErrorCode.BAD_CIPHERTEXT, f"ciphertext too short ({len(data)} bytes)")
    if len(data) > MAX_LEN:
        raise KeySealerError(ErrorCode.BAD_CIPHERTEXT, f"ciphertext too long ({len(data)} bytes)")
    if data[0] != FORMAT_V1:
        raise KeySealerError(ErrorCode.BAD_CIPHERTEXT, f"unknown ciphertext format {data[0]}")
    if data[1] != MECH_AES_256_GCM:
        raise KeySealerError(ErrorCode.BAD_CIPHERTEXT, f"unknown mechanism {data[1]}")
    return Envelope(
        mechanism=data[1],
        key_ref=bytes(data[2:HEADER_LEN]),
        iv=bytes(data[HEADER_LEN : HEADER_LEN + IV_LEN]),
        sealed=bytes(data[HEADER_LEN + IV_LEN :]),
    )
