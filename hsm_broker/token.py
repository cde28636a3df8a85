"""One logged-in PKCS #11 session on the configured token: finding KeySealer's keys in it, and sealing
and opening seeds with them (the mechanisms are in mechanisms.py).

Encryption happens inside the token: the key is sensitive and non-extractable, this process only ever
holds key handles.
"""

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PyKCS11

from keysealer.hsm_broker.config import TokenConfig
from keysealer.hsm_broker.key_naming import KeyIdentity, KeyVersion, current_version, is_keysealer_object_id
from keysealer.hsm_broker.mechanisms import MECHANISMS, KeyObjects
from keysealer.hsm_broker.pin import read_pin
from keysealer.shared import ciphertext
from keysealer.shared.bounded_files import read_bounded
from keysealer.shared.errors import BadPin, ErrorCode, FileRefused, KeySealerError, TokenUnavailable, UnusableFile
from keysealer.shared.key_ids import key_id_for_ref, key_ref_for, key_ref_for_id

log = logging.getLogger(__name__)

# The token refused the PIN itself: retrying risks locking it.
_PIN_ERRORS = frozenset({
    PyKCS11.CKR_PIN_INCORRECT, PyKCS11.CKR_PIN_LOCKED, PyKCS11.CKR_PIN_EXPIRED,
    PyKCS11.CKR_PIN_INVALID, PyKCS11.CKR_PIN_LEN_RANGE,
})
# Data the token rejected as not authentic: the caller's ciphertext is bad, the token is fine.
_BAD_DATA_ERRORS = frozenset({
    PyKCS11.CKR_ENCRYPTED_DATA_INVALID, PyKCS11.CKR_ENCRYPTED_DATA_LEN_RANGE, PyKCS11.CKR_WRAPPED_KEY_INVALID,
    PyKCS11.CKR_WRAPPED_KEY_LEN_RANGE, PyKCS11.CKR_SIGNATURE_INVALID,
})
# Errors a fresh session (same login) can cure: the old one was closed, invalidated, or left with an
# unfinished operation (tpm2-pkcs11 leaves a failed operation active on its session).
SESSION_ERRORS = frozenset({
    PyKCS11.CKR_SESSION_HANDLE_INVALID, PyKCS11.CKR_SESSION_CLOSED, PyKCS11.CKR_OPERATION_ACTIVE,
    PyKCS11.CKR_OPERATION_NOT_INITIALIZED,
})
# The key itself refuses (retired by `keys retire`: CKA_DECRYPT/CKA_UNWRAP cleared) or is gone (destroyed),
# seen before this worker's next key refresh: the caller's key is unusable, the token and session are fine.
_KEY_REFUSED_ERRORS = frozenset({
    PyKCS11.CKR_KEY_FUNCTION_NOT_PERMITTED, PyKCS11.CKR_KEY_HANDLE_INVALID, PyKCS11.CKR_OBJECT_HANDLE_INVALID,
})
# Errors that may mean bad data or a failing token: SoftHSM answers CKR_GENERAL_ERROR to a GCM tag mismatch.
_AMBIGUOUS_ERRORS = frozenset({PyKCS11.CKR_GENERAL_ERROR, PyKCS11.CKR_FUNCTION_FAILED})
SELF_TEST_BYTES = 32
# tpm2-pkcs11's store holds a few kB per key: far below this even with thousands of keys.
MAX_STORE_BYTES = 64 * 1024 * 1024
UNKNOWN_KEY_MESSAGE = "key_id not known to this token or not the ciphertext's key"


def error_name(exc: PyKCS11.PyKCS11Error) -> str:
    return str(PyKCS11.CKR.get(exc.value, f"CKR_0x{exc.value:08X}"))


def load_module(config: TokenConfig) -> PyKCS11.PyKCS11Lib:
    # The module reads its settings (SOFTHSM2_CONF, TCTI, ...) from the environment; only the broker sets them.
    os.environ.update(config.module_env)
    lib = PyKCS11.PyKCS11Lib()
    try:
        lib.load(str(config.module))
    except PyKCS11.PyKCS11Error as exc:
        # -1: the library did not load (exc.text is its path); else C_Initialize's answer (openCryptoki:
        # CKR_HOST_MEMORY while pkcsslotd is not running).
        why = exc.text if exc.value == -1 else f"C_Initialize returned {error_name(exc)}"
        raise TokenUnavailable(f"cannot load PKCS #11 module {config.module.name}: {why}", exc.value) from None
    return lib


def find_slot(lib: PyKCS11.PyKCS11Lib, config: TokenConfig) -> int:
    try:
        slots = lib.getSlotList(tokenPresent=True)
        if config.slot is not None:
            if config.slot in slots:
                return int(config.slot)
            raise TokenUnavailable(f"no token in slot {config.slot}")
        for slot in slots:
            if lib.getTokenInfo(slot).label.rstrip(" \x00") == config.token_label:
                return int(slot)
    except PyKCS11.PyKCS11Error as exc:
        raise TokenUnavailable(f"token not reachable: {error_name(exc)}", exc.value) from None
    raise TokenUnavailable(f"no token labelled {config.token_label!r}")


def open_user_session(lib: PyKCS11.PyKCS11Lib, slot: int, pin: bytearray, rw: bool = False) -> Any:
    flags = PyKCS11.CKF_SERIAL_SESSION | (PyKCS11.CKF_RW_SESSION if rw else 0)
    try:
        session = lib.openSession(slot, flags)
    except PyKCS11.PyKCS11Error as exc:
        raise TokenUnavailable(f"cannot open a session: {error_name(exc)}", exc.value) from None
    try:
        session.login(bytes(pin))  # PyKCS11 takes bytes, not bytearray
    except PyKCS11.PyKCS11Error as exc:
        if exc.value == PyKCS11.CKR_USER_ALREADY_LOGGED_IN:
            return session
        session.closeSession()
        if exc.value in _PIN_ERRORS:
            raise BadPin(f"token login failed: {error_name(exc)}") from None
        raise TokenUnavailable(f"token login failed: {error_name(exc)}", exc.value) from None
    return session


def offered_mechanisms(lib: PyKCS11.PyKCS11Lib, slot: int) -> set[int]:
    """The CKM_* mechanisms the token offers. PyKCS11 names them; vendor-defined ones it cannot name are of
    no use to KeySealer anyway."""
    return {PyKCS11.CKM[m] for m in lib.getMechanismList(slot) if isinstance(PyKCS11.CKM.get(m), int)}


@dataclass(frozen=True, slots=True)
class TokenKey(KeyVersion):
    objects: KeyObjects  # handles, valid only in this process and login


# Object roles, by (class, key type): the main object seals or unwraps, the helper completes it.
_MAIN_OBJECTS = {(PyKCS11.CKO_SECRET_KEY, PyKCS11.CKK_AES), (PyKCS11.CKO_PRIVATE_KEY, PyKCS11.CKK_RSA)}
# An HMAC key is a generic secret, or typed for its hash (tpm2_ptool addkey --algorithm hmac:sha256).
_HELPER_OBJECTS = {(PyKCS11.CKO_SECRET_KEY, PyKCS11.CKK_GENERIC_SECRET),
                   (PyKCS11.CKO_SECRET_KEY, PyKCS11.CKK_SHA256_HMAC), (PyKCS11.CKO_PUBLIC_KEY, PyKCS11.CKK_RSA)}


def find_keys(session: Any) -> list[TokenKey]:
    """Every key in the token that KeySealer created, with its objects and whether it is retired.

    A key whose objects are ambiguous (two main objects, or helpers that do not belong to its main object)
    is ignored: someone holding the PIN could otherwise slip in an object they control, such as an RSA
    public key whose private half they keep, and have seeds sealed to it.
    """
    mains: dict[bytes, list[tuple[Any, str, bool]]] = {}
    helpers: dict[bytes, list[Any]] = {}
    for object_class in (PyKCS11.CKO_SECRET_KEY, PyKCS11.CKO_PRIVATE_KEY, PyKCS11.CKO_PUBLIC_KEY):
        for handle in session.findObjects([(PyKCS11.CKA_CLASS, object_class)]):
            object_id, label, key_type = session.getAttributeValue(
                handle, [PyKCS11.CKA_ID, PyKCS11.CKA_LABEL, PyKCS11.CKA_KEY_TYPE])
            object_id = bytes(object_id or b"")
            role = (object_class, key_type)
            if not is_keysealer_object_id(object_id) or role not in _MAIN_OBJECTS | _HELPER_OBJECTS:
                continue
            if object_class != PyKCS11.CKO_PUBLIC_KEY and not _born_in_token(session, handle, object_id):
                continue
            if role in _MAIN_OBJECTS:
                # Retired keys have every unsealing use switched off; the token itself then refuses them.
                decrypt, unwrap = session.getAttributeValue(handle, [PyKCS11.CKA_DECRYPT, PyKCS11.CKA_UNWRAP])
                mains.setdefault(object_id, []).append((handle, str(label or ""), not (decrypt or unwrap)))
            else:
                helpers.setdefault(object_id, []).append(handle)
    keys = []
    for object_id, found in mains.items():
        helper = _helper_of(session, found, helpers.get(object_id, []))
        if len(found) != 1 or helper is _AMBIGUOUS:
            _warn_once(object_id, "it has more than one object of one kind")
            continue
        handle, label, retired = found[0]
        keys.append(TokenKey(KeyIdentity(object_id, label), retired, KeyObjects(handle, helper)))
    return keys


_AMBIGUOUS = object()


def _helper_of(session: Any, mains: list[tuple[Any, str, bool]], candidates: list[Any]) -> Any:
    """The one helper object of a key (HMAC key, or the RSA public key with the private key's modulus)."""
    if len(mains) == 1 and candidates and session.getAttributeValue(mains[0][0], [PyKCS11.CKA_KEY_TYPE])[0] == \
            PyKCS11.CKK_RSA:
        (modulus,) = session.getAttributeValue(mains[0][0], [PyKCS11.CKA_MODULUS], allAsBinary=True)
        candidates = [c for c in candidates
                      if session.getAttributeValue(c, [PyKCS11.CKA_MODULUS], allAsBinary=True)[0] == modulus]
        if not candidates:
            return _AMBIGUOUS
    if len(candidates) > 1:
        return _AMBIGUOUS
    return candidates[0] if candidates else None


_warned: set[bytes] = set()


def _warn_once(object_id: bytes, why: str) -> None:
    # Keys are re-read every few seconds: one warning per object and process is enough.
    if object_id not in _warned:
        _warned.add(object_id)
        log.warning("ignoring token key %s: %s", key_id_for_ref(key_ref_for(object_id)), why)


def _born_in_token(session: Any, handle: Any, object_id: bytes) -> bool:
    """Whether a secret or private key was generated in the token and never left it.

    Someone holding the PIN could import a key whose value they know, with our CKA_ID shape and the current
    label; made current, it would let them unwrap every later seed offline. CKA_LOCAL is true only for keys
    the token generated; ALWAYS_SENSITIVE and NEVER_EXTRACTABLE say the value never left it. Both are
    needed: openCryptoki 3.8 sets the latter two on a key imported as sensitive and non-extractable.
    """
    local, always_sensitive, never_extractable = session.getAttributeValue(
        handle, [PyKCS11.CKA_LOCAL, PyKCS11.CKA_ALWAYS_SENSITIVE, PyKCS11.CKA_NEVER_EXTRACTABLE])
    if local and always_sensitive and never_extractable:
        return True
    _warn_once(object_id, "it was not generated in the token as a non-extractable key")
    return False


class StoreWatch:
    """For a module that reads the token's objects only in C_Initialize (tpm2-pkcs11): whether the file it
    reads them from (token.reinitialize_when_changed) changed, so that a restart of the module would find
    new keys. Restarting it at every key refresh instead costs a login each time, and tpm2-pkcs11 keeps
    about 2 kB of memory per restart."""

    def __init__(self, config: TokenConfig, path: Path) -> None:
        self.config = config
        self._path = path
        self._seen = self._digest()

    def changed(self) -> bool:
        now = self._digest()
        changed, self._seen = now != self._seen, now
        return changed

    def _digest(self) -> bytes | None:
        # The content, not the modification time: file times tick coarsely, a write just after a look
        # could keep the time the look saw.
        try:
            return hashlib.sha256(read_bounded(self._path, "token store", MAX_STORE_BYTES)).digest()
        except FileRefused:
            return None  # the module's own open says what is wrong with it


class Token:
    """A logged-in session with the key handles it found; one per worker process, used by one thread."""

    def __init__(self, current_label: str, lib: PyKCS11.PyKCS11Lib, slot: int, session: Any,
                 store: StoreWatch | None = None) -> None:
        self._current_label = current_label
        self._lib = lib
        self._slot = slot
        self._session = session
        self._store = store  # set for a module that reads the token's objects only in C_Initialize
        self.current: TokenKey | None = None
        self._by_ref: dict[bytes, TokenKey] = {}  # usable keys only: retired ones serve nothing
        self._read_keys()

    def refresh_keys(self) -> None:
        """Read the token's key set again: another process (`keysealer keys create`, another node) may
        have added keys since. Raises BadPin if restarting the module (store changed) met a refused PIN."""
        if self._store is not None and self._store.changed():
            self._reinitialize(self._store.config)
        self._read_keys()

    def _reinitialize(self, config: TokenConfig) -> None:
        """Finalize the module, then initialize it and log in again, so it reads the token's objects anew.

        Raises BadPin when the token refuses the PIN: never tried a second time (the token may count it).
        """
        self.shut()
        try:
            pin = read_pin(config.pin_file)
        except UnusableFile as exc:  # the worker's next open says it again, and stops
            raise TokenUnavailable(str(exc)) from None
        try:
            self._lib, self._slot, self._session = _start(config, pin)
        finally:
            pin[:] = bytes(len(pin))

    def _read_keys(self) -> None:
        try:
            keys = find_keys(self._session)
        except PyKCS11.PyKCS11Error as exc:
            raise TokenUnavailable(f"cannot list keys: {error_name(exc)}", exc.value) from None
        self._by_ref = {k.identity.key_ref: k for k in keys if not k.retired}
        current = current_version(list(keys), self._current_label)
        self.current = self._by_ref[current.identity.key_ref] if current else None

    @property
    def key_ids(self) -> list[str]:
        """Usable keys, newest first (what a bounded health report keeps)."""
        newest_first = sorted(self._by_ref.values(), key=lambda k: (k.identity.created, k.identity.token_object_id),
                              reverse=True)
        return [k.identity.key_id for k in newest_first]

    def key_by_id(self, key_id: str) -> TokenKey | None:
        # Looked up on every wrap and unwrap: by the reference the id spells, not by hashing every key's id.
        key_ref = key_ref_for_id(key_id)
        return self._by_ref.get(key_ref) if key_ref is not None else None

    def wrap(self, key: TokenKey, plaintext: bytes) -> bytes:
        """Seal `plaintext` with `key` (a key this token found): the whole KeySealer ciphertext."""
        header = ciphertext.header_for(key.identity.mechanism, key.identity.key_ref)
        body: bytes = self._call(MECHANISMS[key.identity.mechanism].seal, self._session, key.objects, header,
                                 plaintext)
        return header + body

    def unwrap(self, key: TokenKey, data: bytes) -> bytes:
        """Open a KeySealer ciphertext that must have been made with `key` (a key this token found)."""
        envelope = ciphertext.parse(data)
        if envelope.key_ref != key.identity.key_ref:
            raise KeySealerError(ErrorCode.UNKNOWN_KEY, UNKNOWN_KEY_MESSAGE)
        try:
            return self._decrypt(key, envelope)
        except TokenUnavailable as exc:
            if exc.ckr in _KEY_REFUSED_ERRORS:
                raise KeySealerError(ErrorCode.UNKNOWN_KEY, "key_id names a retired or destroyed key") from None
            if exc.ckr not in _AMBIGUOUS_ERRORS:
                raise
            # Tell a bad ciphertext from a failing token: a fresh session must round-trip known data.
            self.replace_session()
            probe = os.urandom(SELF_TEST_BYTES)
            if self._decrypt(key, ciphertext.parse(self.wrap(key, probe))) != probe:
                raise TokenUnavailable("token self-test returned wrong data") from None
            raise KeySealerError(ErrorCode.BAD_CIPHERTEXT, "ciphertext failed authentication") from None

    def _decrypt(self, key: TokenKey, envelope: ciphertext.Envelope) -> bytes:
        if envelope.mechanism != key.identity.mechanism:
            raise KeySealerError(ErrorCode.BAD_CIPHERTEXT, "ciphertext mechanism does not match its key")
        mechanism = MECHANISMS[envelope.mechanism]
        opened: bytes = self._call(mechanism.open, self._session, key.objects, envelope.header, envelope.body)
        return opened

    def replace_session(self) -> None:
        """A new session for the one a failed call may have left in a bad state.

        The new one opens before the old one closes: login state lasts while any session is open, so no
        re-login (and no PIN) is needed.
        """
        try:
            fresh = self._lib.openSession(self._slot, PyKCS11.CKF_SERIAL_SESSION)
        except PyKCS11.PyKCS11Error as exc:
            raise TokenUnavailable(f"cannot open a session: {error_name(exc)}", exc.value) from None
        self.close()
        self._session = fresh

    def _call(self, operation: Any, *args: Any) -> Any:
        try:
            return operation(*args)
        except PyKCS11.PyKCS11Error as exc:
            if exc.value in _BAD_DATA_ERRORS:
                raise KeySealerError(ErrorCode.BAD_CIPHERTEXT, "ciphertext failed authentication") from None
            raise TokenUnavailable(f"token error {error_name(exc)}", exc.value) from None

    def close(self) -> None:
        # The session may already be gone with the device.
        with contextlib.suppress(PyKCS11.PyKCS11Error):
            self._session.closeSession()

    def shut(self) -> None:
        """Close the session and finalize the module (C_Finalize), so the next open initializes it afresh.

        Some modules recover only this way: p11-kit's remote client after its server went away, tokens
        that keep answering CKR_DEVICE_ERROR. Key handles and the login go with it.
        """
        self.close()
        with contextlib.suppress(PyKCS11.PyKCS11Error):
            self._lib.unload()


def _start(config: TokenConfig, pin: bytearray) -> tuple[PyKCS11.PyKCS11Lib, int, Any]:
    lib = load_module(config)
    slot = find_slot(lib, config)
    return lib, slot, open_user_session(lib, slot, pin)


def open_token(config: TokenConfig, current_label: str, pin: bytearray) -> Token:
    store = config.reinitialize_when_changed
    # Looked at before the module reads it: a change made meanwhile shows at the next key refresh.
    watch = StoreWatch(config, store) if store is not None else None
    return Token(current_label, *_start(config, pin), watch)

