"""`keysealer doctor` checks on the token, in the order a broker worker meets it: load the module, find the
token, log in, find the keys, wrap and unwrap. They run in the doctor's own (throwaway) process, through
the functions the worker uses, so what passes here is what the broker does."""

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import PyKCS11

from keysealer.hsm_broker.config import BrokerConfig
from keysealer.hsm_broker.key_naming import current_version, newest_with_label, version_state
from keysealer.hsm_broker.mechanisms import MECHANISMS, ckm_names, offered_by
from keysealer.hsm_broker.pin import pin_path, read_pin
from keysealer.hsm_broker.token import (
    SELF_TEST_BYTES,
    Token,
    TokenKey,
    error_name,
    find_keys,
    find_slot,
    load_module,
    offered_mechanisms,
    open_user_session,
)
from keysealer.hsm_broker.token import log as token_log
from keysealer.shared.errors import BadPin, KeySealerError, TokenUnavailable, UnusableFile
from keysealer.tools.doctor_findings import Check, Outcome, failed, passed, warned

_TOKEN_FLAGS = (
    (PyKCS11.CKF_TOKEN_INITIALIZED, "initialized"), (PyKCS11.CKF_LOGIN_REQUIRED, "login required"),
    (PyKCS11.CKF_USER_PIN_INITIALIZED, "user PIN set"), (PyKCS11.CKF_WRITE_PROTECTED, "write-protected"),
    (PyKCS11.CKF_USER_PIN_COUNT_LOW, "wrong user PINs tried"),
    (PyKCS11.CKF_USER_PIN_FINAL_TRY, "next wrong user PIN locks it"), (PyKCS11.CKF_USER_PIN_LOCKED, "user PIN locked"),
)
# What the broker relies on: the token generated the key and will never let its value out.
_PROTECTION = (
    (PyKCS11.CKA_LOCAL, True, "generated in the token"), (PyKCS11.CKA_SENSITIVE, True, "sensitive"),
    (PyKCS11.CKA_EXTRACTABLE, False, "non-extractable"),
    (PyKCS11.CKA_ALWAYS_SENSITIVE, True, "always sensitive"),
    (PyKCS11.CKA_NEVER_EXTRACTABLE, True, "never extractable"),
)
_USES = ("ENCRYPT", "DECRYPT", "WRAP", "UNWRAP", "SIGN", "VERIFY", "DERIVE")
_TROUBLESHOOTING = "look the CKR_ code up in docs/troubleshooting.md"


def _text(value: str) -> str:
    return value.rstrip(" \x00")  # PKCS #11 strings are blank-padded


def _token_name(info: Any) -> str:
    return repr(_text(info.label)) if info.flags & PyKCS11.CKF_TOKEN_INITIALIZED else "an uninitialized token"


def _token_errors_fail(run: Callable[[], Outcome]) -> Callable[[], Outcome]:
    """A check whose token call fails reports that as its failure; later checks that need it are skipped."""

    def guarded() -> Outcome:
        try:
            return run()
        except PyKCS11.PyKCS11Error as exc:
            return failed(f"token error {error_name(exc)}", _TROUBLESHOOTING)
        except TokenUnavailable as exc:
            return failed(exc.reason, _TROUBLESHOOTING)

    return guarded


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__()
        self._into = into

    def emit(self, record: logging.LogRecord) -> None:
        self._into.append(record.getMessage())


@contextlib.contextmanager
def _broker_warnings() -> Iterator[list[str]]:
    """What the broker would log while reading the keys (the objects it ignores, and why), for the report."""
    collected: list[str] = []
    handler, propagate = _Collect(collected), token_log.propagate
    token_log.addHandler(handler)
    token_log.propagate = False
    try:
        yield collected
    finally:
        token_log.removeHandler(handler)
        token_log.propagate = propagate


class TokenCheckup:
    """The token checks, sharing what earlier ones opened (module, slot, session, keys)."""

    def __init__(self, config: BrokerConfig, config_path: Path) -> None:
        self._config = config
        self._config_path = config_path
        self._lib: Any = None
        self._slot = 0
        self._tokens: dict[int, Any] = {}  # slot -> CK_TOKEN_INFO, for each slot holding a token
        self._offered: set[int] = set()
        self._session: Any = None
        self._keys: list[TokenKey] = []
        self._ignored: list[str] = []
        self._token: Token | None = None

    def checks(self) -> list[Check]:
        steps: list[tuple[str, Callable[[], Outcome], tuple[str, ...]]] = [
            ("module", self._module, ()), ("cryptoki", self._cryptoki, ("module",)),
            ("slots", self._slots, ("module",)), ("token", self._find_token, ("slots",)),
            ("mechanisms", self._mechanisms, ("token",)), ("login", self._login, ("token", "pin file")),
            ("keys", self._list_keys, ("login",)), ("current key", self._current_key, ("keys",)),
            ("wrap/unwrap", self._wrap_unwrap, ("current key",)),
        ]
        return [Check(name, _token_errors_fail(run), needs) for name, run, needs in steps]

    def _module(self) -> Outcome:
        module = self._config.token.module
        try:
            self._lib = load_module(self._config.token)  # with token.module_env applied, as in the broker
        except TokenUnavailable as exc:
            return failed(f"{exc.reason} ({module})", f"check that {module} is a PKCS #11 module for this machine, "
                          "readable by the broker's user, and that its dependencies are installed")
        return passed(f"loaded {module}")

    def _cryptoki(self) -> Outcome:
        info = self._lib.getInfo()
        major, minor = info.cryptokiVersion
        library = f"{_text(info.manufacturerID)}, {_text(info.libraryDescription)} " \
                  f"{info.libraryVersion[0]}.{info.libraryVersion[1]}"
        message = f"Cryptoki {major}.{minor}: {library}"
        if major == 3 or (major, minor) in {(2, 20), (2, 40)}:
            return passed(message)
        return warned(f"{message}; KeySealer is tested with Cryptoki 2.20, 2.40 and 3.x")

    def _slots(self) -> Outcome:
        details = []
        for slot in self._lib.getSlotList(tokenPresent=False):
            if not self._lib.getSlotInfo(slot).flags & PyKCS11.CKF_TOKEN_PRESENT:
                details.append(f"slot {slot}: no token")
                continue
            info = self._tokens[slot] = self._lib.getTokenInfo(slot)
            flags = ", ".join(name for flag, name in _TOKEN_FLAGS if info.flags & flag)
            details.append(f"slot {slot}: {_token_name(info)}, model {_text(info.model)!r} ({flags})")
        if not self._tokens:
            return failed(f"the module sees no token ({len(details)} slots)", "check token.module_env (e.g. "
                          "SOFTHSM2_CONF, TPM2_PKCS11_STORE) and that the device or server is reachable", details)
        return passed(f"{len(details)} slots, {len(self._tokens)} with a token", details)

    def _find_token(self) -> Outcome:
        try:
            self._slot = find_slot(self._lib, self._config.token)
        except TokenUnavailable as exc:
            found = ", ".join(f"{_token_name(t)} (slot {s})" for s, t in self._tokens.items())
            setting = "token.token_label" if self._config.token.token_label is not None else "token.slot"
            return failed(f"{exc.reason}; tokens found: {found}", f"set {setting} to your token's, or create "
                          f"the token (SoftHSM: keysealer keys init-token --config {self._config_path})")
        info = self._tokens[self._slot]
        if not info.flags & PyKCS11.CKF_TOKEN_INITIALIZED:
            return failed(f"the token in slot {self._slot} is not initialized", "initialize it with the token's "
                          f"tools (SoftHSM: keysealer keys init-token --config {self._config_path})")
        return passed(f"token {_text(info.label)!r} in slot {self._slot} ({_text(info.model)})")

    def _mechanisms(self) -> Outcome:
        self._offered = offered_mechanisms(self._lib, self._slot)
        usable = offered_by(self._offered)
        missing = [f"{m.name}: the token does not offer {ckm_names(m.needs - self._offered)}"
                   for m in MECHANISMS.values() if m.name not in usable]
        if not usable:
            return warned("the token offers what none of KeySealer's mechanisms needs", None, missing)
        return passed(f"{len(self._offered)} mechanisms, enough for {', '.join(usable)}", missing)

    def _login(self) -> Outcome:
        path = pin_path(self._config.token.pin_file)
        fix = f"write the token's user PIN to {path}: until then the broker stops with exit code 3"
        flags = self._tokens[self._slot].flags
        if flags & PyKCS11.CKF_USER_PIN_LOCKED:
            return failed("the token's user PIN is locked", f"reset it with the SO PIN using the token's tools, "
                          f"and write the new PIN to {path}")
        if flags & PyKCS11.CKF_USER_PIN_FINAL_TRY:
            return failed("not trying the PIN: the token says one more wrong PIN locks it",
                          f"make sure {path} holds the right PIN, then run keysealer keys list --config "
                          f"{self._config_path} once (a good login resets the count)")
        try:
            pin = read_pin(self._config.token.pin_file)
        except UnusableFile as exc:
            return failed(str(exc), fix)
        try:
            self._session = open_user_session(self._lib, self._slot, pin)
        except BadPin as exc:
            return failed(f"{exc}: the token refused the PIN in {path}", fix)
        except TokenUnavailable as exc:
            return failed(exc.reason, _TROUBLESHOOTING)
        finally:
            pin[:] = bytes(len(pin))  # the token has what it needs
        return passed(f"logged in to token {_text(self._tokens[self._slot].label)!r} (slot {self._slot})")

    def _list_keys(self) -> Outcome:
        with _broker_warnings() as ignored:
            self._keys = find_keys(self._session)
        self._ignored = ignored
        self._token = Token(self._config.keys.current_label, self._lib, self._slot, self._session)
        current = current_version(list(self._keys), self._config.keys.current_label)
        details = []
        for key in sorted(self._keys, key=lambda k: (k.identity.created, k.identity.token_object_id)):
            identity = key.identity
            created = datetime.datetime.fromtimestamp(identity.created, datetime.UTC).strftime("%Y-%m-%d %H:%M")
            details.append(f"{identity.key_id}  {identity.label!r}  {MECHANISMS[identity.mechanism].name}  "
                           f"created {created} UTC  {version_state(key, current)}")
        message = f"KeySealer keys in the token: {len(self._keys)}"
        if self._ignored:
            return warned(f"{message}; objects with KeySealer's CKA_ID that the broker ignores: {len(self._ignored)}",
                          "remove the ignored objects with the token's tools: they are never used",
                          details + self._ignored)
        return passed(message, details)

    def _current_key(self) -> Outcome:
        label, rotate = self._config.keys.current_label, f"keysealer keys rotate --config {self._config_path}"
        newest = newest_with_label([k.identity for k in self._keys], label)
        if newest is None:
            return failed(f"no usable key labelled {label!r} in the token",
                          f"keysealer keys create --config {self._config_path}", self._ignored)
        current = current_version(list(self._keys), label)
        if current is None:
            return failed(f"the newest key labelled {label!r}, {newest.key_id}, is retired: nothing can be "
                          "encrypted", rotate)
        key = next(k for k in self._keys if k.identity == current.identity)
        mechanism = MECHANISMS[key.identity.mechanism]
        problems, uses = self._inspect(key)
        if problems:
            return failed(f"{key.identity.key_id}: {'; '.join(problems)}", f"{rotate} (creates a key in the token)",
                          uses)
        message = f"{key.identity.key_id} ({mechanism.name}): " + ", ".join(name for _, _, name in _PROTECTION)
        if mechanism.needs - self._offered:
            return warned(f"{message}; the token does not list {ckm_names(mechanism.needs - self._offered)}, which "
                          f"{mechanism.name} needs", None, uses)
        return passed(message, uses)

    def _inspect(self, key: TokenKey) -> tuple[list[str], list[str]]:
        """(protection problems, what each object may be used for) of a key's objects."""
        problems, uses = [], []
        for role, handle in (("key", key.objects.main), ("helper", key.objects.helper)):
            if handle is None:
                continue
            object_class, *values = self._session.getAttributeValue(
                handle, [PyKCS11.CKA_CLASS] + [attribute for attribute, _, _ in _PROTECTION])
            if object_class != PyKCS11.CKO_PUBLIC_KEY:  # a public key is meant to be public
                problems += [f"{role} object is not {name}" for (_, wanted, name), value in zip(_PROTECTION, values,
                             strict=True) if bool(value) != wanted]
            allowed = self._session.getAttributeValue(handle, [getattr(PyKCS11, f"CKA_{use}") for use in _USES])
            uses.append(f"{role} object may: {', '.join(u.lower() for u, a in zip(_USES, allowed, strict=True) if a)}")
        return problems, uses

    def _round_trip(self, key: TokenKey) -> str | None:
        """Why wrapping and unwrapping random bytes with `key` failed, or None."""
        assert self._token is not None
        probe = os.urandom(SELF_TEST_BYTES)
        try:
            opened = self._token.unwrap(key, self._token.wrap(key, probe))
        except TokenUnavailable as exc:
            return exc.reason
        except KeySealerError as exc:
            return exc.message
        return None if opened == probe else "unwrap returned other bytes than were wrapped"

    def _wrap_unwrap(self) -> Outcome:
        assert self._token is not None and self._token.current is not None
        failure = self._round_trip(self._token.current)
        key_id = self._token.current.identity.key_id
        if failure:
            return failed(f"wrap and unwrap with {key_id} failed: {failure}", "the token cannot run this key's "
                          f"mechanism as KeySealer does: rotate to one it can (keysealer keys rotate --mechanism "
                          f"... --config {self._config_path})")
        others = [k for k in self._keys if not k.retired and k.identity != self._token.current.identity]
        broken = [f"{k.identity.key_id}: {failure}" for k in others if (failure := self._round_trip(k))]
        message = f"{SELF_TEST_BYTES} random bytes wrapped and unwrapped with {key_id}"
        if broken:
            return warned(f"{message}; {len(broken)} decrypt-only keys cannot", "retire keys that cannot be "
                          "used (keysealer keys retire KEY_ID), unless the token only failed for now", broken)
        return passed(message + (f"; also with {len(others)} decrypt-only keys" if others else ""))

    def close(self) -> None:
        """Close every session of ours, which also ends the login (a wrap may have replaced the first one)."""
        if self._session is not None:
            with contextlib.suppress(PyKCS11.PyKCS11Error):
                self._lib.closeAllSessions(self._slot)
