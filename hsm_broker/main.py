"""keysealer-broker: the process that holds the token login and serves wrap/unwrap over IPC."""

import argparse
from pathlib import Path

from keysealer.hsm_broker.config import load_broker_config
from keysealer.hsm_broker.supervisor import Supervisor
from keysealer.shared.process import run_main, setup_logging

PROGRAM = "keysealer-broker"


def _run() -> int:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="broker YAML config")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args()
    setup_logging(PROGRAM, args.verbose)
    return Supervisor(load_broker_config(args.config)).run()


def main() -> None:
    run_main(PROGRAM, _run)


if __name__ == "__main__":
    main()
