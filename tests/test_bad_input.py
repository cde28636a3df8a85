"""The one-line contract under attack: every entry point, given a file or value meant to hang it, exhaust its
memory, crash its parser or slip past its checks, answers one line on stderr and exit code 2, at once.

Each case runs the real console script as a subprocess; the subprocess timeout makes a hang fail the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import short_tmp_dir
from test_config_validation import console_script

from keysealer.shared.ipc_keys import PUBLIC_SUFFIX, SECRET_SUFFIX
from keysealer.tools.dev import DevLayout, prepare

# Far above what a refusal takes; a hang or a read of /dev/zero runs into it.
HANG_SECONDS = 30


@dataclass(frozen=True)
class Setup:
    """A prepared dev layout (token, PIN, CURVE keys, both configs) and a scratch directory per case."""

    layout: DevLayout
    scratch: Path

    def fifo(self, name: str = "fifo") -> Path:
        path = self.scratch / name
        os.mkfifo(path, 0o600)
        return path

    def file(self, name: str, content: bytes) -> Path:
        path = self.scratch / name
        path.write_bytes(content)
        path.chmod(0o600)
        return path

    def broker(self, section: str | None = None, field: str | None = None, value: Any = None) -> Path:
        return self._edited(self.layout.broker_config, "broker.yaml", section, field, value)

    def frontend(self, section: str | None = None, field: str | None = None, value: Any = None) -> Path:
        return self._edited(self.layout.frontend_config, "frontend.yaml", section, field, value)

    def _edited(self, source: Path, name: str, section: str | None, field: str | None, value: Any) -> Path:
        data = yaml.safe_load(source.read_text())
        if section is not None and field is not None:
            data[section][field] = value
        path = self.scratch / name
        path.write_text(yaml.safe_dump(data))
        return path


@pytest.fixture(scope="module")
def prepared() -> Iterator[DevLayout]:
    root = short_tmp_dir()
    layout = DevLayout(root)
    prepare(layout)
    yield layout
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def setup(prepared: DevLayout) -> Iterator[Setup]:
    scratch = short_tmp_dir()
    yield Setup(prepared, scratch)
    shutil.rmtree(scratch, ignore_errors=True)


# -- bad configs, for every command that reads one ---------------------------------------------------------

def _nested(setup: Setup) -> Path:
    return setup.file("c.yaml", b"token: " + b"[" * 5000 + b"]" * 5000 + b"\n")


def _not_utf8(setup: Setup) -> Path:
    return setup.file("c.yaml", b"token:\n  token_label: \xff\xfe\n")


def _huge(setup: Setup) -> Path:
    return setup.file("c.yaml", b"# " + b"x" * (50 * 1024 * 1024) + b"\n")


def _duplicate_top(setup: Setup) -> Path:
    path = setup.broker()
    path.write_text(path.read_text() + "user: nobody\nuser: root\n")
    return path


def _duplicate_nested(setup: Setup) -> Path:
    path = setup.broker()
    path.write_text(path.read_text() + "workers:\n  count: 1\n  count: 2\n")
    return path


CONFIGS: dict[str, Callable[[Setup], Path]] = {
    "nested-yaml": _nested,
    "invalid-utf8": _not_utf8,
    "dev-zero": lambda setup: Path("/dev/zero"),
    "fifo": lambda setup: setup.fifo(),
    "50-MB": _huge,
    "procfs": lambda setup: Path("/proc/self/environ"),
    "duplicate-key": _duplicate_top,
    "duplicate-nested-key": _duplicate_nested,
}
CONFIG_COMMANDS: dict[str, list[str]] = {
    "broker": ["keysealer-broker", "--config"],
    "frontend": ["keysealer-frontend", "--config"],
    "keys-list": ["keysealer", "keys", "list", "--config"],
    "keys-init-token": ["keysealer", "keys", "init-token", "--so-pin-file", "/nonexistent", "--config"],
    "doctor": ["keysealer", "doctor", "--config"],
}


# -- bad files named by a good config ----------------------------------------------------------------------

def _broker_fifo(section: str, field: str, as_list: bool = False) -> Callable[[Setup], list[str]]:
    def argv(setup: Setup) -> list[str]:
        fifo = str(setup.fifo())
        return ["keysealer-broker", "--config", str(setup.broker(section, field, [fifo] if as_list else fifo))]
    return argv


def _with_pin(command: list[str], pin: Callable[[Setup], Path]) -> Callable[[Setup], list[str]]:
    def argv(setup: Setup) -> list[str]:
        return [*command, str(setup.broker("token", "pin_file", str(pin(setup))))]
    return argv


def _frontend_file(field: str, target: Callable[[Setup], Path]) -> Callable[[Setup], list[str]]:
    def argv(setup: Setup) -> list[str]:
        return ["keysealer-frontend", "--config", str(setup.frontend("broker", field, str(target(setup))))]
    return argv


def _module_that_does_not_load(setup: Setup) -> list[str]:
    module = setup.file("module.so", b"not a shared library")
    so_pin = setup.file("so.pin", b"123456\n")
    config = setup.broker("token", "module", str(module))
    return ["keysealer", "keys", "init-token", "--so-pin-file", str(so_pin), "--config", str(config)]


def _doctor_frontend(target: Callable[[Setup], Path]) -> Callable[[Setup], list[str]]:
    def argv(setup: Setup) -> list[str]:
        return ["keysealer", "doctor", "--config", str(setup.layout.broker_config),
                "--frontend-config", str(target(setup))]
    return argv


def _keygen_into(target: Callable[[Setup], Path]) -> Callable[[Setup], list[str]]:
    def argv(setup: Setup) -> list[str]:
        return ["keysealer", "ipc-keygen", "--dir", str(target(setup)), "--name", "x"]
    return argv


FILES: dict[str, Callable[[Setup], list[str]]] = {
    "broker-pin-fifo": _with_pin(["keysealer-broker", "--config"], lambda setup: setup.fifo()),
    "broker-pin-procfs": _with_pin(["keysealer-broker", "--config"], lambda setup: Path("/proc/self/environ")),
    "keys-list-pin-fifo": _with_pin(["keysealer", "keys", "list", "--config"], lambda setup: setup.fifo()),
    "keys-list-pin-procfs": _with_pin(["keysealer", "keys", "list", "--config"],
                                      lambda setup: Path("/proc/self/environ")),
    "keys-list-pin-dev-zero": _with_pin(["keysealer", "keys", "list", "--config"], lambda setup: Path("/dev/zero")),
    "broker-server-key-fifo": _broker_fifo("ipc", "server_key"),
    "broker-client-keys-fifo": _broker_fifo("ipc", "client_keys", as_list=True),
    "broker-client-keys-dev-zero": lambda setup: ["keysealer-broker", "--config",
                                                  str(setup.broker("ipc", "client_keys", ["/dev/zero"]))],
    "frontend-server-key-fifo": _frontend_file("server_key", lambda setup: setup.fifo()),
    "frontend-server-key-dev-zero": _frontend_file("server_key", lambda setup: Path("/dev/zero")),
    "frontend-client-key-fifo": _frontend_file("client_key", lambda setup: setup.fifo()),
    "init-token-module-does-not-load": _module_that_does_not_load,
    "doctor-frontend-config-fifo": _doctor_frontend(lambda setup: setup.fifo()),
    "doctor-frontend-config-nested": _doctor_frontend(_nested),
    "ipc-keygen-dir-fifo": _keygen_into(lambda setup: setup.fifo()),
    "keys-retire-key-id-with-newline-and-bidi": lambda setup: [
        "keysealer", "keys", "retire", "ks1-\u202e\nforged line", "--yes", "--config", str(setup.layout.broker_config)],
    "keys-create-label-with-newline": lambda setup: [
        "keysealer", "keys", "create", "--label", "kek\nforged", "--config", str(setup.layout.broker_config)],
    "ipc-keygen-name-with-newline": lambda setup: ["keysealer", "ipc-keygen", "--dir", str(setup.scratch),
                                                   "--name", "x\ny"],
    "status-without-socket": lambda setup: ["keysealer", "status"],
    "broker-without-config": lambda setup: ["keysealer-broker"],
    "frontend-unknown-flag": lambda setup: ["keysealer-frontend", "--config", "x", "--bogus=\u202e"],
    "status-timeout-nan": lambda setup: ["keysealer", "status", "--socket", "/nonexistent", "--timeout", "nan"],
    "status-timeout-negative": lambda setup: ["keysealer", "status", "--socket", "/nonexistent", "--timeout=-1"],
    "status-timeout-inf": lambda setup: ["keysealer", "status", "--socket", "/nonexistent", "--timeout", "inf"],
}


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    try:
        return subprocess.run([console_script(argv[0]), *argv[1:]], capture_output=True, text=True, cwd=cwd,
                              env=env, timeout=HANG_SECONDS, check=False, errors="replace")
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(argv)} still ran after {HANG_SECONDS} s")


def _assert_one_line_exit_2(result: subprocess.CompletedProcess[str], program: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # A service may have logged its start (JSON lines) before a worker found the file bad: what it says
    # beyond its log is the one line, and it comes last.
    lines = [line for line in result.stderr.splitlines() if not line.startswith('{"time": ')]
    assert len(lines) == 1 and result.stderr.endswith(lines[0] + "\n"), result.stderr[-3000:]
    # "keysealer status: error: ..." for a subcommand's own flags
    assert lines[0].startswith(program) and ": error: " in lines[0], lines[0]
    assert lines[0].isprintable(), lines[0]  # what the caller passed in is shown escaped
    assert result.returncode == 2, (result.returncode, result.stderr)
    return lines[0]


@pytest.mark.parametrize("command", CONFIG_COMMANDS.values(), ids=CONFIG_COMMANDS.keys())
@pytest.mark.parametrize("bad", CONFIGS.values(), ids=CONFIGS.keys())
def test_a_bad_config_is_one_line_and_exit_2(setup: Setup, command: list[str], bad: Callable[[Setup], Path]) -> None:
    path = bad(setup)
    line = _assert_one_line_exit_2(_run([*command, str(path)], setup.scratch), command[0])
    assert str(path) in line


@pytest.mark.parametrize("argv", FILES.values(), ids=FILES.keys())
def test_a_bad_file_or_value_is_one_line_and_exit_2(setup: Setup, argv: Callable[[Setup], list[str]]) -> None:
    command = argv(setup)
    _assert_one_line_exit_2(_run(command, setup.scratch), command[0])


@pytest.mark.parametrize("pin", [lambda setup: setup.fifo(), lambda setup: Path("/proc/self/environ")],
                         ids=["fifo", "procfs"])
def test_doctor_reports_a_pin_file_it_cannot_use_without_trying_it(setup: Setup,
                                                                   pin: Callable[[Setup], Path]) -> None:
    """doctor reports findings, not errors: the PIN file fails its check (exit 1), and no login is tried."""
    result = _run(_with_pin(["keysealer", "doctor", "--config"], pin)(setup), setup.scratch)
    assert result.returncode == 1 and result.stderr == "", (result.returncode, result.stderr)
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 1 and failures[0].split()[1] in ("pin", "login"), result.stdout
    assert "refused the PIN" not in result.stdout


def test_doctor_reports_a_public_key_file_the_broker_would_refuse(setup: Setup) -> None:
    config = setup.broker("ipc", "client_keys", [str(setup.fifo())])
    result = _run(["keysealer", "doctor", "--config", str(config)], setup.scratch)
    assert result.returncode == 1 and result.stderr == "", (result.returncode, result.stderr)
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 1 and "client keys" in failures[0] and "not a regular file" in failures[0], result.stdout


def test_keys_are_where_the_cases_expect_them(prepared: DevLayout) -> None:
    # The cases above edit these fields: a renamed field would make them test nothing.
    broker, frontend = (yaml.safe_load(p.read_text()) for p in (prepared.broker_config, prepared.frontend_config))
    assert {"pin_file", "module"} <= broker["token"].keys()
    assert {"server_key", "client_keys"} <= broker["ipc"].keys()
    assert {"server_key", "client_key"} <= frontend["broker"].keys()
    assert prepared.ipc_key("broker", SECRET_SUFFIX).is_file() and prepared.ipc_key("broker", PUBLIC_SUFFIX).is_file()


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule is root's: a non-root doctor reports the file instead")
def test_doctor_as_root_refuses_a_public_key_file_anyone_can_write(setup: Setup) -> None:
    """/dev/zero is 0666: as root, doctor (which loads the module the config names) refuses the config
    outright, as the broker would, rather than reporting on it."""
    config = setup.broker("ipc", "client_keys", ["/dev/zero"])
    line = _assert_one_line_exit_2(_run(["keysealer", "doctor", "--config", str(config)], setup.scratch),
                                   "keysealer")
    assert "/dev/zero" in line and "others write it" in line
