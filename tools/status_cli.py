"""`keysealer status --socket PATH`: call Status the way the apiserver does and print the answer."""

from pathlib import Path

import grpc

from keysealer.frontend.kmsv2 import api_pb2, api_pb2_grpc
from keysealer.shared.errors import FatalError, UsageError
from keysealer.shared.process import EXIT_FAILURE, EXIT_OK

MAX_TIMEOUT_SECONDS = 3600.0


def fetch_status(socket: Path, timeout: float) -> api_pb2.StatusResponse:
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        stub = api_pb2_grpc.KeyManagementServiceStub(channel)
        try:
            status: api_pb2.StatusResponse = stub.Status(api_pb2.StatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise FatalError(f"{socket}: Status failed: {exc.code().name}: {exc.details()}") from None
    return status


def print_status(socket: Path, timeout: float, liveness: bool = False) -> int:
    """Exit 0 when healthy; with `liveness`, when the plugin answers at all: a token outage must not make a
    liveness probe restart the plugin in a loop (readiness is what reports the token)."""
    if not 0 < timeout <= MAX_TIMEOUT_SECONDS:  # also false for NaN
        raise UsageError(f"--timeout: must be more than 0 and at most {MAX_TIMEOUT_SECONDS:g} seconds")
    status = fetch_status(socket, timeout)
    print(f"version: {status.version}\nhealthz: {status.healthz}\nkey_id:  {status.key_id}")
    return EXIT_OK if liveness or status.healthz == "ok" else EXIT_FAILURE
