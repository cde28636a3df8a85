"""The ways a key can seal a seed, one class each: which token objects make the key, how to generate them,
and how to seal and open a seed with them. Every cryptographic operation runs inside the token.
"""

import contextlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import PyKCS11

from keysealer.hsm_broker.key_naming import KeyIdentity
from keysealer.shared.ciphertext import Mechanism
from keysealer.shared.errors import ErrorCode, KeySealerError

AES_KEY_BYTES = 32
HMAC_KEY_BYTES = 32
GCM_IV_BYTES = 12
GCM_TAG_BITS = 128
CBC_IV_BYTES = 16
AES_BLOCK = 16
HMAC_BYTES = 32
RSA_BITS = 3072
RSA_PUBLIC_EXPONENT = (0x01, 0x00, 0x01)


@dataclass(frozen=True, slots=True)
class KeyObjects:
    """The token objects of one key: `main` seals or unwraps; `helper` is the HMAC key or RSA public key."""

    main: Any
    helper: Any = None


def _common(identity: KeyIdentity) -> list[tuple[int, Any]]:
    return [(PyKCS11.CKA_TOKEN, True), (PyKCS11.CKA_LABEL, identity.label), (PyKCS11.CKA_ID, identity.token_object_id)]


def _secret(identity: KeyIdentity, key_type: int, length: int, **usage: bool) -> list[tuple[int, Any]]:
    """A secret key that never leaves the token and may do only what `usage` allows."""
    flags = {"ENCRYPT": False, "DECRYPT": False, "WRAP": False, "UNWRAP": False, "SIGN": False,
             "VERIFY": False, "DERIVE": False, **usage}
    return [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY), (PyKCS11.CKA_KEY_TYPE, key_type),
        (PyKCS11.CKA_VALUE_LEN, length), (PyKCS11.CKA_PRIVATE, True), (PyKCS11.CKA_SENSITIVE, True),
        (PyKCS11.CKA_EXTRACTABLE, False), *_common(identity),
        *((getattr(PyKCS11, f"CKA_{name}"), value) for name, value in flags.items()),
    ]


class KeyMechanism:
    mechanism: ClassVar[Mechanism]
    name: ClassVar[str]  # as the CLI takes it
    needs: ClassVar[frozenset[int]]  # CKM_* the token must offer to use a key
    # ... and to generate one (`keysealer keys create`); tokens whose own tool makes the keys (TPM 2.0) lack them.
    generate_needs: ClassVar[frozenset[int]]

    def generate(self, session: Any, identity: KeyIdentity) -> None:
        raise NotImplementedError

    def seal(self, session: Any, key: KeyObjects, header: bytes, plaintext: bytes) -> bytes:
        raise NotImplementedError

    def open(self, session: Any, key: KeyObjects, header: bytes, body: bytes) -> bytes:
        raise NotImplementedError


class AesGcm(KeyMechanism):
    mechanism = Mechanism.AES_256_GCM
    name = "aes-gcm"
    needs = frozenset({PyKCS11.CKM_AES_GCM})
    generate_needs = frozenset({PyKCS11.CKM_AES_KEY_GEN})

    def generate(self, session: Any, identity: KeyIdentity) -> None:
        session.generateKey(_secret(identity, PyKCS11.CKK_AES, AES_KEY_BYTES, ENCRYPT=True, DECRYPT=True),
                            PyKCS11.MechanismAESGENERATEKEY)

    def seal(self, session: Any, key: KeyObjects, header: bytes, plaintext: bytes) -> bytes:
        iv = os.urandom(GCM_IV_BYTES)  # random 96-bit IV per call; keys rotate long before 2^32 calls
        return iv + bytes(session.encrypt(key.main, plaintext, PyKCS11.AES_GCM_Mechanism(iv, header, GCM_TAG_BITS)))

    def open(self, session: Any, key: KeyObjects, header: bytes, body: bytes) -> bytes:
        iv, sealed = body[:GCM_IV_BYTES], body[GCM_IV_BYTES:]
        return bytes(session.decrypt(key.main, sealed, PyKCS11.AES_GCM_Mechanism(iv, header, GCM_TAG_BITS)))


class AesCbcHmac(KeyMechanism):
    """Encrypt-then-MAC for tokens without GCM (TPM 2.0, openCryptoki). Plain CBC with padding done here:
    tpm2-pkcs11's CBC_PAD decrypt is broken."""

    mechanism = Mechanism.AES_256_CBC_HMAC_SHA256
    name = "aes-cbc-hmac"
    needs = frozenset({PyKCS11.CKM_AES_CBC, PyKCS11.CKM_SHA256_HMAC})
    generate_needs = frozenset({PyKCS11.CKM_AES_KEY_GEN, PyKCS11.CKM_GENERIC_SECRET_KEY_GEN})

    def generate(self, session: Any, identity: KeyIdentity) -> None:
        session.generateKey(_secret(identity, PyKCS11.CKK_AES, AES_KEY_BYTES, ENCRYPT=True, DECRYPT=True),
                            PyKCS11.MechanismAESGENERATEKEY)
        session.generateKey(_secret(identity, PyKCS11.CKK_GENERIC_SECRET, HMAC_KEY_BYTES, SIGN=True, VERIFY=True),
                            PyKCS11.Mechanism(PyKCS11.CKM_GENERIC_SECRET_KEY_GEN, None))

    def seal(self, session: Any, key: KeyObjects, header: bytes, plaintext: bytes) -> bytes:
        iv = os.urandom(CBC_IV_BYTES)
        pad = AES_BLOCK - len(plaintext) % AES_BLOCK
        encrypted = bytes(session.encrypt(key.main, plaintext + bytes([pad]) * pad,
                                          PyKCS11.Mechanism(PyKCS11.CKM_AES_CBC, iv)))
        return iv + encrypted + self._mac(session, key, header + iv + encrypted)

    def open(self, session: Any, key: KeyObjects, header: bytes, body: bytes) -> bytes:
        iv, encrypted, tag = body[:CBC_IV_BYTES], body[CBC_IV_BYTES:-HMAC_BYTES], body[-HMAC_BYTES:]
        # The MAC is checked before anything is decrypted: no padding oracle.
        if len(encrypted) % AES_BLOCK or not hmac.compare_digest(self._mac(session, key, header + iv + encrypted), tag):
            raise KeySealerError(ErrorCode.BAD_CIPHERTEXT, "ciphertext failed authentication")
        padded = bytes(session.decrypt(key.main, encrypted, PyKCS11.Mechanism(PyKCS11.CKM_AES_CBC, iv)))
        pad = padded[-1]
        if not 1 <= pad <= AES_BLOCK or padded[-pad:] != bytes([pad]) * pad:
            raise KeySealerError(ErrorCode.INTERNAL, "authenticated ciphertext with bad padding")
        return padded[:-pad]

    @staticmethod
    def _mac(session: Any, key: KeyObjects, data: bytes) -> bytes:
        return bytes(session.sign(key.helper, data, PyKCS11.Mechanism(PyKCS11.CKM_SHA256_HMAC, None)))


class AesKeyWrapPad(KeyMechanism):
    """RFC 5649 key wrap. Tokens such as SoftHSM offer it only through C_WrapKey/C_UnwrapKey, so the seed
    travels as a short-lived session object that is destroyed at once. The wrapped value is the seed behind
    a 2-byte length: SoftHSM 2.6's unwrap leaves the RFC 5649 padding on (a 1-byte value comes back as 8)."""

    mechanism = Mechanism.AES_256_KEY_WRAP_PAD
    name = "aes-kwp"
    needs = frozenset({PyKCS11.CKM_AES_KEY_WRAP_PAD})
    generate_needs = frozenset({PyKCS11.CKM_AES_KEY_GEN})
    _SEED_OBJECT: ClassVar[list[tuple[int, Any]]] = [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY), (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_GENERIC_SECRET),
        (PyKCS11.CKA_TOKEN, False), (PyKCS11.CKA_SENSITIVE, False), (PyKCS11.CKA_EXTRACTABLE, True),
    ]

    def generate(self, session: Any, identity: KeyIdentity) -> None:
        session.generateKey(_secret(identity, PyKCS11.CKK_AES, AES_KEY_BYTES, WRAP=True, UNWRAP=True),
                            PyKCS11.MechanismAESGENERATEKEY)

    def seal(self, session: Any, key: KeyObjects, header: bytes, plaintext: bytes) -> bytes:
        value = len(plaintext).to_bytes(2, "big") + plaintext
        seed = session.createObject([*self._SEED_OBJECT, (PyKCS11.CKA_VALUE, value)])
        try:
            return bytes(session.wrapKey(key.main, seed, self._mechanism()))
        finally:
            session.destroyObject(seed)

    def open(self, session: Any, key: KeyObjects, header: bytes, body: bytes) -> bytes:
        seed = session.unwrapKey(key.main, body, self._SEED_OBJECT, self._mechanism())
        try:
            (value,) = session.getAttributeValue(seed, [PyKCS11.CKA_VALUE], allAsBinary=True)
            value = bytes(value)
            length = int.from_bytes(value[:2], "big")
            if not 0 < length <= len(value) - 2:
                raise KeySealerError(ErrorCode.BAD_CIPHERTEXT, "unwrapped value has a bad length")
            return value[2 : 2 + length]
        finally:
            with contextlib.suppress(PyKCS11.PyKCS11Error):
                session.destroyObject(seed)

    @staticmethod
    def _mechanism() -> Any:
        return PyKCS11.Mechanism(PyKCS11.CKM_AES_KEY_WRAP_PAD, None)


class RsaOaep(KeyMechanism):
    """RSA-3072 OAEP; the private half never leaves the token. No OAEP label: SoftHSM refuses one."""

    mechanism = Mechanism.RSA_3072_OAEP_SHA256
    name = "rsa-oaep"
    needs = frozenset({PyKCS11.CKM_RSA_PKCS_OAEP})
    generate_needs = frozenset({PyKCS11.CKM_RSA_PKCS_KEY_PAIR_GEN})
    _hash, _mgf = PyKCS11.CKM_SHA256, PyKCS11.CKG_MGF1_SHA256

    def generate(self, session: Any, identity: KeyIdentity) -> None:
        public = [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY), (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_RSA),
                  (PyKCS11.CKA_MODULUS_BITS, RSA_BITS), (PyKCS11.CKA_PUBLIC_EXPONENT, RSA_PUBLIC_EXPONENT),
                  (PyKCS11.CKA_ENCRYPT, True), (PyKCS11.CKA_VERIFY, False), (PyKCS11.CKA_WRAP, False),
                  *_common(identity)]
        private = [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY), (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_RSA),
                   (PyKCS11.CKA_PRIVATE, True), (PyKCS11.CKA_SENSITIVE, True), (PyKCS11.CKA_EXTRACTABLE, False),
                   (PyKCS11.CKA_DECRYPT, True), (PyKCS11.CKA_SIGN, False), (PyKCS11.CKA_UNWRAP, False),
                   *_common(identity)]
        session.generateKeyPair(public, private, PyKCS11.MechanismRSAGENERATEKEYPAIR)

    def seal(self, session: Any, key: KeyObjects, header: bytes, plaintext: bytes) -> bytes:
        return bytes(session.encrypt(key.helper, plaintext, PyKCS11.RSAOAEPMechanism(self._hash, self._mgf)))

    def open(self, session: Any, key: KeyObjects, header: bytes, body: bytes) -> bytes:
        return bytes(session.decrypt(key.main, body, PyKCS11.RSAOAEPMechanism(self._hash, self._mgf)))


class RsaOaepSha1(RsaOaep):
    """Only by explicit choice, for tokens that offer nothing else (SoftHSM 2.6 refuses OAEP with SHA-256)."""

    mechanism = Mechanism.RSA_3072_OAEP_SHA1
    name = "rsa-oaep-sha1"
    _hash, _mgf = PyKCS11.CKM_SHA_1, PyKCS11.CKG_MGF1_SHA1


MECHANISMS: dict[Mechanism, KeyMechanism] = {
    m.mechanism: m for m in (AesGcm(), AesCbcHmac(), AesKeyWrapPad(), RsaOaep(), RsaOaepSha1())
}
BY_NAME = {m.name: m for m in MECHANISMS.values()}


def ckm_names(mechanisms: Iterable[int]) -> str:
    """CKM_* codes as PyKCS11 names them, sorted, for messages."""
    return ", ".join(sorted(str(PyKCS11.CKM[m]) for m in mechanisms))


def offered_by(token_mechanisms: set[int]) -> list[str]:
    """The KeySealer mechanisms whose keys a token's mechanism list lets us use."""
    return [m.name for m in MECHANISMS.values() if m.needs <= token_mechanisms]
