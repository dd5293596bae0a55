"""The gateway's listening socket hands TCP_NODELAY to every connection it accepts: without it each answer
(uvicorn writes the headers, then the body) waits on the client's delayed ACK, about 40 ms per call."""

from __future__ import annotations

import socket

from lightning_ray.gateway.server import _bind


def test_accepted_connections_send_without_delay():
    listener = _bind("127.0.0.1", 0)
    try:
        listener.listen()
        with socket.create_connection(listener.getsockname()[:2]):
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        listener.close()
