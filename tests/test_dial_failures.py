"""A bot that is down leaves a trace: a WARNING naming agent, bot URL and reason, and
`relay_bot_dial_failures_total{agent,reason}`, on both data-plane paths.

The client's 502/504 itself is pinned in test_relay_e2e.py and test_embedded.py; here we pin
what the operator sees. The bot URL is logged without its query string or user info (either
may carry a credential the operator put there).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families
from support import KEYS, make_config, raw_upgrade_status, running
from trio_websocket import WebSocketRequest, serve_websocket

from relay.config import Config
from relay.errors import BotDialError
from relay.gateway import Gateway
from relay.metrics import Metrics
from relay.upstream import DIAL_WARNING_INTERVAL, bot_url_for_logs

WAIT = 10  # seconds: bound on each exchange that does not advance the fake clock


def dial_failures(metrics: Metrics) -> dict[tuple[str, str], float]:
    data, _ = metrics.render()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(data.decode()):
        for s in family.samples:
            if s.name == "relay_bot_dial_failures_total":
                out[(s.labels["agent"], s.labels["reason"])] = s.value
    return out


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def listener_path(config: Config) -> AsyncIterator[tuple[Gateway, int]]:
    async with running(config) as gw:
        yield gw.gateway, gw.ws_port


@asynccontextmanager
async def embedded_path(config: Config) -> AsyncIterator[tuple[Gateway, int]]:
    gateway = Gateway(config, keys=KEYS, wall_clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, gateway.handle, "127.0.0.1", 0, None)
        yield gateway, server.port
        nursery.cancel_scope.cancel()


PATHS = {"listener": listener_path, "embedded": embedded_path}


def warnings_from(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "relay.upstream"]


@pytest.mark.parametrize("path", list(PATHS))
async def test_unreachable_bot_is_logged_and_counted(
        path: str, caplog: pytest.LogCaptureFixture) -> None:
    port = closed_port()
    url = f"ws://127.0.0.1:{port}/bot?api_key=s3cret"
    caplog.set_level(logging.DEBUG)
    async with PATHS[path](make_config(url, agent="down")) as (gateway, ws_port):
        with trio.fail_after(WAIT):
            assert await raw_upgrade_status(ws_port, "/ws/generic/down.local") == 502
            assert await raw_upgrade_status(ws_port, "/ws/generic/down.local") == 502
        assert dial_failures(gateway.metrics) == {("down", "unreachable"): 2}
    records = warnings_from(caplog)
    assert len(records) == 1  # the second within DIAL_WARNING_INTERVAL: counted, not logged
    text = records[0].getMessage()
    assert "'down'" in text and f"ws://127.0.0.1:{port}/bot" in text
    assert "unreachable" in text and "no session for client 127.0.0.1" in text
    assert "s3cret" not in text


@pytest.mark.parametrize("path", list(PATHS))
async def test_silent_bot_is_logged_and_counted_as_timeout(
        path: str, caplog: pytest.LogCaptureFixture,
        autojump_clock: trio.testing.MockClock) -> None:
    held: list[trio.SocketStream] = []

    async def silent(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    caplog.set_level(logging.WARNING)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        config = make_config(f"ws://127.0.0.1:{port}/bot", bot_connect_timeout=3)
        async with PATHS[path](config) as (gateway, ws_port):
            with trio.fail_after(60):
                assert await raw_upgrade_status(ws_port, "/ws/generic/a.local") == 504
            assert dial_failures(gateway.metrics) == {("a", "timeout"): 1}
        nursery.cancel_scope.cancel()
    [record] = warnings_from(caplog)
    assert "timeout" in record.getMessage() and "did not answer within 3" in record.getMessage()


@pytest.mark.parametrize("path", list(PATHS))
async def test_bot_refusing_the_upgrade_is_logged_and_counted_as_rejected(
        path: str, caplog: pytest.LogCaptureFixture) -> None:
    async def refuse(request: WebSocketRequest) -> None:
        await request.reject(403)

    caplog.set_level(logging.WARNING)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, refuse, "127.0.0.1", 0, None)
        config = make_config(f"ws://127.0.0.1:{server.port}/bot")
        async with PATHS[path](config) as (gateway, ws_port):
            with trio.fail_after(WAIT):
                assert await raw_upgrade_status(ws_port, "/ws/generic/a.local") == 502
            assert dial_failures(gateway.metrics) == {("a", "rejected"): 1}
        nursery.cancel_scope.cancel()
    [record] = warnings_from(caplog)
    assert "rejected" in record.getMessage()


async def test_a_client_refusal_is_not_a_dial_failure(
        caplog: pytest.LogCaptureFixture) -> None:
    """Refusals that are the client's fault (unknown agent, missing token) count nothing."""
    caplog.set_level(logging.WARNING)
    config = make_config(f"ws://127.0.0.1:{closed_port()}/bot", websocket_auth="token")
    async with running(config) as gw:
        with trio.fail_after(WAIT):
            assert await raw_upgrade_status(gw.ws_port, "/ws/generic/a.local") == 403
            assert await raw_upgrade_status(gw.ws_port, "/ws/generic/zz.local") == 404
        assert dial_failures(gw.gateway.metrics) == {}
    assert warnings_from(caplog) == []


async def test_a_flood_of_dials_to_a_dead_bot_is_counted_but_logged_sparingly(
        caplog: pytest.LogCaptureFixture, autojump_clock: trio.testing.MockClock) -> None:
    """A hostile client of an auth-none agent cannot flood the log through a dead bot."""
    caplog.set_level(logging.WARNING)
    async with running(make_config(f"ws://127.0.0.1:{closed_port()}/bot")) as gw:
        with trio.fail_after(60):
            for _ in range(20):
                assert await raw_upgrade_status(gw.ws_port, "/ws/generic/a.local") == 502
            assert len(warnings_from(caplog)) == 1
            await trio.sleep(DIAL_WARNING_INTERVAL)
            assert await raw_upgrade_status(gw.ws_port, "/ws/generic/a.local") == 502
        assert dial_failures(gw.gateway.metrics) == {("a", "unreachable"): 21}
    first, second = warnings_from(caplog)
    assert "more since" not in first.getMessage()
    assert "(19 more since the last report)" in second.getMessage()


async def test_provider_endpoint_dial_failure_is_logged_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    """On /ws/{provider} the dial comes after the 101 (a close 1014, not a 502): the same
    trace for the operator."""
    from test_provider_e2e import Provider, provider, wrong

    caplog.set_level(logging.WARNING)
    async with running(make_config(f"ws://127.0.0.1:{closed_port()}/bot", agent="bot")) as gw:
        async with provider(gw.ws_port, "/ws/plivo/bot.local") as p:
            assert isinstance(p, Provider)
            await p.send(wrong("plivo"))
            assert await p.closed() == (1014, "bot unreachable")
        assert dial_failures(gw.gateway.metrics) == {("bot", "unreachable"): 1}
    [record] = warnings_from(caplog)
    assert "'bot'" in record.getMessage() and "unreachable" in record.getMessage()


def test_reasons_are_a_fixed_set() -> None:
    assert BotDialError(504, "x").reason == "timeout"
    assert BotDialError(502, "x").reason == "rejected"
    with pytest.raises(ValueError, match="reason must be one of"):
        Metrics().bot_dial_failed("a", "client-chosen text")


@pytest.mark.parametrize(("url", "shown"), [
    ("ws://127.0.0.1:9000/ws", "ws://127.0.0.1:9000/ws"),
    ("wss://u:p@bot.example:443/x?key=1#f", "wss://bot.example:443/x"),
    ("ws://[::1]:9/a?b", "ws://[::1]:9/a"),
])
def test_bot_url_for_logs_drops_credentials(url: str, shown: str) -> None:
    assert bot_url_for_logs(url) == shown
