"""In-process bots on relay's own listener: the limits hold as they do for upstream bots.

With `bot = "python:..."` the gateway is the WebSocket end itself (inprocess.py), so
max_message_size, the keepalive and stall_timeout are enforced by different code from the
pass-through path; each has its own test here. Clients are raw wsproto on a trio socket
(they must be able to stop reading, stop answering pings, or send a frame before the 101)
or trio-websocket (`support.open_client`). Time passes on trio's fake clock only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from support import make_config, open_client, running
from trio_websocket import ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage
from wsproto.frame_protocol import FrameProtocol

from relay.inprocess import ClientDisconnected, Session
from relay.runtime import SessionInfo

WAIT = 10  # seconds: the bound on a wait that involves only loopback I/O
WAIT_VIRTUAL = 120  # seconds of fake time for a test whose outcome is a timer
KEEPALIVE = {"ping_interval": 5, "ping_timeout": 5}


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """Jump only after 50 ms of real idleness: bytes may still be in flight on loopback."""
    return trio.testing.MockClock(autojump_threshold=0.05)


# -- bots (named in config as python:test_inprocess_e2e:<name>) ---------------------------

received: list[str | bytes] = []  # what recording_echo got, in order
sender_stopped: list[tuple[str, float]] = []  # (why, when) flood stopped sending


async def recording_echo(session: Session) -> None:
    try:
        while True:
            message = await session.receive()
            received.append(message)
            await session.send(message)
    except ClientDisconnected:
        return


async def flood(session: Session) -> None:
    """Send 64 KiB messages until the gateway says the client is gone."""
    chunk = b"f" * 65536
    try:
        while True:
            await session.send(chunk)
    except ClientDisconnected as exc:
        sender_stopped.append((str(exc), trio.current_time()))


@pytest.fixture(autouse=True)
def _fresh_records() -> None:
    received.clear()
    sender_stopped.clear()


# -- helpers ------------------------------------------------------------------------------


class Ended:
    """on_client_disconnected: the SessionInfo and the fake time of each session's end."""

    def __init__(self) -> None:
        self.infos: list[tuple[SessionInfo, float]] = []
        self.event = trio.Event()

    def __call__(self, info: SessionInfo) -> None:
        self.infos.append((info, trio.current_time()))
        self.event.set()


@asynccontextmanager
async def raw_client(port: int, *, then: bytes = b"") -> AsyncIterator[
        tuple[trio.SocketStream, WSConnection]]:
    """A raw wsproto client that sent its upgrade request (and `then`, in the same write)
    and read the 101; it reads nothing more unless the test does."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(
            ws.send(Request(host=f"127.0.0.1:{port}", target="/ws/generic/a.local")) + then)
        while True:
            data = await stream.receive_some(1)  # byte by byte: leave what follows the 101
            assert data, "the gateway closed before its 101"
            ws.receive_data(data)
            events = list(ws.events())
            if events:
                assert isinstance(events[0], AcceptConnection), events
                break
        yield stream, ws
    finally:
        await trio.aclose_forcefully(stream)


def client_text_frame(text: str) -> bytes:
    """A masked text frame as a browser sends it, encoded by wsproto, not by relay."""
    return bytes(FrameProtocol(client=True, extensions=[]).send_data(text, fin=True))


async def next_text(stream: trio.SocketStream, ws: WSConnection) -> str:
    while True:
        for event in ws.events():
            if isinstance(event, TextMessage):
                return event.data
        data = await stream.receive_some(65536)
        assert data, "EOF before a text message"
        ws.receive_data(data)


# -- max_message_size ---------------------------------------------------------------------


async def test_inprocess_client_message_over_max_message_size_is_1009_and_never_delivered(
) -> None:
    config = make_config("python:test_inprocess_e2e:recording_echo", max_message_size=1000)
    async with running(config) as gw:
        with trio.fail_after(WAIT):
            async with open_client(gw.url()) as ws:
                await ws.send_message(b"a" * 1000)  # exactly at the limit passes
                assert await ws.get_message() == b"a" * 1000
                await ws.send_message(b"b" * 1001)
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1009
    assert received == [b"a" * 1000]


# -- keepalive ----------------------------------------------------------------------------


async def test_inprocess_client_that_stops_answering_pings_is_gone_after_interval_plus_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ended = Ended()
    config = make_config("python:test_inprocess_e2e:recording_echo", server=KEEPALIVE)
    async with running(config, on_client_disconnected=ended) as gw:
        with trio.fail_after(WAIT_VIRTUAL):
            async with raw_client(gw.ws_port):  # reads nothing: pings go unanswered
                accepted = trio.current_time()
                await ended.event.wait()
    info, at = ended.infos[0]
    assert info.end_reason == "client_gone"
    # the first ping at +5 s, unanswered for ping_timeout 5 s
    assert at - accepted == pytest.approx(10, abs=0.2)


async def test_inprocess_client_that_answers_pings_lives_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ended = Ended()
    config = make_config("python:test_inprocess_e2e:recording_echo", server=KEEPALIVE)
    async with running(config, on_client_disconnected=ended) as gw:
        with trio.fail_after(WAIT_VIRTUAL):
            async with open_client(gw.url()) as ws:  # trio-websocket answers pings
                for i in range(8):  # 32 virtual seconds: six keepalive rounds
                    await ws.send_message(f"m{i}")
                    assert await ws.get_message() == f"m{i}"
                    await trio.sleep(4)  # closing at 32 s, between two pings
                assert gw.gateway.session_count() == 1
                await ws.aclose(1000)
            await ended.event.wait()
    assert ended.infos[0][0].end_reason == "client_closed"


# -- stall_timeout ------------------------------------------------------------------------


async def test_inprocess_client_that_reads_nothing_is_ended_after_stall_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ended = Ended()
    config = make_config("python:test_inprocess_e2e:flood", stall_timeout=3, close_timeout=2)
    async with running(config, on_client_disconnected=ended) as gw:
        with trio.fail_after(WAIT_VIRTUAL):
            async with raw_client(gw.ws_port):  # never reads: the socket buffers fill up
                accepted = trio.current_time()
                await ended.event.wait()
    info, at = ended.infos[0]
    assert info.end_reason == "client_stalled"
    assert sender_stopped and sender_stopped[0][0] == "the client stopped reading"
    # no more than stall_timeout after the last byte went out, plus the bounded close
    assert 3 <= at - accepted <= 3 + 2 + 0.2


# -- a frame sent before the 101 ----------------------------------------------------------


async def test_inprocess_frame_sent_with_the_upgrade_request_is_not_lost() -> None:
    """A client may send its first frame right behind the request, before the 101."""
    config = make_config("python:test_inprocess_e2e:recording_echo")
    async with running(config) as gw:
        with trio.fail_after(WAIT):
            async with raw_client(gw.ws_port, then=client_text_frame("early")) as (stream, ws):
                assert await next_text(stream, ws) == "early"
    assert received == ["early"]
