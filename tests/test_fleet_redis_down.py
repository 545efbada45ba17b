"""A `relay serve` process whose real redis-server stops and starts again, or starts late.

While Redis is down: /start is 503 store_unavailable, a token upgrade is 503 (never accepted
unverified), auth-none agents keep admitting and relaying, live sessions are not cut and
lose nothing, /health says "store": "down" and relay_store_up is 0. Once Redis is back the
same process recovers by itself (no restart); a Redis that came back empty has forgotten
which tokens were used, so tokens issued before are refused 403 unverifiable.
"""

from __future__ import annotations

from pathlib import Path

import trio
from fleet import WAIT, Instance, fleet, store_state, until_store, upgrade_status, ws_path
from redis_server import RedisServer, fresh_prefix
from support import bot_server, open_client
from trio_websocket import WebSocketConnection


async def echo_many(ws: WebSocketConnection, tag: str, count: int = 20) -> None:
    """Send ``count`` messages, then get every echo back, in order (nothing lost)."""
    with trio.fail_after(WAIT):
        for i in range(count):
            await ws.send_message(f"{tag}-{i}")
        got: list[str] = []
        while len(got) < count:
            message = await ws.get_message()
            if isinstance(message, str) and message.startswith(f"{tag}-"):
                got.append(message)
    assert got == [f"{tag}-{i}" for i in range(count)]


def token_path(inst: Instance, answer: dict[str, str]) -> str:
    return ws_path(answer["wsUrl"])


async def test_redis_stops_and_starts_live_sessions_untouched_and_recovery_without_restart(
        tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        async with bot_server() as bot, fleet(tmp_path / "gw", ["a"], server.url,
                                              fresh_prefix(), bot.url) as f:
            a = f["a"]
            assert await store_state(a.api_port) == "up"
            assert await a.metric("relay_store_up") == 1.0
            status, live = await a.start("tok")
            assert status == 200
            status, unused = await a.start("tok")
            assert status == 200
            auth = [(b"authorization", f"Bearer {live['token']}".encode())]
            async with open_client(a.ws_url(token_path(a, live)), extra_headers=auth) as tok_ws, \
                    open_client(a.ws_url("/ws/generic/open.local")) as open_ws:
                await echo_many(tok_ws, "before")

                server.stop()

                await echo_many(tok_ws, "during")
                await echo_many(open_ws, "during")
                status, answer = await a.start("tok")
                assert (status, answer["code"]) == (503, "store_unavailable"), answer
                status, head = await upgrade_status(a.ws_port, token_path(a, unused),
                                                    unused["token"])
                assert status == 503 and b"store_unavailable" in head, head
                await until_store(a.api_port, "down")
                assert await a.metric("relay_store_up") == 0.0
                assert (await a.metric("relay_store_down_total") or 0) >= 1
                # auth-none keeps admitting while Redis is down
                async with open_client(a.ws_url("/ws/generic/open.local")) as newcomer:
                    await echo_many(newcomer, "newcomer")

                server.start()  # empty: the fixture runs Redis without persistence

                await until_store(a.api_port, "up")
                assert await a.metric("relay_store_up") == 1.0
                # What the empty Redis forgot is never honoured: the token in use before the
                # restart (its replay would have replaced tok_ws) and one minted then, unused.
                for old in (live, unused):
                    status, head = await upgrade_status(a.ws_port, token_path(a, old),
                                                        old["token"])
                    assert status == 403 and b'"unverifiable"' in head, head
                assert await a.metric(
                    'relay_token_refusals_total{reason="unverifiable"}') == 2.0
                status, fresh = await a.start("tok", {"transport": "websocket",
                                                      "body": {"after": True}})
                assert status == 200, fresh
                fresh_auth = [(b"authorization", f"Bearer {fresh['token']}".encode())]
                async with open_client(a.ws_url(token_path(a, fresh)),
                                       extra_headers=fresh_auth) as after_ws:
                    await echo_many(after_ws, "after")
                await echo_many(tok_ws, "end")
                await echo_many(open_ws, "end")
            assert "Traceback" not in a.stderr_text()
    finally:
        server.stop()


async def test_redis_down_at_start_serves_auth_none_then_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # its port is chosen; nothing listens there yet
    try:
        async with bot_server() as bot, fleet(tmp_path / "gw", ["a"], server.url,
                                              fresh_prefix(), bot.url) as f:
            a = f["a"]
            assert await store_state(a.api_port) == "down"
            assert await a.metric("relay_store_up") == 0.0
            status, answer = await a.start("tok")
            assert status == 503, answer
            async with open_client(a.ws_url("/ws/generic/open.local")) as ws:
                await echo_many(ws, "down")
                server.start()
                await until_store(a.api_port, "up")
                status, answer = await a.start("tok")
                assert status == 200, answer
                assert (await upgrade_status(a.ws_port, token_path(a, answer),
                                             answer["token"]))[0] == 101
                await echo_many(ws, "up")
    finally:
        server.stop()
