"""keysealer-broker: the process that holds the token login and serves wrap/unwrap over IPC."""

from pathlib import Path

from keysealer.hsm_broker.config import load_broker_config
from keysealer.hsm_broker.supervisor import Supervisor
from keysealer.shared.process import run_service


def _serve(config: Path) -> int:
    return Supervisor(load_broker_config(config)).run()


def main() -> None:
    run_service("keysealer-broker", __doc__, _serve)


if __name__ == "__main__":
    main()
