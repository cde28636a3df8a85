"""Every error KeySealer reports, in one place.

Two families. The IPC taxonomy (ErrorCode, KeySealerError): every failure that crosses the IPC boundary
carries one of these codes; the frontend's call gate maps each to one gRPC status, so the apiserver sees
the same code for the same cause whichever process found it. The operator errors: what stops a program
with one line on stderr; which exit code each class ends a process with is decided by the entry point
alone (shared/process.py EXIT_CODES), never where the error is raised. Messages never hold secrets.
The parsers' own ValueErrors (ipc_schema.SchemaError, worker_protocol.ProtocolViolation,
stored_values.Malformed) never leave their callers, which turn each into one of these or an answer.
"""

from enum import StrEnum
from pathlib import Path


class ErrorCode(StrEnum):
    # The caller's fault: retrying the same request cannot succeed.
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_KEY = "unknown_key"
    BAD_CIPHERTEXT = "bad_ciphertext"
    # Load: the request was refused at once rather than queued without bound.
    BUSY = "busy"
    # The token side cannot serve now; the same request may succeed later.
    TOKEN_UNAVAILABLE = "token_unavailable"
    BROKER_UNAVAILABLE = "broker_unavailable"
    WORKER_LOST = "worker_lost"
    # A bug or an unexpected token answer.
    INTERNAL = "internal"


class KeySealerError(Exception):
    """An error with a code from the taxonomy and a short message that never holds secrets."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class UsageError(Exception):
    """An operator mistake (bad usage, bad setting, a file to fix): restarting will not help."""


class UnusableFile(UsageError):
    """A file the operator provides (the PIN, a CURVE key) that cannot be used as it is: the doctor reports
    it as a failed check, a broker worker stops on it rather than retry."""


class ConfigError(Exception):
    """A config that cannot be used; the message names the file and the field."""


class FileRefused(Exception):
    """A file that is not one KeySealer reads; the message names it and says why, on one line."""

    def __init__(self, path: Path, what: str, reason: str) -> None:
        super().__init__(f"{what} {path}: {reason}")
        self.reason = reason


class UnsafePathError(UsageError):
    """A path someone other than root or us could redirect, or one we cannot use as configured."""


class SandboxError(RuntimeError):
    """The kernel or libseccomp refused a lockdown step, or a setting is unsafe."""


class EtcdError(Exception):
    """etcd could not be read: one line for the operator."""


class TokenUnavailable(Exception):
    """The token cannot serve now (absent, session lost, device error); `reason` is short and public."""

    def __init__(self, reason: str, ckr: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.ckr = ckr


class BadPin(Exception):
    """The token refused the PIN: retrying could lock it."""


class FatalError(Exception):
    """A failure that stops the program with one line of explanation."""
