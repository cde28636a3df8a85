"""Read a key range from etcd, read-only, one page at a time.

Uses etcd's v3 JSON gateway (POST /v3/kv/range, served on the client port of etcd 3.4 and later) with the
standard library: no etcd client library, no gRPC. Only Range requests are ever sent. Every page after the
first asks for the revision the first page was read at, so the scan is one consistent snapshot however
long it takes and whatever the apiserver writes meanwhile; memory holds one page at a time.
"""

import base64
import http.client
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from keysealer.shared.bounded_files import read_bounded, read_bounded_text
from keysealer.shared.errors import EtcdError, FileRefused

DEFAULT_PAGE_SIZE = 500
RANGE_PATH = "/v3/kv/range"
# Certificates, chains and keys are a few KiB; a bundle of every public CA is about 200 KiB.
MAX_TLS_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class EtcdOptions:
    endpoints: tuple[str, ...]
    cacert: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    timeout: float = 10.0
    page_size: int = DEFAULT_PAGE_SIZE


def prefix_range_end(prefix: bytes) -> bytes:
    """The smallest key after every key that starts with `prefix` (etcd's GetPrefixRangeEnd)."""
    trimmed = prefix.rstrip(b"\xff")
    return trimmed[:-1] + bytes((trimmed[-1] + 1,)) if trimmed else b"\x00"


def _tls_context(options: EtcdOptions) -> ssl.SSLContext:
    try:
        # Read through the bounded reader: a FIFO or /dev/zero named here must not hang or flood us.
        cadata = read_bounded_text(options.cacert, "--etcd-cacert", MAX_TLS_FILE_BYTES) if options.cacert else None
        context = ssl.create_default_context(cadata=cadata)
        if options.cert is not None:
            # ssl loads a certificate and key only from paths: check them first as any file we read.
            for path, what in ((options.cert, "--etcd-cert"), (options.key, "--etcd-key")):
                if path is not None:
                    read_bounded(path, what, MAX_TLS_FILE_BYTES)
            context.load_cert_chain(str(options.cert), str(options.key) if options.key else None)
    except FileRefused as exc:
        raise EtcdError(f"cannot load the etcd TLS files: {exc}") from None
    except (OSError, ssl.SSLError) as exc:
        raise EtcdError(f"cannot load the etcd TLS files: {exc.strerror or exc}") from None
    return context


class _Endpoint:
    """One etcd member, with a kept-alive connection."""

    def __init__(self, url: str, options: EtcdOptions) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EtcdError(f"not an etcd endpoint URL: {url!r} (expected http(s)://HOST:PORT)")
        self.url = url
        if parts.scheme == "https":
            self.connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, parts.port or 2379, timeout=options.timeout, context=_tls_context(options))
        else:
            self.connection = http.client.HTTPConnection(parts.hostname, parts.port or 2379,
                                                         timeout=options.timeout)

    def range(self, body: dict[str, Any]) -> dict[str, Any]:
        self.connection.request("POST", RANGE_PATH, json.dumps(body), {"Content-Type": "application/json"})
        response = self.connection.getresponse()
        payload = response.read()
        try:
            answer = json.loads(payload)
        except ValueError:
            raise EtcdError(f"{self.url}: HTTP {response.status}: not an etcd v3 answer") from None
        if response.status != 200 or not isinstance(answer, dict):
            message = answer.get("message") or answer.get("error") if isinstance(answer, dict) else None
            raise EtcdError(f"{self.url}: etcd refused the range read: {message or f'HTTP {response.status}'}")
        return answer


def _reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scan_prefix(options: EtcdOptions, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, value) under `prefix`, in key order, as of the revision of the first page. An endpoint
    that fails is left for the next one, which continues where the scan stopped."""
    endpoints = [_Endpoint(url, options) for url in options.endpoints]
    start, end, revision = prefix, prefix_range_end(prefix), 0
    failures: list[str] = []
    while endpoints:
        body: dict[str, Any] = {"key": _b64(start), "range_end": _b64(end), "limit": options.page_size}
        if revision:
            body["revision"] = revision
        try:
            page = endpoints[0].range(body)
        except (OSError, http.client.HTTPException) as exc:
            failed = endpoints.pop(0)
            failed.connection.close()
            failures.append(f"{failed.url}: {_reason(exc)}")
            continue
        revision = revision or int(page.get("header", {}).get("revision", 0))
        kvs = page.get("kvs", [])
        for kv in kvs:
            yield base64.b64decode(kv["key"]), base64.b64decode(kv.get("value", ""))
        if not page.get("more") or not kvs:
            for endpoint in endpoints:
                endpoint.connection.close()
            return
        start = base64.b64decode(kvs[-1]["key"]) + b"\x00"
    raise EtcdError("cannot read etcd: " + "; ".join(failures))
