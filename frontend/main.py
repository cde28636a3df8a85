"""keysealer-frontend: the unprivileged KMS v2 gRPC server that forwards to the broker."""

import argparse
import asyncio
from pathlib import Path

from keysealer.frontend.config import load_frontend_config
from keysealer.frontend.server import serve
from keysealer.shared.process import run_main, setup_logging

PROGRAM = "keysealer-frontend"


def _run() -> int:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="frontend YAML config")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args()
    setup_logging(PROGRAM, args.verbose)
    return asyncio.run(serve(load_frontend_config(args.config)))


def main() -> None:
    run_main(PROGRAM, _run)


if __name__ == "__main__":
    main()
