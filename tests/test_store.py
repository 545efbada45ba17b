"""relay.store.MemoryStore beyond the Store protocol: its bounds, bookkeeping, properties.

The behaviour every Store must have (one-time use, reservation, replay, expiry, purge,
atomicity) is test_store_conformance.py's, run against each implementation. Time is a
plain number passed in.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.store import MAX_BODY_BYTES, ConsumeResult, MemoryStore, StoreFull

T0 = 1_700_000_000.0
LIFE = 300.0


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


async def test_entry_bound_refuses_new_sessions_and_keeps_every_held_one() -> None:
    store = MemoryStore(max_entries=3)
    for i in range(3):
        await store.put_session(f"s{i}", b'{"i":%d}' % i, T0 + LIFE)
    with pytest.raises(StoreFull) as full:
        await store.put_session("s3", None, T0 + LIFE)
    assert full.value.bound == "sessions" and full.value.status == 503
    assert "3 pending sessions" in str(full.value)
    assert store.entry_count == 3 and "s3" not in store
    # nothing was dropped to make room: every held body still reaches its bot
    for i in range(3):
        assert await store.consume(f"s{i}", T0) == ConsumeResult("ok", b'{"i":%d}' % i)
    await store.put_session("s3", None, T0 + LIFE)  # room again once used
    assert "s3" in store


async def test_byte_bound_refuses_the_body_that_does_not_fit_and_drops_nothing() -> None:
    store = MemoryStore(max_body_bytes=10)
    await store.put_session("a", b"1234", T0 + LIFE)
    await store.put_session("b", b"1234", T0 + LIFE)
    with pytest.raises(StoreFull) as full:
        await store.put_session("c", b"123", T0 + LIFE)  # 11 > 10
    assert full.value.bound == "body_bytes"
    assert "a" in store and "b" in store and "c" not in store and store.body_bytes == 8
    await store.put_session("c", b"12", T0 + LIFE)  # exactly 10 fits
    assert store.body_bytes == 10
    await store.put_session("a", b"", T0 + LIFE)  # putting again frees the old body first
    assert store.body_bytes == 6


async def test_expired_sessions_make_room_for_new_ones() -> None:
    store = MemoryStore(max_entries=1, max_body_bytes=4)
    await store.put_session("old", b"1234", T0 + 10)
    await store.put_session("new", b"1234", T0 + 20, now=T0 + 10)
    assert "old" not in store and "new" in store and store.body_bytes == 4


async def test_a_start_flood_cannot_push_out_a_consumed_marker() -> None:
    store = MemoryStore(max_markers=3)
    await store.put_session("a", None, T0 + LIFE)
    assert (await store.consume("a", T0)).ok
    await store.put_session("b", None, T0 + LIFE)
    # 1 marker + 1 pending = 2 of 3: one more /start fits, then the flood is refused
    await store.put_session("c", None, T0 + LIFE)
    for i in range(10):
        with pytest.raises(StoreFull) as full:
            await store.put_session(f"flood{i}", None, T0 + LIFE)
        assert full.value.bound == "markers"
    assert await store.consume("a", T0, expires_at=T0 + LIFE) == ConsumeResult("replayed")
    # every token /start issued still finds room for its marker when it is used
    assert (await store.consume("b", T0)).ok and (await store.consume("c", T0)).ok
    assert store.consumed_count == 3
    # a token minted without /start needs a new marker: refused while full, never evicting
    with pytest.raises(StoreFull):
        await store.reserve("minted", T0, expires_at=T0 + LIFE)
    # markers go only when their token expires
    assert await store.is_consumed("a", T0 + LIFE - 0.001)
    await store.put_session("d", None, T0 + 2 * LIFE, now=T0 + LIFE)
    assert store.consumed_count == 0


async def test_token_minted_with_a_body_whose_body_is_gone_is_body_unavailable() -> None:
    store = MemoryStore()
    assert await store.reserve("gone", T0, expires_at=T0 + LIFE, with_body=True) == (
        ConsumeResult("body_unavailable"))
    assert await store.consume("gone", T0, expires_at=T0 + LIFE, with_body=True) == (
        ConsumeResult("body_unavailable"))
    await store.put_session("none", None, T0 + LIFE)  # held, but without a body
    assert (await store.reserve("none", T0, expires_at=T0 + LIFE, with_body=True)).status == (
        "body_unavailable")
    # a refusal uses nothing up: no marker, the pending session is untouched
    assert store.consumed_count == 0 and "none" in store


async def test_reserve_holds_the_session_for_exactly_one_upgrade() -> None:
    store = MemoryStore()
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
    assert store.body_bytes == 7 and "s" in store  # still held while reserved
    assert await store.consume("s", T0 + 1, expires_at=T0 + LIFE, with_body=True) == (
        ConsumeResult("ok", b'{"k":1}'))
    assert await store.consume("s", T0 + 2, expires_at=T0 + LIFE) == ConsumeResult("replayed")
    assert await store.reserve("s", T0 + 2, expires_at=T0 + LIFE) == ConsumeResult("replayed")
    assert store.body_bytes == 0 and store.entry_count == 0


async def test_release_makes_the_token_usable_again_with_its_body() -> None:
    store = MemoryStore()
    await store.put_session("s", b"[1]", T0 + LIFE)
    assert (await store.reserve("s", T0, expires_at=T0 + LIFE, with_body=True)).ok
    await store.release("s", T0)
    assert not await store.is_consumed("s", T0) and store.body_bytes == 3
    assert (await store.reserve("s", T0, expires_at=T0 + LIFE, with_body=True)).ok
    assert await store.consume("s", T0, with_body=True) == ConsumeResult("ok", b"[1]")
    # releasing a consumed token (or one never reserved) changes nothing
    await store.release("s", T0)
    await store.release("never", T0)
    assert await store.consume("s", T0, expires_at=T0 + LIFE) == ConsumeResult("replayed")
    # a released mint-token token (no pending entry) is usable again too
    assert (await store.reserve("m", T0, expires_at=T0 + LIFE)).ok
    await store.release("m", T0)
    assert await store.consume("m", T0, expires_at=T0 + LIFE) == ConsumeResult("ok")


async def test_reservation_ends_with_its_token() -> None:
    store = MemoryStore()
    await store.put_session("s", b"1", T0 + LIFE)
    assert (await store.reserve("s", T0, expires_at=T0 + LIFE)).ok
    assert await store.consume("s", T0 + LIFE, expires_at=T0 + LIFE) == (
        ConsumeResult("unknown"))
    assert store.entry_count == 0 and store.body_bytes == 0 and store.consumed_count == 0


async def test_an_expired_marker_out_of_order_is_not_a_replay() -> None:
    store = MemoryStore()
    assert (await store.reserve("long", T0, expires_at=T0 + LIFE)).ok
    assert (await store.consume("short", T0, expires_at=T0 + 10)).ok
    # "short" is behind "long" in insertion order, yet its marker ends at its own expiry
    assert await store.consume("short", T0 + 10, expires_at=T0 + 10) == (
        ConsumeResult("unknown"))
    assert await store.reserve("long", T0 + 10, expires_at=T0 + LIFE) == (
        ConsumeResult("replayed"))


async def test_body_larger_than_the_whole_bound_is_refused() -> None:
    assert MemoryStore().max_body_bytes == MAX_BODY_BYTES
    store = MemoryStore(max_body_bytes=4)
    with pytest.raises(ValueError, match="exceeds"):
        await store.put_session("a", b"12345", T0 + LIFE)
    assert store.entry_count == 0
    assert await store.consume("a", T0) == ConsumeResult("unknown")


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


# ------------------------------------------------------------------ property: nothing lost

_IDS = [f"s{i}" for i in range(4)]
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from(_IDS),
                  st.one_of(st.none(), st.binary(min_size=0, max_size=6))),
        st.tuples(st.just("reserve"), st.sampled_from(_IDS), st.booleans()),
        st.tuples(st.just("release"), st.sampled_from(_IDS), st.none()),
        st.tuples(st.just("consume"), st.sampled_from(_IDS), st.booleans()),
        st.tuples(st.just("wait"), st.just(""), st.integers(min_value=1, max_value=200)),
        st.tuples(st.just("purge"), st.just(""), st.none()),
    ),
    max_size=60,
)


@settings(max_examples=400)
@example(  # a token's expiry is fixed at minting, not renewed by each upgrade
    ops=[("reserve", "s3", False), ("wait", "", 200), ("wait", "", 10),
         ("consume", "s3", False), ("wait", "", 90), ("reserve", "s3", False)],
    entries=1, body_bytes=0, markers=1,
)
@given(ops=_OPS, entries=st.integers(1, 4), body_bytes=st.integers(0, 12),
       markers=st.integers(1, 5))
def test_no_operation_sequence_loses_a_body_or_forgets_a_use_early(
    ops: list[tuple[str, str, Any]], entries: int, body_bytes: int, markers: int
) -> None:
    """Whatever floods, races and bounds do: a held body reaches its one consumer intact,
    a used token stays used until it expires, and every bound holds."""
    store = MemoryStore(max_entries=entries, max_body_bytes=body_bytes, max_markers=markers)
    held: dict[str, tuple[bytes | None, float]] = {}  # put and not yet consumed
    used: dict[str, float] = {}  # consumed: id → token expiry
    token_exp: dict[str, float] = {}  # a session's token expiry, fixed when it is minted
    now = T0

    async def run() -> None:
        nonlocal now
        for op, sid, arg in ops:
            if op == "wait":
                now += arg
                continue
            if op == "purge":
                await store.purge(now)
                continue
            live_use = sid in used and now < used[sid]
            if op == "put":
                if sid in token_exp:
                    continue  # session ids are fresh uuids: never put twice
                token_exp[sid] = now + LIFE
                try:
                    await store.put_session(sid, arg, now + LIFE, now=now)
                    held[sid] = (arg, now + LIFE)
                except StoreFull:
                    pass
                except ValueError:
                    assert len(arg) > body_bytes
            elif op == "release":
                await store.release(sid, now)
            else:
                expires_at = token_exp.setdefault(sid, now + LIFE)  # minted without /start
                if now >= expires_at:
                    continue  # tokens.verify refuses an expired token before the store
                entry = held.get(sid)
                with_body = bool(arg) and entry is not None and entry[0] is not None
                call = store.reserve if op == "reserve" else store.consume
                try:
                    result = await call(sid, now, expires_at=expires_at, with_body=with_body)
                except StoreFull as full:
                    assert full.bound == "markers" and (entry is None or now >= entry[1])
                    continue
                if live_use:
                    assert result.status == "replayed"  # never a second use
                elif entry is not None and now < entry[1] and result.ok and op == "consume":
                    assert result.body == entry[0]  # exactly the body /start held
                    del held[sid]
                    used[sid] = entry[1]
                elif result.ok and op == "consume":
                    assert result.body is None and (entry is None or now >= entry[1])
                    used[sid] = expires_at
            assert store.entry_count <= entries
            assert 0 <= store.body_bytes <= body_bytes
            assert store.consumed_count <= markers
            # nothing pending and unexpired ever vanished without being consumed
            for pending, (_, expires) in held.items():
                if now < expires:
                    assert pending in store

    trio.run(run)


async def test_a_token_issued_before_the_store_began_remembering_is_unverifiable() -> None:
    store = MemoryStore(remembers_since=T0)
    before = T0 - 1 + LIFE  # expiry of a token issued one second before the store began
    assert (await store.reserve("old", T0, expires_at=before)).status == "unverifiable"
    assert (await store.consume("old", T0, expires_at=before)).status == "unverifiable"
    assert store.consumed_count == 0  # nothing reserved for it
    assert (await store.reserve("new", T0, expires_at=T0 + LIFE)).ok  # issued since: fine
    # a session /start put here is this store's own, whatever the clock says
    await store.put_session("mine", b"{}", before, now=T0)
    assert (await store.reserve("mine", T0, expires_at=before)).ok
