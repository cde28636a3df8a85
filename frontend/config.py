"""The frontend's YAML config (every field is described in docs/configuration.md)."""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from keysealer.shared.config_loader import bounded, load_config
from keysealer.shared.errors import ConfigError
from keysealer.shared.ipc_schema import MAX_WORKERS_REPORTED
from keysealer.shared.safe_paths import socket_path_problem
from keysealer.shared.socket_path import worker_socket_path


@dataclass(frozen=True)
class ListenConfig:
    socket: Path
    # 0600 by default: only the frontend's own user; 0660 with `group` for the apiserver's group.
    mode: str = dataclasses.field(default="0600", metadata={"choices": ("0600", "0660")})
    group: str | None = None


@dataclass(frozen=True)
class BrokerLinkConfig:
    socket: Path
    # This frontend's CURVE certificate (NAME.key_secret from `keysealer ipc-keygen`).
    client_key: Path
    # The broker's public certificate (NAME.key): a broker without its secret half is never trusted.
    server_key: Path


@dataclass(frozen=True)
class LimitsConfig:
    # Below the apiserver's 3 s default, so the apiserver always gets our answer rather than its timeout.
    call_timeout_seconds: float = bounded(2.5, 0.05, 60.0)
    # Encrypt/Decrypt calls at once; more are refused with RESOURCE_EXHAUSTED instead of queueing.
    max_in_flight: int = bounded(512, 1, 100_000)


@dataclass(frozen=True)
class HealthConfig:
    # How often a real wrap and unwrap go through broker and token.
    probe_interval_seconds: float = bounded(5.0, 0.1, 300.0)
    # Status stays "ok" this long after the last good probe while later probes only timed out (load).
    max_age_seconds: float = bounded(30.0, 1.0, 3600.0)


@dataclass(frozen=True)
class MetricsConfig:
    # Off unless one is set: /metrics, /livez, /readyz and /healthz on a Unix socket, or on a TCP port of
    # 127.0.0.1 (which lets the frontend's sandbox open IPv4 sockets).
    socket: Path | None = None
    port: int | None = bounded(None, 1, 65535)
    # Group of the 0660 socket (a scraper's), instead of the frontend user's own group.
    group: str | None = None


@dataclass(frozen=True)
class FrontendConfig:
    listen: ListenConfig
    broker: BrokerLinkConfig
    # The account to run as when started by root (required then; "root" keeps root on purpose).
    user: str | None = None
    # Also serve the deprecated KMS v1beta1 API on the same socket, for clusters moving from v1 to v2.
    kms_v1beta1: bool = False
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def load_frontend_config(path: Path) -> FrontendConfig:
    config = load_config(path, FrontendConfig)
    if config.listen.mode == "0660" and config.listen.group is None:
        raise ConfigError(f"{path}: listen.group: required when listen.mode is 0660")
    if config.metrics.socket is not None and config.metrics.port is not None:
        raise ConfigError(f"{path}: metrics: set socket or port, not both")
    # The workers' sockets sit next to the broker's, their names longer by a slot number.
    last_worker = worker_socket_path(config.broker.socket, MAX_WORKERS_REPORTED - 1)
    sockets = [("listen.socket", config.listen.socket), ("broker.socket", config.broker.socket),
               ("broker.socket", last_worker), ("metrics.socket", config.metrics.socket)]
    for name, socket in sockets:
        problem = None if socket is None else socket_path_problem(socket)
        if problem:
            raise ConfigError(f"{path}: {name}: {problem}")
    return config
