"""max_clients and when_full across `relay serve` processes on one real redis-server.

Replacement keeps its order across instances (the old client's 4001 and its bot leg's end
before the newcomer's bot is dialled); rejection is fleet-wide; a kill -9'd instance's
slots are free again within lease_ttl. Real processes, real Redis, free loopback ports.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import trio
from fleet import WAIT, fleet
from redis_server import RedisServer, fresh_prefix, redis_server  # noqa: F401
from support import BotBehaviour, BotServer, bot_server, open_client
from trio_websocket import ConnectionClosed, WebSocketConnection

LEASE_TTL = 6  # seconds, set in the config
AGENTS = (
    "[agents.solo]\n"
    'bot = "{bot}"\nbot_protocol = "relay"\nmax_clients = 1\nwhen_full = "replace"\n'
    "[agents.one]\n"
    'bot = "{bot}"\nbot_protocol = "relay"\nmax_clients = 1\nwhen_full = "reject"\n'
)
STORE = f"lease_ttl = {LEASE_TTL}\n"


def recording(events: list[tuple[str, int]]) -> BotBehaviour:
    async def behaviour(ws: WebSocketConnection, bot: BotServer) -> None:
        n = len(bot.requests) - 1
        events.append(("open", n))
        try:
            while True:
                await ws.send_message(await ws.get_message())
        finally:
            events.append(("closed", n))
    return behaviour


async def echo(ws: WebSocketConnection, text: str) -> None:
    with trio.fail_after(WAIT):
        await ws.send_message(text)
        assert await ws.get_message() == text


async def close_code(ws: WebSocketConnection) -> int:
    with trio.fail_after(WAIT), pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.get_message()
    assert info.value.reason is not None
    return info.value.reason.code


async def test_replace_across_instances_closes_the_old_client_before_the_new_bot_dial(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    events: list[tuple[str, int]] = []
    async with bot_server(recording(events)) as bot, \
            fleet(tmp_path, ["a", "b"], redis_server.url, fresh_prefix(), bot.url,
                  store=STORE, agents=AGENTS.format(bot=bot.url)) as f, \
            open_client(f["a"].ws_url("/ws/generic/solo.local")) as old:
        await echo(old, "old")
        async with open_client(f["b"].ws_url("/ws/generic/solo.local")) as new:
            assert await close_code(old) == 4001
            await echo(new, "new")
            # the old session's bot leg had ended before the new bot was dialled
            assert events[:3] == [("open", 0), ("closed", 0), ("open", 1)]
            assert len(bot.requests) == 2


async def test_reject_is_fleet_wide_and_a_freed_slot_is_usable_elsewhere(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    async with bot_server() as bot, \
            fleet(tmp_path, ["a", "b"], redis_server.url, fresh_prefix(), bot.url,
                  store=STORE, agents=AGENTS.format(bot=bot.url)) as f:
        async with open_client(f["a"].ws_url("/ws/generic/one.local")) as held:
            await echo(held, "first")
            async with open_client(f["b"].ws_url("/ws/generic/one.local")) as refused:
                assert await close_code(refused) == 1013
            async with open_client(f["a"].ws_url("/ws/generic/one.local")) as refused:
                assert await close_code(refused) == 1013
            await echo(held, "still here")
        assert len(bot.requests) == 1  # no bot was dialled for the refused
        # the slot is given back when the session ends: B admits now
        with trio.fail_after(WAIT):
            while True:
                async with open_client(f["b"].ws_url("/ws/generic/one.local")) as ws:
                    try:
                        await echo(ws, "second")
                        break
                    except ConnectionClosed:
                        pass  # the release is on its way to Redis
                await trio.sleep(0.1)


async def test_kill_9_of_an_instance_frees_its_slots_within_lease_ttl(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    async with bot_server() as bot, \
            fleet(tmp_path, ["a", "b"], redis_server.url, fresh_prefix(), bot.url,
                  store=STORE, agents=AGENTS.format(bot=bot.url)) as f:
        async with open_client(f["a"].ws_url("/ws/generic/one.local")) as held:
            await echo(held, "held")
            f["a"].process.kill()  # SIGKILL, by PID: no teardown, no release
            killed_at = time.monotonic()
            with trio.fail_after(WAIT):
                await f["a"].process.wait()
            async with open_client(f["b"].ws_url("/ws/generic/one.local")) as ws:
                assert await close_code(ws) == 1013  # its lease still counts
            with trio.fail_after(LEASE_TTL + WAIT):
                while True:
                    async with open_client(f["b"].ws_url("/ws/generic/one.local")) as ws:
                        try:
                            await echo(ws, "free again")
                            break
                        except ConnectionClosed:
                            pass
                    await trio.sleep(0.2)
            freed_after = time.monotonic() - killed_at
            print(f"slot freed {freed_after:.2f} s after kill -9 (lease_ttl {LEASE_TTL})")
            with pytest.raises(ConnectionClosed):
                await held.get_message()  # the killed instance's client saw it go
        assert freed_after <= LEASE_TTL + 3.0, freed_after  # 3 s: a loaded machine


async def test_newcomers_racing_on_two_instances_for_one_slot_one_gets_it(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    outcomes: list[str] = []
    async with bot_server() as bot, \
            fleet(tmp_path, ["a", "b"], redis_server.url, fresh_prefix(), bot.url,
                  store=STORE, agents=AGENTS.format(bot=bot.url)) as f:
        all_in = trio.Event()

        def answered(outcome: str) -> None:
            outcomes.append(outcome)
            if len(outcomes) == 8:
                all_in.set()

        async def newcomer(port: int) -> None:
            async with open_client(f"ws://127.0.0.1:{port}/ws/generic/one.local") as ws:
                try:
                    await echo(ws, "mine?")
                    answered("admitted")
                except ConnectionClosed as exc:
                    assert exc.reason is not None
                    answered(str(exc.reason.code))
                    return
                await all_in.wait()  # hold the slot until every newcomer has an answer

        async with trio.open_nursery() as nursery:
            for inst in [f["a"], f["b"]] * 4:
                nursery.start_soon(newcomer, inst.ws_port)
            with trio.fail_after(WAIT):
                await all_in.wait()
    assert sorted(outcomes) == ["1013"] * 7 + ["admitted"]
    assert len(bot.requests) == 1


async def test_start_answers_429_on_another_instance_once_the_fleet_is_full(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    # /start's 429 agent_full uses the fleet's count as of the last lease renewal
    # (every lease_ttl / 3), so B learns within that of A's session.
    async with bot_server() as bot, \
            fleet(tmp_path, ["a", "b"], redis_server.url, fresh_prefix(), bot.url,
                  store=STORE, agents=AGENTS.format(bot=bot.url)) as f:
        status, answer = await f["b"].start("one")
        assert status == 200, answer
        async with open_client(f["a"].ws_url("/ws/generic/one.local")) as held:
            await echo(held, "holding")
            with trio.fail_after(LEASE_TTL / 3 + WAIT):
                while True:
                    if (await f["b"].start("one"))[0] == 429:
                        break
                    await trio.sleep(0.2)
            status, answer = await f["b"].start("one")
            assert (status, answer["code"]) == (429, "agent_full")


async def test_sigterm_of_an_instance_gives_its_slots_back_at_once(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    # A graceful stop releases each session's lease as the session closes (1001), so the
    # fleet does not wait for lease_ttl as it must after a kill -9.
    async with bot_server() as bot, \
            fleet(tmp_path, ["a", "b"], redis_server.url, fresh_prefix(), bot.url,
                  store=STORE, agents=AGENTS.format(bot=bot.url)) as f:
        async with open_client(f["a"].ws_url("/ws/generic/one.local")) as held:
            await echo(held, "held")
            f["a"].process.send_signal(signal.SIGTERM)
            assert await close_code(held) == 1001
            with trio.fail_after(WAIT):
                assert await f["a"].process.wait() == 0
        async with open_client(f["b"].ws_url("/ws/generic/one.local")) as ws:
            await echo(ws, "admitted at once, not after lease_ttl")
