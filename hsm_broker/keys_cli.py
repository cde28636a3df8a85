"""`keysealer keys ...`: create and list KeySealer keys, and initialise a software token.

These run in the operator's process, not the broker: they load the module, log in, do one thing, exit.
"""

import contextlib
import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import PyKCS11

from keysealer.hsm_broker.config import BrokerConfig, load_broker_config
from keysealer.hsm_broker.key_naming import KeyIdentity, new_token_object_id, newest_with_label
from keysealer.hsm_broker.pin import read_pin, read_pin_file
from keysealer.hsm_broker.token import (
    AES_KEY_BYTES,
    BadPin,
    TokenUnavailable,
    error_name,
    find_keys,
    find_slot,
    load_module,
    open_user_session,
)
from keysealer.shared.process import EXIT_BAD_PIN, EXIT_OK, FatalError


@contextlib.contextmanager
def _user_session(config: BrokerConfig) -> Iterator[Any]:
    pin = read_pin(config.token.pin_file)
    try:
        lib = load_module(config.token)
        session = open_user_session(lib, find_slot(lib, config.token), pin, rw=True)
    except BadPin as exc:
        raise FatalError(str(exc), EXIT_BAD_PIN) from None
    except TokenUnavailable as exc:
        raise FatalError(exc.reason) from None
    finally:
        pin[:] = bytes(len(pin))
    try:
        yield session
    finally:
        session.logout()
        session.closeSession()


def key_template(identity: KeyIdentity) -> list[tuple[int, Any]]:
    """An AES-256 key that never leaves the token and only encrypts and decrypts."""
    return [
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
        (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
        (PyKCS11.CKA_VALUE_LEN, AES_KEY_BYTES),
        (PyKCS11.CKA_TOKEN, True),
        (PyKCS11.CKA_PRIVATE, True),
        (PyKCS11.CKA_SENSITIVE, True),
        (PyKCS11.CKA_EXTRACTABLE, False),
        (PyKCS11.CKA_ENCRYPT, True),
        (PyKCS11.CKA_DECRYPT, True),
        (PyKCS11.CKA_WRAP, False),
        (PyKCS11.CKA_UNWRAP, False),
        (PyKCS11.CKA_SIGN, False),
        (PyKCS11.CKA_VERIFY, False),
        (PyKCS11.CKA_DERIVE, False),
        (PyKCS11.CKA_LABEL, identity.label),
        (PyKCS11.CKA_ID, identity.token_object_id),
    ]


def create_key(config_path: Path, label: str | None, if_missing: bool = False) -> int:
    config = load_broker_config(config_path)
    identity = KeyIdentity(new_token_object_id(), label or config.keys.current_label)
    with _user_session(config) as session:
        existing = newest_with_label([k.identity for k in find_keys(session)], identity.label)
        if if_missing and existing is not None:
            print(f"key {existing.key_id} (label {identity.label!r}) exists already")
            return EXIT_OK
        try:
            session.generateKey(key_template(identity), PyKCS11.MechanismAESGENERATEKEY)
        except PyKCS11.PyKCS11Error as exc:
            raise FatalError(f"the token refused to create the key: {error_name(exc)}") from None
    print(f"created key {identity.key_id} (label {identity.label!r})")
    return EXIT_OK


def list_keys(config_path: Path) -> int:
    config = load_broker_config(config_path)
    with _user_session(config) as session:
        keys = [k.identity for k in find_keys(session)]
    current = newest_with_label(keys, config.keys.current_label)
    print(f"{'KEY ID':<36}  {'LABEL':<24}  {'CREATED (UTC)':<20}  STATE")
    for key in sorted(keys, key=lambda k: (k.created, k.token_object_id)):
        created = datetime.datetime.fromtimestamp(key.created, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        state = "current" if key == current else "decrypt-only"
        print(f"{key.key_id:<36}  {key.label:<24}  {created:<20}  {state}")
    return EXIT_OK


def init_token(config_path: Path, so_pin_file: Path) -> int:
    """Initialise a token (SoftHSM's free slot) with the configured label, unless it exists already."""
    config = load_broker_config(config_path)
    token = config.token
    if token.token_label is None:
        raise FatalError("init-token needs token.token_label in the config")
    lib = load_module(token)
    try:
        find_slot(lib, token)
        print(f"token {token.token_label!r} exists already")
        return EXIT_OK
    except TokenUnavailable:
        pass
    free = [s for s in lib.getSlotList(tokenPresent=True)
            if not lib.getTokenInfo(s).flags & PyKCS11.CKF_TOKEN_INITIALIZED]
    if not free:
        raise FatalError("no uninitialised token to initialise")
    so_pin, pin = read_pin_file(so_pin_file), read_pin(token.pin_file)
    try:
        lib.initToken(free[0], bytes(so_pin), token.token_label.ljust(32))  # CK labels are blank-padded
        # SoftHSM gives the new token a new slot id: look it up again by label.
        session = lib.openSession(find_slot(lib, token), PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
        session.login(bytes(so_pin), PyKCS11.CKU_SO)
        session.initPin(bytes(pin))
        session.logout()
        session.closeSession()
    except PyKCS11.PyKCS11Error as exc:
        raise FatalError(f"token initialisation failed: {error_name(exc)}") from None
    finally:
        so_pin[:] = bytes(len(so_pin))
        pin[:] = bytes(len(pin))
    print(f"initialised token {token.token_label!r}")
    return EXIT_OK
