"""tests/ports.py: a picked port stays ours until the server we start binds it."""

from __future__ import annotations

import errno
import socket

import pytest
from ports import free_port


def test_a_picked_port_is_held_against_plain_binds_and_open_to_servers() -> None:
    port = free_port()
    with socket.socket() as plain, pytest.raises(OSError) as refused:
        plain.bind(("127.0.0.1", port))  # what an outgoing connect() would need of it
    assert refused.value.errno == errno.EADDRINUSE
    with socket.socket() as server:  # a server sets SO_REUSEADDR, as ours all do
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(1)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            accepted, _ = server.accept()
            with accepted:
                client.sendall(b"ping")
                assert accepted.recv(4) == b"ping"


def test_ports_picked_together_differ() -> None:
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
