"""Loopback port allocation for tests."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    The kernel picks the port (bind to 0), so parallel test runs do not collide on a
    hard-coded number. The socket is closed before returning, so there is a small window
    in which another process could take the port; callers bind it immediately.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
