"""/metrics, /livez, /readyz and /healthz over HTTP, on a Unix socket or a loopback TCP port.

Served by the standard library's HTTP server, one thread per connection: every answer comes from state
kept by the event loop (the last health probe, the loop's heartbeat), so a scrape never waits for the
broker, and a slow or idle client holds only its own thread, for a bounded time.
"""

import http.server
import logging
import os
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from keysealer.frontend.health import Health
from keysealer.frontend.metrics import Metrics
from keysealer.shared.safe_paths import Owner, SocketDirectory

log = logging.getLogger(__name__)

# The event loop beats once a second; more than this without a beat means it is wedged.
LIVENESS_STALE_SECONDS = 5.0
# Connections served at once (a thread each); one past it is closed at once. Probes and a scraper need
# a few.
MAX_CONNECTIONS = 16
# A client silent this long (mid-request or between requests) is disconnected.
CONNECTION_TIMEOUT_SECONDS = 5.0


class EndpointState:
    def __init__(self, metrics: Metrics, health: Callable[[], Health]) -> None:
        self.metrics = metrics
        self.health = health
        self.loop_heartbeat = time.monotonic()


def _handler(state: EndpointState) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = CONNECTION_TIMEOUT_SECONDS

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(200, generate_latest(state.metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/livez":
                alive = time.monotonic() - state.loop_heartbeat < LIVENESS_STALE_SECONDS
                self._answer(200 if alive else 503, b"ok\n" if alive else b"event loop not responding\n")
            elif path in ("/readyz", "/healthz"):
                health = state.health()
                self._answer(200 if health.healthy else 503, f"{health.reason}\n".encode())
            else:
                self._answer(404, b"not found\n")

        def _answer(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def address_string(self) -> str:
            return "local"  # a Unix socket peer has no address

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes and scrapes are not worth a log line each

    return Handler


class _BoundedThreads(socketserver.ThreadingMixIn):
    """A thread per connection, at most MAX_CONNECTIONS at once."""

    daemon_threads = True
    request_queue_size = 64  # the listen backlog: a burst of probes waits for accept() instead of failing

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up or timed out: its connection is closed, nothing else to do, never a traceback.
        log.debug("metrics connection ended early: %s", sys.exc_info()[1])


class _TCPHTTPServer(_BoundedThreads, http.server.HTTPServer):
    pass


class _UnixHTTPServer(_BoundedThreads, socketserver.UnixStreamServer):
    def get_request(self) -> tuple[Any, Any]:
        request, _ = super().get_request()
        return request, ("local", 0)


class EndpointServer:
    def __init__(self, state: EndpointState, socket: Path | None, port: int | None, dir_owners: frozenset[int],
                 owner: Owner) -> None:
        """`socket` is created 0660 for `owner` in a directory root, we or `dir_owners` own (safe_paths)."""
        handler = _handler(state)
        self._socket: tuple[SocketDirectory, str] | None = None
        self._server: socketserver.BaseServer
        if socket is not None:
            directory = SocketDirectory.existing(socket.parent, dir_owners)
            self._socket = directory, socket.name
            directory.claim(socket.name)
            with directory.creating(socket.name, 0o660, owner) as path:
                self._server = _UnixHTTPServer(path, handler)
        else:
            assert port is not None
            self._server = _TCPHTTPServer(("127.0.0.1", port), handler)  # loopback only
        self._thread = threading.Thread(target=self._server.serve_forever, name="http-endpoints", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._socket is not None:
            directory, name = self._socket
            directory.remove(name)
            os.close(directory.fd)
