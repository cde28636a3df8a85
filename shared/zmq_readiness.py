"""Whether a ZeroMQ socket holds a message, asked without blocking: both sides drain their sockets this way."""

from typing import cast

import zmq


def message_waiting(sock: zmq.Socket[bytes]) -> bool:
    """Whether a message waits (False once closed: a read scheduled before close() may run after it).
    Asking also processes ZeroMQ's pending commands, which resets the descriptor, so a drain that ends
    here is signalled again by the next arrival."""
    return not sock.closed and bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)
