"""The process boundary, as seen by the import system.

The unprivileged frontend must never load PKCS #11 or broker code; the broker, which holds the token
login, must never load gRPC; the `keysealer` CLI loads either only for the subcommand that needs it.
Each check imports the entry modules in a fresh interpreter and inspects sys.modules there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

FRONTEND_ENTRIES = ["keysealer.frontend.main", "keysealer.frontend.server", "keysealer.frontend.status_cli"]
BROKER_ENTRIES = [
    "keysealer.hsm_broker.main",
    "keysealer.hsm_broker.supervisor",
    "keysealer.hsm_broker.worker",
    "keysealer.hsm_broker.keys_cli",
]
CLI_ENTRIES = ["keysealer.shared.cli"]


def loaded_modules(imports: list[str], cwd: Path, prelude: str = "") -> set[str]:
    """sys.modules of a fresh interpreter after prelude and importing the given modules."""
    code = "\n".join([
        "import importlib, json, sys",
        prelude,
        f"for name in {imports!r}:",
        "    importlib.import_module(name)",
        "print(json.dumps(sorted(sys.modules)))",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    modules = set(json.loads(result.stdout.strip().splitlines()[-1]))
    missing = [name for name in imports if name not in modules]
    assert not missing, f"the imports did not happen: {missing}"
    return modules


def under(modules: set[str], package: str) -> list[str]:
    return sorted(m for m in modules if m == package or m.startswith(package + "."))


def pkcs11_modules(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.startswith("PyKCS11"))


def grpc_modules(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.startswith("grpc"))


def test_frontend_loads_no_pkcs11_and_no_broker_code(tmp_path: Path) -> None:
    modules = loaded_modules(FRONTEND_ENTRIES, tmp_path)
    assert "grpc" in modules  # sanity: the frontend's real dependencies were loaded
    assert pkcs11_modules(modules) == []
    assert under(modules, "keysealer.hsm_broker") == []


def test_broker_loads_no_grpc(tmp_path: Path) -> None:
    modules = loaded_modules(BROKER_ENTRIES, tmp_path)
    assert "PyKCS11" in modules  # sanity: the broker's real dependencies were loaded
    assert grpc_modules(modules) == []


def test_keysealer_cli_imports_neither_grpc_nor_pkcs11_at_import_time(tmp_path: Path) -> None:
    modules = loaded_modules(CLI_ENTRIES, tmp_path)
    assert grpc_modules(modules) == []
    assert pkcs11_modules(modules) == []
    assert under(modules, "keysealer.frontend") == []
    assert under(modules, "keysealer.hsm_broker") == []


def test_building_the_cli_parser_stays_lazy(tmp_path: Path) -> None:
    modules = loaded_modules(CLI_ENTRIES, tmp_path, prelude="import keysealer.shared.cli as c; c._parser()")
    assert grpc_modules(modules) == []
    assert pkcs11_modules(modules) == []


@pytest.mark.parametrize(
    ("forbidden", "entries", "check"),
    [
        ("import PyKCS11", FRONTEND_ENTRIES, pkcs11_modules),
        ("import keysealer.hsm_broker.key_naming", FRONTEND_ENTRIES,
         lambda m: under(m, "keysealer.hsm_broker")),
        ("import grpc", BROKER_ENTRIES, grpc_modules),
        ("import grpc", CLI_ENTRIES, grpc_modules),
        ("import PyKCS11", CLI_ENTRIES, pkcs11_modules),
    ],
    ids=["frontend+PyKCS11", "frontend+broker", "broker+grpc", "cli+grpc", "cli+PyKCS11"],
)
def test_the_checks_catch_a_forbidden_import(
    tmp_path: Path, forbidden: str, entries: list[str], check: Callable[[set[str]], list[str]]
) -> None:
    # The same inspection, with the forbidden import added ahead of the entry modules, must see it.
    assert check(loaded_modules(entries, tmp_path, prelude=forbidden)) != []
