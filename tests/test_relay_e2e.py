"""End to end on loopback: a real client → a real Gateway → a real upstream bot.

Clients are trio-websocket (`open_websocket_url`) or raw wsproto on a trio socket (`Peer`)
when a test needs exact control of frames (fragments, pings, empty closes, TCP drops,
permessage-deflate) or must see the bytes on the wire. Upstream bots are trio-websocket
(`support.bot_server`) or raw wsproto servers (`raw_bot`). Time only passes on trio's fake
clock (`autojump_clock`); every other wait is bounded with `trio.fail_after`.

SPEC §5 is the contract: the close-code table, relay pass-through, handshake pass-through
and bot dial failures; §8 for session timeout timing and frame pass-through.
"""

from __future__ import annotations

import json
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from support import BotServer, bot_server, make_config, read_until, running
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameProtocol
from wsproto.utilities import LocalProtocolError, generate_accept_token

from relay.inprocess import ClientDisconnected, Session
from relay.pump import CHUNK

WAIT = 10  # seconds: the bound on any single wait that involves only loopback I/O
EMPTY_CLOSE = CloseReason.NO_STATUS_RCVD  # wsproto sends a close frame without payload
NEVER_SENT_BY_GATEWAY = (1005, 1006, 1015)

@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """pytest-trio's autojump clock, but jumping only after 50 ms of real idleness.

    These tests use real loopback sockets: on a loaded machine the kernel may deliver a
    segment a little after send() returns, and a clock that jumps at once (threshold 0)
    could fire a timeout while bytes are in flight.
    """
    return trio.testing.MockClock(autojump_threshold=0.05)


OPEN_STREAMS: list[trio.abc.Stream] = []  # raw client streams, closed after each test


@pytest.fixture(autouse=True)
async def _close_raw_clients() -> AsyncIterator[None]:
    yield
    while OPEN_STREAMS:
        await trio.aclose_forcefully(OPEN_STREAMS.pop())


# -- wire-level helpers -------------------------------------------------------------------


@attrs.frozen
class Frame:
    fin: bool
    rsv1: bool
    opcode: int
    masked: bool
    payload: bytes  # unmasked


def parse_frames(data: bytes) -> list[Frame]:
    """Cut a WebSocket byte stream into frames (RFC 6455 §5.2); stops at a partial frame."""
    frames = []
    i = 0
    while i + 2 <= len(data):
        b0, b1 = data[i], data[i + 1]
        n = b1 & 0x7F
        j = i + 2
        if n == 126:
            n = int.from_bytes(data[j : j + 2], "big")
            j += 2
        elif n == 127:
            n = int.from_bytes(data[j : j + 8], "big")
            j += 8
        key = b""
        if b1 & 0x80:
            key = bytes(data[j : j + 4])
            j += 4
        if j + n > len(data):
            break
        payload = bytes(data[j : j + n])
        if key:
            mask = (key * (n // 4 + 1))[:n]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(
                n, "big")
        frames.append(Frame(bool(b0 & 0x80), bool(b0 & 0x40), b0 & 0x0F, bool(key), payload))
        i = j + n
    return frames


def message_event(data: str | bytes, finished: bool = True) -> TextMessage | BytesMessage:
    """wsproto's event for one message (or fragment): text for str, binary for bytes."""
    if isinstance(data, str):
        return TextMessage(data=data, message_finished=finished)
    return BytesMessage(data=data, message_finished=finished)


class PeerClosed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed {code} {reason!r}")
        self.code = code
        self.reason = reason


class Peer:
    """One end of a WebSocket on a raw trio stream, driven by wsproto: exact frame control.

    Records every byte received (`wire`) so a test can look at the frames as they came.
    """

    def __init__(self, stream: trio.abc.Stream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.wire = bytearray()
        self.events: deque[Event] = deque()
        self.accepted: AcceptConnection | None = None
        self.eof = False

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def send_message(self, data: str | bytes, *, finished: bool = True) -> None:
        await self.send(message_event(data, finished))

    async def _fill(self) -> None:
        if self.eof:
            raise AssertionError("no more events: the connection is gone")
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        self.wire += data
        if not data:
            self.eof = True
            if self.ws.state is not ConnectionState.CLOSED:
                self.ws.receive_data(None)
        elif self.ws.state is not ConnectionState.CLOSED:
            self.ws.receive_data(bytes(data))
        self.events.extend(self.ws.events())

    async def event(self) -> Event:
        while not self.events:
            await self._fill()
        return self.events.popleft()

    async def message(self) -> str | bytes:
        """The next whole message; answers pings; PeerClosed on a close."""
        parts: list[Any] = []
        while True:
            ev = await self.event()
            if isinstance(ev, Ping):
                await self.send(ev.response())
            elif isinstance(ev, Pong):
                continue
            elif isinstance(ev, CloseConnection):
                raise PeerClosed(*await self.answer_close(ev))
            else:
                assert isinstance(ev, TextMessage | BytesMessage), ev
                parts.append(ev.data)
                if ev.message_finished:
                    if isinstance(ev, TextMessage):
                        return "".join(parts)
                    return b"".join(bytes(p) for p in parts)

    def wire_close(self) -> tuple[int, str] | None:
        """The (code, reason) of the last close frame received, read from the wire itself.

        wsproto refuses some registered codes (1014 "bad gateway" among them) and reports
        1002 instead, so the wire is the authority; an empty close frame reads as 1005.
        """
        closes = [f for f in self.frames() if f.opcode == 8]
        if not closes:
            return None
        payload = closes[-1].payload
        if not payload:
            return 1005, ""
        return int.from_bytes(payload[:2], "big"), payload[2:].decode()

    async def answer_close(self, close: CloseConnection) -> tuple[int, str]:
        """Answer the peer's close with its own code (unless we closed first)."""
        got = self.wire_close() if close.code != 1006 else None
        code, reason = got if got is not None else (close.code, close.reason or "")
        if self.ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            answer = (CloseConnection(code=EMPTY_CLOSE) if code == 1005
                      else CloseConnection(code=code, reason=reason))
            try:
                await self.send(answer)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        return code, reason

    async def close_code(self) -> tuple[int, str]:
        """Read (dropping messages) until the peer's close; answer it; (code, reason)."""
        while True:
            ev = await self.event()
            if isinstance(ev, Ping):
                try:
                    await self.send(ev.response())
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            elif isinstance(ev, CloseConnection):
                return await self.answer_close(ev)

    async def close(self, code: int, reason: str | None = None) -> tuple[int, str]:
        """Send our close and wait for the answer; the answering (code, reason)."""
        await self.send(CloseConnection(code=code, reason=reason))
        while True:
            ev = await self.event()
            if isinstance(ev, CloseConnection):
                got = self.wire_close() if ev.code != 1006 else None
                return got if got is not None else (ev.code, ev.reason or "")

    async def wait_eof(self) -> None:
        """Read until the other end closes the TCP connection."""
        while not self.eof:
            await self._fill()

    async def drop(self) -> None:
        """Vanish: close the TCP connection without a close frame."""
        await self.stream.aclose()

    def frames(self) -> list[Frame]:
        """Frames received after the HTTP handshake."""
        head = self.wire.find(b"\r\n\r\n")
        assert head >= 0
        return parse_frames(bytes(self.wire[head + 4 :]))


@attrs.frozen
class Rejected:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def envelope(self) -> dict[str, Any]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data


async def ws_connect(
    port: int,
    target: str = "/ws/generic/a.local",
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    subprotocols: list[str] | None = None,
    extensions: list[Any] | None = None,
) -> Peer | Rejected:
    """A raw wsproto client's upgrade; the open Peer, or the gateway's HTTP refusal."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    OPEN_STREAMS.append(stream)
    ws = WSConnection(ConnectionType.CLIENT)
    peer = Peer(stream, ws)
    await peer.send(Request(host=f"127.0.0.1:{port}", target=target,
                            extra_headers=headers or [], subprotocols=subprotocols or [],
                            extensions=extensions or []))
    ev = await peer.event()
    if isinstance(ev, AcceptConnection):
        peer.accepted = ev
        return peer
    assert isinstance(ev, RejectConnection), ev
    body = b""
    if ev.has_body:
        while True:
            data = await peer.event()
            assert isinstance(data, RejectData)
            body += data.data
            if data.body_finished:
                break
    await stream.aclose()
    return Rejected(ev.status_code, {k.lower(): v for k, v in ev.headers}, body)


async def connect(port: int, target: str = "/ws/generic/a.local", **kwargs: Any) -> Peer:
    got = await ws_connect(port, target, **kwargs)
    assert isinstance(got, Peer), got
    return got


@attrs.define
class RawBot:
    """A raw wsproto upstream bot; `handler(peer, request, bot)` runs per connection."""

    port: int = 0
    requests: list[Request] = attrs.field(factory=list)
    peers: list[Peer] = attrs.field(factory=list)
    connected: trio.Event = attrs.field(factory=trio.Event)
    done: trio.Event = attrs.field(factory=trio.Event)
    closes: list[tuple[int, str]] = attrs.field(factory=list)
    received: list[str | bytes] = attrs.field(factory=list)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/bot"


RawHandler = Callable[[Peer, Request, RawBot], Awaitable[None]]


async def accept(peer: Peer, *, subprotocol: str | None = None,
                 extensions: list[Any] | None = None, then: bytes = b"") -> None:
    data = peer.ws.send(AcceptConnection(subprotocol=subprotocol, extensions=extensions or []))
    await peer.stream.send_all(data + then)


async def raw_echo(peer: Peer, request: Request, bot: RawBot) -> None:
    await accept(peer)
    bot.connected.set()
    try:
        while True:
            message = await peer.message()
            bot.received.append(message)
            await peer.send_message(message)
    except PeerClosed as exc:
        bot.closes.append((exc.code, exc.reason))


@asynccontextmanager
async def raw_bot(handler: RawHandler = raw_echo) -> AsyncIterator[RawBot]:
    bot = RawBot()

    async def on_conn(stream: trio.SocketStream) -> None:
        peer = Peer(stream, WSConnection(ConnectionType.SERVER))
        bot.peers.append(peer)
        try:
            request = await peer.event()
            assert isinstance(request, Request)
            bot.requests.append(request)
            await handler(peer, request, bot)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            bot.done.set()
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, on_conn, 0, host="127.0.0.1"))
        bot.port = listeners[0].socket.getsockname()[1]
        yield bot
        nursery.cancel_scope.cancel()


def record_close(into: list[tuple[int, str]]) -> Callable[[WebSocketConnection, BotServer],
                                                            Awaitable[None]]:
    """A trio-websocket echo bot behaviour that also records the close's (code, reason)."""

    async def behaviour(ws: WebSocketConnection, bot: BotServer) -> None:
        try:
            while True:
                message = await ws.get_message()
                bot.received.append(message)
                await ws.send_message(message)
        except ConnectionClosed as exc:
            assert exc.reason is not None
            into.append((exc.reason.code, exc.reason.reason or ""))
            raise

    return behaviour


async def wait_closed(bot: BotServer) -> int | None:
    with trio.fail_after(WAIT):
        await bot.closed.wait()
    return bot.close_codes[-1]


# -- 1. the close-code table (SPEC §5) ----------------------------------------------------

CLOSES = [
    (1000, ""),
    (1000, "bye"),
    (1001, "going away"),
    (1011, "internal"),
    (3000, "registered"),
    (4321, "custom reason"),
    (4999, "ünïcødé reason"),
    (4000, "x" * 123),
]


BOTS_OWN_ANSWER = (1000, "the bot's own answer")


async def answer_close_with_own_code(peer: Peer, request: Request, bot: RawBot) -> None:
    """Echo messages; answer a close with a code and reason of its own (RFC 6455 allows
    any), so a test can tell the bot's answer from an echo made by the gateway."""
    await accept(peer)
    while True:
        ev = await peer.event()
        if isinstance(ev, TextMessage):
            await peer.send_message(ev.data)
        elif isinstance(ev, CloseConnection):
            bot.closes.append(peer.wire_close() or (0, ""))
            await peer.send(CloseConnection(*BOTS_OWN_ANSWER))
            return


@pytest.mark.parametrize(("code", "reason"), CLOSES)
async def test_client_close_code_and_reason_reach_bot_unchanged(code: int, reason: str) -> None:
    async with raw_bot(answer_close_with_own_code) as bot, \
            running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send_message("hi")
            assert await client.message() == "hi"
            answer = await client.close(code, reason)
            await bot.done.wait()
        assert bot.closes == [(code, reason)]
        assert answer == BOTS_OWN_ANSWER  # the bot's answer came back, not an echo of ours


async def test_client_whose_bot_never_answers_its_close_gets_its_code_back_at_close_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def silent(peer: Peer, request: Request, bot: RawBot) -> None:
        await accept(peer)
        while not isinstance(await peer.event(), CloseConnection):
            pass
        bot.closes.append(peer.wire_close() or (0, ""))
        await peer.wait_eof()  # never answers; the gateway drops the leg

    async with raw_bot(silent) as bot, running(make_config(bot.url, close_timeout=3)) as gw:
        with trio.fail_after(60):
            client = await connect(gw.ws_port)
            sent = trio.current_time()
            answer = await client.close(4321, "bye")
            answered_after = trio.current_time() - sent
            await client.wait_eof()
            await bot.done.wait()
    assert bot.closes == [(4321, "bye")]
    assert answer == (4321, "bye")  # the gateway answered for the silent bot
    assert answered_after == pytest.approx(3, abs=0.2)


@pytest.mark.parametrize(("code", "reason"), CLOSES)
async def test_bot_close_code_and_reason_reach_client_unchanged(code: int, reason: str) -> None:
    async def closer(ws: WebSocketConnection, bot: BotServer) -> None:
        await ws.get_message()
        await ws.aclose(code, reason)

    async with bot_server(closer) as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send_message("close please")
            assert await client.close_code() == (code, reason)
        assert await wait_closed(bot) == code


async def test_client_empty_close_frame_reaches_bot_empty() -> None:
    async with raw_bot() as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send_message("x")
            assert await client.message() == "x"
            answer = await client.close(EMPTY_CLOSE)
            await bot.done.wait()
        assert bot.closes == [(1005, "")]
        close_frames = [f for f in bot.peers[0].frames() if f.opcode == 8]
        assert close_frames == [Frame(True, False, 8, True, b"")]
        assert answer[0] == 1005  # the bot's (empty) answer came back empty too
        assert [f.payload for f in client.frames() if f.opcode == 8] == [b""]


async def test_bot_empty_close_frame_reaches_client_empty() -> None:
    async def closer(peer: Peer, request: Request, bot: RawBot) -> None:
        await accept(peer)
        await peer.message()
        bot.closes.append(await peer.close(EMPTY_CLOSE))

    async with raw_bot(closer) as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send_message("close please")
            assert await client.close_code() == (1005, "")
            await bot.done.wait()
        assert [f for f in client.frames() if f.opcode == 8] == [
            Frame(True, False, 8, False, b"")]
        assert bot.closes == [(1005, "")]


async def test_client_tcp_drop_closes_bot_with_1001() -> None:
    async with bot_server() as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send_message("x")
            assert await client.message() == "x"
            await client.drop()
        assert await wait_closed(bot) == 1001


async def test_bot_tcp_drop_closes_client_with_1014_bad_gateway() -> None:
    async def dropper(peer: Peer, request: Request, bot: RawBot) -> None:
        await accept(peer)
        await peer.message()
        await peer.drop()

    async with raw_bot(dropper) as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send_message("drop")
            assert await client.close_code() == (1014, "bad gateway")
            assert client.frames()[-1].opcode == 8  # a real close frame, not a TCP drop


async def test_session_timeout_closes_both_with_4000_at_exact_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    closes: list[tuple[int, str]] = []
    infos: list[Any] = []
    closed_at: list[float] = []

    async def timed(ws: WebSocketConnection, bot: BotServer) -> None:
        try:
            await record_close(closes)(ws, bot)
        finally:
            closed_at.append(trio.current_time())

    async with bot_server(timed) as bot, running(
        make_config(bot.url, session_timeout=7.25), on_client_connected=infos.append
    ) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
        accepted = trio.current_time()
        with trio.fail_after(60):
            await client.send_message("x")
            assert await client.message() == "x"
            assert await client.close_code() == (4000, "session timeout")
            now = trio.current_time()
            await wait_closed(bot)
        assert now - accepted == pytest.approx(7.25, abs=1e-9)
        assert infos[0].connected_at == pytest.approx(accepted, abs=1e-9)
        assert closes[0][0] == 4000
        assert closed_at[0] == pytest.approx(accepted + 7.25, abs=1e-9)


async def test_replaced_client_gets_4001_its_bot_4001_and_newcomer_works(
    autojump_clock: trio.testing.MockClock,
) -> None:
    closes: list[tuple[int, str]] = []
    closes_seen_at_connect: list[int] = []
    log: list[tuple[str, float]] = []

    async def behaviour(ws: WebSocketConnection, bot: BotServer) -> None:
        log.append(("dialled", trio.current_time()))
        closes_seen_at_connect.append(len(closes))
        await record_close(closes)(ws, bot)

    async def slow_disconnect(info: Any) -> None:
        # Holds the predecessor's teardown open for 5 s of fake time (within the
        # close_timeout + 1 s the registry waits at most), so the order is observable.
        log.append(("teardown", trio.current_time()))
        await trio.sleep(5)
        log.append(("torn down", trio.current_time()))

    async with bot_server(behaviour) as bot, running(
        make_config(bot.url, max_clients=1, when_full="replace", close_timeout=10),
        on_client_disconnected=slow_disconnect,
    ) as gw:
        with trio.fail_after(WAIT):
            old = await connect(gw.ws_port)
            await old.send_message("old")
            assert await old.message() == "old"
            async with trio.open_nursery() as nursery:
                old_close: list[tuple[int, str]] = []

                async def read_old() -> None:
                    old_close.append(await old.close_code())

                nursery.start_soon(read_old)
                new = await connect(gw.ws_port)
                await new.send_message("new")
                assert await new.message() == "new"
            await new.close(1000)
        assert old_close == [(4001, "replaced")]
        assert closes[0] == (4001, "replaced")
        # the predecessor's bot leg was closed, and its teardown had finished, before the
        # newcomer's bot was dialled
        assert closes_seen_at_connect == [0, 1]
        assert [kind for kind, _ in log][:4] == ["dialled", "teardown", "torn down", "dialled"]
        assert log[3][1] - log[1][1] >= 5
        assert len(bot.requests) == 2


async def test_reject_mode_accepts_then_closes_newcomer_with_1013_without_dialling(
    autojump_clock: trio.testing.MockClock,
) -> None:  # the gateway's bounded teardown waits pass on the fake clock
    async with bot_server() as bot, running(
        make_config(bot.url, max_clients=1, when_full="reject")
    ) as gw:
        with trio.fail_after(WAIT):
            first = await connect(gw.ws_port)
            await first.send_message("one")
            assert await first.message() == "one"
            second = await ws_connect(gw.ws_port)
            assert isinstance(second, Peer), second  # the upgrade was accepted (101)
            assert await second.close_code() == (1013, "try again later")
            await first.send_message("still here")
            assert await first.message() == "still here"
            await first.close(1000)
        assert len(bot.requests) == 1


async def test_server_shutdown_closes_client_and_bot_with_1001() -> None:
    async with bot_server() as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send_message("x")
            assert await client.message() == "x"
            got: list[tuple[int, str]] = []
            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    got.append(await client.close_code())

                nursery.start_soon(read)
                await gw.gateway.shutdown()
        assert got[0][0] == 1001
        assert await wait_closed(bot) == 1001


@pytest.mark.parametrize("limit", [1000, 1048576])
async def test_client_message_over_max_message_size_client_1009_bot_1001(
    autojump_clock: trio.testing.MockClock, limit: int,
) -> None:  # the gateway's bounded teardown waits pass on the fake clock
    async with bot_server() as bot, running(
        make_config(bot.url, max_message_size=limit)
    ) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send_message(b"a" * limit)  # exactly at the limit passes
            assert await client.message() == b"a" * limit
            await client.send_message(b"b" * (limit + 1))
            code, _reason = await client.close_code()
        assert code == 1009
        assert await wait_closed(bot) == 1001
        assert bot.received == [b"a" * limit]


@pytest.mark.parametrize("limit", [1000, 1048576])
async def test_bot_message_over_max_message_size_client_1001_bot_1009(limit: int) -> None:
    async def big(ws: WebSocketConnection, bot: BotServer) -> None:
        await ws.send_message(b"a" * limit)
        await ws.send_message(b"b" * (limit + 1))
        await ws.get_message()

    async with bot_server(big) as bot, running(
        make_config(bot.url, max_message_size=limit)
    ) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            assert await client.message() == b"a" * limit
            code, _reason = await client.close_code()
        assert code == 1001
        assert await wait_closed(bot) == 1009


async def _send_until_stopped(peer: Peer, stop: trio.Event, done: trio.Event) -> None:
    """Send binary messages until `stop` (between whole messages) or a send fails.

    Each frame is exactly the gateway's read chunk (`relay.pump.CHUNK`) long, header
    included, so the gateway's reads tend to end at frame boundaries, where it can insert
    its close (it only inserts closes at a frame boundary).
    """
    masked = peer.ws.connection is not None and peer.ws.connection.client
    chunk = b"s" * (CHUNK - (8 if masked else 4))
    try:
        while not stop.is_set():
            try:
                data = peer.ws.send(Message(data=chunk))
            except LocalProtocolError:
                break
            await peer.stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        done.set()


async def _read_close_after(peer: Peer, stop: trio.Event, sender_done: trio.Event
                            ) -> tuple[int, str]:
    """Read until the close; stop our sender first so the answering close is whole."""
    while True:
        ev = await peer.event()
        if isinstance(ev, CloseConnection):
            stop.set()
            await sender_done.wait()
            return await peer.answer_close(ev)


async def test_client_that_stops_reading_gets_1008_and_bot_1001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bot_close: list[tuple[int, str]] = []
    bot_closed = trio.Event()

    async def flood(peer: Peer, request: Request, bot: RawBot) -> None:
        await accept(peer)
        stop, sent = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_until_stopped, peer, stop, sent)
            bot_close.append(await _read_close_after(peer, stop, sent))
            bot_closed.set()

    async with raw_bot(flood) as bot, running(
        make_config(bot.url, stall_timeout=3, close_timeout=5)
    ) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
        start = trio.current_time()
        with trio.fail_after(60):
            await bot_closed.wait()  # the client reads nothing until the bot has its close
            stalled_after = trio.current_time() - start
            code, reason = await client.close_code()  # now drain: best effort, a close
            await bot.done.wait()
        assert bot_close[0][0] == 1001
        assert stalled_after >= 3
        assert code == 1008, (code, reason)


async def test_bot_that_stops_reading_gets_1008_and_client_1001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def deaf(peer: Peer, request: Request, bot: RawBot) -> None:
        await accept(peer)
        bot.connected.set()
        await client_closed.wait()  # read nothing until the client has its close
        bot.closes.append(await peer.close_code())

    client_closed = trio.Event()
    async with raw_bot(deaf) as bot, running(
        make_config(bot.url, stall_timeout=3, close_timeout=5)
    ) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
        start = trio.current_time()
        with trio.fail_after(60):
            stop, sent = trio.Event(), trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send_until_stopped, client, stop, sent)
                code, _ = await _read_close_after(client, stop, sent)
            stalled_after = trio.current_time() - start
            client_closed.set()
            await bot.done.wait()
        assert code == 1001
        assert stalled_after >= 3
        assert bot.closes[0][0] == 1008


# -- 2. messages --------------------------------------------------------------------------


async def test_frame_sent_right_behind_the_upgrade_request_reaches_the_bot() -> None:
    """A client may send its first frame before the 101 arrives (in the same write as its
    request, even): the bot leg exists before the 101, so the frame must not be lost."""
    async with raw_bot() as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            stream = await trio.open_tcp_stream("127.0.0.1", gw.ws_port)
            OPEN_STREAMS.append(stream)
            client = Peer(stream, WSConnection(ConnectionType.CLIENT))
            request = client.ws.send(Request(host="127.0.0.1", target="/ws/generic/a.local"))
            early = FrameProtocol(client=True, extensions=[]).send_data("early", fin=True)
            await stream.send_all(request + early)
            assert isinstance(await client.event(), AcceptConnection)
            assert await client.message() == "early"
            await client.close(1000)
            await bot.done.wait()
    assert bot.received == ["early"]


async def test_text_stays_text_binary_stays_binary_including_empty() -> None:
    messages: list[str | bytes] = ["hello", b"\x00\x01\xff", "", b"", "ünï", b"text?"]
    async with bot_server() as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            async with open_websocket_url(gw.url()) as ws:
                for m in messages:
                    await ws.send_message(m)
                    got = await ws.get_message()
                    assert type(got) is type(m)
                    assert got == m
        assert bot.received == messages
        assert [type(m) for m in bot.received] == [type(m) for m in messages]


async def test_zero_length_frames_reach_bot_as_zero_length_frames() -> None:
    async with raw_bot() as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send_message("")
            assert await client.message() == ""
            await client.send_message(b"")
            assert await client.message() == b""
            await client.close(1000)
        data = [(f.opcode, f.payload) for f in bot.peers[0].frames()]
        assert data[:2] == [(1, b""), (2, b"")]
        assert [(f.opcode, f.payload) for f in client.frames()][:2] == [(1, b""), (2, b"")]


async def test_fragmented_messages_pass_with_fragment_boundaries_intact() -> None:
    async def fragmenter(peer: Peer, request: Request, bot: RawBot) -> None:
        await accept(peer)
        bot.received.append(await peer.message())
        bot.received.append(await peer.message())
        await peer.send_message("bot ", finished=False)
        await peer.send_message("says ", finished=False)
        await peer.send_message("hi", finished=True)
        await peer.send_message(b"\x01", finished=False)
        await peer.send_message(b"", finished=False)
        await peer.send_message(b"\x02\x03", finished=True)
        bot.closes.append(await peer.close_code())

    async with raw_bot(fragmenter) as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send_message("hel", finished=False)
            await client.send_message("lo", finished=True)
            await client.send_message(b"ab", finished=False)
            await client.send(Ping(b"between fragments"))
            await client.send_message(b"cd", finished=True)
            assert await client.message() == "bot says hi"
            assert await client.message() == b"\x01\x02\x03"
            await client.close(1000, "done")
            await bot.done.wait()
        assert bot.received == ["hello", b"abcd"]
        to_bot = [(f.fin, f.opcode, f.payload) for f in bot.peers[0].frames()]
        assert to_bot[:5] == [(False, 1, b"hel"), (True, 0, b"lo"), (False, 2, b"ab"),
                              (True, 9, b"between fragments"), (True, 0, b"cd")]
        to_client = [(f.fin, f.opcode, f.payload) for f in client.frames()]
        assert to_client[:7] == [
            (True, 10, b"between fragments"),  # the bot's pong, between fragments
            (False, 1, b"bot "), (False, 0, b"says "), (True, 0, b"hi"),
            (False, 2, b"\x01"), (False, 0, b""), (True, 0, b"\x02\x03")]


async def test_order_is_kept_per_direction_while_both_send_at_once() -> None:
    n = 300
    from_client: list[str | bytes] = []

    async def talker(ws: WebSocketConnection, bot: BotServer) -> None:
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                for i in range(n):
                    await ws.send_message(f"b{i}" if i % 2 else b"b%d" % i)

            nursery.start_soon(send)
            for _ in range(n):
                from_client.append(await ws.get_message())
        await ws.get_message()

    async with bot_server(talker) as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            async with open_websocket_url(gw.url()) as ws, trio.open_nursery() as nursery:

                async def send() -> None:
                    for i in range(n):
                        await ws.send_message(f"c{i}" if i % 3 else b"c%d" % i)

                nursery.start_soon(send)
                got = [await ws.get_message() for _ in range(n)]
            await wait_closed(bot)
        assert got == [f"b{i}" if i % 2 else b"b%d" % i for i in range(n)]
        assert from_client == [f"c{i}" if i % 3 else b"c%d" % i for i in range(n)]


async def test_one_mebibyte_messages_pass_both_ways_at_default_limit() -> None:
    text = "t" * 1048576
    blob = bytes(range(256)) * 4096
    async with bot_server() as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            async with open_websocket_url(gw.url()) as ws:
                await ws.send_message(text)
                assert await ws.get_message() == text
                await ws.send_message(blob)
                assert await ws.get_message() == blob
        assert bot.received == [text, blob]
        assert await wait_closed(bot) == 1000


async def test_client_ping_is_answered_by_the_bot_with_the_same_payload() -> None:
    pings: list[bytes] = []

    async def ponger(peer: Peer, request: Request, bot: RawBot) -> None:
        await accept(peer)
        while True:
            ev = await peer.event()
            if isinstance(ev, Ping):
                pings.append(bytes(ev.payload))
                await peer.send(ev.response())
            elif isinstance(ev, CloseConnection):
                await peer.answer_close(ev)
                return

    async with raw_bot(ponger) as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            for payload in (b"ping-1", b"", b"\xff" * 125):
                await client.send(Ping(payload=payload))
                ev = await client.event()
                assert isinstance(ev, Pong)
                assert ev.payload == payload
            await client.close(1000)
            await bot.done.wait()
        assert pings == [b"ping-1", b"", b"\xff" * 125]


async def test_client_ping_to_trio_websocket_bot_comes_back_as_pong_with_same_payload() -> None:
    async with bot_server() as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send(Ping(payload=b"are you there"))
            ev = await client.event()
            assert isinstance(ev, Pong)
            assert ev.payload == b"are you there"
            await client.close(1000)
        assert await wait_closed(bot) == 1000


@pytest.mark.parametrize("same_write", [True, False])
async def test_bot_frames_sent_right_after_its_101_reach_the_client(same_write: bool) -> None:
    async def early(peer: Peer, request: Request, bot: RawBot) -> None:
        if same_write:
            accept_bytes = peer.ws.send(AcceptConnection())
            data = (peer.ws.send(Message(data="early one"))
                    + peer.ws.send(Message(data=b"early two")))
            await peer.stream.send_all(accept_bytes + data)
        else:
            await accept(peer)
            await peer.send_message("early one")
            await peer.send_message(b"early two")
        bot.closes.append(await peer.close_code())

    async with raw_bot(early) as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            assert await client.message() == "early one"
            assert await client.message() == b"early two"
            await client.close(1000)
            await bot.done.wait()
        assert bot.closes == [(1000, "")]


# -- 3. handshake pass-through ------------------------------------------------------------


async def test_client_subprotocols_reach_bot_and_bots_choice_comes_back() -> None:
    async with bot_server(subprotocol="beta") as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            async with open_websocket_url(gw.url(), subprotocols=["alpha", "beta"]) as ws:
                assert ws.subprotocol == "beta"
                await ws.send_message("x")
                assert await ws.get_message() == "x"
        assert list(bot.requests[0].proposed_subprotocols) == ["alpha", "beta"]


async def test_no_subprotocol_when_the_bot_chooses_none() -> None:
    async with bot_server() as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port, subprotocols=["alpha"])
            assert client.accepted is not None
            assert client.accepted.subprotocol is None
            await client.close(1000)
        assert list(bot.requests[0].proposed_subprotocols) == ["alpha"]


async def test_permessage_deflate_is_negotiated_end_to_end_and_frames_stay_compressed() -> None:
    text = "compress me " * 5000
    blob = b"\x00\x01" * 20000

    async def deflating(peer: Peer, request: Request, bot: RawBot) -> None:
        assert any("permessage-deflate" in str(e) for e in request.extensions)
        await accept(peer, extensions=[PerMessageDeflate()])
        for _ in range(2):
            message = await peer.message()
            bot.received.append(message)
            await peer.send_message(message)
        bot.closes.append(await peer.close_code())

    async with raw_bot(deflating) as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port, extensions=[PerMessageDeflate()])
            assert client.accepted is not None
            assert [e.name for e in client.accepted.extensions] == ["permessage-deflate"]
            await client.send_message(text)
            assert await client.message() == text
            await client.send_message(blob)
            assert await client.message() == blob
            await client.close(1000)
            await bot.done.wait()
        assert bot.received == [text, blob]
        for frames in (bot.peers[0].frames(), client.frames()):
            data = [f for f in frames if f.opcode in (1, 2)]
            assert [(f.opcode, f.rsv1) for f in data] == [(1, True), (2, True)]
            assert sum(len(f.payload) for f in data) < (len(text) + len(blob)) // 20


async def test_relay_headers_origin_and_user_agent_reach_bot_but_not_authorization() -> None:
    infos: list[Any] = []
    async with bot_server() as bot, running(make_config(bot.url),
                                             on_client_connected=infos.append) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port, headers=[
                (b"Origin", b"https://app.example"),
                (b"User-Agent", b"e2e-test/1.0"),
                (b"Authorization", b"Bearer secret-client-credential"),
                (b"X-Other", b"not forwarded"),
            ])
            await client.close(1000)
            await wait_closed(bot)
        headers = {k.decode().lower(): v.decode() for k, v in bot.requests[0].headers}
        assert headers["x-relay-session-id"] == infos[0].id
        assert headers["x-relay-agent"] == "a"
        assert headers["x-relay-organization"] == "local"
        assert headers["x-forwarded-for"] == "127.0.0.1"
        assert headers["origin"] == "https://app.example"
        assert headers["user-agent"] == "e2e-test/1.0"
        assert "authorization" not in headers
        raw = b"".join(k + b": " + v for k, v in bot.requests[0].headers)
        assert b"secret-client-credential" not in raw


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/ws/generic/a.local?foo=1&token=abc&bar=x%20y", "/bot?foo=1&bar=x%20y"),
        ("/ws/generic?serviceHost=a.local&lang=fr", "/bot?lang=fr"),
        ("/ws/generic?lang=de&serviceHost=a.local&token=t", "/bot?lang=de"),
        ("/ws/generic/a.local", "/bot"),
        ("/ws/generic?serviceHost=a.local", "/bot"),
    ],
)
async def test_client_query_minus_token_and_service_host_is_appended_to_bot_url(
    target: str, expected: str,
) -> None:
    async with bot_server() as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port, target)
            await client.send_message("x")
            assert await client.message() == "x"
            await client.close(1000)
            await wait_closed(bot)
        assert bot.requests[0].path == expected


async def test_bot_url_with_own_query_gets_client_query_appended() -> None:
    async with bot_server() as bot, running(make_config(bot.url + "?static=1")) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port, "/ws/generic/a.local?dyn=2")
            await client.close(1000)
            await wait_closed(bot)
        assert bot.requests[0].path == "/bot?static=1&dyn=2"


async def test_service_host_query_form_relays() -> None:
    async with bot_server() as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            async with open_websocket_url(f"{gw.ws_base}/ws/generic?serviceHost=a.local") as ws:
                await ws.send_message("via serviceHost")
                assert await ws.get_message() == "via serviceHost"
        assert await wait_closed(bot) == 1000


# -- 4. bot dial failures -----------------------------------------------------------------


def _closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def _assert_envelope(r: Rejected, status: int) -> None:
    assert r.status == status
    assert r.headers.get(b"content-type", b"").startswith(b"application/json")
    env = r.envelope()
    assert set(env) == {"error", "code", "detail"}
    assert all(isinstance(v, str) and v for v in env.values())


async def test_bot_port_closed_answers_502_without_upgrade() -> None:
    async with running(make_config(f"ws://127.0.0.1:{_closed_port()}/bot")) as gw:
        with trio.fail_after(WAIT):
            r = await ws_connect(gw.ws_port)
    assert isinstance(r, Rejected), r
    _assert_envelope(r, 502)


async def test_bot_that_never_answers_gives_504_after_bot_connect_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    held: list[trio.SocketStream] = []

    async def silent(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with running(make_config(f"ws://127.0.0.1:{port}/bot",
                                       bot_connect_timeout=4.5)) as gw:
            start = trio.current_time()
            with trio.fail_after(60):
                r = await ws_connect(gw.ws_port)
            elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert isinstance(r, Rejected), r
    _assert_envelope(r, 504)
    assert len(held) == 1
    assert elapsed == pytest.approx(4.5, abs=1e-9)


@pytest.mark.parametrize("status", [403, 404, 500, 200])
async def test_bot_answering_http_error_gives_502(status: int) -> None:
    async def refuser(peer: Peer, request: Request, bot: RawBot) -> None:
        body = b"no"
        await peer.send(RejectConnection(status_code=status, has_body=True,
                                         headers=[(b"content-length", b"2")]))
        await peer.send(RejectData(data=body))

    async with raw_bot(refuser) as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            r = await ws_connect(gw.ws_port)
    assert isinstance(r, Rejected), r
    _assert_envelope(r, 502)
    assert len(bot.requests) == 1


# -- 5. many sessions ---------------------------------------------------------------------


async def batched_echo(peer: Peer, request: Request, bot: RawBot) -> None:
    """An echo bot that answers everything one read brought in a single write (fast)."""
    await accept(peer)
    parts: list[Any] = []
    while True:
        await peer._fill()
        out = bytearray()
        while peer.events:
            ev = peer.events.popleft()
            if isinstance(ev, CloseConnection):
                if out:
                    await peer.stream.send_all(out)
                await peer.answer_close(ev)
                return
            assert isinstance(ev, TextMessage | BytesMessage), ev
            parts.append(ev.data)
            if ev.message_finished:
                message = ("".join(parts) if isinstance(ev, TextMessage)
                           else b"".join(bytes(p) for p in parts))
                parts = []
                bot.received.append(message)
                out += peer.ws.send(message_event(message))
        if out:
            await peer.stream.send_all(out)


@pytest.mark.slow
async def test_100_concurrent_sessions_200_messages_each_nothing_lost_or_reordered() -> None:
    sessions, count, batch = 100, 200, 50
    results: dict[int, list[str | bytes]] = {}
    async with raw_bot(batched_echo) as bot, running(
        make_config(bot.url, max_clients=sessions)
    ) as gw:

        async def session(k: int) -> None:
            client = await connect(gw.ws_port)
            expected = [f"{k}:{i}" if i % 2 else b"%d:%d" % (k, i) for i in range(count)]
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    # `batch` separate messages per write: fewer syscalls, same frames
                    for start in range(0, count, batch):
                        await client.stream.send_all(b"".join(
                            client.ws.send(message_event(m))
                            for m in expected[start : start + batch]))

                nursery.start_soon(send)
                got = [await client.message() for _ in range(count)]
            results[k] = got
            assert got == expected
            await client.close(1000)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for k in range(sessions):
                    nursery.start_soon(session, k)
    assert len(results) == sessions
    assert len(bot.requests) == sessions
    assert len(bot.received) == sessions * count


# -- 6. in-process bots -------------------------------------------------------------------


@attrs.define
class InprocState:
    sessions: list[Session] = attrs.field(factory=list)
    errors: list[BaseException] = attrs.field(factory=list)
    done: trio.Event = attrs.field(factory=trio.Event)


STATE = InprocState()


@pytest.fixture(autouse=True)
def _fresh_inproc_state() -> None:
    global STATE
    STATE = InprocState()


async def recording_bot(session: Session) -> None:
    """Echoes; records the session and how it ended."""
    STATE.sessions.append(session)
    try:
        while True:
            await session.send(await session.receive())
    except BaseException as exc:
        STATE.errors.append(exc)
        raise
    finally:
        STATE.done.set()


async def returning_bot(session: Session) -> None:
    await session.send("bye " + str(await session.receive()))


async def raising_bot(session: Session) -> None:
    await session.receive()
    raise RuntimeError("the bot broke")


async def closing_bot(session: Session) -> None:
    await session.receive()
    await session.close(4123, "bot decided")
    STATE.done.set()


def inproc(name: str, **keys: Any) -> Any:
    return make_config(f"python:test_relay_e2e:{name}", **keys)


async def test_builtin_echo_bot_keeps_text_and_binary_types() -> None:
    async with running(make_config("python:relay.echo:echo_bot")) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            for m in ("text", b"bin", "", b"", "x" * 70000):
                await client.send_message(m)
                got = await client.message()
                assert type(got) is type(m) and got == m
            await client.send_message("frag", finished=False)
            await client.send_message("mented", finished=True)
            assert await client.message() == "fragmented"
            await client.send(Ping(b"inproc"))
            ev = await client.event()
            assert isinstance(ev, Pong) and ev.payload == b"inproc"
            assert await client.close(1000, "bye") == (1000, "bye")


async def test_inprocess_max_message_size_counts_utf8_bytes_not_characters() -> None:
    config = make_config("python:relay.echo:echo_bot", max_message_size=8)
    async with running(config) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send_message("éééé")  # 4 characters, 8 bytes: at the limit
            assert await client.message() == "éééé"
            await client.send_message("ééééé")  # 5 characters, 10 bytes: over it
            assert (await client.close_code())[0] == 1009


async def test_inprocess_session_has_no_body_for_auth_none_and_id_matches_event() -> None:
    infos: list[Any] = []
    async with running(inproc("recording_bot"), on_client_connected=infos.append) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port, "/ws/generic/a.local?x=1")
            await client.send_message("hi")
            assert await client.message() == "hi"
            await client.close(1000)
            await STATE.done.wait()
    session = STATE.sessions[0]
    assert session.body is None
    assert session.agent == "a"
    assert session.id == infos[0].id
    assert session.id


async def test_inprocess_client_close_makes_receive_raise_client_disconnected() -> None:
    async with running(inproc("recording_bot")) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send_message("hi")
            assert await client.message() == "hi"
            assert await client.close(4002, "leaving") == (4002, "leaving")
            await STATE.done.wait()
    assert [type(e) for e in STATE.errors] == [ClientDisconnected]


async def test_inprocess_client_tcp_drop_makes_receive_raise_client_disconnected() -> None:
    async with running(inproc("recording_bot")) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send_message("hi")
            assert await client.message() == "hi"
            await client.drop()
            await STATE.done.wait()
    assert [type(e) for e in STATE.errors] == [ClientDisconnected]


async def test_inprocess_session_timeout_closes_client_with_4000_at_exact_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(inproc("recording_bot", session_timeout=12.5)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
        accepted = trio.current_time()
        with trio.fail_after(60):
            assert await client.close_code() == (4000, "session timeout")
            elapsed = trio.current_time() - accepted
            await STATE.done.wait()
    assert elapsed == pytest.approx(12.5, abs=1e-9)


async def test_inprocess_bot_returning_closes_client_with_1000() -> None:
    async with running(inproc("returning_bot")) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send_message("x")
            assert await client.message() == "bye x"
            assert (await client.close_code())[0] == 1000


async def test_inprocess_bot_raising_closes_client_with_1011() -> None:
    async with running(inproc("raising_bot")) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send_message("x")
            assert (await client.close_code())[0] == 1011


async def test_inprocess_bot_close_reaches_client_with_its_code_and_reason() -> None:
    async with running(inproc("closing_bot")) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send_message("x")
            assert await client.close_code() == (4123, "bot decided")


# -- teardown is prompt once the closing handshake is done (autojump: no time may pass) ---


@attrs.define
class Ended:
    """on_client_disconnected: when it fired (trio time)."""

    at: list[float] = attrs.field(factory=list)
    event: trio.Event = attrs.field(factory=trio.Event)

    def __call__(self, info: Any) -> None:
        self.at.append(trio.current_time())
        self.event.set()


async def _closed_then_eof(client: Peer, ended: Ended) -> tuple[tuple[int, str], float]:
    """The client's close (code, reason); then how long until TCP EOF and session end."""
    got = await client.close_code()
    at = trio.current_time()
    await client.wait_eof()
    eof = trio.current_time()
    await ended.event.wait()
    return got, max(eof, ended.at[0]) - at


@pytest.mark.parametrize("scenario", ["bot_close", "timeout", "shutdown"])
async def test_teardown_completes_at_once_after_gateway_or_bot_close(
    autojump_clock: trio.testing.MockClock, scenario: str,
) -> None:
    async def closer(ws: WebSocketConnection, bot: BotServer) -> None:
        if await ws.get_message() == "close":
            await ws.aclose(4100, "bot done")
        await ws.get_message()

    ended = Ended()
    async with bot_server(closer) as bot, running(
        make_config(bot.url, session_timeout=30), on_client_disconnected=ended,
    ) as gw:
        with trio.fail_after(60):
            client = await connect(gw.ws_port)
            if scenario == "bot_close":
                await client.send_message("close")
            elif scenario == "shutdown":
                gw.gateway.rt.shutting_down = True
                for cc in list(gw.gateway.connections):
                    cc.cancel("shutdown")
            got, lag = await _closed_then_eof(client, ended)
            await wait_closed(bot)
    expected = {"bot_close": 4100, "timeout": 4000, "shutdown": 1001}[scenario]
    assert got[0] == expected
    assert lag == 0


async def test_teardown_completes_at_once_after_client_answers_its_1009(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ended = Ended()
    async with bot_server() as bot, running(
        make_config(bot.url, max_message_size=1000), on_client_disconnected=ended,
    ) as gw:
        with trio.fail_after(60):
            client = await connect(gw.ws_port)
            await client.send_message(b"x" * 1001)
            got, lag = await _closed_then_eof(client, ended)
            await wait_closed(bot)
    assert got[0] == 1009
    assert lag == 0


async def test_bot_leg_is_closed_at_once_after_bot_answers_its_1009(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lag: list[float] = []

    async def big(peer: Peer, request: Request, bot: RawBot) -> None:
        await accept(peer)
        await peer.send_message(b"y" * 1001)
        bot.closes.append(await peer.close_code())
        at = trio.current_time()
        await peer.wait_eof()
        lag.append(trio.current_time() - at)

    async with raw_bot(big) as bot, running(make_config(bot.url, max_message_size=1000)) as gw:
        with trio.fail_after(60):
            client = await connect(gw.ws_port)
            assert (await client.close_code())[0] == 1001
            await bot.done.wait()
    assert bot.closes[0][0] == 1009
    assert lag == [0]


async def test_rejected_newcomer_connection_is_closed_once_it_answers_1013(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bot_server() as bot, running(
        make_config(bot.url, max_clients=1, when_full="reject")
    ) as gw:
        with trio.fail_after(60):
            first = await connect(gw.ws_port)
            second = await connect(gw.ws_port)
            close = await second.event()
            assert isinstance(close, CloseConnection)
            with trio.move_on_after(0.5):  # we take 0.5 s to answer: the gateway waits
                await second.wait_eof()
            assert not second.eof, "the gateway closed TCP before the client's close reply"
            assert await second.answer_close(close) == (1013, "try again later")
            at = trio.current_time()
            await second.wait_eof()
            lag = trio.current_time() - at
            await first.close(1000)
        assert len(bot.requests) == 1
    assert lag == 0


# ---------------------------------------------------------------- keepalive (SPEC §5)

KEEPALIVE = {"ping_interval": 5, "ping_timeout": 5}
WAIT_VIRTUAL = 120  # seconds of virtual time (autojump clock) for a keepalive test


async def test_keepalive_pongs_are_not_passed_on_and_answering_peers_live_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen_at_bot: list[Event] = []

    async def recording_echo(peer: Peer, request: Request, bot: RawBot) -> None:
        await accept(peer)
        while True:
            ev = await peer.event()
            seen_at_bot.append(ev)
            if isinstance(ev, Ping):
                await peer.send(ev.response())
            elif isinstance(ev, TextMessage):
                await peer.send_message(ev.data)
            elif isinstance(ev, CloseConnection):
                await peer.answer_close(ev)
                return

    async with raw_bot(recording_echo) as bot, \
            running(make_config(bot.url, server=KEEPALIVE)) as gw:
        with trio.fail_after(WAIT_VIRTUAL):
            client = await connect(gw.ws_port)
            for i in range(16):  # 32 virtual seconds: six keepalive rounds
                await client.send_message(f"m{i}")
                assert await client.message() == f"m{i}"
                await trio.sleep(2)
            assert gw.gateway.session_count() == 1
            await client.close(1000)
    pings_to_client = [f for f in client.frames() if f.opcode == 9]
    assert len(pings_to_client) >= 5
    assert all(f.payload.startswith(b"relay-keepalive-") for f in pings_to_client)
    pings_to_bot = [e for e in seen_at_bot if isinstance(e, Ping)]
    assert len(pings_to_bot) >= 5
    # The client's pongs answer the gateway's pings: the bot never sees them.
    assert not [e for e in seen_at_bot if isinstance(e, Pong)]


async def test_client_that_stops_answering_pings_is_gone_and_bot_gets_1001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    closes: list[tuple[int, str]] = []
    async with bot_server(record_close(closes)) as bot, \
            running(make_config(bot.url, server=KEEPALIVE)) as gw:
        with trio.fail_after(WAIT_VIRTUAL):
            client = await connect(gw.ws_port)  # never reads again: pings go unanswered
            accepted = trio.current_time()
            await bot.closed.wait()
            # the first ping at +5 s, unanswered for ping_timeout 5 s
            assert trio.current_time() - accepted == pytest.approx(10, abs=0.2)
        assert closes[0][0] == 1001
        await client.drop()


async def test_bot_that_stops_answering_pings_is_gone_and_client_gets_1014(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def deaf(peer: Peer, request: Request, bot: RawBot) -> None:
        await accept(peer)
        await trio.sleep_forever()

    async with raw_bot(deaf) as bot, \
            running(make_config(bot.url, server=KEEPALIVE)) as gw:
        with trio.fail_after(WAIT_VIRTUAL):
            client = await connect(gw.ws_port)
            accepted = trio.current_time()
            assert await client.close_code() == (1014, "bad gateway")
            assert trio.current_time() - accepted == pytest.approx(10, abs=0.2)
        assert bot.requests


async def test_client_sending_an_unmasked_frame_gets_1002_and_bot_1001() -> None:
    closes: list[tuple[int, str]] = []
    async with bot_server(record_close(closes)) as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            await client.send_message("fine")
            assert await client.message() == "fine"
            await client.stream.send_all(b"\x82\x03abc")  # binary frame, MASK bit clear
            code, _reason = await client.close_code()
            assert code == 1002
            await bot.closed.wait()
        assert closes[0][0] == 1001
        assert bot.received == ["fine"]  # the bad frame never reached the bot


async def test_bot_sending_a_masked_frame_gets_1002_and_client_1001() -> None:
    async def masking_bot(peer: Peer, request: Request, bot: RawBot) -> None:
        await accept(peer)
        await peer.stream.send_all(b"\x81\x82\x00\x00\x00\x00hi")  # server frames are unmasked
        try:
            await peer.close_code()
        except AssertionError:
            pass
        bot.closes.append(peer.wire_close() or (0, ""))

    async with raw_bot(masking_bot) as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            assert (await client.close_code())[0] == 1001
            await bot.done.wait()
        assert bot.closes[0][0] == 1002


# -- the bot's 101, read by hand (relay/http1.py) -----------------------------------------


def _bot_101(request: bytes, *, sep: bytes = b"\r\n", extra: bytes = b"") -> bytes:
    key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    lines = [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket",
             b"Connection: Upgrade", b"Sec-WebSocket-Accept: " + generate_accept_token(key)]
    return sep.join(lines) + sep + extra + sep


async def _raw_head_bot(answer: Callable[[bytes], list[bytes | None]],
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
                        *, host: str = "127.0.0.1") -> None:
    """A bot that reads our upgrade request and writes `answer(request)`, piece by piece
    (None: close the connection there), then echoes whatever arrives."""
    async def serve(stream: trio.SocketStream) -> None:
        request = await read_until(stream, b"\r\n\r\n")
        if b"\r\n\r\n" not in request:
            return
        for piece in answer(request):
            if piece is None:
                await stream.aclose()
                return
            await stream.send_all(piece)
            await trio.lowlevel.checkpoint()
        while data := await stream.receive_some(65536):  # one short masked frame a read
            await stream.send_all(bytes([data[0], data[1] & 0x7F]) + _unmask(data[2:]))

    listeners = await trio.open_tcp_listeners(0, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(serve, listeners)


def _unmask(rest: bytes) -> bytes:
    mask, payload = rest[:4], rest[4:]
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("answer, why", [
    (lambda req: [_bot_101(req, extra=b"Upgrade : websocket\r\n")], "malformed"),
    (lambda req: [_bot_101(req, extra=b" folded\r\n")], "malformed"),
    (lambda req: [_bot_101(req, extra=b"X-A: a\x00b\r\n")], "malformed"),
    (lambda req: [b"HTTP/1.1 101 Switching Protocols\r\n" + b"X-Pad: " + b"p" * 20000],
     "exceeds 16384 bytes"),
    (lambda req: [_bot_101(req).replace(b"Sec-WebSocket-Accept: ", b"Sec-WebSocket-Accept: x")],
     "Sec-WebSocket-Accept does not match"),
    (lambda req: [b"HTTP/1.1 101 Switching", None],
     "closed the connection during the handshake"),
])
async def test_a_bot_101_that_is_not_valid_http_is_502_with_the_reason(
        answer: Callable[[bytes], list[bytes | None]], why: str) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_raw_head_bot, answer)
        async with running(make_config(f"ws://127.0.0.1:{port}/bot")) as gw:
            with trio.fail_after(WAIT):
                r = await ws_connect(gw.ws_port)
        nursery.cancel_scope.cancel()
    assert isinstance(r, Rejected), r
    _assert_envelope(r, 502)
    assert why in r.envelope()["detail"]


@pytest.mark.parametrize("answer", [
    lambda req: [_bot_101(req, sep=b"\n")],  # bare LF line ends, as h11 accepts them
    lambda req: [bytes([b]) for b in _bot_101(req)],  # one byte per write
    lambda req: [_bot_101(req, extra=b"X-Empty:\r\nX-Spaced:  a  b \r\n")],
])
async def test_a_bot_101_in_any_valid_shape_or_split_opens_the_session(
        answer: Callable[[bytes], list[bytes | None]]) -> None:
    await _session_through_raw_bot(answer, "127.0.0.1", "127.0.0.1")


async def _session_through_raw_bot(answer: Callable[[bytes], list[bytes | None]],
                                   listen: str, url_host: str) -> None:
    """A bot on ``listen`` answering its upgrade with ``answer``, reached as ``url_host``:
    the session opens and a message goes there and back."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(_raw_head_bot, answer, host=listen))
        async with running(make_config(f"ws://{url_host}:{port}/bot")) as gw:
            with trio.fail_after(WAIT):
                peer = await ws_connect(gw.ws_port)
                assert isinstance(peer, Peer), peer
                await peer.send_message(b"hello")
                assert await peer.message() == b"hello"
                await peer.stream.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("listen, url_host", [
    ("127.0.0.1", "127.0.0.1"),  # an IPv4 literal: dialled on a raw socket
    ("::1", "[::1]"),  # an IPv6 literal: the same, AF_INET6
    ("127.0.0.1", "localhost"),  # a name: resolved and dialled by trio
])
async def test_a_bot_at_an_ip_literal_or_a_name_is_dialled(listen: str, url_host: str) -> None:
    await _session_through_raw_bot(lambda req: [_bot_101(req)], listen, url_host)


async def test_a_refused_ipv6_bot_is_502_with_the_reason() -> None:
    with socket.socket(socket.AF_INET6) as s:  # a port nobody listens on
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    async with running(make_config(f"ws://[::1]:{port}/bot")) as gw:
        with trio.fail_after(WAIT):
            r = await ws_connect(gw.ws_port)
    assert isinstance(r, Rejected), r
    _assert_envelope(r, 502)
    assert "cannot connect to the bot at ::1" in r.envelope()["detail"]
