"""`keysealer doctor` on a real SoftHSM token made by `keysealer dev`'s setup (no broker running): a
healthy setup passes every check; each broken piece fails its own check, with a fix, and skips what needs it."""

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from harness import Plugin, created_key_id, short_tmp_dir

CHECKS = ["pin file", "broker config", "broker key", "client keys", "ipc socket dir", "frontend config",
          "frontend key", "broker pub key", "kms socket dir", "ipc socket", "module", "cryptoki", "slots", "token",
          "mechanisms", "login", "keys", "current key", "wrap/unwrap"]
LINE = re.compile(r"^(PASS|WARN|FAIL|SKIP)  (.{16}) (.*)$")


@pytest.fixture
def setup() -> Iterator[Plugin]:
    plugin = Plugin(short_tmp_dir())
    yield plugin
    shutil.rmtree(plugin.layout.root, ignore_errors=True)


def doctor(plugin: Plugin, *extra: str) -> tuple[int, dict[str, tuple[str, str]], str]:
    """Exit code, {check: (verdict, rest of its line)} and the whole output; no secret ever in it."""
    result = subprocess.run(["keysealer", "doctor", "--config", str(plugin.layout.broker_config),
                             "--frontend-config", str(plugin.layout.frontend_config), *extra],
                            capture_output=True, text=True, timeout=120, check=False)
    output = result.stdout + result.stderr
    for secret in plugin.secrets:
        assert secret.decode(errors="replace") not in output, "a secret appears in the doctor's output"
    checks = {}
    for line in result.stdout.splitlines():
        if found := LINE.match(line):
            checks[found.group(2).rstrip()] = (found.group(1), found.group(3))
    return result.returncode, checks, output


def verdicts(checks: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {name: verdict for name, (verdict, _) in checks.items()}


def token_session(plugin: Plugin) -> Any:
    """A logged-in R/W session on the plugin's token, opened as `keysealer keys` opens one."""
    from keysealer.hsm_broker.config import load_broker_config
    from keysealer.hsm_broker.pin import read_pin
    from keysealer.hsm_broker.token import find_slot, load_module, open_user_session

    config = load_broker_config(plugin.layout.broker_config)
    lib = load_module(config.token)
    return open_user_session(lib, find_slot(lib, config.token), read_pin(config.token.pin_file), rw=True)


def test_a_healthy_setup_passes_every_check(setup: Plugin) -> None:
    code, checks, output = doctor(setup)
    assert code == 0, output
    assert list(checks) == CHECKS, output
    assert set(verdicts(checks).values()) == {"PASS"}, output
    assert "Cryptoki 2.40: SoftHSM" in checks["cryptoki"][1]
    assert "'keysealer-dev'" in checks["token"][1]
    assert "aes-gcm" in checks["mechanisms"][1]
    key_id = setup.keys("list").stdout.splitlines()[1].split()[0]
    protection = "generated in the token, sensitive, non-extractable"
    assert checks["current key"][1].startswith(f"{key_id} (aes-gcm): {protection}")
    assert key_id in checks["wrap/unwrap"][1]
    assert f"{key_id}  'keysealer-kek'  aes-gcm" in output  # the key list under "keys"


def test_a_wrong_pin_fails_login_with_a_fix_and_never_shows_a_pin(setup: Plugin) -> None:
    wrong = "0123456789abcdef0123456789abcdef"
    setup.secrets.add(wrong.encode())
    setup.layout.pin.write_text(wrong + "\n")
    code, checks, output = doctor(setup)
    assert code == 1, output
    verdict, line = checks["login"]
    assert verdict == "FAIL", output
    assert "CKR_PIN_INCORRECT" in line and f"-> fix: write the token's user PIN to {setup.layout.pin}" in line
    assert verdicts(checks)["pin file"] == "PASS"
    assert {verdicts(checks)[name] for name in ("keys", "current key", "wrap/unwrap")} == {"SKIP"}
    assert "skipped: needs login, which did not pass" in checks["keys"][1]


def test_a_pin_file_others_can_read_fails_with_the_chmod_fix(setup: Plugin) -> None:
    setup.layout.pin.chmod(0o644)
    code, checks, output = doctor(setup)
    assert code == 1, output
    assert checks["pin file"] == (
        "FAIL", f"{setup.layout.pin} is mode 0644: other users can read the PIN -> fix: chmod 600 {setup.layout.pin}")
    assert verdicts(checks)["login"] == "SKIP"
    assert verdicts(checks)["mechanisms"] == "PASS"  # checks that do not need the PIN still run


def test_loose_socket_directory_mode_fails(setup: Plugin) -> None:
    setup.layout.broker_socket.parent.mkdir(mode=0o755)
    setup.layout.broker_socket.parent.chmod(0o755)
    code, checks, output = doctor(setup)
    assert code == 1, output
    assert checks["ipc socket dir"][1].endswith(f"-> fix: chmod 750 {setup.layout.broker_socket.parent}")
    assert verdicts(checks)["wrap/unwrap"] == "PASS"


@pytest.mark.skipif(os.geteuid() != 0, reason="as another user doctor reports the mode as a FAIL instead")
def test_root_doctor_refuses_a_config_others_can_write(setup: Plugin) -> None:
    """Doctor as root loads the module the config names: a config others can write is not read at all."""
    setup.layout.broker_config.chmod(0o664)
    result = subprocess.run(["keysealer", "doctor", "--config", str(setup.layout.broker_config)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr == (f"keysealer: error: config {setup.layout.broker_config}: mode 0664 lets others "
                             "write it; refusing to use it\n")


def test_no_key_with_the_current_label_fails_the_current_key(setup: Plugin) -> None:
    setup.configure(broker={"keys": {"current_label": "not-there"}})
    code, checks, output = doctor(setup)
    assert code == 1, output
    assert checks["current key"] == ("FAIL", "no usable key labelled 'not-there' in the token -> fix: keysealer "
                                     f"keys create --config {setup.layout.broker_config}")
    assert verdicts(checks)["keys"] == "PASS"  # the other key is still listed
    assert verdicts(checks)["wrap/unwrap"] == "SKIP"


def test_a_wrong_token_label_fails_naming_the_tokens_found(setup: Plugin) -> None:
    setup.configure(broker={"token": {"token_label": "no-such-token"}})
    code, checks, output = doctor(setup)
    assert code == 1, output
    verdict, line = checks["token"]
    assert verdict == "FAIL"
    assert line.startswith("no token labelled 'no-such-token'; tokens found: 'keysealer-dev' (slot ")
    assert "-> fix: set token.token_label" in line
    assert {verdicts(checks)[n] for n in ("mechanisms", "login", "keys", "current key", "wrap/unwrap")} == {"SKIP"}


def test_a_retired_current_key_fails_with_the_rotate_fix(setup: Plugin) -> None:
    key_id = setup.keys("list").stdout.splitlines()[1].split()[0]
    setup.keys("retire", key_id, "--force")
    code, checks, output = doctor(setup)
    assert code == 1, output
    assert checks["current key"] == (
        "FAIL", f"the newest key labelled 'keysealer-kek', {key_id}, is retired: nothing can be encrypted "
        f"-> fix: keysealer keys rotate --config {setup.layout.broker_config}")
    assert f"{key_id}  'keysealer-kek'  aes-gcm" in output and "retired" in output


def test_an_unusable_old_key_and_an_imported_key_only_warn(setup: Plugin) -> None:
    import PyKCS11

    from keysealer.hsm_broker.key_naming import new_token_object_id
    from keysealer.hsm_broker.token import find_keys

    current = setup.keys("list").stdout.splitlines()[1].split()[0]
    # Another label: a decrypt-only key whatever the creation seconds (versions of one label created in
    # the same second are ordered by their random ids).
    other = created_key_id(setup.keys("create", "--label", "older-kek").stdout)
    session = token_session(setup)
    handle = next(k for k in find_keys(session) if k.identity.key_id == other).objects.main
    session.setAttributeValue(handle, [(PyKCS11.CKA_ENCRYPT, False)])  # it can no longer seal
    session.createObject([  # a key whose value someone knows: the broker must ignore it
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY), (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
        (PyKCS11.CKA_TOKEN, True), (PyKCS11.CKA_ENCRYPT, True), (PyKCS11.CKA_DECRYPT, True),
        (PyKCS11.CKA_LABEL, "keysealer-kek"), (PyKCS11.CKA_ID, new_token_object_id()),
        (PyKCS11.CKA_VALUE, bytes(32)),
    ])
    code, checks, output = doctor(setup)
    assert code == 0, output
    assert checks["keys"][0] == "WARN", output
    assert "objects with KeySealer's CKA_ID that the broker ignores: 1" in checks["keys"][1]
    assert "it was not generated in the token as a non-extractable key" in output
    assert checks["current key"][0] == "PASS" and checks["current key"][1].startswith(current)
    assert checks["wrap/unwrap"][0] == "WARN", output
    assert f"{other}: token error CKR_KEY_FUNCTION_NOT_PERMITTED" in output


def test_a_file_that_is_no_module_fails_and_skips_every_token_check(setup: Plugin) -> None:
    fake = setup.layout.root / "libnotamodule.so"
    fake.write_text("not a shared object\n")
    setup.configure(broker={"token": {"module": str(fake)}})
    code, checks, output = doctor(setup)
    assert code == 1, output
    verdict, line = checks["module"]
    assert verdict == "FAIL" and line.startswith("cannot load PKCS #11 module libnotamodule.so") and "-> fix:" in line
    assert {verdicts(checks)[n] for n in CHECKS[CHECKS.index("cryptoki"):]} == {"SKIP"}
    assert verdicts(checks)["pin file"] == "PASS"


@pytest.mark.parametrize(("content", "message"), [
    ("token: [unclosed\n", "not valid YAML at line"),
    (None, "token.module: no such file: /nonexistent/libpkcs11.so"),
])
def test_a_bad_config_is_one_line_and_exit_2(setup: Plugin, content: str | None, message: str) -> None:
    if content is None:
        setup.configure(broker={"token": {"module": "/nonexistent/libpkcs11.so"}})
    else:
        setup.layout.broker_config.write_text(content)
    result = subprocess.run(["keysealer", "doctor", "--config", str(setup.layout.broker_config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("keysealer: error: ")
    assert message in result.stderr
