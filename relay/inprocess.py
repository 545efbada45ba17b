"""In-process bots: the gateway is the WebSocket end itself (wsproto on the client stream).

A bot is `async def bot(session: Session) -> None`, named in config as
`python:package.module:function`. The session nursery holds the reader (client frames →
wsproto events → whole messages → the bot's inbox), the bot task, and the keepalive task.

- `session.receive()` returns str or bytes; raises `ClientDisconnected` once the client
  has left. The inbox is small, so a bot that does not read slows the client (TCP
  backpressure), and memory stays bounded by `INBOX` messages of `max_message_size`.
- `session.send()` writes at once; a client that accepts nothing for `stall_timeout` ends
  the session with 1008. After the client has left it raises `ClientDisconnected`.
- `session.close(code, reason)` closes the client with that code.
- The bot returning closes the client with 1000; the bot raising closes it with 1011
  (logged). Once the client has left, the bot gets `close_timeout` seconds to finish its
  own cleanup before it is cancelled.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from . import closing
from .closing import Outcome
from .config import Limits
from .errors import ConfigError
from .frames import MAX_FRAME_PAYLOAD, FrameScanner
from .wire import Conn, ConnectionLost, Stalled

log = logging.getLogger(__name__)

INBOX = 4  # messages a bot may leave unread before the client is slowed down
READ_CHUNK = 16384  # bytes per socket read

BotFunction = Callable[["Session"], Awaitable[None]]


class ClientDisconnected(Exception):
    """The client has left; no more messages will come or go."""


def load_bot(spec: str) -> BotFunction:
    """Import `python:package.module:function`; ConfigError when it cannot be found."""
    target = spec.removeprefix("python:")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        fn = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load bot {spec!r}: {exc}", key="bot") from exc
    if not callable(fn):
        raise ConfigError(f"bot {spec!r} is not callable", key="bot")
    return fn  # type: ignore[no-any-return]


class Session:
    """What an in-process bot sees of its client."""

    def __init__(self, leg: BotHost, *, id: str, agent: str, organization: str,
                 body: Any, client_addr: str, query: str) -> None:
        self._leg = leg
        self.id = id
        self.agent = agent
        self.organization = organization
        self.body = body
        self.client_addr = client_addr
        self.query = query

    async def receive(self) -> str | bytes:
        try:
            return await self._leg.inbox_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ClientDisconnected("the client has left") from None

    async def send(self, message: str | bytes) -> None:
        if not isinstance(message, str | bytes | bytearray):
            raise TypeError("session.send() takes str or bytes")
        if isinstance(message, str):
            await self._leg.send_event(TextMessage(data=message))
        else:
            await self._leg.send_event(BytesMessage(data=bytes(message)))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self._leg.bot_closed((code, closing.close_reason_text(reason)))
        await self._leg.send_close(code, reason)


class BotHost:
    """Runs one in-process bot for one client: what every transport shares.

    A subclass provides the client side: `send_event(TextMessage | BytesMessage)`,
    `send_close(code, reason)`, a reader that feeds `inbox_send` and calls
    `_client_gone()`, and `run()` / `close()`. `InprocessLeg` does it with wsproto on
    the gateway's own socket; `embedded.py` over a trio-websocket connection.
    """

    def __init__(self, bot: BotFunction, limits: Limits, session_kwargs: dict[str, Any]
                 ) -> None:
        self.bot = bot
        self.limits = limits
        self.session = Session(self, **session_kwargs)
        self.inbox_send, self.inbox_recv = trio.open_memory_channel[str | bytes](INBOX)
        self.outcome: Outcome | None = None
        self._nursery: trio.Nursery | None = None
        self._client_left = False
        self.client_close: tuple[int | None, str] | None = None  # the client's own close
        self.bot_close: tuple[int, str] | None = None  # the bot's session.close()

    def end(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def ending_close(self, outcome: Outcome) -> tuple[int | None, str]:
        """The close that ended the session (for the session log): the closing side's own
        when it closed, else the gateway's; (None, "") when the client vanished."""
        if outcome.reason == "client_closed" and self.client_close is not None:
            return self.client_close
        if outcome.reason == "bot_closed":
            return self.bot_close or outcome.to_client or (1000, "")
        sent = outcome.to_client or outcome.to_bot
        return sent if sent is not None else (None, "")

    def bot_closed(self, code: tuple[int, str]) -> None:
        self.bot_close = self.bot_close or code
        if self.outcome is None:
            self.outcome = closing.BOT_CLOSED

    async def send_event(self, event: Event) -> None:
        raise NotImplementedError

    async def send_close(self, code: int, reason: str) -> None:
        raise NotImplementedError

    async def _reader(self) -> None:
        """Client messages into `inbox_send`; `_client_gone()` when the client leaves."""
        raise NotImplementedError

    async def _keepalive(self) -> None:
        """Ping the client every ping_interval; end the session when it stops answering."""
        raise NotImplementedError

    async def run(self) -> None:
        """The session nursery: the client's reader, the bot, and the keepalive."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._reader)
            nursery.start_soon(self._run_bot)
            if self.limits.ping_interval and math.isfinite(self.limits.ping_interval):
                nursery.start_soon(self._keepalive)

    async def _run_bot(self) -> None:
        try:
            await self.bot(self.session)
        except ClientDisconnected:
            pass
        except Exception:
            log.exception("in-process bot %r failed", self.session.agent)
            self.end(closing.BOT_CRASHED)
            return
        if self.outcome is None:
            # The bot finished on its own: a normal close.
            self.outcome = Outcome("bot_closed", (1000, ""), None)
        self.end(self.outcome)

    def _client_gone(self, outcome: Outcome) -> None:
        """The client left: the bot gets close_timeout to finish, then is cancelled."""
        self._client_left = True
        if self.outcome is None:
            self.outcome = outcome
        self.inbox_send.close()
        assert self._nursery is not None
        scope = self._nursery.cancel_scope
        scope.deadline = min(scope.deadline, trio.current_time() + self.limits.close_timeout)


class InprocessLeg(BotHost):
    """Runs one in-process bot against one client stream, with wsproto on our socket."""

    def __init__(self, conn: Conn, bot: BotFunction, limits: Limits, *, initial: bytes,
                 session_kwargs: dict[str, Any]) -> None:
        super().__init__(bot, limits, session_kwargs)
        self.conn = conn
        self.ws = Connection(ConnectionType.SERVER, trailing_data=initial)
        self._send_lock = trio.Lock()
        self._close_received = False
        self._pong: tuple[bytes, trio.Event] | None = None
        # Relayed counts, as the passthrough path keeps them: the client's bytes go through
        # a frame scanner too (it only counts; wsproto decides), the bot's are counted as sent.
        self._scanner = FrameScanner(masked=True, max_message_size=MAX_FRAME_PAYLOAD)
        self._count_in(initial)
        self._sent_messages = 0
        self._sent_bytes = 0

    def relayed(self) -> tuple[int, int, int, int]:
        """Messages and payload bytes so far: client→bot, then bot→client."""
        s = self._scanner
        return (s.messages, s.data_bytes - s.header_bytes,
                self._sent_messages, self._sent_bytes)

    def _count_in(self, data: bytes | memoryview) -> None:
        if data and not self._scanner.failed:
            self._scanner.feed(memoryview(data))

    # -- writing -------------------------------------------------------------------------

    async def send_event(self, event: Event) -> None:
        if self._client_left or self.ws.state is not ConnectionState.OPEN:
            raise ClientDisconnected("the client has left")
        async with self._send_lock:
            try:
                data = self.ws.send(event)
            except LocalProtocolError as exc:
                raise ClientDisconnected(str(exc)) from exc
            try:
                await self.conn.send_all(data, self.limits.stall_timeout)
                if isinstance(event, TextMessage | BytesMessage):
                    self._sent_messages += 1
                    self._sent_bytes += _payload_size(len(data))
            except ConnectionLost:
                self._client_left = True
                self.end(closing.CLIENT_GONE)
                raise ClientDisconnected("the client has left") from None
            except Stalled:
                self.end(closing.CLIENT_STALLED)
                raise ClientDisconnected("the client stopped reading") from None

    async def send_close(self, code: int, reason: str) -> None:
        if self.ws.state is not ConnectionState.OPEN:
            return
        async with self._send_lock:
            try:
                data = self.ws.send(CloseConnection(code=code, reason=reason))
            except LocalProtocolError:
                return
            try:
                await self.conn.send_all(data, self.limits.stall_timeout)
            except (ConnectionLost, Stalled):
                self._client_left = True

    # -- the session nursery -------------------------------------------------------------

    async def _reader(self) -> None:
        buf = bytearray(READ_CHUNK)
        parts: list[str | bytes] = []
        size = 0
        limit = self.limits.max_message_size
        while True:
            for event in self.ws.events():
                if isinstance(event, TextMessage | BytesMessage):
                    size += _payload_len(event.data)
                    if size > limit:
                        self.end(closing.client_violation(
                            1009, f"message exceeds {limit} bytes"))
                        return
                    data = event.data
                    parts.append(bytes(data) if isinstance(data, bytearray) else data)
                    if event.message_finished:
                        if isinstance(event, TextMessage):
                            message: str | bytes = "".join(parts)  # type: ignore[arg-type]
                        else:
                            message = b"".join(parts)  # type: ignore[arg-type]
                        parts, size = [], 0
                        try:
                            await self.inbox_send.send(message)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                elif isinstance(event, Ping):
                    try:
                        await self.send_event(event.response())
                    except ClientDisconnected:
                        return
                elif isinstance(event, Pong):
                    if self._pong is not None and bytes(event.payload) == self._pong[0]:
                        self._pong[1].set()
                elif isinstance(event, CloseConnection):
                    if self.ws.state is ConnectionState.OPEN:
                        # Not the client's close: wsproto found a protocol error in its
                        # bytes (1002, 1007). The client gets that code; the session ends.
                        self.end(closing.client_violation(
                            event.code, closing.close_reason_text(event.reason or "")))
                        return
                    self._close_received = True
                    if self.client_close is None:
                        self.client_close = (int(event.code), event.reason or "")
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        # The client closed first: answer with its own code.
                        async with self._send_lock:
                            try:
                                data = self.ws.send(event.response())
                                await self.conn.send_all(data, self.limits.stall_timeout)
                            except (LocalProtocolError, ConnectionLost, Stalled):
                                pass
                        if event.code in (1002, 1007) and self.outcome is None:
                            self.outcome = closing.client_violation(event.code)
                        self._client_gone(closing.CLIENT_CLOSED)
                    return
            n = await self.conn.receive_into(buf)
            if n == 0:
                self.ws.receive_data(None)
                self._client_gone(closing.CLIENT_GONE)
                return
            self._count_in(memoryview(buf)[:n])
            self.ws.receive_data(bytes(buf[:n]))

    async def _keepalive(self) -> None:
        count = 0
        while True:
            await trio.sleep(self.limits.ping_interval)
            count += 1
            payload = b"relay-keepalive-%d" % count
            answered = trio.Event()
            self._pong = (payload, answered)
            with trio.move_on_after(self.limits.ping_timeout) as scope:
                try:
                    await self.send_event(Ping(payload=payload))
                except ClientDisconnected:
                    return
                await answered.wait()
            if scope.cancelled_caught:
                self._client_left = True
                self.end(closing.CLIENT_GONE)
                return

    # -- teardown ------------------------------------------------------------------------

    async def close(self, outcome: Outcome) -> None:
        """Close the client as the outcome says, await its answer, close the socket."""
        try:
            with trio.move_on_after(self.limits.close_timeout, shield=True):
                if not self._client_left and outcome.to_client is not None:
                    await self.send_close(*outcome.to_client)
                    await self._await_close()
        finally:
            with trio.CancelScope(shield=True):
                await self.conn.aclose()

    async def _await_close(self) -> None:
        buf = bytearray(READ_CHUNK)
        while not self._close_received and self.ws.state is not ConnectionState.CLOSED:
            n = await self.conn.receive_into(buf)
            if n == 0:
                return
            self.ws.receive_data(bytes(buf[:n]))
            for event in self.ws.events():
                if isinstance(event, CloseConnection):
                    return


def _payload_size(frame_size: int) -> int:
    """The payload of one unmasked, uncompressed frame of frame_size bytes (RFC 6455 §5.2:
    the header is 2 bytes, 4 from 126 payload bytes, 10 from 65536)."""
    if frame_size - 2 < 126:
        return frame_size - 2
    if frame_size - 4 < 65536:
        return frame_size - 4
    return frame_size - 10


def _payload_len(data: str | bytes | bytearray) -> int:
    """Bytes on the wire: max_message_size counts UTF-8 bytes, not characters."""
    if isinstance(data, str) and not data.isascii():  # isascii() is O(1) on str
        return len(data.encode("utf-8"))
    return len(data)
