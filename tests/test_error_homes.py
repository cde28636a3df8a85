"""Where errors are defined and where they become codes: operator and IPC error classes in shared/errors.py
only, exit codes chosen by shared/process.py's table only, gRPC status codes chosen in the call gate only.
Source checks over every module of every package, and the table itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from keysealer.shared import errors
from keysealer.shared.process import (
    EXIT_BAD_PIN,
    EXIT_CODES,
    EXIT_FAILURE,
    EXIT_USAGE,
    error_for_exit_code,
    exit_code_for,
)

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "frontend", "hsm_broker", "tools")
ERRORS_MODULE = REPO / "shared" / "errors.py"
# Parsers' own ValueErrors: raised and caught inside their module's callers, never reported as they are.
PARSER_ERRORS = {"SchemaError", "ProtocolViolation", "Malformed", "_Refused"}
EXCEPTION_BASES = {"Exception", "BaseException", "RuntimeError", "ValueError", "OSError"}


def sources() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (REPO / package).rglob("*.py")
                  if "_pb2" not in path.name)


def base_names(node: ast.ClassDef) -> set[str]:
    return {base.id if isinstance(base, ast.Name) else base.attr for base in node.bases
            if isinstance(base, ast.Name | ast.Attribute)}


def exception_classes(path: Path) -> list[str]:
    """The exception classes `path` defines (parser errors aside)."""
    known = EXCEPTION_BASES | {name for name, value in vars(errors).items()
                               if isinstance(value, type) and issubclass(value, BaseException)}
    return [node.name for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef) and base_names(node) & known and node.name not in PARSER_ERRORS]


def names_a_grpc_status(path: Path) -> bool:
    return any(isinstance(node, ast.Attribute) and node.attr == "StatusCode"
               for node in ast.walk(ast.parse(path.read_text())))


def test_every_error_class_is_defined_in_the_errors_module() -> None:
    found = {str(path.relative_to(REPO)): names for path in sources()
             if path != ERRORS_MODULE and (names := exception_classes(path))}
    assert found == {}


def test_grpc_status_codes_are_chosen_only_in_the_call_gate() -> None:
    gate = REPO / "frontend" / "call_gate.py"
    assert names_a_grpc_status(gate)  # sanity: the check sees the gate's own codes
    assert [str(path.relative_to(REPO)) for path in sources() if path != gate and names_a_grpc_status(path)] == []


def test_the_source_checks_catch_a_stray_class_and_a_stray_code(tmp_path: Path) -> None:
    stray = tmp_path / "stray.py"
    stray.write_text("import grpc\nfrom keysealer.shared import errors\n\n\n"
                     "class PinTooShort(errors.UsageError):\n    pass\n\n\n"
                     "class TokenGone(Exception):\n    pass\n\n\nCODE = grpc.StatusCode.INVALID_ARGUMENT\n")
    assert exception_classes(stray) == ["PinTooShort", "TokenGone"]
    assert names_a_grpc_status(stray)


def test_every_table_class_lives_in_the_errors_module() -> None:
    assert all(kind.__module__ == errors.__name__ for kind, _ in EXIT_CODES)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.BadPin("token login failed: CKR_PIN_INCORRECT"), EXIT_BAD_PIN),
        (errors.UsageError("bad flag"), EXIT_USAGE),
        (errors.UnusableFile("PIN file /x: empty"), EXIT_USAGE),
        (errors.UnsafePathError("/x: writable by others"), EXIT_USAGE),
        (errors.ConfigError("/x: not valid YAML"), EXIT_USAGE),
        (errors.FileRefused(Path("/x"), "config", "not a regular file"), EXIT_USAGE),
        (errors.FatalError("token initialisation failed"), EXIT_FAILURE),
    ],
    ids=["bad-pin", "usage", "unusable-file", "unsafe-path", "config", "file-refused", "fatal"],
)
def test_each_operator_error_ends_a_program_with_its_code(error: Exception, code: int) -> None:
    assert exit_code_for(error) == code


@pytest.mark.parametrize(("code", "kind"), [(EXIT_BAD_PIN, errors.BadPin), (EXIT_USAGE, errors.UsageError),
                                            (EXIT_FAILURE, errors.FatalError), (130, errors.FatalError)])
def test_a_childs_exit_code_is_passed_on_as_the_error_that_ends_with_it(code: int, kind: type[Exception]) -> None:
    error = error_for_exit_code(code, "worker: token login failed")
    assert type(error) is kind and str(error) == "worker: token login failed"
    assert exit_code_for(error) == (code if code in (EXIT_BAD_PIN, EXIT_USAGE) else EXIT_FAILURE)
