"""The broker's YAML config (every field is described in docs/configuration.md)."""

import grp
from dataclasses import dataclass, field
from pathlib import Path

from keysealer.shared.config_loader import bounded, load_config
from keysealer.shared.safe_paths import check_file_root_reads, socket_path_problem
from keysealer.shared.socket_path import worker_socket_path


@dataclass(frozen=True)
class TokenConfig:
    module: Path
    pin_file: Path
    # Pick the token by label (preferred: slot numbers can change when devices are added) or by slot id.
    token_label: str | None = None
    slot: int | None = None
    # Environment the PKCS #11 module reads (SOFTHSM2_CONF, a TPM's TCTI, ...). Set only in the broker.
    module_env: dict[str, str] = field(default_factory=dict)
    # For a module that reads the token's objects only when initialized (tpm2-pkcs11): the file it reads
    # them from. When it has changed, a key refresh finalizes the module, initializes it and logs in again.
    reinitialize_when_changed: Path | None = None


@dataclass(frozen=True)
class KeysConfig:
    # New wraps use the newest key with this label; every other KeySealer key in the token still unwraps.
    current_label: str


@dataclass(frozen=True)
class IpcConfig:
    socket: Path
    # The broker's CURVE certificate (NAME.key_secret from `keysealer ipc-keygen`).
    server_key: Path
    # Public certificates (NAME.key) of the frontends admitted to the socket.
    client_keys: list[Path]
    # The frontend's user (a name, or a uid in quotes): only its processes may connect. Unset: the
    # broker's own user.
    frontend_user: str | None = None
    # Group given to the socket directory so the frontend's user can reach the socket.
    group: str | None = None

    @property
    def worker_socket(self) -> Path:
        """The workers' socket, in a directory only the broker's user can enter."""
        return self.socket.parent / "workers" / "backend.sock"


@dataclass(frozen=True)
class WorkersConfig:
    count: int = bounded(2, 1, 64)
    # Requests waiting for a free worker; past this the broker answers "busy" at once.
    queue_limit: int = bounded(1024, 1, 100_000)


@dataclass(frozen=True)
class SandboxConfig:
    # Let the broker open IPv4/IPv6 sockets: only for a token reached over TCP (a network HSM, a TPM
    # simulator). Off by default: the broker then can open Unix sockets only.
    allow_inet: bool = False


@dataclass(frozen=True)
class BrokerConfig:
    token: TokenConfig
    keys: KeysConfig
    ipc: IpcConfig
    # The account to run as when started by root (required then; "root" keeps root on purpose).
    user: str | None = None
    # Supplementary groups kept after switching to `user`: the token's own (pkcs11 for openCryptoki, tss for
    # /dev/tpmrm0). Nothing else is inherited from root or /etc/group.
    groups: list[str] = field(default_factory=list)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


def load_broker_config(path: Path) -> BrokerConfig:
    config = load_config(path, BrokerConfig)
    _validate(config, path)
    return config


def _validate(config: BrokerConfig, path: Path) -> None:
    from keysealer.shared.errors import ConfigError

    token = config.token
    if (token.token_label is None) == (token.slot is None):
        raise ConfigError(f"{path}: token: set exactly one of token_label and slot")
    if not token.module.is_file():
        raise ConfigError(f"{path}: token.module: no such file: {token.module}")
    check_file_root_reads(token.module, "token.module")  # `keys` and `user: root` load it as root
    if not config.keys.current_label:
        raise ConfigError(f"{path}: keys.current_label: must not be empty")
    if not config.keys.current_label.isprintable():
        raise ConfigError(f"{path}: keys.current_label: must hold printable characters only")
    problem = (socket_path_problem(config.ipc.socket) or socket_path_problem(config.ipc.worker_socket)
               or socket_path_problem(worker_socket_path(config.ipc.socket, config.workers.count - 1)))
    if problem:
        raise ConfigError(f"{path}: ipc.socket: {problem}")
    if not config.ipc.client_keys:
        raise ConfigError(f"{path}: ipc.client_keys: list at least one frontend public key")
    for group in config.groups:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise ConfigError(f"{path}: groups: no such group: {group!r}") from None
