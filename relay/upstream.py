"""Dialling an upstream bot: TCP (or TLS), our upgrade request, its 101.

`dial_bot()` returns an open `Conn` to the bot, what the bot chose (subprotocol,
extensions), and any bytes the bot sent right after its 101 (its first frames). Failures
become `BotDialError`: 502 when the bot is unreachable, refuses the connection or answers
anything but a valid 101; 504 when it does not answer within `bot_connect_timeout`.
"""

from __future__ import annotations

import base64
import errno
import functools
import ipaddress
import logging
import os
import socket
import ssl
from urllib.parse import urlsplit, urlunsplit

import trio

from .errors import BotDialError
from .handshake import BotAccepted, BotTarget, Headers, check_bot_response
from .http1 import MalformedHead, encode_request, head_end, parse_response_head
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


@functools.lru_cache(maxsize=256)  # bot hosts come from the configuration: a few
def _ip_family(host: str) -> socket.AddressFamily | None:
    """The address family of an IP literal; None for a name (resolved by trio)."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


async def connect_ip(family: socket.AddressFamily, host: str, port: int) -> socket.socket:
    """A non-blocking TCP connection to an IP literal, without trio's resolver and its
    happy-eyeballs nursery (there is one address to try). OSError when it fails."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        return sock
    except BaseException:
        sock.close()
        raise


async def _connect(target: BotTarget, ssl_context: ssl.SSLContext | None) -> Conn:
    family = None if target.secure else _ip_family(target.host)
    if family is not None:  # the fast path: a plaintext bot at an IP address
        try:
            return SocketConn(await connect_ip(family, target.host, target.port))
        except OSError as exc:
            raise BotDialError(502, f"cannot connect to the bot at {target.host}:"
                                    f"{target.port}: {exc.strerror or exc}",
                               reason="unreachable") from exc
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
        request = encode_request(request_target, headers)
    except ValueError as exc:
        raise BotDialError(502, f"cannot send this upgrade to the bot: {exc}") from exc
    try:
        with trio.move_on_after(connect_timeout):
            conn = await _connect(target, ssl_context)
            await conn.send_all(request)
            buf = bytearray(4096)
            got = bytearray()
            while (end := head_end(got)) < 0:
                if len(got) > MAX_RESPONSE_HEAD:
                    raise BotDialError(502, "the bot's handshake response is malformed: "
                                            f"its head exceeds {MAX_RESPONSE_HEAD} bytes")
                n = await conn.receive_into(buf)
                if n == 0:
                    raise BotDialError(502, "the bot closed the connection during the handshake")
                got += buf[:n]
            try:
                status, response_headers = parse_response_head(bytes(got[:end]))
            except MalformedHead as exc:
                raise BotDialError(502, f"the bot's handshake response is malformed: "
                                        f"{exc}") from exc
            result = check_bot_response(key, status, response_headers)
            if isinstance(result, str):
                raise BotDialError(502, result)
            return conn, result, bytes(got[end:])
        raise trio.TooSlowError  # only reached when the deadline cancelled the dial
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
