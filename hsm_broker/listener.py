"""The broker's frontend-facing ZeroMQ sockets: the supervisor's (health) and each worker's (wrap, unwrap).

Both get the same defences (figures and reasons: docs/reliability.md): CURVE with the broker's key, every
connection checked by the ZAP handler (ipc_auth) before any message, a frame limit ZeroMQ enforces itself,
a short handshake window and bounded queues.
"""

from dataclasses import dataclass

import zmq

from keysealer.hsm_broker.call_board import CallBoard
from keysealer.hsm_broker.ipc_auth import ZAP_DOMAIN, PeerPolicy
from keysealer.shared import ipc_schema
from keysealer.shared.ipc_keys import KeyPair

# A peer that connects and never completes the CURVE handshake is dropped after this long, so idle
# connections cannot pile up (libzmq's default is 30 s).
HANDSHAKE_MS = 5_000
# Replies ZeroMQ queues per peer. Beyond it, replies to a peer that does not read are dropped: memory per
# peer is bounded by this times the largest reply. The frontend reads replies as they come.
SEND_HWM = 256
# Connections waiting for the kernel to hand them over (a worker socket's listener waits, held by the
# supervisor, while its worker is being replaced).
BACKLOG = 128


@dataclass(frozen=True)
class WorkerSeat:
    """What a worker in slot `slot` serves from: made by the supervisor before the fork, inherited."""

    slot: int
    listener_fd: int  # a listening Unix socket at `path`, bound by the supervisor (ZMQ_USE_FD)
    path: str
    server: KeyPair
    policy: PeerPolicy
    board: CallBoard


def take_request(sock: zmq.Socket[bytes], frames: list[bytes],
                 endpoint: ipc_schema.Endpoint) -> tuple[bytes, ipc_schema.Request] | None:
    """The peer and the request in `frames`, read from `sock` at `endpoint`; None once any refusal is sent."""
    if len(frames) != 2:
        return None  # not a DEALER-framed request: nothing to answer
    peer, frame = frames
    request = ipc_schema.admit_request(frame, endpoint)
    if isinstance(request, ipc_schema.Refusal):
        if request.reply is not None:
            sock.send_multipart([peer, request.reply])
        return None
    return peer, request


def secure_listener(sock: zmq.Socket[bytes], server: KeyPair, receive_hwm: int) -> None:
    """Options for a socket the frontend connects to, set before its bind."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, SEND_HWM)
    # A peer sending faster than we read is held back by ZeroMQ past this many queued requests.
    sock.setsockopt(zmq.RCVHWM, receive_hwm)
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
    # A peer sending a frame larger than the schema allows is disconnected by ZeroMQ itself.
    sock.setsockopt(zmq.MAXMSGSIZE, ipc_schema.zmq_max_msgsize(ipc_schema.MAX_REQUEST_FRAME))
    sock.curve_server = True
    sock.curve_publickey = server.public
    sock.curve_secretkey = server.secret
    sock.zap_domain = ZAP_DOMAIN
