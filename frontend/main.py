"""keysealer-frontend: the unprivileged KMS v2 gRPC server that forwards to the broker."""

import asyncio
from pathlib import Path

from keysealer.frontend.config import load_frontend_config
from keysealer.frontend.heap import limit_arenas
from keysealer.frontend.server import serve
from keysealer.shared.process import run_service


def _serve(config: Path) -> int:
    return asyncio.run(serve(load_frontend_config(config)))


def main() -> None:
    limit_arenas()  # before gRPC starts its threads
    run_service("keysealer-frontend", __doc__, _serve)


if __name__ == "__main__":
    main()
