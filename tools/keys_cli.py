"""`keysealer keys ...`: create and list KeySealer keys, and initialise a software token.

These run in the operator's process, not the broker: they load the module, log in, do one thing, exit.
"""

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PyKCS11

from keysealer.hsm_broker.config import BrokerConfig, load_broker_config
from keysealer.hsm_broker.key_naming import (
    KeyIdentity,
    current_version,
    new_token_object_id,
    newest_with_label,
    version_state,
)
from keysealer.hsm_broker.mechanisms import BY_NAME, MECHANISMS, KeyMechanism, ckm_names, offered_by
from keysealer.hsm_broker.pin import read_pin, read_pin_file
from keysealer.hsm_broker.token import (
    TokenKey,
    error_name,
    find_keys,
    find_slot,
    load_module,
    offered_mechanisms,
    open_user_session,
)
from keysealer.shared.ciphertext import Mechanism, header_for
from keysealer.shared.errors import FatalError, TokenUnavailable, UsageError
from keysealer.shared.etcd_reader import EtcdOptions
from keysealer.shared.process import EXIT_OK
from keysealer.tools.key_usage import resources_line, scan


@dataclass(frozen=True)
class _OpenToken:
    session: Any
    offered: set[int]  # the CKM_* mechanisms the token offers


def _unavailable(exc: TokenUnavailable) -> UsageError | FatalError:
    # ckr -1: the module did not load at all, so token.module is not a PKCS #11 library: fix the config.
    return UsageError(exc.reason) if exc.ckr == -1 else FatalError(exc.reason)


@contextlib.contextmanager
def _user_session(config: BrokerConfig) -> Iterator[_OpenToken]:
    pin = read_pin(config.token.pin_file)
    try:
        lib = load_module(config.token)
        slot = find_slot(lib, config.token)
        session = open_user_session(lib, slot, pin, rw=True)
        offered = offered_mechanisms(lib, slot)
    except TokenUnavailable as exc:
        raise _unavailable(exc) from None
    finally:
        pin[:] = bytes(len(pin))
    try:
        yield _OpenToken(session, offered)
    finally:
        session.logout()
        session.closeSession()


def create_key(config_path: Path, label: str | None, if_missing: bool = False, mechanism: str | None = None) -> int:
    if label is not None and not label.isprintable():
        raise UsageError("--label: must hold printable characters only (it is shown in lists and logs)")
    config = load_broker_config(config_path)
    with _user_session(config) as token:
        keys = find_keys(token.session)
        label = label or config.keys.current_label
        existing = newest_with_label([k.identity for k in keys], label)
        if if_missing and existing is not None:
            print(f"key {existing.key_id} (label {label!r}) exists already")
            return EXIT_OK
        chosen = _choose_mechanism(mechanism, existing, token.offered)
        identity = KeyIdentity(new_token_object_id(chosen.mechanism, newer_than=existing), label)
        try:
            chosen.generate(token.session, identity)
        except PyKCS11.PyKCS11Error as exc:
            raise FatalError(f"the token refused to create a {chosen.name} key: {error_name(exc)}; "
                             f"{_OWN_TOOL}") from None
        _self_test(token.session, identity, chosen)
    print(f"created key {identity.key_id} (label {label!r}, {chosen.name})")
    return EXIT_OK


def _choose_mechanism(name: str | None, previous: KeyIdentity | None, offered: set[int]) -> KeyMechanism:
    """The named mechanism, else the previous version's (a rotation keeps it), else AES-GCM; the token must
    offer what it needs."""
    if name is not None:
        chosen = BY_NAME[name]
    else:
        chosen = MECHANISMS[previous.mechanism if previous else Mechanism.AES_256_GCM]
    if not chosen.needs <= offered:
        usable = ", ".join(offered_by(offered)) or "none of KeySealer's mechanisms"
        raise UsageError(f"the token does not offer what {chosen.name} needs; it offers: {usable}")
    if missing := chosen.generate_needs - offered:
        raise UsageError(f"the token cannot generate {chosen.name} keys (it does not offer {ckm_names(missing)}); "
                         f"{_OWN_TOOL}")
    return chosen


# Where keys come from when the token will not generate them through PKCS #11.
_OWN_TOOL = "tokens that generate keys only with their own tool (TPM 2.0) get them from it: " \
            "deploy/providers/tpm2/create-key.sh"


def _self_test(session: Any, identity: KeyIdentity, mechanism: KeyMechanism) -> None:
    """Seal and open a random seed with the new key; a key the token cannot use is removed at once."""
    key = next(k for k in find_keys(session) if k.identity == identity)
    header, probe = header_for(identity.mechanism, identity.key_ref), os.urandom(32)
    try:
        if mechanism.open(session, key.objects, header, mechanism.seal(session, key.objects, header, probe)) == probe:
            return
        failure = "a round trip returned different data"
    except PyKCS11.PyKCS11Error as exc:
        failure = error_name(exc)
    _destroy(session, key)
    raise FatalError(f"the new {mechanism.name} key failed its self-test ({failure}) and was removed; "
                     "the token may not support this mechanism's parameters")


def _destroy(session: Any, key: TokenKey) -> None:
    for handle in (key.objects.main, key.objects.helper):
        if handle is not None:
            session.destroyObject(handle)


def print_new_id(mechanism: str, with_key_id: bool = False, config_path: Path | None = None) -> int:
    """For tokens whose keys only their own tool can generate (TPM 2.0: tpm2_ptool addkey): the id that
    marks the objects as one KeySealer key; give every object of the key the same id and label. With the
    broker's config, the id sorts after the current label's newest version even within the same second."""
    newest = None
    if config_path is not None:
        config = load_broker_config(config_path)
        with _user_session(config) as token:
            newest = newest_with_label([k.identity for k in find_keys(token.session)], config.keys.current_label)
    object_id = new_token_object_id(BY_NAME[mechanism].mechanism, newer_than=newest)
    key_id = KeyIdentity(object_id, label="").key_id  # derived from the id alone
    print(f"{object_id.hex()} {key_id}" if with_key_id else object_id.hex())
    return EXIT_OK


def rotate_key(config_path: Path, mechanism: str | None = None) -> int:
    """A new version of the current label: running brokers wrap under it within seconds."""
    code = create_key(config_path, None, mechanism=mechanism)
    print("running brokers switch to it within 5 s (at once on SIGHUP); older keys keep decrypting")
    return code


def _keys_with_states(config_path: Path) -> list[tuple[TokenKey, str]]:
    """Every KeySealer key in the token, oldest first, with its state (current, decrypt-only, retired)."""
    config = load_broker_config(config_path)
    with _user_session(config) as token:
        keys = find_keys(token.session)
    current = current_version(list(keys), config.keys.current_label)
    ordered = sorted(keys, key=lambda k: (k.identity.created, k.identity.token_object_id))
    return [(key, version_state(key, current)) for key in ordered]


def key_states(config_path: Path) -> dict[str, str]:
    """key_id -> state, for `keys usage --config`."""
    return {key.identity.key_id: state for key, state in _keys_with_states(config_path)}


def list_keys(config_path: Path) -> int:
    rows = _keys_with_states(config_path)  # first: a bad config is one line on stderr, with nothing on stdout
    print(f"{'KEY ID':<36}  {'LABEL':<24}  {'CREATED (UTC)':<20}  {'MECHANISM':<14}  STATE")
    for key, state in rows:
        identity = key.identity
        created = datetime.datetime.fromtimestamp(identity.created, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        mechanism = MECHANISMS[identity.mechanism].name
        print(f"{identity.key_id:<36}  {identity.label:<24}  {created:<20}  {mechanism:<14}  {state}")
    return EXIT_OK


@dataclass(frozen=True)
class StoredUseCheck:
    """Where `keys retire` looks for stored objects that still need the key: etcd, or nowhere (`unchecked`)."""

    etcd: EtcdOptions | None
    prefix: str
    unchecked: bool


def retire_key(config_path: Path, key_id: str, force: bool, destroy: bool, assume_yes: bool, *,
               stored: StoredUseCheck) -> int:
    """Make a key unusable (the token refuses it from then on), and with --destroy delete it."""
    config = load_broker_config(config_path)
    with _user_session(config) as token:
        session = token.session
        keys = find_keys(session)
        key = next((k for k in keys if k.identity.key_id == key_id), None)
        if key is None:
            raise UsageError(f"no KeySealer key with key_id {key_id} in the token")
        # Only for a key the token holds: what the operator typed is not echoed in warnings before that.
        _check_stored_use(key_id, stored, force, destroy)
        current = current_version(list(keys), config.keys.current_label)
        if current is not None and current.identity == key.identity:
            print(f"warning: {key_id} is the current key: until a newer key is created, nothing can be "
                  "encrypted (Status turns unhealthy)", file=sys.stderr)
            if not force:
                raise UsageError("refusing to retire the current key without --force; rotate first")
        if destroy and not _confirmed(key_id, assume_yes):
            raise UsageError("not confirmed; nothing destroyed")
        try:
            if not key.retired:
                # What find_keys reads as "retired"; the token refuses the key from then on.
                session.setAttributeValue(key.objects.main, [(PyKCS11.CKA_DECRYPT, False), (PyKCS11.CKA_UNWRAP, False)])
            if destroy:
                _destroy(session, key)
        except PyKCS11.PyKCS11Error as exc:
            raise FatalError(f"the token refused to change the key: {error_name(exc)}") from None
    print(f"{'destroyed' if destroy else 'retired'} key {key_id}: ciphertexts made under it no longer decrypt")
    return EXIT_OK


def _check_stored_use(key_id: str, stored: StoredUseCheck, force: bool, destroy: bool) -> None:
    """Refuse to strand data: a key that objects in etcd still need is retired only with --force, and a key
    is destroyed without looking at etcd only with --unchecked."""
    if stored.etcd is None:
        if destroy and not stored.unchecked:
            raise UsageError("refusing to destroy a key without checking that no stored object needs it: give "
                             "the apiserver's --etcd-endpoints (and --etcd-cacert/--etcd-cert/--etcd-key), or add "
                             "--unchecked")
        print(f"warning: could not check whether stored objects still need {key_id} (no --etcd-endpoints)",
              file=sys.stderr)
        return
    usage = scan(stored.etcd, stored.prefix).key_usage(key_id)
    if usage.objects == 0:
        print(f"no object under {stored.prefix} in etcd needs {key_id}", file=sys.stderr)
        return
    need = f"{usage.objects} stored objects still need {key_id} ({resources_line(usage.resources)})"
    if not force:
        raise UsageError(f"{need}: re-encrypt them first (docs/rotation.md), or add --force to strand them")
    print(f"warning: {need}; --force: they will no longer decrypt", file=sys.stderr)


def _confirmed(key_id: str, assume_yes: bool) -> bool:
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        raise UsageError("--destroy needs confirmation: run it in a terminal or add --yes")
    answer = input(f"Destroying {key_id} is irreversible: every secret still under it is lost.\n"
                   "Type the key id to confirm: ")
    return answer.strip() == key_id


def init_token(config_path: Path, so_pin_file: Path) -> int:
    """Initialise a token (SoftHSM's free slot) with the configured label, unless it exists already."""
    config = load_broker_config(config_path)
    token = config.token
    if token.token_label is None:
        raise FatalError("init-token needs token.token_label in the config")
    try:
        lib = load_module(token)
    except TokenUnavailable as exc:
        raise _unavailable(exc) from None
    try:
        find_slot(lib, token)
        print(f"token {token.token_label!r} exists already")
        return EXIT_OK
    except TokenUnavailable:
        pass
    try:
        free = [s for s in lib.getSlotList(tokenPresent=True)
                if not lib.getTokenInfo(s).flags & PyKCS11.CKF_TOKEN_INITIALIZED]
    except PyKCS11.PyKCS11Error as exc:
        raise FatalError(f"cannot list the module's slots: {error_name(exc)}") from None
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
