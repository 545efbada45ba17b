"""One token, one incumbent; no held body lost (SPEC §8 rev 2), black-box on both paths.

Relay's own listener (`Gateway.serve`) and the embedding path (`Gateway.handle` in the
app's `serve_websocket`) are driven by real clients on loopback: /start over real HTTP,
upgrades as raw HTTP/1.1 (so a refusal is read as the plain response it is, and several
upgrades can race), sessions with trio-websocket. Bots are real upstream WebSocket
servers (`support.bot_server`) or an in-process bot of this module. Nothing sleeps on
real time; every wait is bounded by `WAIT`.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import pytest
import trio
from support import KEYS, bot_server, http, open_client, running
from trio_websocket import ConnectionClosed, WebSocketConnection, serve_websocket

from relay.config import Config, build_config
from relay.gateway import Gateway
from relay.inprocess import ClientDisconnected, Session
from relay.store import MAX_BODY_BYTES, MemoryStore
from relay.tokens import mint

PK = "pk_reservation"
WAIT = 20  # seconds: backstop for every network wait (nothing here waits on time)

bodies_seen: list[Any] = []  # session.body of every session of `recording_bot`


async def recording_bot(session: Session) -> None:
    """Records the body the gateway handed over, then echoes."""
    bodies_seen.append(session.body)
    try:
        while True:
            await session.send(await session.receive())
    except ClientDisconnected:
        return


def config(bot_url: str, **agent: Any) -> Config:
    return build_config(
        server={"ws_bind": ["127.0.0.1:0"], "api_bind": ["127.0.0.1:0"],
                "ping_interval": 1000, "ping_timeout": 1000, "public_keys": [PK]},
        agents={"a": {"bot": bot_url, "websocket_auth": "token", **agent}},
    )


async def start(api_port: int, payload: Any = None) -> tuple[int, dict[str, Any]]:
    """POST /v1/public/a/start; (status, parsed JSON answer)."""
    raw = json.dumps({"transport": "websocket"} if payload is None else payload).encode()
    with trio.fail_after(WAIT):
        status, _, body = await http("127.0.0.1", api_port, "POST", "/v1/public/a/start",
                                     [("authorization", f"Bearer {PK}"),
                                      ("content-type", "application/json")], raw)
    return status, json.loads(body)


async def token(api_port: int, payload: Any = None) -> str:
    status, answer = await start(api_port, payload)
    assert status == 200, answer
    return str(answer["token"])


async def metric(api_port: int, name: str) -> float:
    """One sample of a real GET /metrics (0 when absent), e.g. 'x_total{reason="y"}'."""
    with trio.fail_after(WAIT):
        status, _, body = await http("127.0.0.1", api_port, "GET", "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


async def upgrade(port: int, target: str) -> tuple[int, Any]:
    """One raw WebSocket upgrade; (101, None) once accepted (then the client vanishes),
    else the refusal's (status, parsed JSON body)."""
    request = (f"GET {target} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nupgrade: websocket\r\n"
               "connection: Upgrade\r\nsec-websocket-version: 13\r\nsec-websocket-key: "
               f"{base64.b64encode(os.urandom(16)).decode()}\r\n\r\n").encode()
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            conn = h11.Connection(h11.CLIENT)
            conn.send(h11.Request(method="GET", target=target, headers=[
                ("host", "x"), ("upgrade", "websocket"), ("connection", "Upgrade")]))
            status, chunks = 0, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                    return 101, None
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return status, json.loads(b"".join(chunks) or b"null")


async def echoes(ws: WebSocketConnection, message: str) -> bool:
    """True when the session still relays; False when the gateway closed it 4001."""
    with trio.fail_after(WAIT):
        try:
            await ws.send_message(message)
            assert await ws.get_message() == message
            return True
        except ConnectionClosed as closed:
            assert closed.reason is not None
            assert closed.reason.code == 4001, closed.reason
            return False


async def race(port: int, target: str, racers: int) -> list[tuple[int, Any]]:
    """`racers` upgrades with the same target, started together; every answer."""
    answers: list[tuple[int, Any]] = []

    async def one() -> None:
        answers.append(await upgrade(port, target))

    async with trio.open_nursery() as nursery:
        for _ in range(racers):
            nursery.start_soon(one)
    return answers


def assert_one_winner(answers: list[tuple[int, Any]]) -> None:
    assert sorted(status for status, _ in answers) == [101, 403, 403], answers
    assert [body["code"] for status, body in answers if status == 403] == ["replayed"] * 2


# ------------------------------------------------------------------ relay's own listener


async def test_three_racers_with_one_token_close_exactly_one_of_three_incumbents() -> None:
    async with bot_server() as bot, running(config(bot.url, max_clients=3)) as gw:
        urls = [gw.url("a", f"/{await token(gw.api_port)}") for _ in range(3)]
        shared = await token(gw.api_port)
        async with open_client(urls[0]) as s0, open_client(urls[1]) as s1, \
                open_client(urls[2]) as s2:
            for ws in (s0, s1, s2):
                assert await echoes(ws, "up")
            before = await metric(gw.api_port, 'relay_token_refusals_total{reason="replayed"}')
            answers = await race(gw.ws_port, f"/ws/generic/a.local/{shared}", 3)
            assert_one_winner(answers)
            alive = [await echoes(ws, "still") for ws in (s0, s1, s2)]
            assert alive.count(False) == 1, alive  # one 4001, never more
            assert alive == [False, True, True]  # the oldest
            assert bot.close_codes.count(4001) == 1
            assert await metric(
                gw.api_port, 'relay_token_refusals_total{reason="replayed"}') == before + 2
        # 3 incumbents + 1 newcomer dialled, nobody else
        assert len(bot.requests) == 4


async def test_a_full_rejecting_agent_releases_the_token_it_refused_1013() -> None:
    async with bot_server() as bot, running(
            config(bot.url, when_full="reject", max_clients=1)) as gw:
        holder_url = gw.url("a", f"/{await token(gw.api_port)}")
        shared = await token(gw.api_port)
        target = f"/ws/generic/a.local/{shared}"
        async with open_client(holder_url) as holder:
            assert await echoes(holder, "up")
            for _ in range(2):  # accepted and closed 1013, twice: the token is not burned
                async with open_client(gw.url("a", f"/{shared}")) as refused:
                    with trio.fail_after(WAIT), pytest.raises(ConnectionClosed) as closed:
                        await refused.get_message()
                    assert closed.value.reason is not None
                    assert closed.value.reason is not None
                assert closed.value.reason.code == 1013
        with trio.fail_after(WAIT):
            while gw.gateway.session_count("a"):  # the holder's teardown (no event for it)
                await trio.lowlevel.checkpoint()
        assert await upgrade(gw.ws_port, target) == (101, None)  # usable, once
        status, body = await upgrade(gw.ws_port, target)
        assert (status, body["code"]) == (403, "replayed")
        assert len(bot.requests) == 2


async def test_a_failed_dial_still_burns_the_reserved_token() -> None:
    async with running(config("ws://127.0.0.1:9/unreachable")) as gw:
        target = f"/ws/generic/a.local/{await token(gw.api_port)}"
        status, body = await upgrade(gw.ws_port, target)
        assert (status, body["code"]) == (502, "bad_gateway")
        status, body = await upgrade(gw.ws_port, target)
        assert (status, body["code"]) == (403, "replayed")


RESTARTED = 10.0  # seconds between the two processes' starts, on their wall clocks


async def test_a_body_gone_with_a_restarted_gateway_is_403_body_unavailable() -> None:
    # Same key (RELAY_SECRET), new process: the memory store and its bodies are gone.
    # The token says it was minted with a body, so the bot never starts without it.
    bodies_seen.clear()
    cfg = config("python:test_token_reservation:recording_bot", bot_protocol="relay")
    async with running(cfg) as first:
        with_body = await token(first.api_port, {"transport": "websocket",
                                                 "body": {"caller": "+15550100"}})
        without_body = await token(first.api_port)
    async with running(cfg, wall_clock=lambda: trio.current_time() + RESTARTED) as second:
        target = f"/ws/generic/a.local/{with_body}"
        status, body = await upgrade(second.ws_port, target)
        assert (status, body["code"]) == (403, "body_unavailable")
        assert set(body) == {"error", "code", "detail"} and "/start" in body["detail"]
        assert await metric(
            second.api_port, 'relay_token_refusals_total{reason="body_unavailable"}') == 1
        status, body = await upgrade(second.ws_port, target)  # nothing was used up
        assert (status, body["code"]) == (403, "body_unavailable")
        assert bodies_seen == []
        # one minted without a body may have been used before the restart: the new
        # process cannot tell, so it is refused too, never honoured
        status, body = await upgrade(second.ws_port, f"/ws/generic/a.local/{without_body}")
        assert (status, body["code"]) == (403, "unverifiable")
        assert bodies_seen == []


async def test_a_token_used_before_a_restart_is_never_honoured_after_it() -> None:
    # The finding: with the same key, a used token replayed on the restarted gateway was
    # accepted (and replaced the live session), because the memory store forgets its
    # markers. Tokens issued before this process began remembering are refused.
    bodies_seen.clear()
    cfg = config("python:test_token_reservation:recording_bot", bot_protocol="relay")
    async with running(cfg) as first:
        used = await token(first.api_port)
        assert await upgrade(first.ws_port, f"/ws/generic/a.local/{used}") == (101, None)
    async with running(cfg, wall_clock=lambda: trio.current_time() + RESTARTED) as second:
        status, body = await upgrade(second.ws_port, f"/ws/generic/a.local/{used}")
        assert (status, body["code"]) == (403, "unverifiable")
        assert "/start" in body["detail"]
        assert await metric(
            second.api_port, 'relay_token_refusals_total{reason="unverifiable"}') == 1
        fresh = await token(second.api_port)  # the way back: /start on the new process
        assert await upgrade(second.ws_port, f"/ws/generic/a.local/{fresh}") == (101, None)


async def test_start_flood_gets_503_store_full_and_the_victims_bot_gets_its_body() -> None:
    # The finding: 65 /start calls with 1 MiB bodies pushed out an earlier body, and its
    # bot got `body: null`. Now the store refuses the flood and drops nothing.
    bodies_seen.clear()
    cfg = config("python:test_token_reservation:recording_bot", bot_protocol="relay")
    async with running(cfg) as gw:
        victim = await token(gw.api_port, {"transport": "websocket", "body": {"v": 1}})
        big = {"transport": "websocket", "body": "x" * (1_048_576 - 64)}
        statuses: list[int] = []
        for _ in range(MAX_BODY_BYTES // 1_048_576 + 1):
            status, answer = await start(gw.api_port, big)
            statuses.append(status)
            if status != 200:
                assert (status, answer["code"]) == (503, "store_full"), answer
                assert set(answer) == {"error", "code", "detail"}
        assert statuses.count(503) >= 1 and statuses[-1] == 503
        assert 200 in statuses  # the flood filled the store first
        assert await metric(gw.api_port, 'relay_store_full_total{bound="body_bytes"}') == (
            statuses.count(503))
        assert await metric(gw.api_port, 'relay_start_requests_total{status="503"}') == (
            statuses.count(503))
        async with open_client(gw.url("a", f"/{victim}")) as ws:
            assert await echoes(ws, "hi")
        assert bodies_seen == [{"v": 1}]


async def test_a_minted_token_finding_the_markers_full_is_503_and_not_burned() -> None:
    # `relay mint-token` tokens were never put by /start, so their marker is new: with the
    # table full they wait (503) rather than push out a marker that has not expired.
    async with running(config("python:relay.echo:echo_bot")) as gw:
        gw.gateway.rt.store = MemoryStore(max_markers=1)  # the data plane's store, smaller
        first = mint(KEYS, agent="a", org="local", session_id="m1", now=trio.current_time())
        second = mint(KEYS, agent="a", org="local", session_id="m2", now=trio.current_time())
        assert await upgrade(gw.ws_port, f"/ws/generic/a.local/{first}") == (101, None)
        status, body = await upgrade(gw.ws_port, f"/ws/generic/a.local/{second}")
        assert (status, body["code"]) == (503, "store_full")
        assert "tokens remembered until they expire" in body["detail"]
        status, body = await upgrade(gw.ws_port, f"/ws/generic/a.local/{first}")
        assert (status, body["code"]) == (403, "replayed")  # the old marker is still there
        assert await metric(gw.api_port, 'relay_store_full_total{bound="markers"}') == 1
        await gw.gateway.rt.store.purge(trio.current_time() + 300)  # first's token expired
        assert await upgrade(gw.ws_port, f"/ws/generic/a.local/{second}") == (101, None)


# ------------------------------------------------------------------ Gateway.handle


@asynccontextmanager
async def embedded(cfg: Config) -> AsyncIterator[tuple[Gateway, int]]:
    gateway = Gateway(cfg, keys=KEYS, wall_clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, gateway.handle, "127.0.0.1", 0, None)
        yield gateway, server.port
        with trio.fail_after(WAIT):
            while gateway.rt.open_connections:  # every handler torn down
                await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()


def minted(session_id: str, *, body: bool = False) -> str:
    return mint(KEYS, agent="a", org="local", session_id=session_id,
                now=trio.current_time(), body=body)


async def test_embedded_three_racers_with_one_token_close_exactly_one_incumbent() -> None:
    async with bot_server() as bot, embedded(config(bot.url, max_clients=3)) as (_, port):
        base = f"ws://127.0.0.1:{port}/ws/generic/a.local/"
        async with open_client(base + minted("s0")) as s0, \
                open_client(base + minted("s1")) as s1, open_client(base + minted("s2")) as s2:
            for ws in (s0, s1, s2):
                assert await echoes(ws, "up")
            answers = await race(port, f"/ws/generic/a.local/{minted('shared')}", 3)
            assert_one_winner(answers)
            alive = [await echoes(ws, "still") for ws in (s0, s1, s2)]
            assert alive == [False, True, True], alive
            assert bot.close_codes.count(4001) == 1
        assert len(bot.requests) == 4


async def test_embedded_full_rejecting_agent_releases_the_token() -> None:
    async with bot_server() as bot, embedded(
            config(bot.url, when_full="reject", max_clients=1)) as (gw, port):
        base = f"ws://127.0.0.1:{port}/ws/generic/a.local/"
        shared = minted("shared")
        async with open_client(base + minted("holder")) as holder:
            assert await echoes(holder, "up")
            async with open_client(base + shared) as refused:
                with trio.fail_after(WAIT), pytest.raises(ConnectionClosed) as closed:
                    await refused.get_message()
                assert closed.value.reason is not None
                assert closed.value.reason.code == 1013
        with trio.fail_after(WAIT):
            while gw.session_count("a"):
                await trio.lowlevel.checkpoint()
        async with open_client(base + shared) as ws:
            assert await echoes(ws, "mine")
        status, body = await upgrade(port, f"/ws/generic/a.local/{shared}")
        assert (status, body["code"]) == (403, "replayed")
        assert len(bot.requests) == 2


async def test_embedded_body_unavailable_is_403_and_counted() -> None:
    async with bot_server() as bot, embedded(config(bot.url, bot_protocol="relay")) as (
            gw, port):
        status, body = await upgrade(port, f"/ws/generic/a.local/{minted('gone', body=True)}")
        assert (status, body["code"]) == (403, "body_unavailable")
        data, _ = gw.metrics.render()
        assert b'relay_token_refusals_total{reason="body_unavailable"} 1.0' in data
        assert bot.requests == []
