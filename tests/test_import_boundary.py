"""The process boundary, as seen by the import system.

The unprivileged frontend must never load PKCS #11 or broker code; the broker, which holds the token
login, must never load gRPC or frontend code; shared/ belongs to neither side; the operator's tools
(tools/, the `keysealer` command) may use both, load either only for the subcommand that needs it, and
are used by none of the others. Two views of every module of every package: its source (every import
statement, also those inside functions, which run only when called) and what importing it loads in a fresh
interpreter (sys.modules there, which also sees what third-party imports pull in).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Import-name prefixes each package's source must not name; tools/ may import anything.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "shared": ("keysealer.frontend", "keysealer.hsm_broker", "keysealer.tools", "grpc", "PyKCS11"),
    "frontend": ("keysealer.hsm_broker", "keysealer.tools", "PyKCS11"),
    "hsm_broker": ("keysealer.frontend", "keysealer.tools", "grpc"),
    "tools": (),
}


def package_modules(package: str) -> list[str]:
    """Every module of keysealer.<package>, from its directory (the generated gRPC stubs included)."""
    root = REPO / package
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] == "_root":  # shared/_root is the `keysealer` package itself, a docstring
            continue
        names.append(".".join(("keysealer", package, *(parts[:-1] if parts[-1] == "__init__" else parts))))
    return names


FRONTEND_ENTRIES = package_modules("frontend")
BROKER_ENTRIES = package_modules("hsm_broker")
SHARED_ENTRIES = package_modules("shared")
CLI_ENTRIES = ["keysealer.tools.cli"]


def imported_names(source: str, module: str) -> set[str]:
    """Every module name an import statement in `source` (the module `module`) names, wherever it stands."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                anchor = module.split(".")[:-node.level]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def forbidden_imports(source: str, module: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(name for name in imported_names(source, module)
                  if any(name == prefix or name.startswith(prefix + ".") for prefix in forbidden))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_names_a_forbidden_import(package: str) -> None:
    paths = sorted((REPO / package).rglob("*.py"))
    assert len(paths) > 1  # sanity: the package was found
    found = {}
    for path in paths:
        # `pkg.__init__` keeps relative imports in a package's __init__ resolving against the package.
        module = ".".join(("keysealer", package, *path.relative_to(REPO / package).with_suffix("").parts))
        if bad := forbidden_imports(path.read_text(), module, FORBIDDEN[package]):
            found[str(path.relative_to(REPO))] = bad
    assert found == {}


@pytest.mark.parametrize(
    ("source", "package"),
    [
        ("def f():\n    from keysealer.frontend.config import load_frontend_config\n", "shared"),
        ("from keysealer import hsm_broker\n", "shared"),
        ("from ..tools import cli\n", "frontend"),
        ("import PyKCS11.LowLevel\n", "frontend"),
        ("def f():\n    import grpc\n", "hsm_broker"),
        ("from keysealer.frontend import config\n", "hsm_broker"),
    ],
    ids=["shared+lazy-frontend", "shared+from-keysealer", "frontend+relative-tools", "frontend+PyKCS11",
         "broker+lazy-grpc", "broker+frontend"],
)
def test_the_source_check_catches_a_forbidden_import(source: str, package: str) -> None:
    assert forbidden_imports(source, f"keysealer.{package}.example", FORBIDDEN[package]) != []


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


def test_broker_loads_no_grpc_and_no_frontend_code(tmp_path: Path) -> None:
    modules = loaded_modules(BROKER_ENTRIES, tmp_path)
    assert "PyKCS11" in modules  # sanity: the broker's real dependencies were loaded
    assert grpc_modules(modules) == []
    assert under(modules, "keysealer.frontend") == []


def test_shared_loads_neither_side(tmp_path: Path) -> None:
    modules = loaded_modules(SHARED_ENTRIES, tmp_path)
    assert "zmq" in modules  # sanity: shared's real dependencies were loaded
    assert grpc_modules(modules) == []
    assert pkcs11_modules(modules) == []
    assert under(modules, "keysealer.frontend") == []
    assert under(modules, "keysealer.hsm_broker") == []


@pytest.mark.parametrize("entries", [FRONTEND_ENTRIES, BROKER_ENTRIES, SHARED_ENTRIES],
                         ids=["frontend", "broker", "shared"])
def test_no_side_loads_the_tools(tmp_path: Path, entries: list[str]) -> None:
    assert under(loaded_modules(entries, tmp_path), "keysealer.tools") == []


def test_keysealer_cli_imports_neither_side_at_import_time(tmp_path: Path) -> None:
    modules = loaded_modules(CLI_ENTRIES, tmp_path)
    assert grpc_modules(modules) == []
    assert pkcs11_modules(modules) == []
    assert under(modules, "keysealer.frontend") == []
    assert under(modules, "keysealer.hsm_broker") == []


def test_building_the_cli_parser_stays_lazy(tmp_path: Path) -> None:
    modules = loaded_modules(CLI_ENTRIES, tmp_path, prelude="import keysealer.tools.cli as c; c._parser()")
    assert grpc_modules(modules) == []
    assert pkcs11_modules(modules) == []


@pytest.mark.parametrize(
    ("forbidden", "entries", "check"),
    [
        ("import PyKCS11", FRONTEND_ENTRIES, pkcs11_modules),
        ("import keysealer.hsm_broker.key_naming", FRONTEND_ENTRIES,
         lambda m: under(m, "keysealer.hsm_broker")),
        ("import grpc", BROKER_ENTRIES, grpc_modules),
        ("import keysealer.frontend.config", BROKER_ENTRIES, lambda m: under(m, "keysealer.frontend")),
        ("import keysealer.hsm_broker.pin", SHARED_ENTRIES, lambda m: under(m, "keysealer.hsm_broker")),
        ("import keysealer.tools.cli", SHARED_ENTRIES, lambda m: under(m, "keysealer.tools")),
        ("import grpc", CLI_ENTRIES, grpc_modules),
        ("import PyKCS11", CLI_ENTRIES, pkcs11_modules),
    ],
    ids=["frontend+PyKCS11", "frontend+broker", "broker+grpc", "broker+frontend", "shared+broker", "shared+tools",
         "cli+grpc", "cli+PyKCS11"],
)
def test_the_checks_catch_a_forbidden_import(
    tmp_path: Path, forbidden: str, entries: list[str], check: Callable[[set[str]], list[str]]
) -> None:
    # The same inspection, with the forbidden import added ahead of the entry modules, must see it.
    assert check(loaded_modules(entries, tmp_path, prelude=forbidden)) != []
