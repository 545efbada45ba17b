"""The behaviour every `relay.store.Store` must have, run against each implementation.

Only the protocol's methods are used here (put_session, is_consumed, reserve, release,
consume, purge, healthy, aclose), so a new backend (Redis, for several instances) joins
by adding one factory to `IMPLEMENTATIONS`; what is particular to one implementation
(MemoryStore's bounds) is tested in its own module (test_store.py). `IMPLEMENTATIONS` is
typed, so `mypy tests` checks that each factory builds a `Store`.

Time is a plain number passed in, as the gateway passes its wall clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import trio

from relay.store import ConsumeResult, MemoryStore, Store

T0 = 1_700_000_000.0
LIFE = 300.0  # seconds a token lives

IMPLEMENTATIONS: dict[str, Callable[[], Store]] = {
    "memory": MemoryStore,
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    made = IMPLEMENTATIONS[request.param]()
    try:
        yield made
    finally:
        await made.aclose()


async def test_consume_is_one_time_and_hands_over_the_body(store: Store) -> None:
    await store.put_session("s1", b'{"a":1}', T0 + LIFE, now=T0)
    assert await store.consume("s1", T0 + 1) == ConsumeResult("ok", b'{"a":1}')
    assert await store.consume("s1", T0 + 2) == ConsumeResult("replayed")
    assert await store.consume("s1", T0 + 3, expires_at=T0 + LIFE) == ConsumeResult("replayed")


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


async def test_verified_token_without_pending_entry_is_first_use_without_body(
    store: Store,
) -> None:
    # Tokens from `relay mint-token` (or whose body was evicted) were never put.
    assert await store.consume("minted", T0, expires_at=T0 + LIFE) == ConsumeResult("ok")
    assert await store.consume("minted", T0, expires_at=T0 + LIFE) == ConsumeResult("replayed")
    assert await store.consume("late", T0 + LIFE, expires_at=T0 + LIFE) == ConsumeResult(
        "unknown")


async def test_replay_is_named_until_the_token_expires_then_forgotten(store: Store) -> None:
    await store.put_session("s1", b"body", T0 + LIFE)
    assert (await store.consume("s1", T0)).ok
    assert await store.is_consumed("s1", T0 + LIFE - 0.001)
    assert await store.consume("s1", T0 + LIFE - 0.001) == ConsumeResult("replayed")
    assert not await store.is_consumed("s1", T0 + LIFE)
    assert await store.purge(T0 + LIFE) >= 1
    assert not await store.is_consumed("s1")
    assert await store.consume("s1", T0 + LIFE) == ConsumeResult("unknown")


async def test_concurrent_consumers_get_exactly_one_ok(store: Store) -> None:
    await store.put_session("s1", b"x", T0 + LIFE)
    results: list[ConsumeResult] = []

    async def take() -> None:
        results.append(await store.consume("s1", T0, expires_at=T0 + LIFE))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(take)
    assert sorted(r.status for r in results) == ["ok"] + ["replayed"] * 9
    assert [r.body for r in results if r.ok] == [b"x"]


async def test_purge_forgets_only_what_expired(store: Store) -> None:
    await store.put_session("old", b"12", T0 + 10)
    await store.put_session("new", b"345", T0 + 20)
    await store.put_session("out-of-order", b"6", T0 + 5)
    assert await store.purge(T0 + 10) == 2
    assert await store.consume("new", T0 + 10) == ConsumeResult("ok", b"345")
    assert await store.consume("old", T0 + 1) == ConsumeResult("unknown")
    assert await store.consume("out-of-order", T0 + 1) == ConsumeResult("unknown")


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


async def test_reserve_holds_the_session_for_one_upgrade_and_consume_hands_the_body(
    store: Store,
) -> None:
    await store.put_session("s", b'{"k":1}', T0 + LIFE)
    results: list[ConsumeResult] = []

    async def reserve() -> None:
        results.append(await store.reserve("s", T0, expires_at=T0 + LIFE, with_body=True))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(reserve)
    assert sorted(r.status for r in results) == ["ok"] + ["replayed"] * 4
    assert all(r.body is None for r in results)  # the body goes only with consume
    assert await store.is_consumed("s", T0)
    assert await store.consume("s", T0 + 1, expires_at=T0 + LIFE, with_body=True) == (
        ConsumeResult("ok", b'{"k":1}'))
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


async def test_healthy_answers(store: Store) -> None:
    assert await store.healthy()
