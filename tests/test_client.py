"""relay.client against an in-process gateway on loopback: /start, tokens, reconnection.

Time-dependent cases (backoff, give_up_after, session timeout) run on `autojump_clock` and
assert exact virtual times: with ``jitter=0`` the schedule is a plain function of the
policy. Upstream bots are real trio-websocket servers (support.bot_server); "the bot
vanishes" is its TCP connection closed without a close frame, which the gateway reports to
the client as 1014. The gateway process tests are in test_client_process.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import pytest
import trio
import trio.testing
from ports import free_port
from support import BotServer, bot_server, make_config, open_client, raw_upgrade_status, running
from trio_websocket import ConnectionClosed, WebSocketConnection

import relay.client
from relay.client import (
    AttemptFailed,
    ConnectError,
    ConnectionLost,
    Reconnect,
    Reconnected,
    ReconnectFailed,
    SessionClosed,
    StartError,
)

PK = "pk_client_test"
BOUND = 30  # seconds (virtual under autojump_clock): the bound on every test's waits
NO_JITTER = Reconnect(attempts=3, first_delay=1, factor=2, jitter=0, give_up_after=100)
E = TypeVar("E", bound=relay.client.Event)


@asynccontextmanager
async def gateway(bot: str = "python:relay.echo:echo_bot", **agent: Any) -> AsyncIterator[Any]:
    """An in-process gateway whose /start hands out a wsUrl on its real data-plane port."""
    ws_port = free_port()
    agent.setdefault("websocket_auth", "token")
    agent.setdefault("bot_protocol", "pipecat-cloud")
    config = make_config(bot, server={"ws_bind": [f"127.0.0.1:{ws_port}"],
                                      "public_url": f"ws://127.0.0.1:{ws_port}",
                                      "public_keys": [PK]}, **agent)
    async with running(config) as gw:
        yield gw


def start_url(gw: Any, agent: str = "a") -> str:
    return f"http://127.0.0.1:{gw.api_port}/v1/public/{agent}/start"


def starts(gw: Any, status: int) -> float:
    value = gw.gateway.metrics.registry.get_sample_value(
        "relay_start_requests_total", {"status": str(status)})
    return value or 0.0


def body_of(bot_path: str) -> Any:
    """The held body as a pipecat-cloud bot gets it: ?body= base64 of the compact JSON."""
    [encoded] = parse_qs(urlsplit(bot_path).query)["body"]
    return json.loads(base64.b64decode(encoded))


async def vanish_on_die(ws: WebSocketConnection, bot: BotServer) -> None:
    """Echo; on "die", drop the TCP connection without a close frame (a killed bot)."""
    while True:
        message = await ws.get_message()
        bot.received.append(message)
        if message == "die":
            await ws._stream.aclose()
            return
        await ws.send_message(message)


class Recorder:
    """An on_event callback that keeps every event with the (virtual) time it came."""

    def __init__(self) -> None:
        self.events: list[tuple[float, relay.client.Event]] = []

        self.lost = trio.Event()
        self.reconnected = trio.Event()

    def __call__(self, event: relay.client.Event) -> None:
        self.events.append((trio.current_time(), event))
        if isinstance(event, ConnectionLost):
            self.lost.set()
        if isinstance(event, Reconnected):
            self.reconnected.set()

    def of(self, kind: type[E]) -> list[E]:
        return [e for _, e in self.events if isinstance(e, kind)]

    def attempts_after(self, first: int) -> list[tuple[float, AttemptFailed]]:
        """The events from index `first` on, each of which must be a failed attempt."""
        attempts = []
        for t, e in self.events[first:]:
            assert isinstance(e, AttemptFailed), e
            attempts.append((t, e))
        return attempts


# --------------------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("token_in", ["header", "query", "path"])
async def test_echo_through_start_with_the_token_in_each_place(token_in: Any) -> None:
    async with gateway() as gw:
        with trio.fail_after(BOUND):
            async with relay.client.connect(start_url(gw), PK, token_in=token_in) as session:
                await session.send("hello")
                assert await session.receive() == "hello"
                await session.send(b"\x00\x01")
                assert await session.receive() == b"\x00\x01"
                assert session.token and session.session_id


async def test_the_body_reaches_the_bot_and_the_token_is_spent() -> None:
    async with bot_server() as bot, gateway(bot.url) as gw:
        with trio.fail_after(BOUND):
            async with relay.client.connect(start_url(gw), PK,
                                            body={"caller": "+15550100"}) as session:
                await session.send("x")
                assert await session.receive() == "x"
                token = session.token
            assert body_of(bot.requests[0].path) == {"caller": "+15550100"}
            status = await raw_upgrade_status(gw.ws_port, f"/ws/generic/a.local/{token}")
            assert status == 403
            assert gw.gateway.metrics.registry.get_sample_value(
                "relay_token_refusals_total", {"reason": "replayed"}) == 1


async def test_auth_none_agent_connects_without_a_token() -> None:
    async with gateway(websocket_auth="none") as gw:
        with trio.fail_after(BOUND):
            async with relay.client.connect(start_url(gw), PK) as session:
                await session.send("plain")
                assert await session.receive() == "plain"
                assert session.token is None


@pytest.mark.parametrize(("key", "agent", "status", "code"), [
    ("pk_wrong", "a", 401, "unauthorized"),
    (PK, "nope", 404, "agent_not_found"),
])
async def test_start_refusal_is_a_clear_error_without_retries(
        key: str, agent: str, status: int, code: str) -> None:
    events = Recorder()
    async with gateway() as gw:
        with trio.fail_after(BOUND), pytest.raises(StartError) as refused:
            async with relay.client.connect(start_url(gw, agent), key, on_event=events):
                pytest.fail("connected with a refused /start")
        assert (refused.value.status, refused.value.code) == (status, code)
        assert not refused.value.retryable
        assert str(status) in str(refused.value)
        assert starts(gw, status) == 1  # asked once: no retry loop
        assert events.events == []


async def test_body_for_an_auth_none_agent_is_refused_as_400() -> None:
    async with gateway(websocket_auth="none") as gw:
        with trio.fail_after(BOUND), pytest.raises(StartError) as refused:
            async with relay.client.connect(start_url(gw), PK, body={"a": 1}):
                pass
        assert (refused.value.status, refused.value.code) == (400, "body_requires_token_auth")


async def test_unreachable_gateway_is_a_retryable_start_error_raised_at_once() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/public/a/start"
    with trio.fail_after(BOUND), pytest.raises(StartError) as refused:
        async with relay.client.connect(url, PK):
            pass
    assert refused.value.status is None and refused.value.code == "unreachable"
    assert refused.value.retryable  # but the first connection is never retried


async def test_refused_first_upgrade_is_a_connect_error_with_the_gateway_code() -> None:
    # The agent's bot is not listening: the gateway burns the token and answers 502.
    async with gateway(f"ws://127.0.0.1:{free_port()}/bot") as gw:
        with trio.fail_after(BOUND), pytest.raises(ConnectError) as refused:
            async with relay.client.connect(start_url(gw), PK):
                pass
        assert refused.value.status == 502
        assert refused.value.code == "bad_gateway"


# --------------------------------------------------------------------------------------
# Losing the connection and reconnecting
# --------------------------------------------------------------------------------------


async def test_bot_gone_is_reported_as_1014_and_the_session_reconnects() -> None:
    events = Recorder()
    async with bot_server(vanish_on_die) as bot, gateway(bot.url) as gw:
        with trio.fail_after(BOUND):
            async with relay.client.connect(start_url(gw), PK, body={"n": 1},
                                            reconnect=NO_JITTER, on_event=events) as session:
                await session.send("one")
                assert await session.receive() == "one"
                first_token, first_id = session.token, session.session_id
                await session.send("die")
                await events.lost.wait()
                await session.send("two")  # waits for the new connection, then goes there
                assert await session.receive() == "two"
                assert session.reconnects == 1
                assert session.token != first_token and session.session_id != first_id
                # The first connection's token is spent: replayed, it is refused.
                status = await raw_upgrade_status(gw.ws_port,
                                                  f"/ws/generic/a.local/{first_token}")
                assert status == 403
                assert gw.gateway.metrics.registry.get_sample_value(
                    "relay_token_refusals_total", {"reason": "replayed"}) == 1
        [lost] = events.of(ConnectionLost)
        assert (lost.code, lost.reason) == (1014, "bad gateway")
        assert lost.session_id == first_id and lost.messages_sent == 2
        [back] = events.of(Reconnected)
        assert back.attempt == 1 and back.previous_session_id == first_id
        assert back.session_id == session.session_id
        assert events.of(AttemptFailed) == []
        assert [body_of(r.path) for r in bot.requests] == [{"n": 1}, {"n": 1}]


async def test_1014_without_reconnection_ends_the_session_with_1014() -> None:
    async with bot_server(vanish_on_die) as bot, gateway(bot.url) as gw:
        with trio.fail_after(BOUND):
            async with relay.client.connect(start_url(gw), PK,
                                            reconnect=Reconnect(codes=())) as session:
                await session.send("die")
                with pytest.raises(SessionClosed) as closed:
                    await session.receive()
                assert (closed.value.code, closed.value.reason) == (1014, "bad gateway")
                assert not isinstance(closed.value, ReconnectFailed)
                with pytest.raises(SessionClosed):  # and again, every time
                    await session.send("more")


@asynccontextmanager
async def stoppable_bot() -> AsyncIterator[tuple[BotServer, trio.CancelScope]]:
    """A vanish_on_die bot whose server can be stopped (scope.cancel()) mid-test."""
    scope = trio.CancelScope()

    async def serve(task_status: trio.TaskStatus[BotServer]) -> None:
        with scope:
            async with bot_server(vanish_on_die) as bot:
                task_status.started(bot)
                await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        bot = await nursery.start(serve)
        yield bot, scope
        scope.cancel()


async def test_attempts_exhausted_end_with_reconnect_failed_at_exact_backoff_times(
        autojump_clock: trio.testing.MockClock) -> None:
    events = Recorder()
    async with stoppable_bot() as (bot, stop_bot), gateway(bot.url) as gw:
        with trio.fail_after(BOUND):
            async with relay.client.connect(start_url(gw), PK, reconnect=NO_JITTER,
                                            on_event=events) as session:
                await session.send("die")
                await events.lost.wait()
                stop_bot.cancel()  # from now on every dial of the bot is refused: 502
                with pytest.raises(ReconnectFailed) as failed:
                    await session.receive()
                ended_at = trio.current_time()
                with pytest.raises(ReconnectFailed):
                    await session.send("x")
    lost_at, lost = events.events[0]
    tries = events.attempts_after(1)
    assert isinstance(lost, ConnectionLost) and lost.code == 1014
    assert [(t - lost_at, e.attempt, e.retrying) for t, e in tries] == [
        (1, 1, True), (3, 2, True), (7, 3, False)]
    assert all(isinstance(e.error, ConnectError) and e.error.status == 502 for _, e in tries)
    assert ended_at - lost_at == 7
    assert (failed.value.code, failed.value.reason) == (1014, "bad gateway")
    assert failed.value.attempts == 3
    assert isinstance(failed.value.last_error, ConnectError)
    assert "no more attempts (3)" in str(failed.value) and "502" in str(failed.value)
    assert starts(gw, 200) == 4  # the first token and one fresh token per try


async def test_give_up_after_bounds_the_reconnect_in_time(
        autojump_clock: trio.testing.MockClock) -> None:
    events = Recorder()
    policy = Reconnect(attempts=100, first_delay=1, factor=2, jitter=0, give_up_after=10)
    async with stoppable_bot() as (bot, stop_bot), gateway(bot.url) as gw:
        with trio.fail_after(BOUND):
            async with relay.client.connect(start_url(gw), PK, reconnect=policy,
                                            on_event=events) as session:
                await session.send("die")
                await events.lost.wait()
                stop_bot.cancel()
                with pytest.raises(ReconnectFailed) as failed:
                    await session.receive()
    lost_at = events.events[0][0]
    # Tries at +1, +3, +7; the next would start at +15, past give_up_after: no try starts.
    assert [(t - lost_at, e.retrying) for t, e in events.attempts_after(1)] == [
        (1, True), (3, True), (7, False)]
    assert failed.value.attempts == 3
    assert "give_up_after (10 s)" in str(failed.value)


async def test_max_reconnects_zero_reports_the_loss_and_ends_at_once() -> None:
    events = Recorder()
    async with bot_server(vanish_on_die) as bot, gateway(bot.url) as gw:
        with trio.fail_after(BOUND):
            async with relay.client.connect(start_url(gw), PK, on_event=events,
                                            reconnect=Reconnect(max_reconnects=0)) as session:
                await session.send("die")
                with pytest.raises(ReconnectFailed) as failed:
                    await session.receive()
        assert failed.value.attempts == 0 and "max_reconnects (0)" in str(failed.value)
        assert [type(e) for _, e in events.events] == [ConnectionLost]
        assert starts(gw, 200) == 1


async def test_send_and_receive_after_close_raise_session_closed_with_our_code() -> None:
    closes: list[int | None] = []

    async def record(ws: WebSocketConnection, bot: BotServer) -> None:
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except ConnectionClosed as exc:
            closes.append(exc.reason.code if exc.reason else None)
            bot.closed.set()
            raise

    async with bot_server(record) as bot, gateway(bot.url) as gw:
        with trio.fail_after(BOUND):
            async with relay.client.connect(start_url(gw), PK) as session:
                await session.send("x")
                assert await session.receive() == "x"
                await session.close(4100, "done here")
                with pytest.raises(SessionClosed) as closed:
                    await session.receive()
                assert (closed.value.code, closed.value.reason) == (4100, "done here")
                with pytest.raises(SessionClosed):
                    await session.send("late")
                await session.close()  # idempotent
            await bot.closed.wait()
    assert closes == [4100]


async def test_plain_trio_websocket_sees_1002_where_the_client_reports_1014() -> None:
    """Why closewatch exists: wsproto refuses 1014 and trio-websocket reports 1002."""
    async with bot_server(vanish_on_die) as bot, gateway(bot.url, websocket_auth="none") as gw:
        with trio.fail_after(BOUND):
            async with open_client(gw.url()) as ws:
                await ws.send_message("die")
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
            assert closed.value.reason is not None and closed.value.reason.code == 1002


async def bursty(ws: WebSocketConnection, bot: BotServer) -> None:
    """On "burst", send three messages and vanish; otherwise echo."""
    while True:
        message = await ws.get_message()
        if message == "burst":
            for i in range(3):
                await ws.send_message(f"m{i}")
            await ws._stream.aclose()
            return
        await ws.send_message(message)


async def test_messages_received_before_the_loss_are_delivered_first() -> None:
    events = Recorder()
    async with bot_server(bursty) as bot, gateway(bot.url) as gw:
        with trio.fail_after(BOUND):
            async with relay.client.connect(start_url(gw), PK, reconnect=NO_JITTER,
                                            on_event=events) as session:
                await session.send("burst")
                assert [await session.receive() for _ in range(3)] == ["m0", "m1", "m2"]
                await events.reconnected.wait()
                await session.send("after")
                assert await session.receive() == "after"
        [lost] = events.of(ConnectionLost)
        assert lost.messages_received == 3 and lost.messages_sent == 1


def closing_bot(code: int, reason: str) -> Any:
    async def behaviour(ws: WebSocketConnection, bot: BotServer) -> None:
        message = await ws.get_message()
        if message == "close":
            await ws.aclose(code, reason)
            return
        await ws.send_message(message)
        await trio.sleep_forever()
    return behaviour


@pytest.mark.parametrize(("code", "reconnects"), [
    (1000, False), (4002, False), (1008, False), (1011, True), (1001, True)])
async def test_bot_close_codes_end_or_reconnect_as_the_policy_says(
        code: int, reconnects: bool) -> None:
    events = Recorder()
    async with bot_server(closing_bot(code, "bye")) as bot, gateway(bot.url) as gw:
        with trio.fail_after(BOUND):
            async with relay.client.connect(start_url(gw), PK, reconnect=NO_JITTER,
                                            on_event=events) as session:
                await session.send("close")
                if reconnects:
                    await events.reconnected.wait()
                    await session.send("again")
                    assert await session.receive() == "again"
                    [lost] = events.of(ConnectionLost)
                    assert (lost.code, lost.reason) == (code, "bye")
                else:
                    with pytest.raises(SessionClosed) as closed:
                        await session.receive()
                    assert (closed.value.code, closed.value.reason) == (code, "bye")
                    assert events.events == []
                    assert starts(gw, 200) == 1


async def test_session_timeout_4000_ends_the_session_without_reconnecting(
        autojump_clock: trio.testing.MockClock) -> None:
    async with gateway(session_timeout=300) as gw:
        with trio.fail_after(BOUND * 20):
            async with relay.client.connect(start_url(gw), PK) as session:
                connected_at = trio.current_time()
                with pytest.raises(SessionClosed) as closed:
                    await session.receive()
                assert trio.current_time() - connected_at == 300
        assert (closed.value.code, closed.value.reason) == (4000, "session timeout")
        assert starts(gw, 200) == 1


async def test_replaced_4001_ends_the_older_session_and_the_newer_one_works() -> None:
    async with gateway() as gw:
        with trio.fail_after(BOUND):
            async with relay.client.connect(start_url(gw), PK) as first:
                await first.send("one")
                assert await first.receive() == "one"
                async with relay.client.connect(start_url(gw), PK) as second:
                    with pytest.raises(SessionClosed) as closed:
                        await first.receive()
                    assert (closed.value.code, closed.value.reason) == (4001, "replaced")
                    await second.send("two")
                    assert await second.receive() == "two"
        assert starts(gw, 200) == 2


async def test_close_during_the_backoff_wait_ends_at_once(
        autojump_clock: trio.testing.MockClock) -> None:
    events = Recorder()
    policy = Reconnect(first_delay=100, jitter=0, give_up_after=1000)
    async with bot_server(vanish_on_die) as bot, gateway(bot.url) as gw:
        with trio.fail_after(BOUND):
            async with relay.client.connect(start_url(gw), PK, reconnect=policy,
                                            on_event=events) as session:
                await session.send("die")
                await events.lost.wait()
                lost_at = trio.current_time()
                await session.close()
                assert trio.current_time() == lost_at
                with pytest.raises(SessionClosed) as closed:
                    await session.receive()
                assert not isinstance(closed.value, ReconnectFailed)
                assert closed.value.code == 1000
        assert starts(gw, 200) == 1


async def test_async_callbacks_are_awaited_and_a_failing_callback_is_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    reconnected = trio.Event()

    async def on_event(event: relay.client.Event) -> None:
        await trio.lowlevel.checkpoint()
        seen.append(type(event).__name__)
        if isinstance(event, ConnectionLost):
            raise RuntimeError("callback bug")
        if isinstance(event, Reconnected):
            reconnected.set()

    async with bot_server(vanish_on_die) as bot, gateway(bot.url) as gw:
        with trio.fail_after(BOUND):
            async with relay.client.connect(start_url(gw), PK, reconnect=NO_JITTER,
                                            on_event=on_event) as session:
                await session.send("die")
                await reconnected.wait()
                await session.send("ok")
                assert await session.receive() == "ok"
    assert seen == ["ConnectionLost", "Reconnected"]
    assert "callback bug" in caplog.text


async def test_a_caller_error_inside_the_block_propagates_unwrapped() -> None:
    async with gateway() as gw:
        with trio.fail_after(BOUND), pytest.raises(KeyError, match="mine"):
            async with relay.client.connect(start_url(gw), PK):
                raise KeyError("mine")


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP server that accepts and never answers (a hung gateway); its port."""
    async def handler(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def test_a_silent_start_is_a_timeout_at_exactly_connect_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    async with silent_server() as port:
        began = trio.current_time()
        with pytest.raises(StartError) as refused:
            async with relay.client.connect(f"http://127.0.0.1:{port}/v1/public/a/start", PK,
                                            connect_timeout=7):
                pass
        assert trio.current_time() - began == 7
    assert refused.value.code == "timeout" and refused.value.retryable


async def test_a_silent_upgrade_is_a_timeout_at_exactly_connect_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    async with silent_server() as port:
        config = make_config(websocket_auth="token", server={
            "public_url": f"ws://127.0.0.1:{port}", "public_keys": [PK]})
        async with running(config) as gw:
            began = trio.current_time()
            with pytest.raises(ConnectError) as refused:
                async with relay.client.connect(start_url(gw), PK, connect_timeout=7):
                    pass
            assert trio.current_time() - began == 7
    assert refused.value.code == "timeout" and refused.value.status is None


async def test_a_message_over_max_message_size_ends_the_session_with_1009() -> None:
    async with gateway() as gw:
        with trio.fail_after(BOUND):
            async with relay.client.connect(start_url(gw), PK,
                                            max_message_size=10) as session:
                await session.send("x" * 11)
                with pytest.raises(SessionClosed) as closed:
                    await session.receive()
        assert closed.value.code == 1009 and not isinstance(closed.value, ReconnectFailed)
        assert starts(gw, 200) == 1
