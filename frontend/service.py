"""The KMS v2 gRPC service: validate, admit, forward to the broker, map errors to gRPC codes."""

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from keysealer.frontend import validation
from keysealer.frontend.broker_client import BrokerClient
from keysealer.frontend.config import LimitsConfig
from keysealer.frontend.health import HealthMonitor
from keysealer.frontend.kmsv2 import api_pb2, api_pb2_grpc
from keysealer.shared.errors import ErrorCode, KeySealerError

log = logging.getLogger(__name__)
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]

API_VERSION = "v2"
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


class KmsService(api_pb2_grpc.KeyManagementServiceServicer):
    def __init__(self, client: BrokerClient, health: HealthMonitor, limits: LimitsConfig) -> None:
        self._client = client
        self._health = health
        self._limits = limits
        self._in_flight = 0

    async def Status(self, request: api_pb2.StatusRequest, context: Context
                     ) -> api_pb2.StatusResponse:
        health = self._health.current()
        return api_pb2.StatusResponse(version=API_VERSION, healthz=health.reason, key_id=health.key_id)

    async def Encrypt(self, request: api_pb2.EncryptRequest, context: Context
                      ) -> api_pb2.EncryptResponse:
        return await self._serve(context, self._encrypt, request)

    async def Decrypt(self, request: api_pb2.DecryptRequest, context: Context
                      ) -> api_pb2.DecryptResponse:
        return await self._serve(context, self._decrypt, request)

    async def _encrypt(self, request: api_pb2.EncryptRequest, timeout: float) -> api_pb2.EncryptResponse:
        validation.check_encrypt(request.plaintext, request.uid)
        result = await self._client.wrap(request.plaintext, timeout)
        return api_pb2.EncryptResponse(ciphertext=result.ciphertext, key_id=result.key_id,
                                       annotations=validation.ANNOTATIONS)

    async def _decrypt(self, request: api_pb2.DecryptRequest, timeout: float) -> api_pb2.DecryptResponse:
        validation.check_decrypt(request.ciphertext, request.uid, request.key_id, request.annotations)
        if not await self._health.is_known_key(request.key_id):
            raise KeySealerError(ErrorCode.UNKNOWN_KEY, "key_id is not a key this plugin holds")
        result = await self._client.unwrap(request.ciphertext, request.key_id, timeout)
        return api_pb2.DecryptResponse(plaintext=result.plaintext)

    async def _serve(self, context: Context,
                     handler: Callable[[Req, float], Awaitable[Resp]], request: Req) -> Resp:
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
