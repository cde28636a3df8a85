"""Who may talk to the broker: the ZAP handler ZeroMQ consults for every new IPC connection.

A peer is admitted only if both hold: its CURVE public key is one the config lists, and its uid (which
libzmq reads with SO_PEERCRED and puts in the ZAP address as `host:uid:gid:pid`) is the frontend's.
Refused peers get no answer at all: ZeroMQ closes the connection before any message is delivered.
"""

import logging
from dataclasses import dataclass

from zmq.utils import z85

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
ZAP_DOMAIN = b"keysealer"


@dataclass(frozen=True)
class PeerPolicy:
    client_keys: frozenset[bytes]  # Z85 public keys
    allowed_uids: frozenset[int]


def _peer_credentials(address: bytes) -> tuple[int, int] | None:
    """(uid, pid) from an ipc:// ZAP address, or None when it carries none."""
    parts = address.split(b":")
    if len(parts) < 4 or not all(p.isdigit() for p in parts[-3:]):
        return None
    return int(parts[-3]), int(parts[-1])


def zap_reply(frames: list[bytes], policy: PeerPolicy) -> list[bytes]:
    """The ZAP reply for one request (RFC 27)."""
    if len(frames) < 6:
        return [ZAP_VERSION, b"", b"500", b"malformed ZAP request", b"", b""]
    version, request_id, domain, address, _identity, mechanism, *credentials = frames

    def answer(code: bytes, text: bytes, user: bytes = b"") -> list[bytes]:
        return [ZAP_VERSION, request_id, code, text, user, b""]

    if version != ZAP_VERSION or domain != ZAP_DOMAIN:
        return answer(b"400", b"unexpected ZAP request")
    peer = _peer_credentials(address)
    if mechanism != b"CURVE" or len(credentials) != 1 or peer is None:
        log.warning("refused an IPC peer: no CURVE key or no peer credentials")
        return answer(b"400", b"refused")
    uid, pid = peer
    client_key = z85.encode(credentials[0])
    if uid not in policy.allowed_uids:
        log.warning("refused an IPC peer: uid %d (pid %d) is not the frontend's", uid, pid)
        return answer(b"400", b"refused")
    if client_key not in policy.client_keys:
        log.warning("refused an IPC peer: uid %d (pid %d) presented a CURVE key not in ipc.client_keys", uid, pid)
        return answer(b"400", b"refused")
    return answer(b"200", b"OK", b"frontend")
