#!/usr/bin/env python3
"""A reference for `scripts/bench --targets uvloop`: a minimal WebSocket relay on asyncio + uvloop.

Not a product and not this project's design (which is Trio: a nursery per connection with
two relay tasks). It is here to answer one question with a measurement: how much of the
gap between `floor` (bench/trio_floor.py) and nginx belongs to the runtime. It does what
trio_floor.py does — read the client's upgrade, dial the bot with an upgrade of its own,
answer 101, pass bytes unchanged both ways — with libuv's callbacks instead of tasks: per
connection two `asyncio.Protocol` objects, no task per direction, no per-read wake-up of a
coroutine. Backpressure: a transport whose peer stops reading pauses the other side's
reads. No auth, no frame parsing, no timeouts, no metrics, no logs.

Runs in its own venv (`.venv-uvloop`, made by scripts/bench from
bench/uvloop-requirements.txt): the gateway itself never imports uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import os
import pathlib
import re
import socket
from typing import cast

import uvloop

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
GC_THRESHOLDS = (20_000, 50, 100)  # as relay/server.py and bench/trio_floor.py
KEY = re.compile(rb"^sec-websocket-key:[ \t]*(\S+)", re.I | re.M)
MAX_HEAD = 16 * 1024
BOT_UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n")
SWITCHING = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Accept: %s\r\n\r\n")


def nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Side(asyncio.Protocol):
    """One peer's connection; `other` is the side its bytes go to once the relay is up."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: Side | None = None
        self.head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        nodelay(transport)

    def head_end(self, data: bytes) -> int:
        """Add to the HTTP head being read; where its blank line starts, or -1 (and the
        connection closed when the head outgrows MAX_HEAD)."""
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0 and len(self.head) > MAX_HEAD:
            self.close()
        return end

    def forward(self, data: bytes) -> None:
        assert self.other is not None and self.other.transport is not None
        self.other.transport.write(data)

    def pause_writing(self) -> None:  # our peer is slow: stop reading the other one
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def close(self) -> None:
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()


class Bot(Side):
    """The bot leg: our upgrade out, its 101 in, then the relay."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client
        client.bot = self

    def close(self) -> None:
        self.client.close()

    def data_received(self, data: bytes) -> None:
        if self.other is not None:
            self.forward(data)
            return
        if (end := self.head_end(data)) < 0:
            return
        if not self.head.startswith(b"HTTP/1.1 101"):
            self.close()
            return
        early, self.head = self.head[end + 4:], b""
        accept = base64.b64encode(hashlib.sha1(self.client.key + GUID).digest())
        self.client.link(self)
        assert self.client.transport is not None
        self.client.transport.write(SWITCHING % accept + early)  # + any early bot frames


class Client(Side):
    """The client leg: its upgrade in; the bot dialled; our 101 out once the bot's is in."""

    def __init__(self, bot_addr: tuple[str, int]) -> None:
        super().__init__()
        self.bot_addr = bot_addr
        self.key = b""
        self.pending = b""  # bytes the client sent after its upgrade, before the bot's 101
        self.bot: Bot | None = None  # from the dial on (`other` only once the bot's 101 is in)
        self.dialling: asyncio.Task[None] | None = None

    def close(self) -> None:
        for side in (self, self.bot):
            if side is not None and side.transport is not None:
                side.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.other is not None:
            self.forward(data)
        elif self.key:
            self.pending += data
        else:
            if (end := self.head_end(data)) < 0:
                return
            key = KEY.search(self.head[:end])
            if key is None:
                self.close()
                return
            self.key, self.pending, self.head = key.group(1), self.head[end + 4:], b""
            self.dialling = asyncio.get_running_loop().create_task(self.dial())

    async def dial(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.bot_addr
        try:
            transport, _ = await loop.create_connection(lambda: Bot(self), host, port)
        except OSError:
            self.close()
            return
        own_key = base64.b64encode(os.urandom(16))
        transport.write(BOT_UPGRADE % (host.encode(), port, own_key))

    def link(self, bot: Bot) -> None:
        self.other, bot.other = bot, self
        if self.pending:
            self.forward(self.pending)  # frames the client sent early, in order
            self.pending = b""


async def serve(listener: socket.socket, bot_addr: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(bot_addr), sock=listener, backlog=4096)
    gc.freeze()  # as relay/server.py: start-up objects out of the GC, collections rarer
    gc.set_threshold(*GC_THRESHOLDS)
    await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", help="write the bound port here once listening")
    ap.add_argument("--bot-port", type=int, required=True, help="the echo bot on 127.0.0.1:N")
    args = ap.parse_args()
    listener = socket.create_server((args.host, args.port), backlog=4096)  # SO_REUSEADDR on
    if args.port_file:  # one write(2) of a few bytes: never seen half-written
        pathlib.Path(args.port_file).write_text(f"{listener.getsockname()[1]}\n")
    uvloop.run(serve(listener, ("127.0.0.1", args.bot_port)))


if __name__ == "__main__":
    main()
