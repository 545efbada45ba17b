"""Dialling an upstream bot: TCP (or TLS), our upgrade request, its 101.

`dial_bot()` returns an open `Conn` to the bot, what the bot chose (subprotocol,
extensions), and any bytes the bot sent right after its 101 (its first frames). Failures
become `BotDialError`: 502 when the bot is unreachable, refuses the connection or answers
anything but a valid 101; 504 when it does not answer within `bot_connect_timeout`.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import ssl
from urllib.parse import urlsplit, urlunsplit

import h11
import trio

from .errors import BotDialError
from .handshake import BotAccepted, BotTarget, Headers, check_bot_response
from .metrics import Metrics
from .wire import Conn, SocketConn, StreamConn

log = logging.getLogger(__name__)

MAX_RESPONSE_HEAD = 16384  # bytes: a bot's 101 is a few hundred; more is a broken bot


def bot_url_for_logs(url: str) -> str:
    """The bot URL without user info or query string (either may hold a credential)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


DIAL_WARNING_INTERVAL = 10.0  # seconds: at most one WARNING per agent and reason this often


class DialFailures:
    """Failed dials are the bot's fault, not the client's: each is counted, and logged at
    WARNING with the agent, the bot URL and the reason.

    Any client of an auth-none agent can make the gateway dial a dead bot once per
    connection, so the log is bounded: per (agent, reason), at most one line every
    DIAL_WARNING_INTERVAL seconds, saying how many were not logged since. The metric counts
    every one. Memory is bounded too: agents are configured, reasons a fixed set.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._last: dict[tuple[str, str], tuple[float, int]] = {}  # -> (logged at, unlogged)

    def report(self, agent: str, bot_url: str, exc: BotDialError, client_addr: str) -> None:
        self.metrics.bot_dial_failed(agent, exc.reason)
        now = trio.current_time()
        key = (agent, exc.reason)
        last = self._last.get(key)
        if last is not None and now - last[0] < DIAL_WARNING_INTERVAL:
            self._last[key] = (last[0], last[1] + 1)
            return
        self._last[key] = (now, 0)
        more = f" ({last[1]} more since the last report)" if last and last[1] else ""
        log.warning("agent %r: bot %s %s (%s); no session for client %s%s",
                    agent, bot_url_for_logs(bot_url), exc.reason, exc.detail, client_addr,
                    more)


def new_key() -> bytes:
    return base64.b64encode(os.urandom(16))


async def open_tcp_to_bot(target: BotTarget) -> trio.SocketStream:
    """TCP to the bot; an unreachable or refusing bot is BotDialError 502."""
    try:
        return await trio.open_tcp_stream(target.host, target.port)
    except OSError as exc:
        raise BotDialError(502, f"cannot connect to the bot at {target.host}:{target.port}: "
                                f"{exc.strerror or exc}", reason="unreachable") from exc


async def _connect(target: BotTarget, ssl_context: ssl.SSLContext | None) -> Conn:
    stream = await open_tcp_to_bot(target)
    if target.secure:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = ssl_context or ssl.create_default_context()
        tls = trio.SSLStream(stream, ctx, server_hostname=target.host)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            await trio.aclose_forcefully(tls)
            raise BotDialError(502, f"TLS handshake with the bot failed: {exc}",
                               reason="tls") from exc
        return StreamConn(tls, peer=target.host)
    # Take the plain socket out of trio's stream for the fast path (see wire.py).
    fd = stream.socket.detach()
    return SocketConn(socket.socket(fileno=fd))


async def dial_bot(
    target: BotTarget,
    request_target: str,
    headers: Headers,
    key: bytes,
    *,
    connect_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[Conn, BotAccepted, bytes]:
    """Open the bot leg; raises BotDialError (502/504)."""
    conn: Conn | None = None
    try:
        with trio.fail_after(connect_timeout):
            conn = await _connect(target, ssl_context)
            h = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
            data = h.send(h11.Request(method="GET", target=request_target, headers=headers))
            data = (data or b"") + (h.send(h11.EndOfMessage()) or b"")
            await conn.send_all(data)
            buf = bytearray(4096)
            while True:
                try:
                    event = h.next_event()
                except h11.RemoteProtocolError as exc:
                    raise BotDialError(502, f"the bot's handshake response is malformed: "
                                            f"{exc}") from exc
                if event is h11.NEED_DATA:
                    n = await conn.receive_into(buf)
                    h.receive_data(bytes(buf[:n]))
                    continue
                if isinstance(event, h11.InformationalResponse | h11.Response):
                    result = check_bot_response(key, event.status_code, list(event.headers))
                    if isinstance(result, str):
                        raise BotDialError(502, result)
                    if event.status_code != 101:
                        raise BotDialError(502, f"the bot answered HTTP {event.status_code}")
                    trailing, _closed = h.trailing_data
                    return conn, result, bytes(trailing)
                if isinstance(event, h11.ConnectionClosed):
                    raise BotDialError(502, "the bot closed the connection during the handshake")
                # EndOfMessage / Data of a non-101 answer cannot reach here: handled above.
    except trio.TooSlowError as exc:
        if conn is not None:
            await conn.aclose()
        raise BotDialError(504, f"the bot did not answer within {connect_timeout} s") from exc
    except BotDialError:
        if conn is not None:
            await conn.aclose()
        raise
    except BaseException:
        if conn is not None:
            with trio.CancelScope(shield=True):
                await conn.aclose()
        raise
