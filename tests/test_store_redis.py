"""The Store protocol's behaviour, run against both implementations, plus what only Redis has.

``store`` is parametrized: ``memory`` (MemoryStore) and ``redis`` (RedisStore on a real
redis-server started for this module, each test under its own key prefix). The behavioural
tests are the same for both; the Redis-only tests check atomicity across two instances
(two clients, as two gateway processes would have), that every key has the prefix and an
expiry, and that a Redis that stops answering is StoreUnavailable and is used again,
by the same store object, once it is back.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import coredis
import pytest
import trio
from redis_server import RedisServer, fresh_prefix, redis_server, started  # noqa: F401

from relay.store import ConsumeResult, MemoryStore, Store, StoreUnavailable
from relay.store.redis import RedisStore

T0 = time.time()  # Redis expires keys on its own clock: keep the tests' "now" near it
EXP = T0 + 300.0


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest,
                redis_server: RedisServer) -> AsyncIterator[Store]:  # noqa: F811
    if request.param == "memory":
        yield MemoryStore()
        return
    # the store's clock is the tests' (T0): its epoch is written in it
    redis_store = RedisStore(redis_server.url, key_prefix=fresh_prefix(),
                             wall_clock=lambda: T0)
    async with trio.open_nursery() as nursery:
        await nursery.start(redis_store.run)
        yield redis_store
        nursery.cancel_scope.cancel()


# -- one-time use and the held body ------------------------------------------------------


async def test_body_is_handed_over_once(store: Store) -> None:
    await store.put_session("s1", b'{"a":1}', EXP, now=T0)
    assert await store.consume("s1", T0, expires_at=EXP, with_body=True) == \
        ConsumeResult("ok", b'{"a":1}')
    assert await store.consume("s1", T0, expires_at=EXP, with_body=True) == \
        ConsumeResult("replayed")
    assert await store.is_consumed("s1", T0)


async def test_reserve_then_consume_takes_the_body(store: Store) -> None:
    await store.put_session("s1", b"\x00\xffbinary", EXP, now=T0)
    assert await store.reserve("s1", T0, expires_at=EXP, with_body=True) == ConsumeResult("ok")
    assert await store.reserve("s1", T0, expires_at=EXP, with_body=True) == \
        ConsumeResult("replayed")
    assert await store.consume("s1", T0, expires_at=EXP, with_body=True) == \
        ConsumeResult("ok", b"\x00\xffbinary")
    assert await store.consume("s1", T0, expires_at=EXP) == ConsumeResult("replayed")


async def test_release_makes_the_token_usable_again_with_its_body(store: Store) -> None:
    await store.put_session("s1", b"[1]", EXP, now=T0)
    assert (await store.reserve("s1", T0, expires_at=EXP, with_body=True)).ok
    await store.release("s1", T0)
    assert not await store.is_consumed("s1", T0)
    assert (await store.reserve("s1", T0, expires_at=EXP, with_body=True)).ok
    assert await store.consume("s1", T0, expires_at=EXP) == ConsumeResult("ok", b"[1]")


async def test_release_after_consume_does_not_make_it_usable(store: Store) -> None:
    await store.put_session("s1", None, EXP, now=T0)
    assert await store.consume("s1", T0, expires_at=EXP) == ConsumeResult("ok", None)
    await store.release("s1", T0)
    assert await store.reserve("s1", T0, expires_at=EXP) == ConsumeResult("replayed")


async def test_token_without_put_session_is_usable_once(store: Store) -> None:
    # relay mint-token: nothing was put; the token's own expiry bounds the marker
    assert await store.consume("minted", T0, expires_at=EXP) == ConsumeResult("ok", None)
    assert await store.consume("minted", T0, expires_at=EXP) == ConsumeResult("replayed")


async def test_body_token_whose_body_is_not_held_is_refused(store: Store) -> None:
    assert await store.reserve("gone", T0, expires_at=EXP, with_body=True) == \
        ConsumeResult("body_unavailable")
    await store.put_session("nobody", None, EXP, now=T0)
    assert await store.consume("nobody", T0, expires_at=EXP, with_body=True) == \
        ConsumeResult("body_unavailable")
    # refused, not used: nothing was burned
    assert not await store.is_consumed("gone", T0)
    assert await store.consume("nobody", T0, expires_at=EXP) == ConsumeResult("ok", None)


async def test_unknown_and_expired(store: Store) -> None:
    assert await store.consume("never", T0) == ConsumeResult("unknown")
    assert await store.reserve("late", T0, expires_at=T0 - 1) == ConsumeResult("unknown")
    await store.put_session("short", b"{}", T0 + 10, now=T0)
    assert await store.consume("short", T0 + 10, expires_at=T0 + 10) == \
        ConsumeResult("unknown")


async def test_marker_lasts_until_the_token_expires(store: Store) -> None:
    await store.put_session("s1", None, T0 + 60, now=T0)
    assert (await store.consume("s1", T0, expires_at=T0 + 60)).ok
    assert await store.is_consumed("s1", T0 + 59)
    assert await store.consume("s1", T0 + 59, expires_at=T0 + 60) == ConsumeResult("replayed")
    assert not await store.is_consumed("s1", T0 + 60)


async def test_body_over_the_bound_is_refused_and_nothing_held(store: Store) -> None:
    limit = store.max_body_bytes  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="exceeds"):
        await store.put_session("big", b"x" * (limit + 1), EXP, now=T0)
    assert await store.consume("big", T0) == ConsumeResult("unknown")


async def test_racing_upgrades_get_exactly_one_ok(store: Store) -> None:
    await store.put_session("s1", b'"b"', EXP, now=T0)
    results: list[ConsumeResult] = []

    async def one() -> None:
        results.append(await store.consume("s1", T0, expires_at=EXP, with_body=True))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    assert sorted(r.status for r in results) == ["ok"] + ["replayed"] * 19
    assert [r.body for r in results if r.ok] == [b'"b"']


# -- Redis only ---------------------------------------------------------------------------


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
    now = time.time()
    store = RedisStore(redis_server.url, key_prefix=prefix, wall_clock=lambda: now)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.put_session("pending", b"{}", now + 300, now=now)
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
