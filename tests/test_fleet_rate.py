"""/start's rate limit (``start_rate`` / ``start_burst``) holds for the whole fleet on Redis.

On a real redis-server: the Lua bucket answers exactly as the sans-IO ``TokenBucket`` on
any sequence of times (clocks going back included); two `relay serve` processes share
each public key's bucket (a burst spread over both, then 429 with ``Retry-After`` and the
envelope on either; a hostile client racing both at once never gets more than the burst);
two in-process gateways on an injected wall clock show the refill and clock skew without
real sleeps; the bucket's key is under ``key_prefix``, hashed, and expires; with Redis
down /start answers as before (503 ``store_unavailable`` for token agents, each process
limiting with its own bucket meanwhile) and the shared limit is back once Redis is.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import coredis
import pytest
import trio
from fleet import PK as FLEET_PK
from fleet import WAIT, Instance, fleet, until_store
from redis_server import RedisServer, fresh_prefix, redis_server  # noqa: F401
from support import Running, http, running

from relay.config import Config, build_config
from relay.control import ControlApp
from relay.fleet_rate import FleetStartLimiter, bucket_name
from relay.gateway import Gateway
from relay.limits import TokenBucket, bucket_expiry
from relay.store.redis import RedisStore
from relay.tokens import KeyRing

PK = "pk_fleet_rate_test"
DEAD_BOT = "ws://127.0.0.1:9/"  # /start never dials a bot


class WallClock:
    """An injected wall clock (unix seconds) that moves only when a test moves it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def redis_config(url: str, prefix: str, *, rate: float, burst: int) -> Config:
    return build_config(
        server={"ws_bind": ["127.0.0.1:0"], "api_bind": ["127.0.0.1:0"],
                "ping_interval": 1000, "ping_timeout": 1000, "public_keys": [PK],
                "start_rate": rate, "start_burst": burst},
        store={"backend": "redis", "url": url, "key_prefix": prefix},
        agents={"tok": {"bot": DEAD_BOT, "websocket_auth": "token", "bot_protocol": "relay"},
                "open": {"bot": DEAD_BOT}},
    )


@asynccontextmanager
async def two_gateways(config: Config, clock_a: WallClock, clock_b: WallClock
                       ) -> AsyncIterator[tuple[Running, Running]]:
    """Two gateways (two instances) in this process, on one Redis, each on its clock."""
    async with running(config, wall_clock=clock_a) as a, \
            running(config, wall_clock=clock_b) as b:
        yield a, b


async def start(port: int, agent: str = "tok", key: str = PK
                ) -> tuple[int, dict[str, str], Any]:
    """POST /start over HTTP: status, headers, JSON answer."""
    with trio.fail_after(WAIT):
        status, headers, body = await http(
            "127.0.0.1", port, "POST", f"/v1/public/{agent}/start",
            [("authorization", f"Bearer {key}"), ("content-type", "application/json")],
            b'{"transport": "websocket"}')
    return status, headers, json.loads(body)


async def statuses(*ports: int) -> list[int]:
    """One /start on each port in turn (token agent): their statuses."""
    return [(await start(port))[0] for port in ports]


def assert_rate_limited(answer: tuple[int, dict[str, str], Any], retry_after: int) -> None:
    status, headers, body = answer
    assert status == 429, body
    assert body["code"] == "rate_limited" and set(body) == {"error", "code", "detail"}
    assert headers["retry-after"] == str(retry_after)
    assert headers["cache-control"] == "no-store"


async def until_gone(raw: coredis.Redis[bytes], name: str | bytes) -> None:
    """Poll until Redis has expired ``name``."""
    while True:
        if not await raw.exists([name]):
            return
        await trio.sleep(0.05)


# ------------------------------------------------------------------ the script itself


def test_a_bucket_is_kept_until_it_is_full_again_plus_a_margin() -> None:
    assert bucket_expiry(20, 50) == pytest.approx(3.5)  # the defaults: 2.5 s + 1 s
    assert bucket_expiry(0.5, 5) == pytest.approx(11.0)
    with pytest.raises(ValueError, match="rate"):
        bucket_expiry(0, 5)
    with pytest.raises(ValueError, match="burst"):
        FleetStartLimiter(RedisStore("redis://127.0.0.1:9/0"), [PK], rate=1, burst=0)


@pytest.mark.parametrize(("rate", "burst", "seed"), [(2.0, 3, 1), (0.37, 1, 2),
                                                     (1000.0, 50, 3), (20.0, 50, 4)])
async def test_the_script_answers_as_the_sans_io_bucket_on_any_sequence(
        redis_server: RedisServer, rate: float, burst: int, seed: int) -> None:  # noqa: F811
    """Times going forward in small and large steps, standing still, and going back (a
    peer's clock ahead): the Lua bucket's waits are the sans-IO bucket's, to the bit."""
    rng = random.Random(seed)
    store = RedisStore(redis_server.url, key_prefix=fresh_prefix())
    limiter = FleetStartLimiter(store, [PK], rate=rate, burst=burst)
    reference = TokenBucket(rate, burst)
    now = time.time()
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await nursery.start(limiter.run)
        waits = []
        for _ in range(300):
            now += rng.choice([0.0, 0.0, 0.0, rng.uniform(0, 0.5 / rate),
                               rng.uniform(0, 2 / rate), -rng.uniform(0, 1),
                               rng.uniform(0, 3 * burst / rate) if rng.random() < 0.3
                               else 0.0])
            got = await limiter.take(PK, now)
            assert got == reference.take(now), (now, reference)
            waits.append(got)
        nursery.cancel_scope.cancel()
    assert 0.0 in waits and any(w > 0 for w in waits)  # both answers were exercised


async def test_unknown_keys_never_reach_redis_and_names_do_not_depend_on_order(
        redis_server: RedisServer) -> None:  # noqa: F811
    prefix = fresh_prefix()
    store = RedisStore(redis_server.url, key_prefix=prefix)
    one = FleetStartLimiter(store, ["pk_a", PK], rate=1, burst=1)
    other = FleetStartLimiter(store, [PK, "pk_b", "pk_a"], rate=1, burst=1)
    assert one.redis_key(PK) == other.redis_key(PK) == f"{prefix}rate:{bucket_name(PK)}"
    assert one.redis_key("pk_b") is None
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await nursery.start(one.run)
        for i in range(50):
            assert await one.take(f"pk_unknown_{i}", time.time()) == 0.0
        async with coredis.Redis.from_url(redis_server.url) as raw:
            assert [k async for k in raw.scan_iter(match=f"{prefix}rate:*")] == []
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ real processes


async def test_a_burst_spread_over_two_instances_then_429_on_either(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    async with fleet(tmp_path, ["a", "b"], redis_server.url, fresh_prefix(), DEAD_BOT,
                     server="start_rate = 0.01\nstart_burst = 4\n") as f:
        a, b = f["a"].api_port, f["b"].api_port
        ok = [await start(port, key=FLEET_PK) for port in (a, b, a, b)]
        assert [answer[0] for answer in ok] == [200] * 4, ok
        # the fifth, on either instance: each alone has seen only two
        for port in (a, b):
            assert_rate_limited(await start(port, key=FLEET_PK), 100)
        # an auth-none agent's /start spends the same key's bucket
        assert_rate_limited(await start(b, agent="open", key=FLEET_PK), 100)
        assert await f["a"].metric("relay_start_rate_limited_total") == 1.0
        assert await f["b"].metric("relay_start_rate_limited_total") == 2.0
        for inst in f.values():
            assert "Traceback" not in inst.stderr_text()


async def test_a_hostile_client_racing_both_instances_never_gets_more_than_the_burst(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    burst, calls = 10, 80
    async with fleet(tmp_path, ["a", "b"], redis_server.url, fresh_prefix(), DEAD_BOT,
                     server=f"start_rate = 0.001\nstart_burst = {burst}\n") as f:
        instances: list[Instance] = [f["a"], f["b"]]
        answers: list[tuple[str, int, Any]] = []

        async def one(inst: Instance) -> None:
            status, _, body = await start(inst.api_port, key=FLEET_PK)
            answers.append((inst.name, status, body))

        async with trio.open_nursery() as nursery:
            for i in range(calls):
                nursery.start_soon(one, instances[i % 2])
        ok = [body for _, status, body in answers if status == 200]
        assert len(ok) == burst, sorted(status for _, status, _ in answers)
        assert len({body["sessionId"] for body in ok}) == burst
        assert sorted(status for _, status, _ in answers) == [200] * burst + \
            [429] * (calls - burst)
        counted = [await inst.metric("relay_start_rate_limited_total") or 0.0
                   for inst in instances]
        assert sum(counted) == calls - burst
        for inst in instances:
            assert "Traceback" not in inst.stderr_text()


# ------------------------------------------------------------------ injected wall clock


async def test_refill_follows_the_wall_clock_across_instances(
        redis_server: RedisServer) -> None:  # noqa: F811
    clock = WallClock(time.time())
    config = redis_config(redis_server.url, fresh_prefix(), rate=2, burst=3)
    async with two_gateways(config, clock, clock) as (a, b):
        assert await statuses(a.api_port, b.api_port, a.api_port) == [200] * 3
        assert_rate_limited(await start(b.api_port), 1)  # 0.5 s to the next token
        clock.now += 0.25
        assert_rate_limited(await start(a.api_port), 1)  # 0.25 s: still whole seconds
        clock.now += 0.25
        assert await statuses(b.api_port) == [200]  # one token back after 1 / rate
        assert_rate_limited(await start(a.api_port), 1)
        clock.now += 3600  # an idle hour banks no more than the burst
        assert await statuses(a.api_port, b.api_port, b.api_port) == [200] * 3
        assert_rate_limited(await start(a.api_port), 1)
        assert "relay_start_rate_limited_total 3.0" in a.gateway.metrics.render()[0].decode()
        assert "relay_start_rate_limited_total 1.0" in b.gateway.metrics.render()[0].decode()


async def test_a_peer_clock_ahead_never_grants_more_than_the_burst(
        redis_server: RedisServer) -> None:  # noqa: F811
    t = time.time()
    behind, ahead = WallClock(t), WallClock(t + 5)
    config = redis_config(redis_server.url, fresh_prefix(), rate=1, burst=2)
    async with two_gateways(config, behind, ahead) as (a, b):
        assert await statuses(b.api_port, b.api_port) == [200, 200]  # stamped at t + 5
        # a's clock is 5 s behind the stamp: no refill (not negative, not the gap's worth)
        assert_rate_limited(await start(a.api_port), 1)
        behind.now += 1
        ahead.now += 1
        assert_rate_limited(await start(a.api_port), 1)  # t + 1: still before the stamp
        assert await statuses(b.api_port) == [200]  # t + 6: one token after one second
        behind.now += 10  # t + 11: five seconds after the stamp, the burst and no more
        assert await statuses(a.api_port, a.api_port, a.api_port) == [200, 200, 429]


# ------------------------------------------------------------------ keys and expiry


async def test_the_bucket_is_one_hashed_key_under_the_prefix_with_an_expiry(
        redis_server: RedisServer) -> None:  # noqa: F811
    prefix = fresh_prefix()
    clock = WallClock(time.time())
    config = redis_config(redis_server.url, prefix, rate=0.5, burst=5)
    name = f"{prefix}rate:{bucket_name(PK)}".encode()
    async with two_gateways(config, clock, clock) as (a, _b):
        assert await statuses(a.api_port) == [200]
        async with coredis.Redis.from_url(redis_server.url) as raw:
            buckets = [k async for k in raw.scan_iter(match=f"{prefix}rate:*")]
            assert buckets == [name]
            everything = [k async for k in raw.scan_iter(match="*")]
            assert not any(PK.encode() in k for k in everything)  # the key is never named
            # expires once a refill from empty is done (5 / 0.5 = 10 s), plus the margin
            expiry_ms = math.ceil(bucket_expiry(0.5, 5) * 1000)
            assert expiry_ms == 11_000
            # its full expiry less what the round trips took (up to 5 s on a loaded machine)
            assert 6_000 < await raw.pttl(name) <= expiry_ms
            await raw.pexpire(name, 50)  # as if its time had passed ...
            with trio.fail_after(WAIT):
                await until_gone(raw, name)
        # ... a forgotten bucket is a full one, and is written again with its expiry
        assert await statuses(a.api_port) == [200]
        async with coredis.Redis.from_url(redis_server.url) as raw:
            assert 6_000 < await raw.pttl(name) <= 11_000
            assert await raw.hget(name, "t") == b"4"


async def test_a_short_bucket_really_expires(redis_server: RedisServer) -> None:  # noqa: F811
    """Redis itself forgets a bucket once it would be full again (20/s, burst 1: 50 ms,
    plus the 1 s margin): nothing is left behind."""
    prefix = fresh_prefix()
    store = RedisStore(redis_server.url, key_prefix=prefix)
    limiter = FleetStartLimiter(store, [PK], rate=20, burst=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await nursery.start(limiter.run)
        assert await limiter.take(PK, time.time()) == 0.0
        async with coredis.Redis.from_url(redis_server.url) as raw:
            name = limiter.redis_key(PK)
            assert name is not None and await raw.exists([name]) == 1
            with trio.fail_after(WAIT):
                await until_gone(raw, name)
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ Redis down


async def test_redis_down_answers_as_before_then_the_fleet_limit_is_back(
        tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        clock = WallClock(time.time())
        config = redis_config(server.url, fresh_prefix(), rate=0.01, burst=2)
        async with two_gateways(config, clock, clock) as (a, b):
            assert await statuses(a.api_port, b.api_port) == [200, 200]
            assert_rate_limited(await start(a.api_port), 100)

            server.stop()

            # Token agents: 503 store_unavailable, exactly as without a shared bucket
            # (never 500, never a token whose session could not be held).
            for port in (a.api_port, b.api_port):
                status, headers, body = await start(port)
                assert (status, body["code"]) == (503, "store_unavailable"), body
                assert headers["retry-after"] == "5"
            # Auth-none agents keep their 200, limited per process meanwhile: a has spent
            # one of its own two tokens above, so one more, then 429.
            assert (await start(a.api_port, agent="open"))[0] == 200
            assert_rate_limited(await start(a.api_port, agent="open"), 100)
            assert (await start(b.api_port, agent="open"))[0] == 200  # b: its own bucket

            server.start()  # empty: it forgot the bucket, as a full one
            await until_store(a.api_port, "up")
            await until_store(b.api_port, "up")

            # the shared bucket again: a's own is empty, yet a gets one, b the other
            assert await statuses(a.api_port, b.api_port) == [200, 200]
            assert_rate_limited(await start(b.api_port), 100)
            assert_rate_limited(await start(a.api_port), 100)
    finally:
        server.stop()


# ------------------------------------------------------------------ the memory store


def test_only_the_redis_store_shares_the_buckets() -> None:
    keys = KeyRing.parse("k1:fleet-rate-test-secret")
    redis = Gateway(redis_config("redis://127.0.0.1:9/0", "p:", rate=1, burst=1), keys=keys)
    memory = Gateway(build_config(server={"public_keys": [PK], "api_bind": ["127.0.0.1:0"]},
                                  agents={"open": {"bot": DEAD_BOT}}), keys=keys)
    assert isinstance(redis.control_app, ControlApp)
    assert isinstance(memory.control_app, ControlApp)
    assert isinstance(redis.control_app.state.fleet_rate, FleetStartLimiter)
    # the process's own buckets, as test_limits.py and test_control.py drive them
    assert memory.control_app.state.fleet_rate is None
