"""Loopback ports for servers the tests start as processes (redis-server, nginx, relay serve).

Such a server cannot bind port 0 and tell us, so a port is picked first and passed in. A
port merely found free can be handed by the kernel to any outgoing connection before the
server binds it (each test opens hundreds), and the server then fails to start. So
`free_port()` picks it and keeps it out of the kernel's ephemeral picks for a minute:
listen on port 0, connect to it and accept, close the accepted end first. That end's
TIME_WAIT keeps the port in the kernel's bind table (no connect() is given it as its local
port, no bind without SO_REUSEADDR succeeds), while a server binding it with SO_REUSEADDR —
redis-server, nginx, relay serve, trio listeners and the bench's echo bots all do — can.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port on 127.0.0.1 nobody listens on, held back from ephemeral use for ~60 s."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = int(listener.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            accepted, _ = listener.accept()
            accepted.close()  # the listening side closes first: its end goes to TIME_WAIT
    return port
