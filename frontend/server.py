"""The frontend process: serve the KMS v2 API on a Unix socket until SIGTERM/SIGINT, then stop cleanly."""

import asyncio
import logging
import os
import pwd
import signal
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from keysealer.frontend.broker_client import BrokerClient
from keysealer.frontend.call_gate import CallGate
from keysealer.frontend.config import FrontendConfig
from keysealer.frontend.health import HealthMonitor
from keysealer.frontend.heap import return_free_memory
from keysealer.frontend.http_endpoints import EndpointServer, EndpointState
from keysealer.frontend.kmsv1 import api_pb2_grpc as v1_grpc
from keysealer.frontend.kmsv2 import api_pb2_grpc as v2_grpc
from keysealer.frontend.malformed_requests import MalformedRequests
from keysealer.frontend.metrics import Metrics
from keysealer.frontend.service import Forwarder, KmsService, KmsV1Service
from keysealer.shared.errors import SandboxError, UsageError
from keysealer.shared.ipc_keys import load_keypair, load_public_key
from keysealer.shared.open_files import raise_open_file_limit
from keysealer.shared.process import EXIT_OK
from keysealer.shared.safe_paths import SocketDirectory, owner_of_created, service_account
from keysealer.shared.sandbox import become_configured_user, lock_down, require_user_if_root

log = logging.getLogger(__name__)
T = TypeVar("T")

# Far above any legitimate KMS v2 message (32-byte seeds, <= 1 KiB ciphertexts, <= 32 KiB annotations);
# gRPC refuses larger messages before our code sees them.
MAX_MESSAGE_BYTES = 64 * 1024
HEARTBEAT_SECONDS = 1.0
# Bounds on what a peer of kms.sock can make the server hold (figures and reasons: docs/reliability.md).
# The apiserver keeps one connection per KMS provider (a second one while it reloads its config);
# `keysealer status` and the two probes open short-lived ones. Each connection streaming an endless header
# block makes gRPC hold ~20 MiB at once, so this cap keeps that attack's peak ~100 MiB over the baseline.
MAX_CONNECTIONS = 5
# A connection that has not sent the HTTP/2 preface and SETTINGS by then is closed.
HANDSHAKE_MS = 5_000
# A connection with no call for this long gets a GOAWAY (a gRPC client reconnects when it next calls).
# Twice the apiserver's Status poll (once a minute), so its own connection never idles out.
IDLE_MS = 120_000
# Every connection is recycled after this long, so one that holds a call open without finishing it, or
# streams an endless header block (HEADERS then CONTINUATION frames, which gRPC holds until END_HEADERS),
# keeps its slot and memory only this long; calls in flight get the grace below to finish.
MAX_AGE_MS = 300_000
# Request metadata (headers): the apiserver sends a few hundred bytes. gRPC refuses a call above the hard
# limit, and advertises the soft one as SETTINGS_MAX_HEADER_LIST_SIZE.
METADATA_SOFT_BYTES = 8 * 1024
METADATA_HARD_BYTES = 16 * 1024
# Server pings to find a peer that stopped reading; a peer that answers no ping within the timeout is
# dropped.
KEEPALIVE_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000
STREAM_HEADROOM = 1024


def _server_options(config: FrontendConfig) -> list[tuple[str, int]]:
    call_timeout_ms = int(config.limits.call_timeout_seconds * 1000)
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_allowed_incoming_connections", MAX_CONNECTIONS),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_MS),
        ("grpc.max_connection_idle_ms", IDLE_MS),
        ("grpc.max_connection_age_ms", MAX_AGE_MS),
        ("grpc.max_connection_age_grace_ms", call_timeout_ms + 1000),
        ("grpc.max_metadata_size", METADATA_SOFT_BYTES),
        ("grpc.absolute_max_metadata_size", METADATA_HARD_BYTES),
        # Streams one connection may hold open. Calls past max_in_flight must still reach the call gate,
        # to be refused at once (a client may open streams before it has read this setting, and gRPC
        # resets those past the limit): ample room for them and Status.
        ("grpc.max_concurrent_streams", config.limits.max_in_flight + STREAM_HEADROOM),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # gRPC's defaults, stated: a peer pinging more than every 5 min without calls is sent GOAWAY
        # after 2 strikes.
        ("grpc.http2.min_ping_interval_without_data_ms", 300_000),
        ("grpc.http2.max_ping_strikes", 2),
    ]


async def serve(config: FrontendConfig) -> int:
    try:
        require_user_if_root(config.user)
    except SandboxError as exc:
        raise UsageError(str(exc)) from None
    raise_open_file_limit()  # before any listener: 1,024 idle connections must not starve us
    path = config.listen.socket
    account = service_account(config.user)
    # The socket's directory may belong to our service user, who can swap what is in it at any time: held
    # open and worked in relative to its descriptor, the socket made with its owner, group and mode by bind.
    listen_dir = SocketDirectory.existing(path.parent, _owners(account))
    listen_dir.claim(path.name)
    owner = owner_of_created(account, config.listen.group, "listen.group")
    metrics = Metrics()
    client = BrokerClient(config.broker.socket, load_keypair(config.broker.client_key),
                          load_public_key(config.broker.server_key), metrics)
    health = HealthMonitor(client, config.health, config.limits.call_timeout_seconds, metrics)
    forwarder, gate = Forwarder(client, health), CallGate(config.limits, metrics)
    server = grpc.aio.server(interceptors=[MalformedRequests(gate)], options=_server_options(config))
    v2_grpc.add_KeyManagementServiceServicer_to_server(KmsService(forwarder, health, gate), server)
    if config.kms_v1beta1:
        v1_grpc.add_KeyManagementServiceServicer_to_server(KmsV1Service(forwarder, gate), server)
    with listen_dir.creating(path.name, int(config.listen.mode, 8), owner) as bind_path:
        try:
            server.add_insecure_port(f"unix:{bind_path}")
        except RuntimeError:
            raise UsageError(f"listen.socket: cannot bind {path}") from None
    await server.start()
    endpoints_state = EndpointState(metrics, health.current)
    endpoints: EndpointServer | None = None
    heartbeat = asyncio.create_task(_beat(endpoints_state))
    try:
        endpoints = _endpoint_server(config, endpoints_state, account)
        if _sandbox(become_configured_user, config.user):
            log.warning("running as root, as configured (user: root)")
        await client.start()  # connects as the service user: the broker admits that uid only
        # Every socket exists: from here on no exec, and Unix sockets only unless metrics listen on TCP.
        _sandbox(lock_down, config.metrics.port is not None)
        health.start()
        log.info("serving KMS v2%s on %s (broker %s)", " and v1beta1" if config.kms_v1beta1 else "", path,
                 config.broker.socket)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        log.info("stopping: letting calls in flight finish")
    finally:
        await server.stop(grace=config.limits.call_timeout_seconds)
        heartbeat.cancel()
        if endpoints is not None:
            endpoints.stop()
        await health.stop()
        await client.close()
        listen_dir.remove(path.name)
        os.close(listen_dir.fd)
    return EXIT_OK


def _owners(account: pwd.struct_passwd | None) -> frozenset[int]:
    """Who besides root and us may own a socket's directory: the user we become."""
    return frozenset() if account is None else frozenset({account.pw_uid})


def _endpoint_server(config: FrontendConfig, state: EndpointState,
                     account: pwd.struct_passwd | None) -> EndpointServer | None:
    if config.metrics.socket is None and config.metrics.port is None:
        return None
    try:
        endpoints = EndpointServer(state, config.metrics.socket, config.metrics.port, _owners(account),
                                   owner_of_created(account, config.metrics.group, "metrics.group"))
    except OSError as exc:
        raise UsageError(f"metrics: cannot listen: {exc.strerror}") from None
    endpoints.start()
    return endpoints


async def _beat(state: EndpointState) -> None:
    """What /livez checks: the event loop still runs its tasks. Also returns freed heap to the system."""
    while True:
        state.loop_heartbeat = time.monotonic()
        return_free_memory()
        await asyncio.sleep(HEARTBEAT_SECONDS)


def _sandbox(step: Callable[..., T], *args: Any) -> T:
    try:
        return step(*args)
    except SandboxError as exc:
        raise UsageError(f"cannot sandbox the frontend: {exc}") from None
