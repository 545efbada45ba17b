"""The embedding path's upstream bot leg: dialled with trio-websocket (``embedded.py``).

``dial`` opens TCP (and TLS for wss://), sends the bot the same request headers as the
fast path (``handshake.bot_request_headers``) and fails fast with ``BotDialError``: 504
after bot_connect_timeout, 502 when the bot refuses, drops or answers unusably.
"""

from __future__ import annotations

import ssl

import attrs
import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

from .auth import Grant
from .closing import CloseCode
from .config import AgentConfig
from .embedded_ws import close_ws
from .errors import BotDialError
from .handshake import Route, Upgrade, bot_request_headers, bot_request_target, parse_bot_url
from .runtime import Runtime
from .upstream import open_tcp_to_bot

__all__ = ["BotLeg", "dial", "leaf"]

# Handshake headers trio-websocket (wsproto) writes itself on the bot leg.
_OWN_HEADERS = frozenset({b"host", b"upgrade", b"connection", b"sec-websocket-key",
                          b"sec-websocket-version", b"sec-websocket-protocol",
                          b"sec-websocket-extensions"})


def leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


@attrs.define(eq=False)
class BotLeg:
    """The upstream bot's WebSocket and the stream under it (ours to close at the end)."""

    ws: WebSocketConnection
    stream: trio.abc.Stream

    async def close(self, close: CloseCode | None, within: float) -> None:
        """Close the WebSocket, then the stream: a client-side trio-websocket leaves the
        stream open after a close the bot started, until the bot drops TCP."""
        try:
            await close_ws(self.ws, close, within)
        finally:
            await _discard(self.stream)


async def dial(nursery: trio.Nursery, rt: Runtime, agent: AgentConfig, r: Route,
               upgrade: Upgrade, grant: Grant, peer: str) -> BotLeg:
    """Open the bot leg with trio-websocket; raises BotDialError (502/504).

    The bot's reader task runs in `nursery`. A bot that answers with anything but a 101
    makes that task raise `ConnectionRejected` into `nursery`: the caller maps it to 502.
    """
    target = parse_bot_url(agent.bot)
    extra_query, extra_headers = grant.bot_extras(agent)
    headers = [(k, v) for k, v in bot_request_headers(
        target, upgrade.key, upgrade, session_id=grant.session_id, agent=agent.name,
        organization=rt.config.server.organization, client_addr=peer, extra=extra_headers)
        if k not in _OWN_HEADERS]
    resource = bot_request_target(target, r.bot_query, extra_query)
    timeout = agent.limits.bot_connect_timeout
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
    try:
        with trio.fail_after(timeout):
            stream = await open_tcp_to_bot(target)
            if target.secure:
                stream = trio.SSLStream(stream, rt.bot_ssl or ssl.create_default_context(),
                                        server_hostname=target.host, https_compatible=True)
            ws = await _handshake(nursery, stream, target.host_header, resource,
                                  [p.decode() for p in upgrade.subprotocols], headers,
                                  agent.limits.max_message_size)
            return BotLeg(ws, stream)
    except trio.TooSlowError:
        await _discard(stream)
        raise BotDialError(504, f"the bot did not answer within {timeout} s") from None
    except BaseException:
        await _discard(stream)
        raise


async def _discard(stream: trio.abc.Stream | None) -> None:
    if stream is not None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


async def _handshake(nursery: trio.Nursery, stream: trio.SocketStream
                     | trio.SSLStream[trio.SocketStream], host: str, resource: str,
                     subprotocols: list[str], headers: list[tuple[bytes, bytes]],
                     max_message_size: int) -> WebSocketConnection:
    """trio-websocket's client handshake, failing fast when its reader gives up.

    `wrap_client_stream` waits for the bot's 101 forever when the bot drops the connection,
    answers garbage or fails TLS (its reader just stops). So the reader runs in a nursery
    of its own, hosted in `nursery`, and its end before the 101 is a 502.
    """
    gate = trio.Event()
    reader_done = trio.Event()

    async def host_reader(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
        try:
            async with trio.open_nursery() as inner:
                task_status.started(inner)
                await gate.wait()  # keeps `inner` open until the reader is in it
        finally:
            reader_done.set()

    ws: WebSocketConnection | None = None
    try:
        inner: trio.Nursery = await nursery.start(host_reader)
        async with trio.open_nursery() as race:

            async def watch() -> None:
                await reader_done.wait()
                race.cancel_scope.cancel()

            race.start_soon(watch)
            # No checkpoint between gate.set() and the reader's start_soon in
            # wrap_client_stream, so `inner` is still open when the reader joins it.
            gate.set()
            ws = await wrap_client_stream(inner, stream, host, resource,
                                          subprotocols=subprotocols, extra_headers=headers,
                                          max_message_size=max_message_size)
            race.cancel_scope.cancel()
    finally:
        gate.set()  # never leave host_reader waiting, whatever happened
    if ws is None:
        raise BotDialError(502, "the bot closed the connection or answered unusably "
                                "during the handshake")
    return ws
