"""The operator API is fleet-wide on Redis: three `relay serve` processes, one redis-server.

Sessions of every instance are listed from any of them with the instance holding each;
DELETE on one ends a session on another (4002 to client and bot); a drain set on one
refuses upgrades and /start on all of them until it ends; an unknown id is 404; with Redis
stopped the operator API answers 503 store_unavailable while live sessions go on. Real
processes on free loopback ports, each stopped by its PID.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import trio
from fleet import WAIT, Instance, fleet, upgrade_status, ws_path
from redis_server import RedisServer, fresh_prefix, redis_server  # noqa: F401
from support import bot_server, http, open_client
from trio_websocket import ConnectionClosed, WebSocketConnection

ADMIN = "fleet-admin-key"
SERVER = f'admin_keys = ["{ADMIN}"]\n'
OPEN = "/ws/generic/open.local"


async def admin(inst: Instance, method: str, target: str) -> tuple[int, Any]:
    with trio.fail_after(WAIT):
        status, _, body = await http("127.0.0.1", inst.api_port, method, target,
                                     [("authorization", f"Bearer {ADMIN}")])
    return status, json.loads(body) if body else None


async def listed(inst: Instance) -> list[dict[str, Any]]:
    status, answer = await admin(inst, "GET", "/v1/admin/sessions")
    assert status == 200, answer
    return list(answer["sessions"])


async def until_listed(inst: Instance, count: int) -> list[dict[str, Any]]:
    """The listing once it holds ``count`` sessions (each is written once its upgrade is
    accepted: a moment after the client's 101)."""
    with trio.fail_after(WAIT):
        while len(sessions := await listed(inst)) != count:  # noqa: ASYNC110 - polls another process
            await trio.sleep(0.05)
    return sessions


def instance_name(inst: Instance) -> str:
    return f"{socket.gethostname()}:{inst.process.pid}"


async def echo(ws: WebSocketConnection, text: str) -> None:
    with trio.fail_after(WAIT):
        await ws.send_message(text)
        while await ws.get_message() != text:  # skip the bot's relay.session frame echo
            pass


async def closed_with(ws: WebSocketConnection) -> tuple[int, str | None]:
    with trio.fail_after(WAIT), pytest.raises(ConnectionClosed) as closed:
        while True:
            await ws.get_message()
    assert closed.value.reason is not None
    return closed.value.reason.code, closed.value.reason.reason


async def test_list_on_a_shows_b_and_c_and_delete_on_a_ends_the_session_on_c(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    # renewals every 100 s: the end request can only reach C over its channel here
    async with bot_server() as bot, fleet(tmp_path, ["a", "b", "c"], redis_server.url,
                                          fresh_prefix(), bot.url, server=SERVER,
                                          store="lease_ttl = 300\n") as f:
        a, b, c = f["a"], f["b"], f["c"]
        async with open_client(b.ws_url(OPEN)) as on_b, open_client(c.ws_url(OPEN)) as on_c:
            await echo(on_b, "b")
            await echo(on_c, "c")
            sessions = await until_listed(a, 2)
            by_instance = {s["instance"]: s for s in sessions}
            assert set(by_instance) == {instance_name(b), instance_name(c)}
            for s in sessions:
                assert s["agent"] == "open" and s["client_addr"].startswith("127.0.0.1")
                assert isinstance(s["connected_at"], float) and s["id"]
                # relayed counts are the holder's: not in another instance's listing
                assert "messages" not in s and "bytes" not in s
            # the holder lists its own session with its counts, and the others' too
            own = {s["instance"]: s for s in await listed(c)}
            assert set(own) == {instance_name(b), instance_name(c)}
            assert own[instance_name(c)]["messages"]["client_to_bot"] >= 1
            # the agents view counts the fleet's sessions
            status, agents = await admin(a, "GET", "/v1/admin/agents")
            assert status == 200
            assert {x["name"]: x["sessions"] for x in agents["agents"]} == {"open": 2, "tok": 0}

            on_c_id = by_instance[instance_name(c)]["id"]
            status, body = await admin(a, "DELETE", f"/v1/admin/sessions/{on_c_id}")
            assert (status, body) == (204, None)
            assert await closed_with(on_c) == (4002, "ended by operator")
            with trio.fail_after(WAIT):
                await bot.closed.wait()  # the first (and only) bot leg to end
            assert bot.close_codes == [4002]  # B's bot leg untouched
            await echo(on_b, "still here")
            # gone from the fleet's listing at once, and a second DELETE is 404
            assert [s["instance"] for s in await listed(a)] == [instance_name(b)]
            status, body = await admin(a, "DELETE", f"/v1/admin/sessions/{on_c_id}")
            assert (status, body["code"]) == (404, "session_not_found")
            # ids a client could try: unknown, or shaped like Redis members and patterns
            for bad in ("nope", "%2A", "x%7Cy", "a" * 2000):
                status, body = await admin(b, "DELETE", f"/v1/admin/sessions/{bad}")
                assert (status, body["code"]) == (404, "session_not_found"), bad
            await echo(on_b, "after the 404s")
            assert len(await listed(c)) == 1
        metric = 'relay_sessions_ended_total{agent="open",reason="operator"}'
        assert await c.metric(metric) == 1.0
        assert await b.metric(metric) is None
        for inst in (a, b, c):
            assert "Traceback" not in inst.stderr_text()


async def test_delete_of_a_session_whose_instance_was_killed_frees_it_at_once(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    async with bot_server() as bot, fleet(tmp_path, ["a", "c"], redis_server.url,
                                          fresh_prefix(), bot.url, server=SERVER,
                                          store="lease_ttl = 30\n") as f:
        a, c = f["a"], f["c"]
        async with open_client(c.ws_url(OPEN)) as on_c:
            await echo(on_c, "c")
            (s,) = await until_listed(a, 1)
            c.process.kill()  # by its PID: its lease would stay listed for lease_ttl
            with trio.fail_after(WAIT):
                await c.process.wait()
            assert [x["id"] for x in await listed(a)] == [s["id"]]
            status, _ = await admin(a, "DELETE", f"/v1/admin/sessions/{s['id']}")
            assert status == 204
            assert await listed(a) == []
            status, _ = await admin(a, "DELETE", f"/v1/admin/sessions/{s['id']}")
            assert status == 404


async def test_drain_on_b_refuses_upgrades_and_start_on_every_instance_until_undrained(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    async with bot_server() as bot, fleet(tmp_path, ["a", "b", "c"], redis_server.url,
                                          fresh_prefix(), bot.url, server=SERVER) as f:
        a, b, c = f["a"], f["b"], f["c"]
        status, held = await a.start("tok")  # a token issued before the drain
        assert status == 200
        path = ws_path(held["wsUrl"])
        async with open_client(c.ws_url(OPEN)) as live:
            await echo(live, "before")
            status, _ = await admin(b, "POST", "/v1/admin/agents/open/drain")
            assert status == 204
            status, _ = await admin(b, "POST", "/v1/admin/agents/tok/drain")
            assert status == 204
            # B knows at once; A and C within their refresh
            status, head = await upgrade_status(b.ws_port, OPEN)
            assert status == 503 and b'"draining"' in head, head
            status, head = await upgrade_status(b.ws_port, path, held["token"])
            assert status == 503 and b'"draining"' in head, head
            for inst in (a, c):
                with trio.fail_after(WAIT):
                    while (answer := await inst.start("tok"))[0] != 503:  # noqa: ASYNC110 - polls another process
                        await trio.sleep(0.05)
                assert answer[1]["code"] == "draining", answer
                status, head = await upgrade_status(inst.ws_port, OPEN)
                assert status == 503 and b'"draining"' in head, head
                status, agents = await admin(inst, "GET", "/v1/admin/agents")
                assert all(x["draining"] for x in agents["agents"]), agents
            await echo(live, "during")  # a drain refuses new sessions only

            status, _ = await admin(c, "DELETE", "/v1/admin/agents/tok/drain")
            assert status == 204
            status, _ = await admin(c, "DELETE", "/v1/admin/agents/open/drain")
            assert status == 204
            for inst in (a, b):
                with trio.fail_after(WAIT):
                    while (await upgrade_status(inst.ws_port, OPEN))[0] != 101:  # noqa: ASYNC110 - polls another process
                        await trio.sleep(0.05)
                    while (await inst.start("tok"))[0] != 200:  # noqa: ASYNC110 - polls another process
                        await trio.sleep(0.05)
            # the token refused during the drain was kept: it opens a session now
            assert (await upgrade_status(b.ws_port, path, held["token"]))[0] == 101
            await echo(live, "after")


async def test_redis_stopped_the_operator_api_is_503_and_live_sessions_go_on(
        tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        async with bot_server() as bot, fleet(tmp_path / "gw", ["a", "b"], server.url,
                                              fresh_prefix(), bot.url, server=SERVER) as f:
            a, b = f["a"], f["b"]
            async with open_client(b.ws_url(OPEN)) as ws:
                await echo(ws, "before")
                (s,) = await until_listed(a, 1)

                server.stop()

                for method, target in (("GET", "/v1/admin/sessions"),
                                       ("GET", "/v1/admin/agents"),
                                       ("DELETE", f"/v1/admin/sessions/{s['id']}"),
                                       ("DELETE", "/v1/admin/sessions/unknown"),
                                       ("POST", "/v1/admin/agents/open/drain"),
                                       ("DELETE", "/v1/admin/agents/open/drain")):
                    status, body = await admin(a, method, target)
                    assert status == 503, (method, target, body)
                    assert set(body) == {"error", "code", "detail"}
                    assert body["code"] == "store_unavailable"
                await echo(ws, "during")  # nothing was ended or drained
                # the holder still ends its own session without Redis
                status, _ = await admin(b, "DELETE", f"/v1/admin/sessions/{s['id']}")
                assert status == 204
                assert await closed_with(ws) == (4002, "ended by operator")

                server.start()

                with trio.fail_after(30):
                    while (await admin(a, "GET", "/v1/admin/sessions"))[0] != 200:  # noqa: ASYNC110 - polls another process
                        await trio.sleep(0.1)
                assert await listed(a) == []
    finally:
        server.stop()
