"""relay.store.MemoryStore: one-time use, expiry, bounds. Time is a plain number passed in."""

from __future__ import annotations

import trio

from relay.store import ConsumeResult, MemoryStore, Store

T0 = 1_700_000_000.0
LIFE = 300.0


def test_memory_store_satisfies_the_protocol() -> None:
    store: Store = MemoryStore()
    assert store is not None


async def test_consume_is_one_time() -> None:
    store = MemoryStore()
    await store.put_session("s1", b'{"a":1}', T0 + LIFE, now=T0)
    assert await store.consume("s1", T0 + 1) == ConsumeResult("ok", b'{"a":1}')
    assert await store.consume("s1", T0 + 2) == ConsumeResult("replayed")
    assert await store.consume("s1", T0 + 3) == ConsumeResult("replayed")


async def test_session_without_body() -> None:
    store = MemoryStore()
    await store.put_session("s1", None, T0 + LIFE)
    result = await store.consume("s1", T0)
    assert result.ok and result.body is None
    assert not (await store.consume("s1", T0)).ok


async def test_unknown_and_expired_sessions_are_unknown() -> None:
    store = MemoryStore()
    assert await store.consume("never", T0) == ConsumeResult("unknown")
    await store.put_session("s1", b"1", T0 + LIFE)
    assert await store.consume("s1", T0 + LIFE) == ConsumeResult("unknown")
    assert store.entry_count == 0 and store.body_bytes == 0


async def test_consumed_marker_lasts_until_expiry_then_goes() -> None:
    store = MemoryStore()
    await store.put_session("s1", b"body", T0 + LIFE)
    await store.consume("s1", T0)
    # body handed over, pending entry gone, consumed marker kept
    assert store.body_bytes == 0 and store.entry_count == 0 and store.consumed_count == 1
    assert await store.consume("s1", T0 + LIFE - 0.001) == ConsumeResult("replayed")
    assert await store.purge(T0 + LIFE) == 1
    assert store.consumed_count == 0


async def test_concurrent_consumers_get_exactly_one_ok() -> None:
    store = MemoryStore()
    await store.put_session("s1", b"x", T0 + LIFE)
    results: list[ConsumeResult] = []

    async def take() -> None:
        results.append(await store.consume("s1", T0))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(take)
    assert sorted(r.status for r in results) == ["ok"] + ["replayed"] * 9


async def test_purge_removes_only_expired() -> None:
    store = MemoryStore()
    await store.put_session("old", b"12", T0 + 10)
    await store.put_session("new", b"345", T0 + 20)
    await store.put_session("out-of-order", b"6", T0 + 5)
    assert await store.purge(T0 + 10) == 2
    assert "new" in store and "old" not in store and "out-of-order" not in store
    assert store.body_bytes == 3


async def test_expired_entries_are_dropped_lazily_from_the_oldest_end() -> None:
    store = MemoryStore()
    for i in range(5):
        await store.put_session(f"s{i}", b"x", T0 + i)
    await store.consume("unrelated", T0 + 3)
    assert [f"s{i}" in store for i in range(5)] == [False] * 4 + [True]
    await store.put_session("late", b"y", T0 + 100, now=T0 + 4)
    assert "s4" not in store and store.entry_count == 1


async def test_entry_bound_evicts_oldest_and_counts() -> None:
    evicted: list[None] = []
    store = MemoryStore(max_entries=3, on_evict=lambda: evicted.append(None))
    for i in range(5):
        await store.put_session(f"s{i}", None, T0 + LIFE)
    assert store.entry_count == 3
    assert [f"s{i}" in store for i in range(5)] == [False, False, True, True, True]
    assert len(evicted) == 2
    # An evicted session is unknown, never usable: eviction cannot enable a replay.
    assert await store.consume("s0", T0) == ConsumeResult("unknown")


async def test_byte_bound_evicts_oldest_first() -> None:
    evicted: list[None] = []
    store = MemoryStore(max_body_bytes=10, on_evict=lambda: evicted.append(None))
    await store.put_session("a", b"1234", T0 + LIFE)
    await store.put_session("b", b"1234", T0 + LIFE)
    await store.put_session("c", b"123456", T0 + LIFE)  # 14 > 10: "a" must go
    assert "a" not in store and "b" in store and "c" in store
    assert store.body_bytes == 10 and len(evicted) == 1


async def test_a_start_flood_cannot_push_out_a_consumed_marker() -> None:
    evicted: list[None] = []
    store = MemoryStore(max_entries=1, on_evict=lambda: evicted.append(None))
    await store.put_session("a", None, T0 + LIFE)
    await store.consume("a", T0)
    for i in range(10):
        await store.put_session(f"flood{i}", None, T0 + LIFE)
    assert len(evicted) == 9  # pending sessions evicted, counted
    assert await store.consume("a", T0, expires_at=T0 + LIFE) == ConsumeResult("replayed")


async def test_verified_token_without_pending_entry_is_a_first_use_without_body() -> None:
    # Tokens from `relay mint-token` (or whose body was evicted) were never put here.
    store = MemoryStore()
    assert await store.consume("minted", T0, expires_at=T0 + LIFE) == ConsumeResult("ok")
    assert await store.consume("minted", T0, expires_at=T0 + LIFE) == ConsumeResult("replayed")
    assert await store.consume("no-expiry-given", T0) == ConsumeResult("unknown")
    assert await store.consume("expired", T0 + LIFE, expires_at=T0 + LIFE) == ConsumeResult(
        "unknown")


async def test_body_larger_than_the_whole_bound_is_refused() -> None:
    store = MemoryStore(max_body_bytes=4)
    try:
        await store.put_session("a", b"12345", T0 + LIFE)
    except ValueError:
        pass
    else:
        raise AssertionError("expected ValueError")
    assert store.entry_count == 0


async def test_put_again_replaces() -> None:
    store = MemoryStore()
    await store.put_session("a", b"old", T0 + LIFE)
    await store.put_session("a", b"newer", T0 + LIFE)
    assert store.entry_count == 1 and store.body_bytes == 5
    assert (await store.consume("a", T0)).body == b"newer"


async def test_1000_put_consume_cycles_leave_no_entries_after_expiry() -> None:
    store = MemoryStore()
    now = T0
    for i in range(1000):
        now += 0.25
        await store.put_session(f"s{i}", b'{"n":%d}' % i, now + LIFE, now=now)
        assert (await store.consume(f"s{i}", now + 0.1)).ok
    assert store.body_bytes == 0  # consumed bodies are handed over, only markers remain
    assert store.entry_count == 0 and store.consumed_count == 1000
    assert await store.purge(now + LIFE) == 1000
    assert store.entry_count == 0 and store.consumed_count == 0 and store.body_bytes == 0


async def test_healthy_and_aclose() -> None:
    store = MemoryStore()
    assert await store.healthy()
    await store.put_session("a", b"1", T0 + LIFE)
    await store.aclose()
    assert store.entry_count == 0


async def test_cancelled_consume_does_not_use_the_session() -> None:
    # A cancelled caller must not half-apply a consume: the checkpoint comes first.
    store = MemoryStore()
    await store.put_session("a", b"1", T0 + LIFE)
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.consume("a", T0)
    assert scope.cancelled_caught
    assert (await store.consume("a", T0)).ok


async def test_is_consumed_peeks_without_using() -> None:
    store = MemoryStore()
    await store.put_session("a", b"1", T0 + LIFE)
    assert not await store.is_consumed("a")
    assert not await store.is_consumed("a", T0)
    assert store.entry_count == 1  # a peek never mutates
    assert (await store.consume("a", T0, expires_at=T0 + LIFE)).ok
    assert await store.is_consumed("a", T0)
    assert not await store.is_consumed("a", T0 + LIFE)  # the marker ends with the token
    assert not await store.is_consumed("never-put")
