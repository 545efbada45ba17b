"""Helpers for fleet tests: real `relay serve` processes on one real redis-server.

Each instance binds loopback port 0 (its ports are read from its ready line, see
processes.py) and has its own config file; all share the HMAC secret and the Redis
``key_prefix``. Processes are stopped by PID on the way out. The default ``public_url``
names no port (the instances' ports are not known when the configs are written): tests take
the path from a ``wsUrl`` with ``ws_path`` and open it on the instance they mean.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio
from processes import relay_serve
from support import http, read_until

TESTS = str(Path(__file__).parent)
SECRET = "k1:fleet-test-secret"
PK = "pk_fleet"
PUBLIC_URL = "ws://relay.fleet.test"  # the default public_url: wsUrl's path is what counts
WAIT = 15.0  # seconds: backstop for every network wait in fleet tests
RECOVERY_BOUND = 20.0  # seconds: the health ping backs off to 5 s; a loaded machine adds more


@attrs.define
class Instance:
    name: str
    process: trio.Process
    ws_port: int
    api_port: int
    stderr: Path
    config: Path

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.ws_port}{path}"

    def stderr_text(self) -> str:
        return self.stderr.read_text(encoding="utf-8", errors="replace")

    async def start(self, agent: str, payload: Any = None) -> tuple[int, Any]:
        raw = json.dumps({"transport": "websocket"} if payload is None else payload).encode()
        with trio.fail_after(WAIT):
            status, _, body = await http(
                "127.0.0.1", self.api_port, "POST", f"/v1/public/{agent}/start",
                [("content-type", "application/json"), ("authorization", f"Bearer {PK}")],
                raw)
        return status, json.loads(body)

    async def get_json(self, target: str) -> tuple[int, Any]:
        with trio.fail_after(WAIT):
            status, _, body = await http("127.0.0.1", self.api_port, "GET", target)
        return status, json.loads(body)

    async def metric(self, name: str) -> float | None:
        with trio.fail_after(WAIT):
            status, _, body = await http("127.0.0.1", self.api_port, "GET", "/metrics")
        assert status == 200
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return None


async def store_state(api_port: int) -> str:
    """What an instance's /health says of its store: "up" or "down"."""
    with trio.fail_after(WAIT):
        status, _, body = await http("127.0.0.1", api_port, "GET", "/health")
    assert status == 200
    return str(json.loads(body)["store"])


async def until_store(api_port: int, state: str) -> None:
    """Poll /health until the instance reports its store ``state``."""
    with trio.fail_after(RECOVERY_BOUND):
        while True:
            if await store_state(api_port) == state:
                return
            await trio.sleep(0.1)  # another process: polled, bounded above


def ws_path(ws_url: str) -> str:
    """The path of a /start answer's wsUrl: the same on every instance."""
    assert ws_url.startswith(PUBLIC_URL + "/"), ws_url
    return urlsplit(ws_url).path


def config_text(redis_url: str, prefix: str, bot_url: str,
                *, server: str = "", store: str = "", agents: str = "",
                public_url: str = PUBLIC_URL) -> str:
    return (
        "[server]\n"
        'ws_bind = ["127.0.0.1:0"]\n'
        'api_bind = ["127.0.0.1:0"]\n'
        f'public_url = "{public_url}"\n'
        f'public_keys = ["{PK}"]\n'
        "close_timeout = 1\n"
        "ping_interval = 1000\n"
        "ping_timeout = 1000\n"
        + server +
        "[store]\n"
        'backend = "redis"\n'
        f'url = "{redis_url}"\n'
        f'key_prefix = "{prefix}"\n'
        + store +
        "[agents.tok]\n"
        f'bot = "{bot_url}"\n'
        'websocket_auth = "token"\n'
        'bot_protocol = "relay"\n'
        "max_clients = 100\n"
        "[agents.open]\n"
        f'bot = "{bot_url}"\n'
        'bot_protocol = "relay"\n'
        "max_clients = 100\n"
        + agents
    )


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@asynccontextmanager
async def fleet(directory: Path, names: list[str], redis_url: str, prefix: str,
                bot_url: str, **config: str) -> AsyncIterator[dict[str, Instance]]:
    """Start one `relay serve` per name, all on ``redis_url``; stop them all at the end."""
    env = {**os.environ, "RELAY_SECRET": SECRET,  # tests/ on the path: python: bots there
           "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    instances: dict[str, Instance] = {}
    async with AsyncExitStack() as stack:
        for name in names:
            path = write_config(directory / f"{name}.toml", config_text(
                redis_url, prefix, bot_url, **config))
            stderr = directory / f"{name}.stderr"
            served = await stack.enter_async_context(relay_serve(path, stderr, env=env))
            instances[name] = Instance(name, served.process, served.ws_port,
                                       served.api_port, stderr, path)
        yield instances


async def upgrade_status(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    """A raw WebSocket upgrade; its status and the whole answer (the stream is closed)."""
    auth = f"authorization: Bearer {token}\r\n" if token else ""
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\n"
                "connection: Upgrade\r\nsec-websocket-version: 13\r\n"
                f"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n{auth}\r\n".encode())
            data = await read_until(stream, b"\r\n\r\n")
            if not data.startswith(b"HTTP/1.1 101"):  # a refusal: read its body
                head, _, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                while length is None or len(body) < int(length.group(1)):
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    body += chunk
                data = head + b"\r\n\r\n" + body
    head = data.split(b"\r\n\r\n", 1)[0]
    return int(head.split(b" ", 2)[1]), data
