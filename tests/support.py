"""Test support: a real gateway on loopback port 0, and real upstream bots.

Rules for deterministic network tests (after trio-websocket's test suite): every server
binds 127.0.0.1 port 0 and reports what it bound; nothing waits on wall time; a test that
needs time to pass uses the `autojump_clock` fixture, so timeouts run on trio's fake clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import h11
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from relay.config import Config, build_config
from relay.gateway import Gateway, Ports
from relay.tokens import KeyRing

KEYS = KeyRing.parse("k1:test-secret-one")


@attrs.define
class BotServer:
    """A real upstream WebSocket bot (trio-websocket) that records what it saw."""

    port: int = 0
    requests: list[WebSocketRequest] = attrs.field(factory=list)
    received: list[str | bytes] = attrs.field(factory=list)
    close_codes: list[int | None] = attrs.field(factory=list)
    connected: trio.Event = attrs.field(factory=trio.Event)
    closed: trio.Event = attrs.field(factory=trio.Event)
    subprotocol: str | None = None
    connections: list[WebSocketConnection] = attrs.field(factory=list)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/bot"


BotBehaviour = Callable[[WebSocketConnection, BotServer], Awaitable[None]]


async def echo_behaviour(ws: WebSocketConnection, bot: BotServer) -> None:
    while True:
        message = await ws.get_message()
        bot.received.append(message)
        await ws.send_message(message)


@asynccontextmanager
async def bot_server(behaviour: BotBehaviour = echo_behaviour, *,
                     subprotocol: str | None = None) -> AsyncIterator[BotServer]:
    bot = BotServer(subprotocol=subprotocol)

    async def handler(request: WebSocketRequest) -> None:
        bot.requests.append(request)
        chosen = subprotocol if subprotocol in request.proposed_subprotocols else None
        ws = await request.accept(subprotocol=chosen)
        bot.connections.append(ws)
        bot.connected.set()
        try:
            await behaviour(ws, bot)
        except ConnectionClosed as exc:
            assert exc.reason is not None
            bot.close_codes.append(exc.reason.code)
        finally:
            if ws.closed is not None and (not bot.close_codes or
                                          bot.close_codes[-1] != ws.closed.code):
                bot.close_codes.append(ws.closed.code)
            bot.closed.set()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        bot.port = server.port
        yield bot
        nursery.cancel_scope.cancel()


def make_config(bot: str = "python:relay.echo:echo_bot", *, agent: str = "a",
                server: dict[str, Any] | None = None, **agent_keys: Any) -> Config:
    return build_config(
        server={"ws_bind": ["127.0.0.1:0"], "api_bind": ["127.0.0.1:0"],
                "ping_interval": 1000, "ping_timeout": 1000, **(server or {})},
        agents={agent: {"bot": bot, **agent_keys}},
    )


@attrs.define
class Running:
    gateway: Gateway
    ports: Ports

    @property
    def ws_base(self) -> str:
        host, port = self.ports.ws[0]
        return f"ws://{host}:{port}"

    def url(self, agent: str = "a", suffix: str = "") -> str:
        return f"{self.ws_base}/ws/generic/{agent}.local{suffix}"

    @property
    def ws_port(self) -> int:
        return self.ports.ws[0][1]

    @property
    def api_port(self) -> int:
        return self.ports.api[0][1]


@asynccontextmanager
async def running(config: Config, **kwargs: Any) -> AsyncIterator[Running]:
    kwargs.setdefault("keys", KEYS)
    kwargs.setdefault("wall_clock", trio.current_time)
    gateway = Gateway(config, **kwargs)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(gateway.serve)
        yield Running(gateway, ports)
        await gateway.shutdown()
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_client(url: str, **kwargs: Any) -> AsyncIterator[WebSocketConnection]:
    """`open_websocket_url`, plus closing the client's socket on the way out.

    trio-websocket 0.12 leaves a client's socket open (CLOSE_WAIT, closed only by the
    garbage collector, with a ResourceWarning) when the *server* starts the closing
    handshake, as the gateway does on timeout, replacement, rejection and shutdown.
    """
    from trio_websocket import open_websocket_url

    stream: trio.abc.Stream | None = None
    try:
        async with open_websocket_url(url, **kwargs) as ws:
            stream = ws._stream
            yield ws
    finally:
        if stream is not None:
            with trio.CancelScope(shield=True):
                await stream.aclose()


async def read_until(stream: trio.abc.ReceiveStream, marker: bytes) -> bytes:
    """What ``stream`` sends until ``marker`` has arrived, or until EOF (then without it)."""
    data = b""
    while marker not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data


async def raw_upgrade_status(port: int, path: str) -> int:
    """Send one well-formed upgrade request over raw TCP; the status of the answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\n"
            "connection: Upgrade\r\nsec-websocket-version: 13\r\n"
            "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
        data = await read_until(stream, b"\r\n")
    return int(data.split(b" ", 2)[1])


async def http(
    host: str,
    port: int,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request over a fresh TCP connection, with h11."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request_headers = [("host", f"{host}:{port}"), ("content-length", str(len(body))), *headers]
        data = conn.send(h11.Request(method=method, target=target, headers=request_headers))
        data += conn.send(h11.Data(data=body)) if body else b""
        data += conn.send(h11.EndOfMessage())

        async def send_request() -> None:
            try:
                await stream.send_all(data)
            except trio.BrokenResourceError:  # the server answered early and closed
                pass

        status, response_headers, chunks = 0, {}, []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_request)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65_536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    response_headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            nursery.cancel_scope.cancel()
        return status, response_headers, b"".join(chunks)
