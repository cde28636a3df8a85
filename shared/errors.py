"""The error taxonomy shared by broker and frontend.

Every failure that crosses the IPC boundary carries one of these codes; the frontend maps each to one
gRPC status, so the apiserver sees the same code for the same cause whichever process found it.
"""

from enum import StrEnum


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
