"""Config loading (keysealer.hsm_broker.config, keysealer.frontend.config) and the operator-error contract of
the console scripts: a bad config is one line on stderr naming the file and the field, exit code 2, never a
traceback.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from keysealer.frontend.config import FrontendConfig, load_frontend_config
from keysealer.hsm_broker.config import BrokerConfig, load_broker_config
from keysealer.shared.config_loader import ConfigError

SOFTHSM_LIB = Path("/usr/lib/softhsm/libsofthsm2.so")
_DELETE = object()


def broker_data(tmp_path: Path) -> dict[str, Any]:
    module = tmp_path / "module.so"
    module.write_bytes(b"")
    return {
        "token": {"module": str(module), "pin_file": str(tmp_path / "pin"), "token_label": "keysealer"},
        "keys": {"current_label": "kek"},
        "ipc": {
            "socket": str(tmp_path / "broker.sock"),
            "server_key": str(tmp_path / "broker.key_secret"),
            "client_keys": [str(tmp_path / "frontend.key")],
        },
    }


def frontend_data(tmp_path: Path) -> dict[str, Any]:
    return {
        "listen": {"socket": str(tmp_path / "kms.sock")},
        "broker": {
            "socket": str(tmp_path / "broker.sock"),
            "client_key": str(tmp_path / "frontend.key_secret"),
            "server_key": str(tmp_path / "broker.key"),
        },
    }


def edited(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of data with the dotted field set to value (or removed, for _DELETE)."""
    result = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = result
    for name in parents:
        node = node.setdefault(name, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return result


def write(tmp_path: Path, data: Any, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def config_error(load: Any, path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message, message
    return message


# --- good configs ------------------------------------------------------------------------------------

def test_good_broker_config_loads_with_defaults(tmp_path: Path) -> None:
    config = load_broker_config(write(tmp_path, broker_data(tmp_path)))
    assert isinstance(config, BrokerConfig)
    assert config.token.module == tmp_path / "module.so"
    assert config.token.pin_file == tmp_path / "pin"
    assert config.token.token_label == "keysealer"
    assert config.token.slot is None
    assert config.token.module_env == {}
    assert config.keys.current_label == "kek"
    assert config.ipc.socket == tmp_path / "broker.sock"
    assert config.ipc.server_key == tmp_path / "broker.key_secret"
    assert config.ipc.client_keys == [tmp_path / "frontend.key"]
    assert config.ipc.frontend_user is None
    assert config.ipc.group is None
    assert config.workers.count == 2
    assert config.workers.queue_limit == 1024
    assert config.sandbox.allow_inet is False


def test_broker_config_with_every_field_set(tmp_path: Path) -> None:
    data = broker_data(tmp_path)
    del data["token"]["token_label"]
    data["token"].update(slot=0, module_env={"SOFTHSM2_CONF": "/etc/softhsm2.conf"})
    data["ipc"].update(group="keysealer", frontend_user="kms", client_keys=["/a.key", "/b.key"])
    data["workers"] = {"count": 64, "queue_limit": 1}
    data["sandbox"] = {"allow_inet": True}
    config = load_broker_config(write(tmp_path, data))
    assert config.ipc.client_keys == [Path("/a.key"), Path("/b.key")]
    assert config.ipc.frontend_user == "kms"
    assert config.sandbox.allow_inet is True
    assert config.token.slot == 0
    assert config.token.token_label is None
    assert config.token.module_env == {"SOFTHSM2_CONF": "/etc/softhsm2.conf"}
    assert config.ipc.group == "keysealer"
    assert (config.workers.count, config.workers.queue_limit) == (64, 1)


def test_good_frontend_config_loads_with_defaults(tmp_path: Path) -> None:
    config = load_frontend_config(write(tmp_path, frontend_data(tmp_path)))
    assert isinstance(config, FrontendConfig)
    assert config.listen.socket == tmp_path / "kms.sock"
    assert config.listen.mode == "0600"
    assert config.listen.group is None
    assert config.broker.socket == tmp_path / "broker.sock"
    assert config.broker.client_key == tmp_path / "frontend.key_secret"
    assert config.broker.server_key == tmp_path / "broker.key"
    assert config.limits.call_timeout_seconds == 2.5
    assert config.limits.max_in_flight == 512
    assert config.health.probe_interval_seconds == 5.0
    assert config.health.max_age_seconds == 30.0


def test_frontend_mode_0660_with_group_loads(tmp_path: Path) -> None:
    data = edited(edited(frontend_data(tmp_path), "listen.mode", "0660"), "listen.group", "kube")
    config = load_frontend_config(write(tmp_path, data))
    assert (config.listen.mode, config.listen.group) == ("0660", "kube")


def test_frontend_float_field_takes_an_integer(tmp_path: Path) -> None:
    config = load_frontend_config(write(tmp_path, edited(frontend_data(tmp_path), "limits.call_timeout_seconds", 1)))
    assert config.limits.call_timeout_seconds == 1.0
    assert type(config.limits.call_timeout_seconds) is float


# --- file-level errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("load", [load_broker_config, load_frontend_config])
def test_missing_file(tmp_path: Path, load: Any) -> None:
    message = config_error(load, tmp_path / "absent.yaml")
    assert "cannot read" in message


@pytest.mark.parametrize("load", [load_broker_config, load_frontend_config])
def test_directory_instead_of_file(tmp_path: Path, load: Any) -> None:
    assert "cannot read" in config_error(load, tmp_path)


@pytest.mark.parametrize("load", [load_broker_config, load_frontend_config])
@pytest.mark.parametrize("text", ["token: [unclosed\n", "a: b: c\n", "\tkeys: x\n", "key: 'unterminated\n"])
def test_invalid_yaml(tmp_path: Path, load: Any, text: str) -> None:
    assert "not valid YAML" in config_error(load, write(tmp_path, text))


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    message = config_error(load_broker_config, write(tmp_path, "token:\n  module: x\nkeys: [\n"))
    assert "line" in message


@pytest.mark.parametrize("load", [load_broker_config, load_frontend_config])
@pytest.mark.parametrize("text", ["- token\n- keys\n", "just a string\n", "42\n"])
def test_top_level_not_a_mapping(tmp_path: Path, load: Any, text: str) -> None:
    assert "top level: must be a mapping" in config_error(load, write(tmp_path, text))


@pytest.mark.parametrize(("load", "first_required"), [(load_broker_config, "token"), (load_frontend_config, "listen")])
def test_empty_file_reports_the_first_missing_field(tmp_path: Path, load: Any, first_required: str) -> None:
    assert f"{first_required}: missing required field" in config_error(load, write(tmp_path, ""))


# --- field errors: broker --------------------------------------------------------------------------------

BROKER_ERRORS = [
    # (dotted field, value, what the message must say)
    ("tokens", {}, "tokens: unknown field"),
    ("workers.cuont", 2, "workers.cuont: unknown field"),
    ("token.modul", "/x", "token.modul: unknown field"),
    ("keys.current_label", {"x": 1}, "keys.current_label: must be a string, not a mapping"),
    ("workers.count", "two", "workers.count: must be an integer, not a string"),
    ("workers.count", True, "workers.count: must be an integer, not true or false"),
    ("workers.count", 1.5, "workers.count: must be an integer, not a number"),
    ("workers.count", None, "workers.count: must be an integer"),
    ("workers.count", 0, "workers.count: must be at least 1"),
    ("workers.count", -3, "workers.count: must be at least 1"),
    ("workers.count", 65, "workers.count: must be at most 64"),
    ("workers.queue_limit", 0, "workers.queue_limit: must be at least 1"),
    ("workers.queue_limit", False, "workers.queue_limit: must be an integer"),
    ("workers", None, "workers: must be a mapping"),
    ("workers", [1], "workers: must be a mapping"),
    ("token", "softhsm", "token: must be a mapping"),
    ("token.token_label", 5, "token.token_label: must be a string"),
    ("token.module", "", "token.module: must be a path"),
    ("token.module", 7, "token.module: must be a path"),
    ("token.module_env", ["A=1"], "token.module_env: must be a mapping"),
    ("token.module_env", {"A": 1}, "token.module_env.A: must be a string"),
    ("token.module_env", {"A": True}, "token.module_env.A: must be a string"),
    ("ipc.group", 1000, "ipc.group: must be a string"),
    ("ipc.socket", None, "ipc.socket: must be a path"),
    ("token", _DELETE, "token: missing required field"),
    ("token.module", _DELETE, "token.module: missing required field"),
    ("token.pin_file", _DELETE, "token.pin_file: missing required field"),
    ("keys.current_label", _DELETE, "keys.current_label: missing required field"),
    ("ipc.socket", _DELETE, "ipc.socket: missing required field"),
    ("ipc.server_key", _DELETE, "ipc.server_key: missing required field"),
    ("ipc.client_keys", _DELETE, "ipc.client_keys: missing required field"),
    ("ipc.client_keys", [], "ipc.client_keys: list at least one frontend public key"),
    ("ipc.client_keys", "/a.key", "ipc.client_keys: must be a list"),
    ("ipc.client_keys", ["/a.key", 3], "ipc.client_keys[1]: must be a path"),
    ("ipc.client_keys", [""], "ipc.client_keys[0]: must be a path"),
    ("ipc.frontend_user", 1000, "ipc.frontend_user: must be a string"),
    ("sandbox.allow_inet", "yes", "sandbox.allow_inet: must be true or false, not a string"),
    ("sandbox.allow_inet", 1, "sandbox.allow_inet: must be true or false, not an integer"),
    ("sandbox.allow_net", True, "sandbox.allow_net: unknown field"),
    ("keys.current_label", "", "keys.current_label: must not be empty"),
    ("token.slot", 0, "token: set exactly one of token_label and slot"),  # both
    ("token.token_label", _DELETE, "token: set exactly one of token_label and slot"),  # neither
    ("groups", "pkcs11", "groups: must be a list"),
    ("groups", ["no-such-group-ks"], "groups: no such group: 'no-such-group-ks'"),
]


@pytest.mark.parametrize(("field", "value", "expected"), BROKER_ERRORS, ids=lambda x: x if isinstance(x, str) else "")
def test_broker_config_error(tmp_path: Path, field: str, value: Any, expected: str) -> None:
    data = edited(broker_data(tmp_path), field, value)
    assert expected in config_error(load_broker_config, write(tmp_path, data))


def test_broker_groups_name_existing_groups(tmp_path: Path) -> None:
    data = edited(broker_data(tmp_path), "groups", ["daemon"])
    assert load_broker_config(write(tmp_path, data)).groups == ["daemon"]


def test_broker_slot_must_not_be_a_bool(tmp_path: Path) -> None:
    data = edited(edited(broker_data(tmp_path), "token.token_label", _DELETE), "token.slot", True)
    assert "token.slot: must be an integer" in config_error(load_broker_config, write(tmp_path, data))


def test_broker_slot_alone_loads(tmp_path: Path) -> None:
    data = edited(edited(broker_data(tmp_path), "token.token_label", _DELETE), "token.slot", 3)
    assert load_broker_config(write(tmp_path, data)).token.slot == 3


@pytest.mark.parametrize("module", ["missing.so", "."])
def test_broker_module_that_is_not_a_file(tmp_path: Path, module: str) -> None:
    data = edited(broker_data(tmp_path), "token.module", str(tmp_path / module))
    message = config_error(load_broker_config, write(tmp_path, data))
    assert "token.module: no such file" in message


# --- field errors: frontend ------------------------------------------------------------------------------

FRONTEND_ERRORS = [
    ("listen.mode", "0777", "listen.mode: must be one of 0600, 0660"),
    ("listen.mode", "600", "listen.mode: must be one of 0600, 0660"),
    ("listen.mode", "0660", "listen.group: required when listen.mode is 0660"),
    ("listen.mode", 0o600, "listen.mode: must be a string"),
    ("listen.sockt", "/x", "listen.sockt: unknown field"),
    ("limits.max_inflight", 5, "limits.max_inflight: unknown field"),
    ("broker", _DELETE, "broker: missing required field"),
    ("listen.socket", _DELETE, "listen.socket: missing required field"),
    ("broker.client_key", _DELETE, "broker.client_key: missing required field"),
    ("broker.server_key", _DELETE, "broker.server_key: missing required field"),
    ("broker.server_key", ["/b.key"], "broker.server_key: must be a path"),
    ("limits.call_timeout_seconds", "fast", "limits.call_timeout_seconds: must be a number, not a string"),
    ("limits.call_timeout_seconds", True, "limits.call_timeout_seconds: must be a number, not true or false"),
    ("limits.call_timeout_seconds", 0, "limits.call_timeout_seconds: must be at least 0.05"),
    ("limits.call_timeout_seconds", 61, "limits.call_timeout_seconds: must be at most 60"),
    ("limits.call_timeout_seconds", float("inf"), "limits.call_timeout_seconds: must be a finite number"),
    ("limits.max_in_flight", 0, "limits.max_in_flight: must be at least 1"),
    ("limits.max_in_flight", 2.0, "limits.max_in_flight: must be an integer"),
    ("health.probe_interval_seconds", 1000, "health.probe_interval_seconds: must be at most 300"),
    ("health.max_age_seconds", 0.5, "health.max_age_seconds: must be at least 1"),
    ("listen.group", 33, "listen.group: must be a string"),
]


@pytest.mark.parametrize(("field", "value", "expected"), FRONTEND_ERRORS, ids=lambda x: x if isinstance(x, str) else "")
def test_frontend_config_error(tmp_path: Path, field: str, value: Any, expected: str) -> None:
    data = edited(frontend_data(tmp_path), field, value)
    assert expected in config_error(load_frontend_config, write(tmp_path, data))


def test_frontend_unquoted_yaml_mode_is_refused(tmp_path: Path) -> None:
    # YAML 1.1 reads an unquoted 0660 as the octal integer 432: refused rather than misread.
    data = edited(frontend_data(tmp_path), "listen", _DELETE)
    text = yaml.safe_dump(data) + f"listen:\n  socket: {tmp_path}/kms.sock\n  mode: 0660\n  group: kube\n"
    assert "listen.mode: must be a string" in config_error(load_frontend_config, write(tmp_path, text))


@pytest.mark.parametrize("field", ["limits.call_timeout_seconds", "health.probe_interval_seconds",
                                   "health.max_age_seconds"])
def test_frontend_nan_is_refused(tmp_path: Path, field: str) -> None:
    section, name = field.split(".")
    text = yaml.safe_dump(frontend_data(tmp_path)) + f"{section}:\n  {name}: .nan\n"
    assert f"{field}: must be a finite number" in config_error(load_frontend_config, write(tmp_path, text))


def test_unknown_field_with_a_newline_stays_one_line(tmp_path: Path) -> None:
    text = yaml.safe_dump(frontend_data(tmp_path)) + '"evil\\nline": 1\n'
    config_error(load_frontend_config, write(tmp_path, text))


# --- the console scripts' contract -------------------------------------------------------------------------

def console_script(name: str) -> str:
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    assert found, f"console script {name} is not installed"
    return found


def run_script(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run([console_script(argv[0]), *argv[1:]], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=60, check=False)


def assert_one_line_usage_error(result: subprocess.CompletedProcess[str], program: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stderr == lines[0] + "\n"
    assert lines[0].startswith(f"{program}: error: "), lines[0]
    assert result.stdout == ""
    return lines[0]


COMMANDS = [
    ("keysealer-broker", ["keysealer-broker", "--config"]),
    ("keysealer-frontend", ["keysealer-frontend", "--config"]),
    ("keysealer", ["keysealer", "keys", "list", "--config"]),
]


def bad_config(tmp_path: Path, program: str, bad: str) -> tuple[Path, str]:
    """Write a bad config for program; return its path and the field its error must name."""
    path = tmp_path / "bad.yaml"
    if bad == "missing":
        return path, "cannot read config"
    if bad == "invalid-yaml":
        path.write_text("token: [unclosed\n", encoding="utf-8")
        return path, "not valid YAML"
    # Otherwise good, with one misspelt nested field.
    if program == "keysealer-frontend":
        write(tmp_path, edited(frontend_data(tmp_path), "limits.max_inflight", 5), path.name)
        return path, "limits.max_inflight: unknown field"
    write(tmp_path, edited(broker_data(tmp_path), "workers.cuont", 2), path.name)
    return path, "workers.cuont: unknown field"


@pytest.mark.parametrize(("program", "argv"), COMMANDS, ids=[" ".join(c[1][:-1]) for c in COMMANDS])
@pytest.mark.parametrize("bad", ["missing", "invalid-yaml", "unknown-nested"])
def test_cli_bad_config_is_one_line_and_exit_2(tmp_path: Path, program: str, argv: list[str], bad: str) -> None:
    path, expected = bad_config(tmp_path, program, bad)
    line = assert_one_line_usage_error(run_script([*argv, str(path)], tmp_path), program)
    assert line.startswith(f"{program}: error: {path}: ")
    assert expected in line


@pytest.mark.skipif(not SOFTHSM_LIB.is_file(), reason="SoftHSM is not installed")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_cli_keys_list_refuses_a_pin_file_others_can_read(tmp_path: Path, mode: int) -> None:
    pin = tmp_path / "token.pin"
    secret = "s3cret-PIN-value"
    pin.write_text(secret + "\n", encoding="utf-8")
    pin.chmod(mode)
    data = edited(broker_data(tmp_path), "token.module", str(SOFTHSM_LIB))
    data["token"]["pin_file"] = str(pin)
    config = write(tmp_path, data)
    line = assert_one_line_usage_error(run_script(["keysealer", "keys", "list", "--config", str(config)], tmp_path),
                                       "keysealer")
    assert f"PIN file {pin}" in line
    assert f"{mode:04o}" in line
    assert "others read it" in line
    assert secret not in line
