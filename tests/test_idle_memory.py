"""The read buffer every relay direction shares, and the process-wide keepalive timer.

Both exist so an idle session holds no buffer and no sleeping task of its own; these tests
show that sharing loses and mixes no byte, and that the timer keeps every ping's time.
"""

from __future__ import annotations

import logging
import socket
from functools import partial

import pytest
import trio
import trio.testing

from relay.frames import OP_BINARY, FrameScanner, encode_frame
from relay.keepalive import KeepaliveTimer, keepalive_timer
from relay.pump import CHUNK, Ending, Outbound, pump, read_buffer
from relay.wire import SocketConn


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return a, b


async def _read_exactly(sock: socket.socket, n: int) -> bytes:
    sock.setblocking(False)
    got = bytearray()
    while len(got) < n:
        await trio.lowlevel.wait_readable(sock)
        chunk = sock.recv(65536)
        assert chunk, "peer closed early"
        got += chunk
    return bytes(got)


async def test_a_direction_blocked_mid_write_keeps_its_bytes_while_another_reuses_the_buffer(
) -> None:
    # Direction A: its destination reads nothing at first, so A's pump waits mid-write
    # holding an unsent remainder. Direction B relays other bytes meanwhile, through the
    # same read buffer. Then A's destination reads: every byte of A arrives unchanged.
    a_src_w, a_src = _pair()
    a_dst, a_dst_r = _pair()
    b_src_w, b_src = _pair()
    b_dst, b_dst_r = _pair()
    frames_a = b"".join(encode_frame(OP_BINARY, bytes([i]) * 3000, mask=False)
                        for i in range(1, 41))
    frames_b = b"".join(encode_frame(OP_BINARY, b"\xee" * 1000, mask=False)
                        for _ in range(200))
    ends = []
    outs: list[Outbound] = []

    async def run(src: socket.socket, dst: socket.socket) -> None:
        out = Outbound(SocketConn(dst), mask=False)
        outs.append(out)
        ends.append(await pump(SocketConn(src), FrameScanner(masked=False,
                                                             max_message_size=1 << 20), out))

    async def feed(w: socket.socket, data: bytes) -> None:
        w.setblocking(False)
        view = memoryview(data)
        while view:
            await trio.lowlevel.wait_writable(w)
            view = view[w.send(view):]
        w.shutdown(socket.SHUT_WR)

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, a_src, a_dst)
            nursery.start_soon(feed, a_src_w, frames_a)
            await trio.testing.wait_all_tasks_blocked()
            assert outs[0].conn.would_block()  # A waits on its peer, mid-write
            nursery.start_soon(run, b_src, b_dst)
            nursery.start_soon(feed, b_src_w, frames_b)
            assert await _read_exactly(b_dst_r, len(frames_b)) == frames_b
            assert await _read_exactly(a_dst_r, len(frames_a)) == frames_a
    assert [e.kind for e in ends] == [Ending.GONE, Ending.GONE]
    for s in (a_src_w, a_src, a_dst, a_dst_r, b_src_w, b_src, b_dst, b_dst_r):
        s.close()


async def test_the_read_buffer_is_one_per_trio_run() -> None:
    buf = read_buffer()
    assert read_buffer() is buf
    assert len(buf) == CHUNK
    other = await trio.to_thread.run_sync(trio.run, _buffer_in_a_new_run)
    assert other is not buf  # another run (in another thread) has its own


async def _buffer_in_a_new_run() -> bytearray:
    return read_buffer()


def test_the_read_buffer_differs_between_runs_in_threads() -> None:
    async def get() -> bytearray:
        return read_buffer()

    assert trio.run(get) is not trio.run(get)


async def test_timer_calls_each_entry_at_its_time_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timer = KeepaliveTimer()
    calls: list[tuple[str, float]] = []

    def record(name: str) -> None:
        calls.append((name, trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        for name, delay in (("c", 30.0), ("a", 10.0), ("b", 20.0), ("a2", 10.0)):
            timer.schedule(t0 + delay, partial(record, name))
        await trio.sleep(31)
        nursery.cancel_scope.cancel()
    assert [(n, round(t - t0, 3)) for n, t in calls] == [
        ("a", 10.0), ("a2", 10.0), ("b", 20.0), ("c", 30.0)]


async def test_a_sooner_entry_wakes_a_timer_sleeping_on_a_later_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timer = KeepaliveTimer()
    calls: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        t0 = trio.current_time()
        timer.schedule(t0 + 100, lambda: calls.append(trio.current_time() - t0))
        await trio.sleep(1)  # the timer now sleeps until +100
        timer.schedule(t0 + 5, lambda: calls.append(trio.current_time() - t0))
        await trio.sleep(10)
        assert calls == [pytest.approx(5)]
        nursery.cancel_scope.cancel()


async def test_a_cancelled_ticket_never_fires_and_drops_its_callback(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timer = KeepaliveTimer()
    calls: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        t0 = trio.current_time()
        ticket = timer.schedule(t0 + 5, lambda: calls.append("cancelled"))
        timer.schedule(t0 + 6, lambda: calls.append("kept"))
        ticket.cancel()
        assert ticket.due is None  # the session it belonged to is not kept alive by it
        await trio.sleep(10)
        assert calls == ["kept"]
        assert len(timer) == 0
        nursery.cancel_scope.cancel()


async def test_a_failing_callback_is_logged_and_the_others_still_run(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
) -> None:
    timer = KeepaliveTimer()
    calls: list[str] = []

    def broken() -> None:
        raise ValueError("boom")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        t0 = trio.current_time()
        with caplog.at_level(logging.ERROR, logger="relay.keepalive"):
            timer.schedule(t0 + 1, broken)
            timer.schedule(t0 + 1, lambda: calls.append("after"))
            await trio.sleep(2)
        assert calls == ["after"]
        assert "keepalive callback failed" in caplog.text
        nursery.cancel_scope.cancel()


async def test_one_timer_per_trio_run_started_on_first_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timer = keepalive_timer()
    assert keepalive_timer() is timer
    fired = trio.Event()
    timer.schedule(trio.current_time() + 3, fired.set)
    with trio.fail_after(4):
        await fired.wait()


async def test_cancelled_entries_are_swept_once_they_are_most_of_the_heap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Session churn: every ended session leaves cancelled entries; they must not pile up
    # for a whole ping_interval.
    timer = KeepaliveTimer()
    fired: list[int] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timer.run)
        t0 = trio.current_time()
        tickets = [timer.schedule(t0 + 20 + i / 1000, partial(fired.append, i))
                   for i in range(4000)]
        for t in tickets[:2000]:
            t.cancel()
        assert len(timer) == 4000  # half cancelled: not yet swept
        tickets[2000].cancel()  # now more than half: swept
        assert len(timer) == 1999
        await trio.sleep(30)
        assert fired == list(range(2001, 4000))
        assert len(timer) == 0
        nursery.cancel_scope.cancel()


async def test_an_idle_session_holds_only_its_two_pump_tasks_between_pings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from support import bot_server, make_config, open_client, running

    from relay.connection import ClientConnection
    from relay.passthrough import Passthrough

    async with bot_server() as bot, running(make_config(
            bot.url, server={"ping_interval": 5, "ping_timeout": 5})) as gw:
        async with open_client(gw.url()) as ws:
            (member,) = gw.gateway.rt.registry.members()
            assert isinstance(member, ClientConnection)  # the registry holds it as a Member
            leg = member._leg
            assert isinstance(leg, Passthrough)
            assert leg._nursery is not None
            for _ in range(4):  # pings at +5, +10, +15, +20: each answered, none kept
                await trio.sleep(4)  # between two pings
                assert len(leg._nursery.child_tasks) == 2
                await trio.sleep(1)
                await ws.send_message("still here")
                assert await ws.get_message() == "still here"
            assert leg.client.pings >= 3 and leg.bot.pings >= 3
            assert leg.client.ticket is not None and leg.bot.ticket is not None
            assert gw.gateway.session_count() == 1
        with trio.fail_after(5):
            await member.done.wait()
        assert leg.client.ticket is None and leg.bot.ticket is None  # cancelled at the end
