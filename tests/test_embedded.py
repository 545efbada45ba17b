"""SPEC §6 embedding: `gateway.handle` mounted in the app's own trio-websocket server.

The app runs `serve_websocket(gateway.handle, "127.0.0.1", 0, None)`; the Gateway itself
never serves. Clients are real trio-websocket clients; upstream bots are support.bot_server.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import attrs
import pytest
import trio
import trio.testing
from support import KEYS, BotServer, bot_server, echo_behaviour, make_config
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    serve_websocket,
    wrap_client_stream,
)
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.frame_protocol import CloseReason as WireCloseReason

from relay.config import Config
from relay.gateway import Gateway
from relay.inprocess import ClientDisconnected, Session
from relay.runtime import SessionInfo
from relay.tokens import mint


@attrs.define
class App:
    gateway: Gateway
    port: int
    events: list[tuple[str, str | None]]

    def url(self, agent: str = "a", suffix: str = "") -> str:
        return f"ws://127.0.0.1:{self.port}/ws/generic/{agent}.local{suffix}"


POLL = 0.01  # seconds of virtual time between polls (every test here is on the fake clock)


@pytest.fixture(autouse=True)
def _virtual_time(autojump_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    """Every test here runs on the fake clock, so the polls below cost no wall time."""
    return autojump_clock


async def wait_until(done: Callable[[], bool]) -> None:
    """Poll gateway state that has no event of its own (bounded)."""
    with trio.fail_after(30):
        while not done():  # noqa: ASYNC110
            await trio.sleep(POLL)


@asynccontextmanager
async def embedded(config: Config) -> AsyncIterator[App]:
    events: list[tuple[str, str | None]] = []

    def record(name: str) -> Any:
        def callback(info: SessionInfo) -> None:
            events.append((name, info.end_reason))
        return callback

    gateway = Gateway(config, keys=KEYS, wall_clock=trio.current_time,
                      on_client_connected=record("connected"),
                      on_client_disconnected=record("disconnected"),
                      on_session_timeout=record("timeout"))
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, gateway.handle, "127.0.0.1", 0, None)
        yield App(gateway, server.port, events)
        await wait_until(lambda: not gateway.rt.open_connections)  # all torn down
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_websocket_url(url: str, *, subprotocols: list[str] | None = None,
                             extra_headers: list[tuple[bytes, bytes]] | None = None
                             ) -> AsyncIterator[WebSocketConnection]:
    """trio-websocket's client on a TCP stream of our own, closed at the end.

    (`trio_websocket.open_websocket_url` leaves its socket open after ConnectionRejected
    and after a close the server started: ResourceWarnings, errors under -W error.)
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream(host, port)
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                ws = await wrap_client_stream(nursery, stream, f"{host}:{port}", resource,
                                              subprotocols=subprotocols,
                                              extra_headers=extra_headers)
            try:
                yield ws
            finally:
                with trio.move_on_after(30, shield=True):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def refused(url: str) -> ConnectionRejected:
    """The HTTP refusal of an upgrade, as trio-websocket's client reports it."""
    caught: list[BaseException] = []
    try:
        async with open_websocket_url(url):
            raise AssertionError(f"upgrade to {url} was accepted")
    except* ConnectionRejected as group:
        caught.extend(group.exceptions)
    while isinstance(caught[0], BaseExceptionGroup):
        caught = list(caught[0].exceptions)
    assert isinstance(caught[0], ConnectionRejected)
    return caught[0]


async def closed_code(ws: WebSocketConnection) -> tuple[int, str | None]:
    """Read until the gateway closes this client; its close code and reason."""
    with trio.fail_after(30):
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await ws.get_message()
    reason = info.value.reason
    assert reason is not None
    return int(reason.code), reason.reason


async def wait_closed(bot: BotServer) -> None:
    with trio.fail_after(30):
        await bot.closed.wait()


def header(bot: BotServer, name: bytes) -> bytes | None:
    values = [v for k, v in bot.requests[-1].headers if k.lower() == name]
    return values[0] if values else None


# -- round trips ---------------------------------------------------------------------------


async def test_upstream_echo_roundtrip_and_bot_request() -> None:
    async with bot_server(subprotocol="chat") as bot, embedded(make_config(bot.url)) as app:
        async with open_websocket_url(app.url(suffix="?x=1&serviceHost=zz&y=2"),
                                      subprotocols=["other", "chat"],
                                      extra_headers=[(b"origin", b"https://app.example"),
                                                     (b"authorization", b"Bearer nope")]
                                      ) as ws:
            assert ws.subprotocol == "chat"
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            await ws.send_message(b"\x00\x01")
            assert await ws.get_message() == b"\x00\x01"
            await ws.send_message(b"")
            assert await ws.get_message() == b""
            await ws.send_message(b"\x07" * 200_000)
            assert await ws.get_message() == b"\x07" * 200_000
        await wait_closed(bot)
    assert bot.close_codes[-1] == 1000
    request = bot.requests[-1]
    assert request.path == "/bot?x=1&y=2"
    assert set(request.proposed_subprotocols) == {"other", "chat"}
    assert header(bot, b"x-relay-agent") == b"a"
    assert header(bot, b"x-relay-organization") == b"local"
    assert header(bot, b"x-forwarded-for") == b"127.0.0.1"
    assert header(bot, b"x-relay-session-id")
    assert header(bot, b"origin") == b"https://app.example"
    assert header(bot, b"authorization") is None
    assert [name for name, _ in app.events] == ["connected", "disconnected"]
    assert app.events[-1] == ("disconnected", "client_closed")


async def test_inprocess_echo_roundtrip() -> None:
    async with embedded(make_config()) as app, open_websocket_url(app.url()) as ws:
        await ws.send_message("hello")
        assert await ws.get_message() == "hello"
        await ws.send_message(b"\x00\x01")
        assert await ws.get_message() == b"\x00\x01"
    assert app.events == [("connected", None), ("disconnected", "client_closed")]


async def test_first_frame_carries_the_held_body() -> None:
    async with bot_server() as bot, embedded(make_config(bot.url, websocket_auth="token",
                                                         bot_protocol="relay")) as app:
        now = trio.current_time()
        await app.gateway.rt.store.put_session("s-1", b'{"k":1}', now + 300)
        token = mint(KEYS, agent="a", org="local", session_id="s-1", now=now)
        async with open_websocket_url(app.url(suffix=f"/{token}")) as ws:
            await ws.send_message("after")
            first = await ws.get_message()
            assert json.loads(first) == {"type": "relay.session", "sessionId": "s-1",
                                         "agent": "a", "body": {"k": 1}}
            assert await ws.get_message() == "after"
        # one-time: the same token again is refused before any bot is dialled
        assert (await refused(app.url(suffix=f"/{token}"))).status_code == 403
    assert len(bot.requests) == 1


# -- refusals before the upgrade ------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ws/generic/nope.local", "/ws/generic/a.other", "/x"])
async def test_unknown_agent_or_path_is_404(path: str) -> None:
    async with embedded(make_config()) as app:
        rejection = await refused(f"ws://127.0.0.1:{app.port}{path}")
    assert rejection.status_code == 404
    assert rejection.body is not None
    assert json.loads(rejection.body)["code"] in ("unknown_service_host", "unknown_path")
    assert (b"content-type", b"application/json") in [
        (k.lower(), v) for k, v in rejection.headers]


@pytest.mark.parametrize("path", ["/ws/twilio/a.local", "/ws/twilio",
                                  "/ws/plivo?serviceHost=a.local"])
async def test_provider_endpoints_are_refused_clearly_on_the_message_level_path(
        path: str) -> None:
    """Provider endpoints are served by relay's own listener only (README, Embedding)."""
    async with bot_server() as bot, embedded(make_config(bot.url)) as app:
        rejection = await refused(f"ws://127.0.0.1:{app.port}{path}")
    assert rejection.status_code == 404
    assert rejection.body is not None
    body = json.loads(rejection.body)
    assert body["code"] == "provider_endpoint_unavailable"
    assert "Gateway.handle" in body["detail"]
    assert bot.requests == []


async def test_missing_token_is_403_and_no_bot_is_dialled() -> None:
    async with bot_server() as bot, embedded(make_config(bot.url, websocket_auth="token")
                                             ) as app:
        assert (await refused(app.url())).status_code == 403
    assert bot.requests == []


async def test_unreachable_bot_is_502() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with embedded(make_config(f"ws://127.0.0.1:{port}/bot")) as app:
        assert (await refused(app.url())).status_code == 502
    assert app.gateway.session_count() == 0


async def test_bot_rejecting_the_upgrade_is_502() -> None:
    async def refuse(request: Any) -> None:
        await request.reject(403)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, refuse, "127.0.0.1", 0, None)
        config = make_config(f"ws://127.0.0.1:{server.port}/bot")
        async with embedded(config) as app:
            assert (await refused(app.url())).status_code == 502
        nursery.cancel_scope.cancel()


async def test_bot_dropping_tcp_during_the_handshake_is_502_at_once() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]

    async def drop() -> None:
        stream = await listener.accept()
        await stream.receive_some(65536)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drop)
        async with embedded(make_config(f"ws://127.0.0.1:{port}/bot",
                                        bot_connect_timeout=30)) as app:
            with trio.fail_after(10):
                assert (await refused(app.url())).status_code == 502
    await listener.aclose()


async def test_silent_bot_is_504(autojump_clock: trio.testing.MockClock) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []

    async def hold() -> None:
        accepted.append(await listener.accept())
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        async with embedded(make_config(f"ws://127.0.0.1:{port}/bot",
                                        bot_connect_timeout=3)) as app:
            start = trio.current_time()
            assert (await refused(app.url())).status_code == 504
            assert 3 <= trio.current_time() - start < 10
        nursery.cancel_scope.cancel()
    for stream in accepted:
        await stream.aclose()
    await listener.aclose()


# -- the close table --------------------------------------------------------------------------


async def test_client_close_code_and_reason_reach_the_bot() -> None:
    async with bot_server() as bot, embedded(make_config(bot.url)) as app:
        async with open_websocket_url(app.url()) as ws:
            await ws.send_message("hi")
            assert await ws.get_message() == "hi"
            await ws.aclose(4321, "bye now")
        await wait_closed(bot)
        assert bot.close_codes[-1] == 4321
        assert bot.connections[-1].closed is not None
        assert bot.connections[-1].closed.reason == "bye now"
    assert app.events[-1] == ("disconnected", "client_closed")


async def test_bot_close_code_and_reason_reach_the_client() -> None:
    async def close_at_once(ws: WebSocketConnection, bot: BotServer) -> None:
        await ws.get_message()
        await ws.aclose(4100, "bot done")

    async with bot_server(close_at_once) as bot, embedded(make_config(bot.url)) as app:
        async with open_websocket_url(app.url()) as ws:
            await ws.send_message("go")
            assert await closed_code(ws) == (4100, "bot done")
        await wait_closed(bot)
    assert app.events[-1] == ("disconnected", "bot_closed")


async def test_session_timeout_closes_both_with_4000(
        autojump_clock: trio.testing.MockClock) -> None:
    async with bot_server() as bot, embedded(make_config(bot.url, session_timeout=5)) as app:
        async with open_websocket_url(app.url()) as ws:
            start = trio.current_time()
            assert await closed_code(ws) == (4000, "session timeout")
            assert 5 <= trio.current_time() - start < 6
        await wait_closed(bot)
        assert bot.close_codes[-1] == 4000
    assert [name for name, _ in app.events] == ["connected", "timeout", "disconnected"]
    assert app.events[-1] == ("disconnected", "timeout")


async def test_inprocess_session_timeout_is_4000(
        autojump_clock: trio.testing.MockClock) -> None:
    async with embedded(make_config(session_timeout=5)) as app, \
            open_websocket_url(app.url()) as ws:
        assert await closed_code(ws) == (4000, "session timeout")


async def test_newer_client_replaces_the_oldest_with_4001() -> None:
    async with bot_server() as bot, embedded(make_config(bot.url)) as app, \
            open_websocket_url(app.url()) as first:
        await first.send_message("one")
        assert await first.get_message() == "one"
        async with open_websocket_url(app.url()) as second:
            assert bot.close_codes == [4001]
            assert app.events[:2] == [("connected", None), ("disconnected", "replaced")]
            assert await closed_code(first) == (4001, "replaced")
            await second.send_message("two")
            assert await second.get_message() == "two"


async def test_newcomers_bot_is_dialled_only_after_the_predecessors_teardown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The predecessor's teardown is held open 5 s (its on_client_disconnected is slow,
    within the close_timeout + 1 s the registry waits at most): the newcomer's bot must
    not be dialled before it has finished."""
    log: list[tuple[str, float]] = []

    async def dialled(ws: WebSocketConnection, bot: BotServer) -> None:
        log.append(("dialled", trio.current_time()))
        await echo_behaviour(ws, bot)

    async def slow_disconnect(info: SessionInfo) -> None:
        log.append(("teardown", trio.current_time()))
        await trio.sleep(5)
        log.append(("torn down", trio.current_time()))

    async with bot_server(dialled) as bot, trio.open_nursery() as nursery:
        gateway = Gateway(make_config(bot.url, close_timeout=10), keys=KEYS,
                          wall_clock=trio.current_time, on_client_disconnected=slow_disconnect)
        server = await nursery.start(serve_websocket, gateway.handle, "127.0.0.1", 0, None)
        url = f"ws://127.0.0.1:{server.port}/ws/generic/a.local"
        async with open_websocket_url(url) as first:
            await first.send_message("one")
            assert await first.get_message() == "one"
            async with open_websocket_url(url) as second:
                assert await closed_code(first) == (4001, "replaced")
                await second.send_message("two")
                assert await second.get_message() == "two"
        await wait_until(lambda: not gateway.rt.open_connections)
        nursery.cancel_scope.cancel()
    kinds = [kind for kind, _ in log]
    assert kinds[:4] == ["dialled", "teardown", "torn down", "dialled"], log
    assert log[3][1] - log[1][1] >= 5


async def test_replacement_keeps_the_newcomer_counted() -> None:
    async with embedded(make_config()) as app, open_websocket_url(app.url()) as first:
        await first.send_message("one")
        assert await first.get_message() == "one"
        async with open_websocket_url(app.url()) as second:
            await second.send_message("two")
            assert await second.get_message() == "two"
            assert app.gateway.session_count("a") == 1


async def test_inprocess_replacement_is_4001() -> None:
    async with embedded(make_config()) as app, open_websocket_url(app.url()) as first:
        await first.send_message("one")
        assert await first.get_message() == "one"
        async with open_websocket_url(app.url()) as second:
            assert await closed_code(first) == (4001, "replaced")
            await second.send_message("two")
            assert await second.get_message() == "two"


async def test_full_agent_in_reject_mode_accepts_then_closes_1013() -> None:
    async with bot_server() as bot, embedded(make_config(bot.url, when_full="reject")) as app, \
            open_websocket_url(app.url()) as first:
        await first.send_message("one")
        assert await first.get_message() == "one"
        async with open_websocket_url(app.url()) as second:
            assert await closed_code(second) == (1013, "try again later")
        await first.send_message("still")
        assert await first.get_message() == "still"
    assert len(bot.requests) == 1


async def test_registry_cancel_as_shutdown_closes_both_with_1001() -> None:
    async with bot_server() as bot, embedded(make_config(bot.url)) as app:
        async with open_websocket_url(app.url()) as ws:
            await ws.send_message("x")
            assert await ws.get_message() == "x"
            for member in app.gateway.rt.registry.members():
                member.cancel("shutdown")
            assert (await closed_code(ws))[0] == 1001
        await wait_closed(bot)
        assert bot.close_codes[-1] == 1001
    assert app.events[-1] == ("disconnected", "shutdown")


async def test_client_message_over_the_limit_is_1009_and_bot_gets_1001() -> None:
    async with bot_server() as bot, embedded(make_config(bot.url, max_message_size=1000)
                                             ) as app:
        async with open_websocket_url(app.url()) as ws:
            await ws.send_message(b"x" * 1001)
            assert (await closed_code(ws))[0] == 1009
        await wait_closed(bot)
        assert bot.close_codes[-1] == 1001


# -- limits on the embedding path (its own code: message-level legs) ----------------------

KEEPALIVE = {"ping_interval": 5, "ping_timeout": 5}
inprocess_received: list[str | bytes] = []  # what recording_echo got


async def recording_echo(session: Session) -> None:
    try:
        while True:
            message = await session.receive()
            inprocess_received.append(message)
            await session.send(message)
    except ClientDisconnected:
        return


@asynccontextmanager
async def silent_client(url: str) -> AsyncIterator[trio.SocketStream]:
    """A raw wsproto client that reads the 101 and then nothing: no pongs, no reads."""
    parts = urlsplit(url)
    stream = await trio.open_tcp_stream("127.0.0.1", parts.port or 80)
    try:
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host=parts.netloc, target=parts.path)))
        while not any(isinstance(e, AcceptConnection) for e in ws.events()):
            data = await stream.receive_some(1)  # leave whatever follows the 101 unread
            assert data, "the gateway closed before its 101"
            ws.receive_data(data)
        yield stream
    finally:
        await trio.aclose_forcefully(stream)


async def test_client_that_stops_answering_pings_is_gone_and_bot_gets_1001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bot_server() as bot, embedded(make_config(bot.url, server=KEEPALIVE)) as app:
        with trio.fail_after(120):
            async with silent_client(app.url()):
                accepted = trio.current_time()
                await bot.closed.wait()
                # the first ping at +5 s, unanswered for ping_timeout 5 s
                assert trio.current_time() - accepted == pytest.approx(10, abs=0.2)
    assert bot.close_codes[-1] == 1001
    assert app.events[-1] == ("disconnected", "client_gone")


async def test_client_that_reads_nothing_is_stalled_after_stall_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def flood(ws: WebSocketConnection, bot: BotServer) -> None:
        while True:
            await ws.send_message(b"f" * 65536)

    async with bot_server(flood) as bot, \
            embedded(make_config(bot.url, stall_timeout=3, close_timeout=2)) as app:
        with trio.fail_after(120):
            async with silent_client(app.url()):
                accepted = trio.current_time()
                await bot.closed.wait()
                stalled_after = trio.current_time() - accepted
    assert app.events[-1] == ("disconnected", "client_stalled")
    assert bot.close_codes[-1] == 1001
    assert 3 <= stalled_after <= 3 + 2 + 0.2


async def test_bot_message_over_max_message_size_is_1009_to_bot_1001_to_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def big(ws: WebSocketConnection, bot: BotServer) -> None:
        await ws.send_message(b"a" * 1000)
        await ws.get_message()  # the client has it (trio-websocket may drop a message
        await ws.send_message(b"b" * 1001)  # still queued when it closes the leg)
        await ws.get_message()

    async with bot_server(big) as bot, \
            embedded(make_config(bot.url, max_message_size=1000)) as app:
        async with open_websocket_url(app.url()) as ws:
            assert await ws.get_message() == b"a" * 1000  # exactly at the limit passes
            await ws.send_message("got it")
            assert (await closed_code(ws))[0] == 1001
        await wait_closed(bot)
    assert bot.close_codes[-1] == 1009
    assert app.events[-1] == ("disconnected", "bot_too_big")


async def test_inprocess_client_message_over_the_limit_is_1009_and_never_delivered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    inprocess_received.clear()
    config = make_config("python:test_embedded:recording_echo", max_message_size=1000)
    async with embedded(config) as app, open_websocket_url(app.url()) as ws:
        await ws.send_message(b"a" * 1000)
        assert await ws.get_message() == b"a" * 1000
        await ws.send_message(b"b" * 1001)
        assert (await closed_code(ws))[0] == 1009
    assert inprocess_received == [b"a" * 1000]


async def test_upgrade_while_shutting_down_is_503_and_dials_nothing() -> None:
    async with bot_server() as bot, embedded(make_config(bot.url)) as app:
        await app.gateway.shutdown()  # the app keeps its own server running
        rejection = await refused(app.url())
    assert rejection.status_code == 503
    assert rejection.body is not None
    assert json.loads(rejection.body)["code"] == "shutting_down"
    assert bot.requests == []


async def test_metrics_count_the_session() -> None:
    async with bot_server() as bot, embedded(make_config(bot.url)) as app:
        async with open_websocket_url(app.url()) as ws:
            await ws.send_message("abc")
            assert await ws.get_message() == "abc"
        await wait_closed(bot)
        await wait_until(lambda: len(app.events) == 2)
        registry = app.gateway.metrics.registry
    labels = {"agent": "a", "reason": "client_closed"}
    assert registry.get_sample_value("relay_sessions_ended_total", labels) == 1
    assert registry.get_sample_value("relay_sessions_active", {"agent": "a"}) == 0
    assert registry.get_sample_value("relay_messages_relayed_total",
                                     {"direction": "client_to_bot"}) == 1
    assert registry.get_sample_value("relay_bytes_relayed_total",
                                     {"direction": "bot_to_client"}) == 3


async def test_empty_client_close_reaches_the_bot_empty() -> None:
    async with bot_server() as bot, embedded(make_config(bot.url)) as app:
        async with open_websocket_url(app.url()) as ws:
            await ws.send_message("hi")
            assert await ws.get_message() == "hi"
            await ws.aclose(WireCloseReason.NO_STATUS_RCVD)
        await wait_closed(bot)
        assert bot.close_codes[-1] == 1005  # what an empty close reports


async def test_connections_per_ip_over_the_limit_get_503_others_unaffected() -> None:
    """max_connections_per_ip counts Gateway.handle's connections too (the handshake
    limits are the app server's: it has read the request before handle is called)."""
    config = make_config(server={"max_connections_per_ip": 2}, max_clients=10)
    async with embedded(config) as app:
        gate = app.gateway.rt.gate
        with trio.fail_after(30):
            async with open_websocket_url(app.url()) as one:
                async with open_websocket_url(app.url()) as two:
                    assert gate.connections.get("127.0.0.1") == 2
                    rejected = await refused(app.url())
                    assert rejected.status_code == 503
                    assert rejected.body is not None
                    assert json.loads(rejected.body)["code"] == "too_many_connections_per_ip"
                    assert gate.connections.get("127.0.0.1") == 2  # the refused one is gone
                    await two.send_message("still here")
                    assert await two.get_message() == "still here"
                await wait_until(lambda: gate.connections.get("127.0.0.1") == 1)
                async with open_websocket_url(app.url()) as three:
                    await three.send_message(b"\x01")
                    assert await three.get_message() == b"\x01"
                await one.send_message("and here")
                assert await one.get_message() == "and here"
        await wait_until(lambda: "127.0.0.1" not in gate.connections)
    text = app.gateway.metrics.render()[0].decode()
    assert 'relay_connections_refused_total{reason="too_many_connections_per_ip"} 1.0' in text
