#!/usr/bin/env python3
"""The floor of this design, for `scripts/bench`: a minimal WebSocket relay on Trio, not a product.

Per client connection: read the upgrade, dial the bot with an upgrade of its own, answer 101, then
the shape the gateway mandates: a trio nursery with two relay tasks (client->bot, bot->client) in
a session-timeout cancel scope. No auth, no frame parsing (bytes pass unchanged), no metrics, no
logs, no stream layer. Its costs are the least any relay of this design pays on this machine.
"""

import argparse
import base64
import contextlib
import errno
import gc
import hashlib
import os
import pathlib
import re
import socket

import trio
from trio.lowlevel import notify_closing, wait_readable, wait_writable

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
GC_THRESHOLDS = (20_000, 50, 100)  # as relay/server.py
BUF = bytearray(256 * 1024)  # one receive buffer: trio runs one task at a time
VIEW = memoryview(BUF)
KEY = re.compile(rb"^sec-websocket-key:[ \t]*(\S+)", re.I | re.M)
BOT_UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n")
SWITCHING = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Accept: %s\r\n\r\n")


def nonblocking(sock: socket.socket) -> socket.socket:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def send_all(sock: socket.socket, data: bytes | memoryview) -> None:
    """Send it all; what the kernel does not take at once is copied out of BUF first."""
    view = memoryview(data)
    while True:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            pass
        if not view:
            return
        view = memoryview(bytes(view)) if view.obj is BUF else view
        await wait_writable(sock)


async def read_head(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """An HTTP head up to CRLFCRLF (<= 16 KiB) and the bytes after it; None on EOF/overflow."""
    buf = b""
    while (end := buf.find(b"\r\n\r\n")) < 0 and len(buf) <= 16 * 1024:
        await wait_readable(sock)
        try:
            chunk = sock.recv(4096)
        except BlockingIOError:
            continue
        if not chunk:
            return None
        buf += chunk
    return (buf[:end], buf[end + 4:]) if end >= 0 else None


async def pump(src: socket.socket, dst: socket.socket, scope: trio.CancelScope) -> None:
    """Copy bytes src -> dst until EOF or an error, then end the session (cancel `scope`)."""
    with contextlib.suppress(OSError):
        while True:
            await wait_readable(src)
            try:
                n = src.recv_into(BUF)
            except BlockingIOError:
                continue
            if not n:
                break
            await send_all(dst, VIEW[:n])
    scope.cancel()


async def session(client: socket.socket, bot_addr: tuple[str, int]) -> None:
    bot = None
    try:
        got = await read_head(nonblocking(client))
        if not (key := got and KEY.search(got[0])):
            return
        bot = nonblocking(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        if bot.connect_ex(bot_addr) not in (0, errno.EINPROGRESS):
            return
        await wait_writable(bot)
        if bot.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            return
        own_key = base64.b64encode(os.urandom(16))  # + any frames the client sent early:
        await send_all(bot, BOT_UPGRADE % (bot_addr[0].encode(), bot_addr[1], own_key) + got[1])
        if not (answer := await read_head(bot)) or not answer[0].startswith(b"HTTP/1.1 101"):
            return
        accept = base64.b64encode(hashlib.sha1(key[1] + GUID).digest())
        await send_all(client, SWITCHING % accept + answer[1])  # + any early bot frames
        with trio.move_on_after(3600):  # the session timeout
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, bot, nursery.cancel_scope)
                nursery.start_soon(pump, bot, client, nursery.cancel_scope)
    except OSError:  # a failed set-up ends this session (closed, no answer), not the server
        pass
    finally:
        for s in filter(None, (client, bot)):
            notify_closing(s)
            s.close()


async def serve(listener: socket.socket, bot_addr: tuple[str, int]) -> None:
    async with trio.open_nursery() as nursery:
        while True:  # accept until the backlog is empty, then wait for the listener
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                await wait_readable(listener)
            except OSError:  # EMFILE etc.: back off instead of spinning
                await trio.sleep(0.1)
            else:
                nursery.start_soon(session, conn, bot_addr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", help="write the bound port here once listening")
    bot = ap.add_mutually_exclusive_group(required=True)
    bot.add_argument("--bot-port", type=int, help="the echo bot on 127.0.0.1:N")
    bot.add_argument("--bot", help="the echo bot as IPv4-HOST:PORT")
    args = ap.parse_args()
    host, _, port = args.bot.rpartition(":") if args.bot else ("127.0.0.1", "", args.bot_port)
    listener = socket.create_server((args.host, args.port), backlog=4096)  # SO_REUSEADDR on
    listener.setblocking(False)
    if args.port_file:  # one write(2) of a few bytes: never seen half-written
        pathlib.Path(args.port_file).write_text(f"{listener.getsockname()[1]}\n")
    gc.freeze()  # as relay/server.py: start-up objects out of the GC, collections rarer
    gc.set_threshold(*GC_THRESHOLDS)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, listener, (host, int(port)))


if __name__ == "__main__":
    main()
