"""What only the Redis store has, on a real redis-server (redis_server.py).

The Store protocol's behaviour (one-time use, reservation, release, replay, expiry,
purge, racing upgrades) is test_store_conformance.py's, run on MemoryStore and on
RedisStore alike. Here: atomicity across two store objects on one Redis (two gateway
processes), that every key has the prefix and the token's expiry, reckoned on the clock the
store is given, the epoch that makes a Redis restarted empty refuse older tokens, a Redis
that stops answering (StoreUnavailable, then used again by the same store object), an
answer that comes too late, and RedisStore's own body bound.
"""

from __future__ import annotations

import time
from pathlib import Path

import coredis
import pytest
import trio
from redis_server import RedisServer, fresh_prefix, redis_server, started  # noqa: F401

from relay.store import MAX_BODY_BYTES, ConsumeResult, StoreUnavailable
from relay.store.redis import RedisStore

T0 = time.time()  # Redis expires keys on its own clock: keep the tests' "now" near it
EXP = T0 + 300.0


async def test_two_instances_one_token_one_body(redis_server: RedisServer) -> None:  # noqa: F811
    prefix = fresh_prefix()
    a = RedisStore(redis_server.url, key_prefix=prefix, wall_clock=lambda: T0)
    b = RedisStore(redis_server.url, key_prefix=prefix, wall_clock=lambda: T0)
    results: list[ConsumeResult] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)
        for i in range(10):
            await a.put_session(f"s{i}", f'{{"n":{i}}}'.encode(), EXP, now=T0)

        async def use(store: RedisStore, sid: str) -> None:
            reserved = await store.reserve(sid, T0, expires_at=EXP, with_body=True)
            if reserved.ok:
                results.append(await store.consume(sid, T0, expires_at=EXP, with_body=True))
            else:
                results.append(reserved)

        async with trio.open_nursery() as racers:
            for i in range(10):
                for store in (a, b, b, a):
                    racers.start_soon(use, store, f"s{i}")
        nursery.cancel_scope.cancel()
    oks = sorted(r.body or b"" for r in results if r.ok)
    assert oks == sorted(f'{{"n":{i}}}'.encode() for i in range(10))
    assert sum(r.status == "replayed" for r in results) == 30


async def test_every_key_has_the_prefix_and_an_expiry(
        redis_server: RedisServer) -> None:  # noqa: F811
    prefix = fresh_prefix()
    # the store's clock, 1000 s off Redis's: a TTL is reckoned on the store's (a put
    # without `now` too), never on the real time
    now = time.time() - 1000.0
    store = RedisStore(redis_server.url, key_prefix=prefix, wall_clock=lambda: now)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.put_session("pending", b"{}", now + 300)
        await store.put_session("used", None, now + 300, now=now)
        await store.consume("used", now, expires_at=now + 300)
        await store.reserve("minted", now, expires_at=now + 300)
        # issued 3 minutes before the store began: may have been used, so no key is written
        assert await store.reserve("older", now, expires_at=now + 120) == \
            ConsumeResult("unverifiable")
        async with coredis.Redis.from_url(redis_server.url) as raw:
            keys = sorted([k async for k in raw.scan_iter(match=f"{prefix}*")])
            assert keys == sorted([f"{prefix}epoch".encode()] + [
                f"{prefix}{kind}:{{{sid}}}".encode() for kind, sid in
                [("s", "pending"), ("m", "used"), ("m", "minted")]])
            ttls = {k: await raw.pttl(k) for k in keys}
            epoch = float(await raw.get(f"{prefix}epoch") or b"nan")
        nursery.cancel_scope.cancel()
    # each token's key expires with its token, not earlier and not later
    assert ttls[f"{prefix}m:{{minted}}".encode()] in range(290_000, 300_001)
    assert ttls[f"{prefix}s:{{pending}}".encode()] in range(290_000, 300_001)
    assert ttls[f"{prefix}m:{{used}}".encode()] in range(290_000, 300_001)
    # the one key without an expiry: since when this Redis remembers uses (the store's
    # start, on its clock)
    assert ttls[f"{prefix}epoch".encode()] == -1
    assert epoch == pytest.approx(now, abs=1e-5)


async def test_body_over_the_bound_is_refused_and_nothing_held(
        redis_server: RedisServer) -> None:  # noqa: F811
    assert RedisStore(redis_server.url).max_body_bytes == MAX_BODY_BYTES
    store = RedisStore(redis_server.url, key_prefix=fresh_prefix(), max_body_bytes=16,
                       wall_clock=lambda: T0)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        with pytest.raises(ValueError, match="exceeds"):
            await store.put_session("big", b"x" * 17, EXP, now=T0)
        assert await store.consume("big", T0) == ConsumeResult("unknown")
        await store.put_session("fits", b"x" * 16, EXP, now=T0)
        assert await store.consume("fits", T0) == ConsumeResult("ok", b"x" * 16)
        nursery.cancel_scope.cancel()


async def back_up(store: RedisStore) -> bool:
    """Whether the store answers again after a restart: the first command may still meet
    the connection the old server dropped (answered "unavailable"); the next reconnects."""
    for _ in range(3):
        if await store.healthy():
            return True
    return False


async def test_a_redis_that_lost_its_data_never_honours_a_used_token_again(
        tmp_path: Path) -> None:
    # The finding: a Redis restarted without persistence forgot its markers, and a token
    # used before the restart, still inside its 5 minutes, was accepted once more. Now the
    # lost epoch key says the Redis forgot: tokens from before it are "unverifiable".
    clock = [T0]
    for server in started(tmp_path):  # --save "" --appendonly no: a restart empties it
        store = RedisStore(server.url, key_prefix=fresh_prefix(), wall_clock=lambda: clock[0])
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            await store.put_session("with-body", b'{"n":1}', EXP, now=T0)
            assert await store.consume("used", T0, expires_at=EXP) == ConsumeResult("ok")
            assert await store.consume("used", T0, expires_at=EXP) == \
                ConsumeResult("replayed")
            server.stop()
            clock[0] = later = T0 + 10.0
            server.start()
            assert await back_up(store)
            # used before the restart: refused, and refused again (nothing was burned)
            for _ in range(2):
                assert await store.consume("used", later, expires_at=EXP) == \
                    ConsumeResult("unverifiable")
                assert await store.reserve("used", later, expires_at=EXP) == \
                    ConsumeResult("unverifiable")
            assert not await store.is_consumed("used", later)
            # its body went with the data: the token says so, and is refused as before
            assert await store.consume("with-body", later, expires_at=EXP, with_body=True) \
                == ConsumeResult("body_unavailable")
            # tokens issued since are fine, with or without a held body, once each
            fresh_exp = later + 300.0
            await store.put_session("fresh", b'{"n":2}', fresh_exp, now=later)
            assert await store.consume("fresh", later, expires_at=fresh_exp,
                                       with_body=True) == ConsumeResult("ok", b'{"n":2}')
            assert await store.consume("minted", later, expires_at=fresh_exp) == \
                ConsumeResult("ok")
            assert await store.consume("minted", later, expires_at=fresh_exp) == \
                ConsumeResult("replayed")
            # no grace: one issued a moment before the epoch is refused too
            assert await store.consume("edge", later, expires_at=later - 0.01 + 300.0) == \
                ConsumeResult("unverifiable")
            nursery.cancel_scope.cancel()


async def test_the_epoch_survives_a_restart_with_persistence(tmp_path: Path) -> None:
    # With AOF on, Redis keeps the markers and the epoch: nothing is refused.
    for server in started(tmp_path, persistent=True):
        store = RedisStore(server.url, key_prefix=fresh_prefix(), wall_clock=lambda: T0)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            assert await store.consume("used", T0, expires_at=EXP) == ConsumeResult("ok")
            unused_exp = T0 + 300.0
            server.stop()
            server.start()
            assert await back_up(store)
            later = T0 + 10.0
            assert await store.consume("used", later, expires_at=EXP) == \
                ConsumeResult("replayed")
            assert await store.consume("unused", later, expires_at=unused_exp) == \
                ConsumeResult("ok")
            nursery.cancel_scope.cancel()


async def test_redis_down_is_unavailable_then_the_same_store_recovers(
        tmp_path: Path) -> None:
    changes: list[bool] = []
    for server in started(tmp_path):
        store = RedisStore(server.url, key_prefix=fresh_prefix(), on_state=changes.append,
                           wall_clock=lambda: T0)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            assert store.up
            await store.put_session("kept", b"{}", EXP, now=T0)
            server.stop()
            with pytest.raises(StoreUnavailable):
                await store.reserve("s1", T0, expires_at=EXP)
            with pytest.raises(StoreUnavailable):
                await store.put_session("s2", None, EXP, now=T0)
            assert not await store.healthy()
            assert not store.up
            server.start()  # an empty Redis: no persistence, as the fixture runs it
            assert await store.healthy()
            assert store.up
            assert await store.consume("minted", T0, expires_at=EXP) == \
                ConsumeResult("ok", None)
            nursery.cancel_scope.cancel()
    assert changes == [True, False, True]


async def test_store_that_starts_while_redis_is_down_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # port chosen, nothing listening yet
    store = RedisStore(server.url, key_prefix=fresh_prefix(), wall_clock=lambda: T0)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)  # starts anyway: token paths answer 503
            assert not store.up
            with pytest.raises(StoreUnavailable):
                await store.consume("s1", T0, expires_at=EXP)
            server.start()
            assert (await store.consume("s1", T0, expires_at=EXP)).ok
            assert store.up
            nursery.cancel_scope.cancel()
    finally:
        server.stop()


async def test_store_not_running_is_unavailable() -> None:
    store = RedisStore("redis://127.0.0.1:1/0")
    with pytest.raises(StoreUnavailable, match="not running"):
        await store.reserve("s1", T0, expires_at=EXP)
    assert not await store.healthy()


def test_password_is_kept_out_of_logged_url() -> None:
    store = RedisStore("redis://user:hunter2@cache:6379/0")
    assert "hunter2" not in store.safe_url
    assert store.safe_url == "redis://***@cache:6379/0"


_SPIN = """
local t = redis.call('TIME')
local stop = tonumber(t[1]) * 1000000 + tonumber(t[2]) + 1000000
repeat
  t = redis.call('TIME')
until tonumber(t[1]) * 1000000 + tonumber(t[2]) >= stop
return 1
"""


async def busy_for_a_second(raw: coredis.Redis[bytes]) -> None:
    await raw.eval(_SPIN, keys=[], args=[])


async def test_an_answer_too_late_is_unavailable_and_never_read_as_the_next_one(
        redis_server: RedisServer) -> None:  # noqa: F811
    # Redis busy (a script spinning for 1 s blocks it): the call gives up after op_timeout. Its late
    # answer must not be taken as the answer to a later call (which would hand a body,
    # or "ok", to the wrong upgrade).
    prefix = fresh_prefix()
    store = RedisStore(redis_server.url, key_prefix=prefix, op_timeout=0.3,
                       wall_clock=lambda: T0)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for i in range(4):
            await store.put_session(f"s{i}", f'{{"n":{i}}}'.encode(), EXP, now=T0)
        timed_out = ""
        async with coredis.Redis.from_url(redis_server.url) as raw, \
                trio.open_nursery() as busy:
            busy.start_soon(busy_for_a_second, raw)
            for n in range(1000):  # until a call meets the busy Redis (no sleep guessing)
                try:
                    await store.consume(f"probe{n}", T0, expires_at=EXP)
                except StoreUnavailable as exc:
                    assert "timed out" in str(exc)
                    timed_out = f"probe{n}"
                    break
        assert timed_out
        for i in range(4):
            assert await store.consume(f"s{i}", T0, expires_at=EXP, with_body=True) == \
                ConsumeResult("ok", f'{{"n":{i}}}'.encode())
        # the call that timed out may or may not have run: either way it is used once
        assert await store.consume(timed_out, T0, expires_at=EXP) in (
            ConsumeResult("ok"), ConsumeResult("replayed"))
        assert await store.consume(timed_out, T0, expires_at=EXP) == ConsumeResult("replayed")
        nursery.cancel_scope.cancel()
