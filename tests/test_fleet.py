"""Three `relay serve` processes on one real redis-server behave as one gateway.

/start on one instance, upgrade on another; the token is usable once across the fleet and
the held body reaches exactly one bot, also when a hostile client races the same token at
every instance at once. Real processes, a real redis-server, free loopback ports; every
process is stopped by its PID.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio
from fleet import WAIT, fleet, upgrade_status, ws_path
from redis_server import RedisServer, fresh_prefix, redis_server  # noqa: F401
from support import BotServer, bot_server, open_client


def session_frames(bot: BotServer) -> list[dict[str, object]]:
    frames = []
    for message in bot.received:
        if isinstance(message, str) and message.startswith('{"type":"relay.session"'):
            frames.append(json.loads(message))
    return frames


async def test_start_on_a_upgrade_on_c_replay_on_b_is_403_body_delivered_once(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    async with bot_server() as bot, fleet(tmp_path, ["a", "b", "c"], redis_server.url,
                                          fresh_prefix(), bot.url) as f:
        status, answer = await f["a"].start("tok", {"transport": "websocket", "body": {"n": 7}})
        assert status == 200, answer
        token, ws_url = answer["token"], answer["wsUrl"]
        path = ws_path(ws_url)  # the same path on any instance
        with trio.fail_after(WAIT):
            async with open_client(f["c"].ws_url(path),
                                   extra_headers=[(b"authorization",
                                                   f"Bearer {token}".encode())]) as ws:
                await ws.send_message("hello")
                while await ws.get_message() != "hello":  # the echoed relay.session frame
                    pass
                # while the session lives, the same token on B is a replay
                status_b, head = await upgrade_status(f["b"].ws_port, path, token)
                assert status_b == 403 and b"replayed" in head, head
                # and on A, where it was issued, too
                assert (await upgrade_status(f["a"].ws_port, path, token))[0] == 403
        frames = session_frames(bot)
        assert [frame["body"] for frame in frames] == [{"n": 7}]
        assert len(bot.requests) == 1  # no bot was dialled for the replays


async def test_one_token_raced_at_every_instance_opens_exactly_one_session(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    async with bot_server() as bot, fleet(tmp_path, ["a", "b", "c"], redis_server.url,
                                          fresh_prefix(), bot.url) as f:
        status, answer = await f["b"].start("tok", {"transport": "websocket", "body": {"x": "y"}})
        assert status == 200, answer
        path = ws_path(answer["wsUrl"])
        statuses: list[int] = []

        async def attempt(port: int) -> None:
            statuses.append((await upgrade_status(port, path, answer["token"]))[0])

        async with trio.open_nursery() as nursery:
            for inst in list(f.values()) * 3:
                nursery.start_soon(attempt, inst.ws_port)
        assert sorted(statuses) == [101] + [403] * 8
        with trio.fail_after(WAIT):
            await bot.connected.wait()
        assert len(bot.requests) == 1


async def test_a_token_from_another_fleet_prefix_is_unknown_here(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    # Two fleets on one Redis with different key_prefix share nothing: a body held by one
    # is not found by the other, whose instance refuses the token (its body is not held).
    url = redis_server.url
    async with bot_server() as bot, \
            fleet(tmp_path / "x", ["x"], url, fresh_prefix(), bot.url) as fx, \
            fleet(tmp_path / "y", ["y"], url, fresh_prefix(), bot.url) as fy:
        status, answer = await fx["x"].start("tok", {"transport": "websocket",
                                                     "body": {"n": 1}})
        assert status == 200
        path = ws_path(answer["wsUrl"])
        status_y, head = await upgrade_status(fy["y"].ws_port, path, answer["token"])
        assert status_y == 403 and b"body_unavailable" in head, head
        assert (await upgrade_status(fx["x"].ws_port, path, answer["token"]))[0] == 101
