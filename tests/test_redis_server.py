"""The test helper that starts a real redis-server: a port taken between pick and bind."""

from __future__ import annotations

import socket
from pathlib import Path

from redis_server import RedisServer


def test_first_start_moves_off_a_port_taken_after_it_was_picked(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    with socket.socket() as squatter:  # someone else binds the port first
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        server.port = squatter.getsockname()[1]
        server.start()
        try:
            assert server.port != squatter.getsockname()[1]
            assert "Address already in use" in server.last_error
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
                conn.sendall(b"PING\r\n")
                assert conn.recv(64) == b"+PONG\r\n"
        finally:
            server.stop()
