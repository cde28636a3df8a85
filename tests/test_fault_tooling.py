"""Tests of the reliability tooling itself, on the real SoftHSM (no KeySealer process): the fault-injecting
PKCS #11 wrapper (tests/pkcs11_faults) and the p11-kit remote token fixture (tests/remote_token.py).

Each PKCS #11 client runs in its own child process (pkcs11_faults.client.TokenClient): the modules read
their environment when they load, and C_Initialize/C_Finalize are per process.

Run with -s to see what SoftHSM leaves behind after failed calls and which mechanisms p11-kit's client
forwards: information for the broker's recovery logic.
"""

import ctypes
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import short_tmp_dir
from pkcs11_faults import SOURCE, FaultControl, build
from pkcs11_faults.client import TokenClient, TokenError
from remote_token import RemoteToken, client_module, make_softhsm_token, softhsm_module

LABEL = "faults-test"
PIN = "4321"
SO_PIN = "87654321"
CKS_RO_USER_FUNCTIONS = 1
CKF_USER_PIN_COUNT_LOW = 0x10000
CKF_USER_PIN_FINAL_TRY = 0x20000


@pytest.fixture(scope="module")
def token_env() -> Iterator[dict[str, str]]:
    root = short_tmp_dir()
    yield make_softhsm_token(root, LABEL, PIN, SO_PIN)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def wrapper() -> Path:
    return build()


@pytest.fixture
def faults() -> Iterator[FaultControl]:
    root = short_tmp_dir()
    yield FaultControl(root / "faults")
    shutil.rmtree(root, ignore_errors=True)


def wrapped(wrapper: Path, faults: FaultControl, token_env: dict[str, str]) -> TokenClient:
    return TokenClient(wrapper, {**token_env, **faults.module_env(softhsm_module(), debug=True)})


# ---------------------------------------------------------------------------------------------------------
# Building


def test_build_is_cached_and_redone_when_the_source_changes(tmp_path: Path) -> None:
    source = tmp_path / "pkcs11_faults.c"
    shutil.copy(SOURCE, source)
    first = build.__wrapped__(source, tmp_path / "cache")
    again = build.__wrapped__(source, tmp_path / "cache")
    assert again == first and first.stat().st_mtime_ns == again.stat().st_mtime_ns
    source.write_text(source.read_text() + "\n/* changed */\n")
    changed = build.__wrapped__(source, tmp_path / "cache")
    assert changed != first and changed.is_file()
    # A PKCS #11 module: C_GetFunctionList and nothing else of PKCS #11 is exported.
    library = ctypes.CDLL(str(changed))
    assert hasattr(library, "C_GetFunctionList")
    assert not hasattr(library, "C_Encrypt")
    assert not hasattr(library, "before")


# ---------------------------------------------------------------------------------------------------------
# Forwarding


def test_forwards_everything_without_cues(wrapper: Path, faults: FaultControl, token_env: dict[str, str]) -> None:
    with TokenClient(softhsm_module(), token_env) as direct:
        mechanisms = direct.call("mechanisms", direct.slot_of(LABEL))
    with wrapped(wrapper, faults, token_env) as token:
        assert token.call("mechanisms", token.slot_of(LABEL)) == mechanisms
        sid = token.open_login(LABEL, PIN)
        key = token.aes_key(sid)
        iv, sealed = token.encrypt(sid, key, b"s" * 32, aad=b"header")
        assert len(sealed) == 32 + 16
        assert token.decrypt(sid, key, sealed, iv, aad=b"header") == b"s" * 32
        assert token.call("session_info", sid)["state"] == CKS_RO_USER_FUNCTIONS
    assert faults.fired() == 0


def test_forwards_without_a_control_file(wrapper: Path, token_env: dict[str, str]) -> None:
    with TokenClient(wrapper, {**token_env, "PKCS11_FAULTS_MODULE": str(softhsm_module())}) as token:
        sid = token.open_login(LABEL, PIN)
        key = token.aes_key(sid)
        iv, sealed = token.encrypt(sid, key, b"x")
        assert token.decrypt(sid, key, sealed, iv) == b"x"


def test_refuses_to_load_without_a_real_module(wrapper: Path) -> None:
    with pytest.raises(TokenError):
        TokenClient(wrapper, {"PKCS11_FAULTS_MODULE": ""})


# ---------------------------------------------------------------------------------------------------------
# Cues


@pytest.mark.parametrize("function", ["C_Encrypt", "C_Decrypt"])
def test_count_fires_that_many_times_and_leaves_the_session_usable(
        function: str, wrapper: Path, faults: FaultControl, token_env: dict[str, str]) -> None:
    with wrapped(wrapper, faults, token_env) as token:
        sid = token.open_login(LABEL, PIN)
        key = token.aes_key(sid)
        iv, sealed = token.encrypt(sid, key, b"y" * 32)
        faults.set(function, "CKR_DEVICE_ERROR", count=3)
        op = ("encrypt", sid, key, b"y") if function == "C_Encrypt" else ("decrypt", sid, key, sealed, iv)
        results = [token.result(*op) for _ in range(5)]
        # An injected failure ends the real operation: the same session serves the next call.
        assert results == ["CKR_DEVICE_ERROR"] * 3 + ["OK"] * 2, token.stderr()
        assert faults.fired(function) == 3
        assert token.decrypt(sid, key, sealed, iv) == b"y" * 32


def test_count_is_shared_by_every_process(wrapper: Path, faults: FaultControl, token_env: dict[str, str]) -> None:
    faults.set("C_GenerateRandom", "CKR_DEVICE_ERROR", count=3)
    with wrapped(wrapper, faults, token_env) as first, wrapped(wrapper, faults, token_env) as second:
        one, two = first.open_login(LABEL, PIN), second.open_login(LABEL, PIN)
        seen = [first.result("random", one, 8), first.result("random", one, 8),
                second.result("random", two, 8), second.result("random", two, 8),
                first.result("random", one, 8)]
    assert seen == ["CKR_DEVICE_ERROR"] * 3 + ["OK"] * 2
    assert faults.fired() == 3
    [count] = faults.counts()
    assert (count.matched, count.fired) == (5, 3)


def test_counts_belong_to_cues(wrapper: Path, faults: FaultControl, token_env: dict[str, str]) -> None:
    with wrapped(wrapper, faults, token_env) as token:
        sid = token.open_login(LABEL, PIN)
        for _ in range(3):  # rewritten quickly, with the same length: the mtime must still tell them apart
            faults.set("C_GenerateRandom", "CKR_DEVICE_ERROR")  # a new cue each time: armed again
            assert [token.result("random", sid, 8) for _ in range(2)] == ["CKR_DEVICE_ERROR", "OK"]
        # Adding a cue leaves the spent one spent (one control file for a whole soak run).
        faults.add("C_GetSessionInfo", "CKR_DEVICE_ERROR")
        assert token.result("random", sid, 8) == "OK"
        assert token.result("session_info", sid) == "CKR_DEVICE_ERROR"
        assert [(c.matched, c.fired) for c in faults.counts()] == [(3, 1), (1, 1)]
        # Hand-written lines: the same text is the same cue, a changed one is new.
        faults.write(["C_GenerateRandom CKR_DEVICE_ERROR count=2", "C_GenerateRandom CKR_DEVICE_ERROR count=2"])
        assert [token.result("random", sid, 8) for _ in range(5)] == ["CKR_DEVICE_ERROR"] * 4 + ["OK"]
        faults.write(["C_GenerateRandom CKR_DEVICE_ERROR count=2", "C_GenerateRandom CKR_DEVICE_ERROR count=2"])
        assert token.result("random", sid, 8) == "OK"
        faults.write(["C_GenerateRandom CKR_DEVICE_ERROR count=2 id=again"])
        assert token.result("random", sid, 8) == "CKR_DEVICE_ERROR"


def test_login_cue_defaults_to_once_and_spares_the_real_pin_counter(
        wrapper: Path, faults: FaultControl, token_env: dict[str, str]) -> None:
    faults.write(["C_Login CKR_PIN_INCORRECT"])
    with wrapped(wrapper, faults, token_env) as token:
        slot = token.slot_of(LABEL)
        sid = int(token.call("open", slot, False))
        assert token.result("login", sid, PIN) == "CKR_PIN_INCORRECT"
        assert token.result("login", sid, PIN) == "OK"
        assert token.call("session_info", sid)["state"] == CKS_RO_USER_FUNCTIONS
        flags = int(token.call("token_flags", slot))
        assert not flags & (CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_FINAL_TRY), "the real token saw a bad PIN"


def test_always_until_cleared(wrapper: Path, faults: FaultControl, token_env: dict[str, str]) -> None:
    with wrapped(wrapper, faults, token_env) as token:
        sid = token.open_login(LABEL, PIN)
        key = token.aes_key(sid)
        iv, sealed = token.encrypt(sid, key, b"z")
        faults.write(["C_Decrypt CKR_SESSION_HANDLE_INVALID always"])
        assert [token.result("decrypt", sid, key, sealed, iv) for _ in range(4)] == ["CKR_SESSION_HANDLE_INVALID"] * 4
        assert token.result("encrypt", sid, key, b"z") == "OK"  # other functions are untouched
        faults.clear()
        assert token.decrypt(sid, key, sealed, iv) == b"z"


def test_star_fails_everything_but_the_library_calls(
        wrapper: Path, faults: FaultControl, token_env: dict[str, str]) -> None:
    with wrapped(wrapper, faults, token_env) as token:
        sid = token.open_login(LABEL, PIN)
        faults.set("*", "CKR_DEVICE_REMOVED", always=True)
        assert token.result("slots") == "CKR_DEVICE_REMOVED"
        assert token.result("random", sid, 8) == "CKR_DEVICE_REMOVED"
        assert token.result("close", sid) == "CKR_DEVICE_REMOVED"
        assert token.result("finalize") == "OK"
        assert token.result("initialize") == "OK"
        assert token.result("slots") == "CKR_DEVICE_REMOVED"
        faults.clear()
        sid = token.open_login(LABEL, PIN)
        assert token.result("random", sid, 8) == "OK"


def test_after_lets_calls_through_first(wrapper: Path, faults: FaultControl, token_env: dict[str, str]) -> None:
    with wrapped(wrapper, faults, token_env) as token:
        sid = token.open_login(LABEL, PIN)
        key = token.aes_key(sid)
        # PyKCS11's encrypt is C_EncryptInit, C_Encrypt (length), C_Encrypt (data): two C_Encrypt calls.
        faults.set("C_Encrypt", "CKR_DEVICE_ERROR", after=2)
        assert [token.result("encrypt", sid, key, b"a") for _ in range(3)] == ["OK", "CKR_DEVICE_ERROR", "OK"]


@pytest.mark.parametrize("function", ["C_EncryptInit", "C_Encrypt"])
def test_sticky_operation_keeps_the_session_busy_until_closed(
        function: str, wrapper: Path, faults: FaultControl, token_env: dict[str, str]) -> None:
    with wrapped(wrapper, faults, token_env) as token:
        sid = token.open_login(LABEL, PIN)
        other = token.open_login(LABEL, PIN)
        key = token.aes_key(sid)
        faults.set(function, "CKR_DEVICE_ERROR", sticky_operation=True)
        assert token.result("encrypt", sid, key, b"b") == "CKR_DEVICE_ERROR"
        faults.clear()  # the session stays stuck: the state is the session's, not the cue's
        assert [token.result("encrypt", sid, key, b"b") for _ in range(2)] == ["CKR_OPERATION_ACTIVE"] * 2
        assert token.result("encrypt", other, key, b"b") == "OK"
        assert token.result("close", sid) == "OK"
        fresh = token.open_login(LABEL, PIN)
        key = token.aes_key(fresh)
        assert token.result("encrypt", fresh, key, b"b") == "OK"


def test_sticky_operation_after_a_real_failure(wrapper: Path, faults: FaultControl, token_env: dict[str, str]) -> None:
    """A forwarding cue: SoftHSM ends the operation on a bad tag, tpm2-pkcs11 does not; this makes it not."""
    with wrapped(wrapper, faults, token_env) as token:
        sid = token.open_login(LABEL, PIN)
        key = token.aes_key(sid)
        iv, sealed = token.encrypt(sid, key, b"c" * 32)
        forged = sealed[:-1] + bytes([sealed[-1] ^ 1])
        faults.set("C_Decrypt", sticky_operation=True)
        assert token.result("decrypt", sid, key, sealed, iv) == "OK"  # successes leave nothing behind
        assert token.result("decrypt", sid, key, forged, iv) == "CKR_GENERAL_ERROR"
        assert token.result("decrypt", sid, key, sealed, iv) == "CKR_OPERATION_ACTIVE"
        # Forwarding cues count every call they touch: 2 C_Decrypt (length, data) per decrypt; the third
        # decrypt stopped at C_DecryptInit.
        assert faults.counts()[0].fired == 4


def test_reinit_required_until_finalize_and_initialize(
        wrapper: Path, faults: FaultControl, token_env: dict[str, str]) -> None:
    with wrapped(wrapper, faults, token_env) as token, wrapped(wrapper, faults, token_env) as bystander:
        sid = token.open_login(LABEL, PIN)
        key = token.aes_key(sid)
        watcher = bystander.open_login(LABEL, PIN)
        faults.set("C_Encrypt", "CKR_DEVICE_ERROR", reinit_required=True)
        assert token.result("encrypt", sid, key, b"d") == "CKR_DEVICE_ERROR"
        faults.clear()  # per process, and not undone by clearing
        assert token.result("random", sid, 8) == "CKR_DEVICE_ERROR"
        assert token.result("slots") == "CKR_DEVICE_ERROR"
        assert token.result("close", sid) == "CKR_DEVICE_ERROR"
        assert token.result("initialize") == "CKR_CRYPTOKI_ALREADY_INITIALIZED"
        assert token.result("random", sid, 8) == "CKR_DEVICE_ERROR"
        assert bystander.result("random", watcher, 8) == "OK"  # another process is not concerned
        assert token.result("finalize") == "OK"
        assert token.result("random", sid, 8) == "CKR_CRYPTOKI_NOT_INITIALIZED"
        assert token.result("initialize") == "OK"
        sid = token.open_login(LABEL, PIN)  # the real module logged out with C_Finalize
        key = token.aes_key(sid)
        assert token.result("encrypt", sid, key, b"d") == "OK"

        # The same through PyKCS11's unload()/load() (C_Finalize, dlclose, dlopen, C_Initialize).
        faults.set("C_Encrypt", "CKR_DEVICE_ERROR", reinit_required=True)
        assert token.result("encrypt", sid, key, b"d") == "CKR_DEVICE_ERROR"
        assert token.result("random", sid, 8) == "CKR_DEVICE_ERROR"
        assert token.result("unload") == token.result("load") == "OK"
        sid = token.open_login(LABEL, PIN)
        assert token.result("random", sid, 8) == "OK"


def test_delays(wrapper: Path, faults: FaultControl, token_env: dict[str, str]) -> None:
    with wrapped(wrapper, faults, token_env) as token:
        sid = token.open_login(LABEL, PIN)
        key = token.aes_key(sid)
        token.encrypt(sid, key, b"e")
        fast = token.last_seconds
        faults.delay(40)
        token.encrypt(sid, key, b"e")  # C_EncryptInit + 2 x C_Encrypt: 3 crypto calls
        slow = token.last_seconds
        token.slots()  # not a crypto call
        untouched = token.last_seconds
        faults.set("C_GenerateRandom", delay_ms=100)  # a forwarding cue with its own delay
        token.call("random", sid, 8)
        random_seconds = token.last_seconds
        faults.clear()
        token.encrypt(sid, key, b"e")
        cleared = token.last_seconds
    print(f"\nencrypt: {fast * 1000:.2f} ms, with delay_ms=40: {slow * 1000:.1f} ms, after clear: "
          f"{cleared * 1000:.2f} ms; slots with the delay: {untouched * 1000:.2f} ms; "
          f"random with a 100 ms cue (+40 global): {random_seconds * 1000:.1f} ms")
    assert slow >= 0.12 > fast
    assert untouched < 0.04
    assert random_seconds >= 0.14
    assert cleared < 0.04


def test_bad_cues_are_refused(wrapper: Path, faults: FaultControl, token_env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="unknown PKCS #11 function"):
        faults.set("C_Encrpyt", "CKR_DEVICE_ERROR")
    with pytest.raises(ValueError, match="unknown return value"):
        faults.set("C_Encrypt", "CKR_DEVICE_EROR")
    faults.write(["C_GenerateRandom CKR_DEVICE_ERROR sometimes", "C_GenerateRandom CKR_HOST_MEMORY"])
    with wrapped(wrapper, faults, token_env) as token:
        sid = token.open_login(LABEL, PIN)
        assert token.result("random", sid, 8) == "CKR_HOST_MEMORY"
        assert "faults:1: cue not understood" in token.stderr()


# ---------------------------------------------------------------------------------------------------------
# What SoftHSM leaves behind (information for the broker's recovery logic)


def test_what_softhsm_leaves_after_failed_decrypts(token_env: dict[str, str]) -> None:
    rows: dict[str, dict[str, str]] = {}
    with TokenClient(softhsm_module(), token_env) as token:
        keeper = token.open_login(LABEL, PIN)
        key = token.aes_key(keeper)  # session keys live while their session does: one session keeps it
        iv, sealed = token.encrypt(keeper, key, b"k" * 32, aad=b"hdr")
        cases: dict[str, Callable[[int], str]] = {
            "bad GCM tag": lambda sid: token.result("decrypt", sid, key, sealed[:-1] + b"\0", iv, b"hdr"),
            "wrong AAD": lambda sid: token.result("decrypt", sid, key, sealed, iv, b"other"),
            "shorter than the tag": lambda sid: token.result("decrypt", sid, key, sealed[:5], iv, b"hdr"),
            "empty ciphertext": lambda sid: token.result("decrypt", sid, key, b"", iv, b"hdr"),
            "C_DecryptInit, no C_Decrypt": lambda sid: token.result("decrypt_init", sid, key),
        }
        for name, fail in cases.items():
            sid = token.open_login(LABEL, PIN)
            row = {"rv": fail(sid)}
            row["next decrypt"] = token.result("decrypt", sid, key, sealed, iv, b"hdr")
            row["next encrypt"] = token.result("encrypt", sid, key, b"k")
            row["logged in"] = str(token.call("session_info", sid)["state"] == CKS_RO_USER_FUNCTIONS)
            row["C_CloseSession"] = token.result("close", sid)
            fresh = token.open_login(LABEL, PIN)
            row["new session"] = token.result("decrypt", fresh, key, sealed, iv, b"hdr")
            token.call("close", fresh)
            rows[name] = row
    columns = ["rv", "next decrypt", "next encrypt", "logged in", "C_CloseSession", "new session"]
    print("\nSoftHSM 2.6 after a failed AES-GCM decrypt (same session unless said):")
    print(f"  {'case':30}" + "".join(f"{c:22}" for c in columns))
    for name, row in rows.items():
        print(f"  {name:30}" + "".join(f"{row[c]:22}" for c in columns))
    # What the broker may rely on: an authentication failure ends the operation and keeps the session
    # and the login; CKR_GENERAL_ERROR is what SoftHSM says for it.
    for name in ("bad GCM tag", "wrong AAD", "shorter than the tag"):
        assert rows[name] == {"rv": "CKR_GENERAL_ERROR", "next decrypt": "OK", "next encrypt": "OK",
                              "logged in": "True", "C_CloseSession": "OK", "new session": "OK"}, (name, rows[name])
    # And what it must not: a refused call may leave the operation active, blocking every other
    # operation of the session (SoftHSM has one operation per session) until C_CloseSession.
    for name in ("empty ciphertext", "C_DecryptInit, no C_Decrypt"):
        assert rows[name]["next decrypt"] == rows[name]["next encrypt"] == "CKR_OPERATION_ACTIVE", rows[name]
        assert rows[name]["logged in"] == "True" and rows[name]["new session"] == "OK", rows[name]
    assert rows["empty ciphertext"]["rv"] == "CKR_ARGUMENTS_BAD"


# ---------------------------------------------------------------------------------------------------------
# The p11-kit remote token


@pytest.fixture(scope="module")
def remote() -> Iterator[RemoteToken]:
    root = short_tmp_dir()
    token = RemoteToken.create(root, token_label=LABEL, pin=PIN, so_pin=SO_PIN)
    with token:
        yield token
    shutil.rmtree(root, ignore_errors=True)


def p11_kit_version() -> str:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "p11-kit-modules"], capture_output=True,
                            text=True, check=False)
    return result.stdout.strip() or "unknown"


def test_remote_token_serves_and_forwards_some_mechanisms(remote: RemoteToken) -> None:
    with TokenClient(client_module(), remote.client_env()) as client:
        assert client.slots() == [(client.slot_of(LABEL), LABEL)]
        probe = client.call("probe", client.slot_of(LABEL), PIN)
        sid = client.open_login(LABEL, PIN)
        assert client.call("session_info", sid)["state"] == CKS_RO_USER_FUNCTIONS
        assert len(remote.connections()) >= 1  # a p11-kit-remote child serves this client
    with TokenClient(softhsm_module(), remote.module_env) as direct:
        direct_probe = direct.call("probe", direct.slot_of(LABEL), PIN)
    listed = probe.pop("_listed")["names"]
    direct_listed = direct_probe.pop("_listed")["names"]
    version = p11_kit_version()
    print(f"\np11-kit {version} client -> server -> SoftHSM: {len(listed)} of SoftHSM's {len(direct_listed)} "
          f"mechanisms listed; not listed: {sorted(set(direct_listed) - set(listed))}")
    print(f"  {'mechanism':28}{'listed':8}{'real call':26}{'same call on SoftHSM directly'}")
    for name, row in probe.items():
        print(f"  {name:28}{row['listed']!s:8}{row['call']:26}{direct_probe[name]['call']}")
    assert set(listed) <= set(direct_listed)
    assert probe["CKM_AES_KEY_GEN"]["call"] == probe["CKM_AES_ECB"]["call"] == "OK"
    assert probe["CKM_RSA_PKCS_OAEP"]["call"] == "OK"
    assert direct_probe["CKM_AES_GCM"]["call"] == "OK"
    for name, row in probe.items():
        if not row["listed"]:
            assert row["call"] == "CKR_MECHANISM_INVALID", (name, row)
    if version.startswith("0.24."):  # bookworm: no GCM parameters in the RPC (0.25 added them)
        assert probe["CKM_AES_GCM"] == {"listed": False, "call": "CKR_MECHANISM_INVALID"}


def test_remote_token_kill_and_restart(remote: RemoteToken) -> None:
    with TokenClient(client_module(), remote.client_env()) as client:
        sid = client.open_login(LABEL, PIN)
        assert client.result("random", sid, 8) == "OK"
        [serving] = [pid for pid in remote.connections() if Path(f"/proc/{pid}/cmdline").read_bytes()]

        # The listening server alone: the existing connection goes on being served.
        remote.kill_server_only()
        assert client.result("random", sid, 8) == "OK"
        assert serving in remote.connections()
        with TokenClient(client_module(), remote.client_env()) as late:
            assert late.slots() == []  # no server: C_Initialize succeeds, with no slot

        # Server and connections: CKR_DEVICE_ERROR, even once a new server listens on the same socket.
        killed = remote.kill()
        assert serving in killed and remote.connections() == []
        assert client.result("random", sid, 8) == "CKR_DEVICE_ERROR"
        remote.start()
        assert client.result("random", sid, 8) == "CKR_DEVICE_ERROR"
        assert client.result("slots") in {"OK", "CKR_DEVICE_ERROR"}

        # Only C_Finalize + C_Initialize connect again; the login is gone with the old connection.
        assert client.result("finalize") == "OK"
        assert client.result("initialize") == "OK"
        sid = client.open_login(LABEL, PIN)
        assert client.result("random", sid, 8) == "OK"

        # restart(): the same, in one call.
        remote.restart()
        assert client.result("random", sid, 8) == "CKR_DEVICE_ERROR"
