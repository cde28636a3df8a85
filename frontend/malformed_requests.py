"""Requests that are not valid protobuf messages: answered INVALID_ARGUMENT with one audit line.

Left to gRPC, a request its deserializer cannot parse costs an ~850-byte traceback in the log (gRPC's own
"Exception deserializing request") and an UNKNOWN answer, for any caller that can write to the socket.
This interceptor parses the request itself and hands an unparsable one to the call gate, which refuses
and accounts for it like any other bad request.
"""

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc

from keysealer.frontend.call_gate import CallGate, CallRecord, Context
from keysealer.shared.errors import ErrorCode

# The service of the KMS v2 API, whose methods the audit and metrics name without a prefix.
V2_SERVICE = "v2.KeyManagementService"


class _Malformed:
    """What the tolerant deserializer returns for bytes that do not parse."""


_MALFORMED = _Malformed()
if TYPE_CHECKING:  # generic in the type stubs only
    Handler = grpc.RpcMethodHandler[Any, Any]
    Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    Interceptor = grpc.aio.ServerInterceptor


class MalformedRequests(Interceptor):
    def __init__(self, gate: CallGate) -> None:
        self._gate = gate
        self._handlers: dict[str, Handler] = {}  # by full method name: KMS methods only

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        method: str = details.method
        if method in self._handlers:
            return self._handlers[method]
        handler = await continuation(details)
        # Unknown methods (None) are gRPC's to answer; every KMS method is unary-unary.
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        self._handlers[method] = tolerant = self._tolerant(handler, _audit_name(method))
        return tolerant

    def _tolerant(self, handler: Handler, name: str) -> Handler:
        parse = cast(Callable[[bytes], Any], handler.request_deserializer)
        behaviour = cast(Callable[[Any, Context], Awaitable[Any]], handler.unary_unary)

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception:  # protobuf's DecodeError, or whatever else its parser raises on bytes
                return _MALFORMED

        async def serve(request: Any, context: Context) -> Any:
            if request is _MALFORMED:
                await self._gate.refuse(context, CallRecord(name, ""), ErrorCode.INVALID_REQUEST,
                                        "request is not a valid protobuf message")
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(serve, request_deserializer=deserialize,
                                                   response_serializer=handler.response_serializer)


def _audit_name(method: str) -> str:
    """"/v2.KeyManagementService/Encrypt" -> "Encrypt", "/v1beta1.KeyManagementService/Encrypt" ->
    "v1beta1.Encrypt": the names the services give their calls."""
    service, _, name = method.lstrip("/").partition("/")
    return name if service == V2_SERVICE else f"{service.split('.')[0]}.{name}"
