"""What every call the frontend serves goes through, whichever KMS API version: admission under the
in-flight bound, a deadline shorter than the caller's, and one mapping from errors to gRPC codes."""

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from keysealer.frontend.config import LimitsConfig
from keysealer.shared.errors import ErrorCode, KeySealerError

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]

# Time kept back from the caller's deadline to send our answer before it expires.
DEADLINE_MARGIN_SECONDS = 0.05

GRPC_CODES = {
    ErrorCode.INVALID_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNKNOWN_KEY: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.BAD_CIPHERTEXT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.TOKEN_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.BROKER_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.WORKER_LOST: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}


class CallGate:
    def __init__(self, limits: LimitsConfig) -> None:
        self._limits = limits
        self._in_flight = 0

    async def run(self, context: Context, handler: Callable[[Req, float], Awaitable[Resp]], request: Req) -> Resp:
        """Admit the call under the in-flight bound, give it its deadline, turn errors into gRPC codes."""
        if self._in_flight >= self._limits.max_in_flight:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many calls in flight")
        self._in_flight += 1
        try:
            timeout = self._limits.call_timeout_seconds
            remaining = context.time_remaining()
            if remaining is not None:
                timeout = min(timeout, remaining - DEADLINE_MARGIN_SECONDS)
            return await handler(request, max(timeout, 0.001))
        except KeySealerError as exc:
            await context.abort(GRPC_CODES[exc.code], exc.message)
        except TimeoutError:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "broker did not answer in time")
        finally:
            self._in_flight -= 1
