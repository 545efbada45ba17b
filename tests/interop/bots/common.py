"""Shared by the interop bots (run by .venv-interop's Python, never imported by pytest).

A bot reports to the test as JSON lines on stdout, one object per line with an "event"
key; Pipecat's own logging (loguru) goes to stderr, which the test keeps in a file.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import uvicorn


def report(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def serve(app: Any) -> None:
    """Serve app with uvicorn on a free loopback port, first reporting that port.

    The socket is bound and listening before the port is reported, so a connection the
    test makes at once waits in the backlog rather than being refused.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    report("listening", port=sock.getsockname()[1])
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
