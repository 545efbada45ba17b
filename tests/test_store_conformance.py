"""The behaviour every `relay.store.Store` must have, run against each implementation.

Only the protocol's methods are used here (put_session, is_consumed, reserve, release,
consume, purge, healthy, aclose), so a new backend joins by adding one factory to
`IMPLEMENTATIONS`; what is particular to one implementation is tested in its own module
(MemoryStore's bounds and bookkeeping in test_store.py; Redis's keys, epoch, restarts and
outages in test_store_redis.py). `IMPLEMENTATIONS` is typed, so `mypy tests` checks that
each factory yields a `Store`.

    memory   MemoryStore()
    redis    RedisStore on a real redis-server (one per module, redis_server.py), each test
             under its own key prefix; no redis-server is a failure, never a skip

Time is a plain number passed in, as the gateway passes its wall clock, and a store that
needs a clock of its own (RedisStore's epoch; put_session without ``now``) is given the
suite's, fixed at T0. T0 is far from the real time on purpose: RedisStore sends Redis only
relative TTLs (the token's expiry less ``now``) and compares expiries with the ``now`` it
is given, so a store that reads the real clock instead of the given one shows here (a
put_session without ``now`` did, until this suite ran on Redis). A Redis key lives, in
real time, what its token had left at the call: at least 200 s wherever a test needs the
key, so no test sleeps, and on Redis "expired" is always the passed ``now`` reaching the
expiry, never Redis's clock (that is test_store_redis.py's).

``purge(now)`` only has to guarantee that nothing expired at ``now`` is observable at
``now`` or later, and that nothing unexpired goes; how many entries it drops is the
store's business (Redis expires its keys itself and reports 0; MemoryStore's count is
checked in test_store.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio
from redis_server import RedisServer, fresh_prefix, redis_server  # noqa: F401

from relay.store import ConsumeResult, MemoryStore, Store
from relay.store.redis import RedisStore
from relay.tokens import TOKEN_LIFETIME

T0 = 1_700_000_000.0
LIFE = float(TOKEN_LIFETIME)  # seconds a token lives


@asynccontextmanager
async def memory_store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    store = MemoryStore()
    try:
        yield store
    finally:
        await store.aclose()


@asynccontextmanager
async def redis_store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    server: RedisServer = request.getfixturevalue("redis_server")
    store = RedisStore(server.url, key_prefix=fresh_prefix(), wall_clock=lambda: T0)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        try:
            yield store
        finally:
            await store.aclose()
            nursery.cancel_scope.cancel()


IMPLEMENTATIONS: dict[
    str, Callable[[pytest.FixtureRequest], AbstractAsyncContextManager[Store]]] = {
    "memory": memory_store,
    "redis": redis_store,
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def implementation(request: pytest.FixtureRequest) -> AbstractAsyncContextManager[Store]:
    # a plain fixture, so that a backend's own fixtures (redis_server) are set up here
    return IMPLEMENTATIONS[request.param](request)


@pytest.fixture
async def store(implementation: AbstractAsyncContextManager[Store]) -> AsyncIterator[Store]:
    async with implementation as made:
        yield made


async def test_consume_is_one_time_and_hands_over_the_body(store: Store) -> None:
    await store.put_session("s1", b'{"a":1}', T0 + LIFE, now=T0)
    assert await store.consume("s1", T0 + 1) == ConsumeResult("ok", b'{"a":1}')
    assert await store.consume("s1", T0 + 2) == ConsumeResult("replayed")
    assert await store.consume("s1", T0 + 3, expires_at=T0 + LIFE) == ConsumeResult("replayed")
    # as the upgrade calls it: the token's expiry, and a body the token says is held;
    # any bytes come back as they went in
    await store.put_session("s2", b"\x00\xff\r\nbinary", T0 + LIFE, now=T0)
    assert await store.consume("s2", T0, expires_at=T0 + LIFE, with_body=True) == (
        ConsumeResult("ok", b"\x00\xff\r\nbinary"))
    assert await store.consume("s2", T0, expires_at=T0 + LIFE, with_body=True) == (
        ConsumeResult("replayed"))
    assert await store.is_consumed("s2", T0)


async def test_session_without_body_is_used_once_without_body(store: Store) -> None:
    await store.put_session("s1", None, T0 + LIFE)
    assert await store.consume("s1", T0) == ConsumeResult("ok", None)
    assert await store.consume("s1", T0) == ConsumeResult("replayed")


async def test_unknown_session_without_token_expiry_is_unknown(store: Store) -> None:
    assert await store.consume("never", T0) == ConsumeResult("unknown")
    assert not await store.is_consumed("never", T0)


async def test_expired_session_is_unknown_and_its_body_gone(store: Store) -> None:
    await store.put_session("s1", b"1", T0 + LIFE)
    assert await store.consume("s1", T0 + LIFE) == ConsumeResult("unknown")
    assert await store.consume("s1", T0 + 1) == ConsumeResult("unknown")  # not held any more
    # the same at its expiry when the upgrade passes the token's expiry
    await store.put_session("s2", b"{}", T0 + 10, now=T0)
    assert await store.consume("s2", T0 + 10, expires_at=T0 + 10) == ConsumeResult("unknown")


async def test_verified_token_without_pending_entry_is_first_use_without_body(
    store: Store,
) -> None:
    # Tokens from `relay mint-token` (or whose body was evicted) were never put.
    assert await store.consume("minted", T0, expires_at=T0 + LIFE) == ConsumeResult("ok")
    assert await store.consume("minted", T0, expires_at=T0 + LIFE) == ConsumeResult("replayed")
    assert await store.consume("late", T0 + LIFE, expires_at=T0 + LIFE) == ConsumeResult(
        "unknown")
    assert await store.reserve("late", T0, expires_at=T0 - 1) == ConsumeResult("unknown")


async def test_replay_is_named_until_the_token_expires_then_forgotten(store: Store) -> None:
    await store.put_session("s1", b"body", T0 + LIFE)
    assert (await store.consume("s1", T0)).ok
    assert await store.is_consumed("s1", T0 + LIFE - 0.001)
    assert await store.consume("s1", T0 + LIFE - 0.001) == ConsumeResult("replayed")
    assert not await store.is_consumed("s1", T0 + LIFE)
    assert 0 <= await store.purge(T0 + LIFE) <= 1  # at most the marker went
    assert not await store.is_consumed("s1", T0 + LIFE)
    assert await store.consume("s1", T0 + LIFE) == ConsumeResult("unknown")


async def test_concurrent_consumers_get_exactly_one_ok(store: Store) -> None:
    await store.put_session("s1", b"x", T0 + LIFE)
    results: list[ConsumeResult] = []

    async def take(with_body: bool) -> None:
        results.append(await store.consume("s1", T0, expires_at=T0 + LIFE,
                                           with_body=with_body))

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(take, i % 2 == 0)
    assert sorted(r.status for r in results) == ["ok"] + ["replayed"] * 19
    assert [r.body for r in results if r.ok] == [b"x"]


async def test_purge_forgets_only_what_expired(store: Store) -> None:
    await store.put_session("old", b"12", T0 + 100)
    await store.put_session("new", b"345", T0 + 200)
    await store.put_session("out-of-order", b"6", T0 + 50)
    for sid, expires_at in (("used-old", T0 + 100), ("used-new", T0 + 200)):
        await store.put_session(sid, None, expires_at, now=T0)
        assert (await store.consume(sid, T0, expires_at=expires_at)).ok
    # at most the two sessions and the marker that expired went
    assert 0 <= await store.purge(T0 + 100) <= 3
    # nothing that had not expired went: the held body, and the use of a live token
    assert await store.is_consumed("used-new", T0 + 100)
    assert await store.consume("used-new", T0 + 100, expires_at=T0 + 200) == (
        ConsumeResult("replayed"))
    assert await store.consume("new", T0 + 100) == ConsumeResult("ok", b"345")
    # and nothing that had expired is seen at that time or later
    for later in (T0 + 100, T0 + 150):
        assert await store.consume("old", later) == ConsumeResult("unknown")
        assert await store.consume("out-of-order", later) == ConsumeResult("unknown")
        assert not await store.is_consumed("used-old", later)
    assert await store.consume("used-old", T0 + 100, expires_at=T0 + 100) == (
        ConsumeResult("unknown"))


async def test_put_again_replaces_the_body(store: Store) -> None:
    await store.put_session("a", b"old", T0 + LIFE)
    await store.put_session("a", b"newer", T0 + LIFE)
    assert await store.consume("a", T0) == ConsumeResult("ok", b"newer")


async def test_is_consumed_peeks_without_using(store: Store) -> None:
    await store.put_session("a", b"1", T0 + LIFE)
    assert not await store.is_consumed("a")
    assert not await store.is_consumed("a", T0)
    assert await store.consume("a", T0, expires_at=T0 + LIFE) == ConsumeResult("ok", b"1")
    assert await store.is_consumed("a", T0)
    assert await store.is_consumed("a")


async def test_cancelled_consume_does_not_use_the_session(store: Store) -> None:
    await store.put_session("a", b"1", T0 + LIFE)
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.consume("a", T0)
    assert scope.cancelled_caught
    assert await store.consume("a", T0) == ConsumeResult("ok", b"1")


async def test_many_new_sessions_never_push_out_a_used_token(store: Store) -> None:
    await store.put_session("used", None, T0 + LIFE)
    assert (await store.consume("used", T0)).ok
    for i in range(200):
        await store.put_session(f"new{i}", b"x" * 100, T0 + LIFE, now=T0)
    assert await store.consume("used", T0, expires_at=T0 + LIFE) == ConsumeResult("replayed")


async def test_token_minted_with_a_body_whose_body_is_gone_is_body_unavailable(
    store: Store,
) -> None:
    assert await store.reserve("gone", T0, expires_at=T0 + LIFE, with_body=True) == (
        ConsumeResult("body_unavailable"))
    assert await store.consume("gone", T0, expires_at=T0 + LIFE, with_body=True) == (
        ConsumeResult("body_unavailable"))
    # the refusal used nothing up: once the body is there, the token works
    assert not await store.is_consumed("gone", T0)
    # a session held without a body is refused the same way, and stays usable
    await store.put_session("nobody", None, T0 + LIFE, now=T0)
    assert await store.reserve("nobody", T0, expires_at=T0 + LIFE, with_body=True) == (
        ConsumeResult("body_unavailable"))
    assert await store.consume("nobody", T0, expires_at=T0 + LIFE, with_body=True) == (
        ConsumeResult("body_unavailable"))
    assert not await store.is_consumed("nobody", T0)
    assert await store.consume("nobody", T0, expires_at=T0 + LIFE) == ConsumeResult("ok", None)


async def test_reserve_holds_the_session_for_one_upgrade_and_consume_hands_the_body(
    store: Store,
) -> None:
    await store.put_session("s", b'\x00\xff{"k":1}', T0 + LIFE)
    results: list[ConsumeResult] = []

    async def reserve() -> None:
        results.append(await store.reserve("s", T0, expires_at=T0 + LIFE, with_body=True))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(reserve)
    assert sorted(r.status for r in results) == ["ok"] + ["replayed"] * 4
    assert all(r.body is None for r in results)  # the body goes only with consume
    assert await store.is_consumed("s", T0)
    assert await store.reserve("s", T0, expires_at=T0 + LIFE, with_body=True) == (
        ConsumeResult("replayed"))
    assert await store.consume("s", T0 + 1, expires_at=T0 + LIFE, with_body=True) == (
        ConsumeResult("ok", b'\x00\xff{"k":1}'))
    assert await store.consume("s", T0 + 2, expires_at=T0 + LIFE) == ConsumeResult("replayed")
    assert await store.reserve("s", T0 + 2, expires_at=T0 + LIFE) == ConsumeResult("replayed")


async def test_release_makes_a_reserved_token_usable_again_with_its_body(store: Store) -> None:
    await store.put_session("s", b"[1]", T0 + LIFE)
    assert (await store.reserve("s", T0, expires_at=T0 + LIFE, with_body=True)).ok
    await store.release("s", T0)
    assert not await store.is_consumed("s", T0)
    assert (await store.reserve("s", T0, expires_at=T0 + LIFE, with_body=True)).ok
    assert await store.consume("s", T0, with_body=True) == ConsumeResult("ok", b"[1]")
    # releasing a consumed token (or one never reserved) changes nothing
    await store.release("s", T0)
    await store.release("never", T0)
    assert await store.consume("s", T0, expires_at=T0 + LIFE) == ConsumeResult("replayed")
    assert await store.reserve("s", T0, expires_at=T0 + LIFE) == ConsumeResult("replayed")
    # a released token that was never put (relay mint-token) is usable again too
    assert (await store.reserve("m", T0, expires_at=T0 + LIFE)).ok
    await store.release("m", T0)
    assert await store.consume("m", T0, expires_at=T0 + LIFE) == ConsumeResult("ok")


async def test_healthy_answers(store: Store) -> None:
    assert await store.healthy()
