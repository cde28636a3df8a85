"""What every call the frontend serves goes through, whichever KMS API version: admission under the
in-flight bound, a deadline shorter than the caller's, and one mapping from errors to gRPC codes (the only
place a gRPC status code is chosen)."""

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc

from keysealer.frontend.config import LimitsConfig
from keysealer.frontend.metrics import Metrics
from keysealer.shared.errors import ErrorCode, KeySealerError
from keysealer.shared.log_text import printable

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]

audit = logging.getLogger("keysealer.audit")
log = logging.getLogger(__name__)
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


@dataclass
class CallRecord:
    """What the audit event of one call says; the handler fills in the key_id once it knows it."""

    method: str
    uid: str
    key_id: str = ""


class CallGate:
    def __init__(self, limits: LimitsConfig, metrics: Metrics) -> None:
        self._limits = limits
        self._metrics = metrics
        self._in_flight = 0

    async def run(self, context: Context, record: CallRecord,
                  handler: Callable[[Req, float, CallRecord], Awaitable[Resp]], request: Req) -> Resp:
        """Admit the call under the in-flight bound, give it its deadline, turn errors into gRPC codes,
        and account for it (metrics, one audit event)."""
        started = time.monotonic()
        if self._in_flight >= self._limits.max_in_flight:
            self._metrics.refused.inc()
            await self.refuse(context, record, ErrorCode.BUSY, "too many calls in flight")
        self._in_flight += 1
        self._metrics.in_flight.set(self._in_flight)
        # What the audit says unless the handler returns: a cancelled call ends with CancelledError.
        code = grpc.StatusCode.CANCELLED
        try:
            timeout = self._limits.call_timeout_seconds
            remaining = context.time_remaining()
            if remaining is not None:
                timeout = min(timeout, remaining - DEADLINE_MARGIN_SECONDS)
            response = await handler(request, max(timeout, 0.001), record)
            code = grpc.StatusCode.OK
            return response
        except KeySealerError as exc:
            code = GRPC_CODES[exc.code]
            await context.abort(code, exc.message)
        except TimeoutError:
            code = grpc.StatusCode.UNAVAILABLE
            await context.abort(code, "broker did not answer in time")
        except Exception:
            # A bug: one log line (the traceback inside its JSON), and the caller learns no more than that.
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed unexpectedly", record.method)
            await context.abort(code, "internal error")
        finally:
            self._in_flight -= 1
            self._metrics.in_flight.set(self._in_flight)
            self._finish(record, code, started)

    async def refuse(self, context: Context, record: CallRecord, error: ErrorCode, message: str) -> NoReturn:
        """Answer a call that is not served at all, accounted for like one that is."""
        code = GRPC_CODES[error]
        self._finish(record, code, time.monotonic())
        await context.abort(code, message)

    def _finish(self, record: CallRecord, code: grpc.StatusCode, started: float) -> None:
        seconds = time.monotonic() - started
        self._metrics.requests.labels(record.method, code.name).inc()
        self._metrics.request_seconds.labels(record.method).observe(seconds)
        audit.info("%s %s", record.method, code.name, extra={"audit": {
            "method": record.method, "uid": printable(record.uid), "key_id": printable(record.key_id),
            "outcome": "ok" if code is grpc.StatusCode.OK else "error", "code": code.name,
            "latency_ms": round(seconds * 1000, 3)}})

