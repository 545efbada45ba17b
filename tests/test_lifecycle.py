"""Session lifecycle: timeout, replacement, rejection, events, serve/shutdown, cleanup.

Every test runs on `autojump_clock` with loopback sockets and asserts exact virtual times
(`trio.current_time()`): the gateway's timers are trio deadlines, so a session timeout of
300 s ends at exactly accept + 300. Event order is recorded in one list shared by the
gateway's callbacks and the upstream bot's handler, which logs the moment the gateway's
upgrade request reaches it ("dialled") and the close code it got.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from support import KEYS, bot_server, make_config, open_client, read_until, running
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from relay.gateway import Gateway, Ports
from relay.runtime import SessionInfo

BOUND = 1000  # virtual seconds: the bound on every wait (nothing here should take long)
Event = tuple[Any, ...]


# --------------------------------------------------------------------------------------
# Helpers: an event log, a bot that writes to it, a gateway that writes to it
# --------------------------------------------------------------------------------------


@attrs.define
class Log:
    """Callbacks and bot handlers append here, in the order things happen."""

    events: list[Event] = attrs.field(factory=list)
    infos: list[SessionInfo] = attrs.field(factory=list)
    ready: list[object] = attrs.field(factory=list)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def add(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, kind: str, count: int = 1) -> None:
        """Until `count` events of this kind have happened (callers bound the wait)."""
        while sum(1 for e in self.events if e[0] == kind) < count:
            await self._changed.wait()

    def callbacks(self) -> dict[str, Any]:
        def connected(info: SessionInfo) -> None:
            self.infos.append(info)
            self.add(("connected", self.number(info), trio.current_time()))

        async def disconnected(info: SessionInfo) -> None:
            await trio.lowlevel.checkpoint()  # async callbacks are awaited
            self.add(("disconnected", self.number(info), info.end_reason,
                                trio.current_time()))

        def timed_out(info: SessionInfo) -> None:
            self.add(("timeout", self.number(info), trio.current_time()))

        def ready(gateway: object) -> None:
            self.ready.append(gateway)

        return dict(on_client_connected=connected, on_client_disconnected=disconnected,
                    on_session_timeout=timed_out, on_websocket_ready=ready)

    def number(self, info: SessionInfo) -> int:
        """1 for the first session connected, 2 for the second..."""
        return next(i for i, x in enumerate(self.infos, 1) if x is info)

    def names(self) -> list[tuple[Any, ...]]:
        """The events without their times."""
        return [e[:-1] if e[0] in ("connected", "timeout", "disconnected") else e
                for e in self.events]


@attrs.define
class RecordingBot:
    port: int = 0
    requests: list[WebSocketRequest] = attrs.field(factory=list)
    close_codes: list[int | None] = attrs.field(factory=list)
    finished: int = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/bot"


@asynccontextmanager
async def recording_bot(log: Log) -> AsyncIterator[RecordingBot]:
    """An echo bot that logs ("dialled", n) when the gateway's request arrives and
    ("bot closed", n, code) when its session ends."""
    bot = RecordingBot()

    async def handler(request: WebSocketRequest) -> None:
        bot.requests.append(request)
        n = len(bot.requests)
        log.add(("dialled", n))
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except ConnectionClosed as exc:
            assert exc.reason is not None
            bot.close_codes.append(exc.reason.code)
            log.add(("bot closed", n, exc.reason.code))
        finally:
            bot.finished += 1

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        bot.port = server.port
        yield bot
        nursery.cancel_scope.cancel()


def task_count() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def roundtrip(ws: WebSocketConnection, message: str = "ping") -> None:
    await ws.send_message(message)
    assert await ws.get_message() == message


async def closed_with(ws: WebSocketConnection) -> tuple[int | None, str | None]:
    """Wait for the gateway to close this client; its code and reason."""
    with pytest.raises(ConnectionClosed) as exc:
        while True:
            await ws.get_message()
    reason = exc.value.reason
    assert reason is not None
    return reason.code, reason.reason or ""


# --------------------------------------------------------------------------------------
# Session timeout
# --------------------------------------------------------------------------------------


async def test_session_timeout_closes_with_4000_at_exactly_accept_plus_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with recording_bot(log) as bot, \
            running(make_config(bot.url, session_timeout=300), **log.callbacks()) as gw:
        await trio.sleep(42)  # the gateway's start is not the session's start
        with trio.fail_after(BOUND):
            async with open_client(gw.url()) as ws:
                accepted = trio.current_time()
                await trio.sleep(120)
                await roundtrip(ws)  # activity does not extend the session
                code, reason = await closed_with(ws)
                assert trio.current_time() == accepted + 300
            assert (code, reason) == (4000, "session timeout")
            await log.wait_for("bot closed", 1)
            await log.wait_for("disconnected", 1)
        assert bot.close_codes == [4000]
        info = log.infos[0]
        assert info.connected_at == accepted
        assert info.end_reason == "timeout"
        assert log.events == [
            ("dialled", 1),
            ("connected", 1, accepted),
            ("timeout", 1, accepted + 300),
            ("bot closed", 1, 4000),
            ("disconnected", 1, "timeout", accepted + 300),
        ] or log.events == [
            ("dialled", 1),
            ("connected", 1, accepted),
            ("timeout", 1, accepted + 300),
            ("disconnected", 1, "timeout", accepted + 300),
            ("bot closed", 1, 4000),
        ]
        assert gw.gateway.session_count() == 0


async def test_session_timeout_with_inprocess_bot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with running(make_config(session_timeout=2.5), **log.callbacks()) as gw:
        with trio.fail_after(BOUND):
            async with open_client(gw.url()) as ws:
                accepted = trio.current_time()
                await roundtrip(ws)
                assert await closed_with(ws) == (4000, "session timeout")
                assert trio.current_time() == accepted + 2.5
        assert [e[0] for e in log.events] == ["connected", "timeout", "disconnected"]
        assert log.events[1] == ("timeout", 1, accepted + 2.5)


async def test_no_session_timeout_by_default(autojump_clock: trio.testing.MockClock) -> None:
    async with running(make_config()) as gw:
        with trio.fail_after(BOUND):
            async with open_client(gw.url()) as ws:
                await trio.sleep(900)
                await roundtrip(ws)


# --------------------------------------------------------------------------------------
# Replacement (SPEC §5 step 3)
# --------------------------------------------------------------------------------------


async def test_replacement_finishes_predecessor_teardown_before_dialling_newcomer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with recording_bot(log) as bot, \
            running(make_config(bot.url), **log.callbacks()) as gw:
        with trio.fail_after(BOUND):
            async with open_client(gw.url()) as first:
                await roundtrip(first)
                async with open_client(gw.url()) as second:
                    assert await closed_with(first) == (4001, "replaced")
                    await roundtrip(second)
            await log.wait_for("bot closed", 2)
            await log.wait_for("disconnected", 2)
        names = log.names()
        dial_2 = names.index(("dialled", 2))
        assert names.index(("bot closed", 1, 4001)) < dial_2
        assert names.index(("disconnected", 1, "replaced")) < dial_2
        assert names.index(("connected", 2)) > dial_2
        assert bot.close_codes[0] == 4001
        assert log.infos[0].end_reason == "replaced"


async def test_replacement_takes_no_virtual_time_with_cooperative_peers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with recording_bot(log) as bot, running(make_config(bot.url), **log.callbacks()) as gw:
        with trio.fail_after(BOUND):
            async with open_client(gw.url()) as first:
                t0 = trio.current_time()
                async with open_client(gw.url()) as second:
                    assert trio.current_time() == t0
                    await roundtrip(second)
                    assert await closed_with(first) == (4001, "replaced")


async def test_max_clients_two_keeps_two_and_replaces_the_oldest_on_the_third(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with recording_bot(log) as bot, \
            running(make_config(bot.url, max_clients=2), **log.callbacks()) as gw:
        with trio.fail_after(BOUND):
            async with open_client(gw.url()) as c1, open_client(gw.url()) as c2:
                await roundtrip(c1, "one")
                await roundtrip(c2, "two")
                assert gw.gateway.session_count("a") == 2
                async with open_client(gw.url()) as c3:
                    assert await closed_with(c1) == (4001, "replaced")
                    await roundtrip(c2, "two again")
                    await roundtrip(c3, "three")
                    assert gw.gateway.session_count("a") == 2
        assert bot.close_codes[0] == 4001
        assert next(i.end_reason for i in log.infos) == "replaced"
        names = log.names()
        assert names.index(("disconnected", 1, "replaced")) < names.index(("dialled", 3))


async def test_reject_mode_closes_newcomer_with_1013_and_leaves_existing_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with recording_bot(log) as bot:
        config = make_config(bot.url, when_full="reject")
        async with running(config, **log.callbacks()) as gw:
            with trio.fail_after(BOUND):
                async with open_client(gw.url()) as first:
                    await roundtrip(first)
                    t0 = trio.current_time()
                    async with open_client(gw.url()) as second:
                        assert await closed_with(second) == (1013, "try again later")
                        assert trio.current_time() == t0  # closed at once, no bot dial
                    await roundtrip(first, "undisturbed")
                    assert gw.gateway.session_count("a") == 1
                    assert len(bot.requests) == 1  # no bot dialled for the refused one
                    assert [e[0] for e in log.events] == ["dialled", "connected"]


async def test_reject_mode_ends_the_tcp_connection_right_after_the_close_handshake(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(make_config(when_full="reject")) as gw:
        with trio.fail_after(BOUND):
            async with open_client(gw.url()) as first:
                t0 = trio.current_time()
                async with open_client(gw.url()) as second:
                    assert await closed_with(second) == (1013, "try again later")
                assert trio.current_time() == t0
                await roundtrip(first)


async def test_session_count_is_one_after_a_replacement(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(make_config()) as gw:
        with trio.fail_after(BOUND):
            async with open_client(gw.url()) as first, open_client(gw.url()) as second:
                assert await closed_with(first) == (4001, "replaced")
                await roundtrip(second)
                assert gw.gateway.session_count("a") == 1
                assert gw.gateway.session_count() == 1


async def test_max_clients_one_still_holds_after_a_replacement(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(make_config()) as gw:
        with trio.fail_after(BOUND):
            async with open_client(gw.url()) as c1, open_client(gw.url()) as c2:
                assert await closed_with(c1) == (4001, "replaced")
                async with open_client(gw.url()) as c3:
                    await roundtrip(c3)
                    with trio.move_on_after(10):
                        assert await closed_with(c2) == (4001, "replaced")
                        return
                    raise AssertionError("the second client was not replaced by the third")


# --------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------


async def test_events_fire_with_session_info(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    async with recording_bot(log) as bot, running(make_config(bot.url), **log.callbacks()) as gw:
        assert log.ready == [gw.gateway]
        with trio.fail_after(BOUND):
            async with open_client(gw.url()) as ws:
                accepted = trio.current_time()
                await roundtrip(ws)
                [info] = log.infos
                assert isinstance(info, SessionInfo)
                assert info.agent == "a"
                assert info.organization == "local"
                assert info.client_addr == "127.0.0.1"
                assert isinstance(info.id, str) and info.id
                assert info.connected_at == accepted
                assert info.end_reason is None
                headers = {k.lower(): v for k, v in bot.requests[0].headers}
                assert headers[b"x-relay-session-id"] == info.id.encode()
                await trio.sleep(10)
            await log.wait_for("bot closed", 1)
            await log.wait_for("disconnected", 1)
        assert ("disconnected", 1, "client_closed", accepted + 10) in log.events
        assert [e[0] for e in log.events if e[0] != "bot closed"] == [
            "dialled", "connected", "disconnected"]
        assert info.end_reason == "client_closed"
    assert log.ready == [gw.gateway]  # once


async def test_each_session_gets_its_own_id(autojump_clock: trio.testing.MockClock) -> None:
    log = Log()
    async with running(make_config(max_clients=3), **log.callbacks()) as gw:
        with trio.fail_after(BOUND):
            for _ in range(3):
                async with open_client(gw.url()) as ws:
                    await roundtrip(ws)
    assert len({i.id for i in log.infos}) == 3


async def test_failing_callback_does_not_break_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    def boom(info: SessionInfo) -> None:
        raise RuntimeError("callback failed")

    async with running(make_config(), on_client_connected=boom,
                       on_client_disconnected=boom) as gw:
        with trio.fail_after(BOUND):
            async with open_client(gw.url()) as ws:
                await roundtrip(ws)
        await trio.testing.wait_all_tasks_blocked()
        assert gw.gateway.session_count() == 0


async def test_ready_has_fired_when_start_returns_even_for_an_async_callback(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """SPEC §6: once `nursery.start(gateway.serve)` returns, on_websocket_ready has fired."""
    fired: list[object] = []

    async def on_ready(gateway: object) -> None:
        await trio.sleep(1)  # e.g. registering with a service discovery
        fired.append(gateway)

    gateway = Gateway(make_config(), keys=KEYS, wall_clock=trio.current_time,
                      on_websocket_ready=on_ready)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        assert fired == [gateway]
        await gateway.shutdown()
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------
# serve() and shutdown()
# --------------------------------------------------------------------------------------


async def http_get(port: int, path: str) -> bytes:
    with trio.fail_after(BOUND):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close"
                                  "\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    return data


async def test_serve_reports_the_ports_it_bound_for_port_zero(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ready: list[object] = []
    gateway = Gateway(make_config(), keys=KEYS, wall_clock=trio.current_time,
                      on_websocket_ready=ready.append)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(gateway.serve)
        assert isinstance(ports, Ports)
        assert ready == [gateway]
        [(ws_host, ws_port)] = ports.ws
        [(api_host, api_port)] = ports.api
        assert (ws_host, api_host) == ("127.0.0.1", "127.0.0.1")
        assert ws_port != 0 and api_port != 0 and ws_port != api_port
        assert (await http_get(api_port, "/health")).startswith(b"HTTP/1.1 200 ")
        with trio.fail_after(BOUND):
            async with open_client(f"ws://127.0.0.1:{ws_port}/ws/generic/a.local") as ws:
                await roundtrip(ws)
        await gateway.shutdown()
        nursery.cancel_scope.cancel()


async def test_serve_reports_every_bind(autojump_clock: trio.testing.MockClock) -> None:
    config = make_config(server={"ws_bind": ["127.0.0.1:0", "127.0.0.1:0"],
                                 "api_bind": ["127.0.0.1:0", "127.0.0.1:0"]})
    gateway = Gateway(config, keys=KEYS, wall_clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(gateway.serve)
        assert len(ports.ws) == 2 and len(ports.api) == 2
        assert len({p for _, p in ports.ws + ports.api}) == 4
        await gateway.shutdown()
        nursery.cancel_scope.cancel()


async def test_shutdown_closes_every_session_with_1001_both_ways(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with recording_bot(log) as bot:
        gateway = Gateway(make_config(bot.url, max_clients=2, close_timeout=3),
                          keys=KEYS, wall_clock=trio.current_time, **log.callbacks())
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(gateway.serve)
            url = f"ws://127.0.0.1:{ports.ws[0][1]}/ws/generic/a.local"
            with trio.fail_after(BOUND):
                async with open_client(url) as c1, open_client(url) as c2:
                    await roundtrip(c1)
                    await roundtrip(c2)
                    t0 = trio.current_time()
                    await gateway.shutdown()
                    assert trio.current_time() <= t0 + 3 + 0.5
                    assert await closed_with(c1) == (1001, "")
                    assert await closed_with(c2) == (1001, "")
                await log.wait_for("bot closed", 2)
                await log.wait_for("disconnected", 2)
            assert bot.close_codes == [1001, 1001]
            assert [i.end_reason for i in log.infos] == ["shutdown", "shutdown"]
            assert gateway.session_count() == 0 and not gateway.connections
            nursery.cancel_scope.cancel()


async def raw_upgrade(port: int, path: str = "/ws/generic/a.local") -> trio.SocketStream:
    """A client that completes the upgrade and then never reads or answers anything."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        f"GET {path} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        "sec-websocket-version: 13\r\nsec-websocket-key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n\r\n"
        .encode())
    data = await read_until(stream, b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 101 ")
    return stream


async def test_shutdown_is_bounded_by_close_timeout_with_a_silent_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Log()
    async with recording_bot(log) as bot:
        gateway = Gateway(make_config(bot.url, close_timeout=3), keys=KEYS,
                          wall_clock=trio.current_time, **log.callbacks())
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(gateway.serve)
            with trio.fail_after(BOUND):
                stream = await raw_upgrade(ports.ws[0][1])
                async with stream:
                    t0 = trio.current_time()
                    await gateway.shutdown()
                    elapsed = trio.current_time() - t0
                    assert 0 < elapsed <= 3 + 0.5
                await log.wait_for("bot closed", 1)
                await log.wait_for("disconnected", 1)
            assert bot.close_codes == [1001]
            assert log.infos[0].end_reason == "shutdown"
            assert gateway.session_count() == 0 and not gateway.connections
            nursery.cancel_scope.cancel()


async def test_shutdown_with_no_sessions_returns_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gateway = Gateway(make_config(), keys=KEYS, wall_clock=trio.current_time)
    returned: list[float] = []

    async def serve(*, task_status: trio.TaskStatus[Ports]) -> None:
        await gateway.serve(task_status=task_status)
        returned.append(trio.current_time())

    # A regression here would hang: the whole test is bounded, and nothing cancels serve().
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            t0 = trio.current_time()
            await gateway.shutdown()
            assert trio.current_time() == t0  # shutdown() returned at once
    assert returned == [t0]  # and serve() returned by itself, at that same moment
    assert not nursery.cancel_scope.cancelled_caught


async def test_serve_returns_after_shutdown(autojump_clock: trio.testing.MockClock) -> None:
    gateway = Gateway(make_config(), keys=KEYS, wall_clock=trio.current_time)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(gateway.serve)
            await gateway.shutdown()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", ports.ws[0][1])


# --------------------------------------------------------------------------------------
# Nothing left behind
# --------------------------------------------------------------------------------------


ENDINGS = ["client closes", "bot closes", "timeout", "replaced", "client vanishes",
           "shutdown"]


@pytest.mark.parametrize("ending", ENDINGS)
async def test_nothing_remains_after_a_session_ends(
    ending: str, autojump_clock: trio.testing.MockClock
) -> None:
    """No task, socket or registry entry outlives a session, however it ends."""
    log = Log()

    async def bot_closes_on_bye(ws: WebSocketConnection, bot: Any) -> None:
        while True:
            message = await ws.get_message()
            if message == "bye":
                await ws.aclose(1000, "bye")
                return
            await ws.send_message(message)

    async with bot_server(bot_closes_on_bye) as bot:
        gateway = Gateway(make_config(bot.url, session_timeout=50), keys=KEYS,
                          wall_clock=trio.current_time, **log.callbacks())
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(gateway.serve)
            url = f"ws://127.0.0.1:{ports.ws[0][1]}/ws/generic/a.local"
            await trio.testing.wait_all_tasks_blocked()
            tasks, fds = task_count(), fd_count()
            sessions = 1
            with trio.fail_after(BOUND):
                async with open_client(url) as ws:
                    await roundtrip(ws)
                    assert gateway.session_count() == 1
                    if ending == "bot closes":
                        await ws.send_message("bye")
                        assert await closed_with(ws) == (1000, "bye")
                    elif ending == "timeout":
                        assert await closed_with(ws) == (4000, "session timeout")
                    elif ending == "replaced":
                        async with open_client(url) as newcomer:
                            assert await closed_with(ws) == (4001, "replaced")
                            await roundtrip(newcomer)
                        sessions = 2
                    elif ending == "client vanishes":
                        await ws._stream.aclose()  # TCP drop, no close frame
                    elif ending == "shutdown":
                        await gateway.shutdown()
                        assert await closed_with(ws) == (1001, "")
                await log.wait_for("disconnected", sessions)
                while bot.close_codes.__len__() < sessions or gateway.connections:
                    await trio.testing.wait_all_tasks_blocked()
            await trio.testing.wait_all_tasks_blocked()
            assert not gateway.connections
            assert gateway.rt.registry.members() == []
            assert gateway.rt.open_connections == 0
            if ending != "replaced":  # see test_session_count_is_one_after_a_replacement
                assert gateway.session_count() == 0
            if ending == "shutdown":  # the listeners are closed too
                assert fd_count() == fds - len(ports.ws) - len(ports.api)
            else:
                assert task_count() == tasks
                assert fd_count() == fds
            nursery.cancel_scope.cancel()


async def test_cancelling_serve_from_outside_closes_the_bot_leg(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An embedding app that cancels the nursery running gateway.serve (no shutdown())."""
    log = Log()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        async with bot_server() as bot:
            gateway = Gateway(make_config(bot.url), keys=KEYS, wall_clock=trio.current_time,
                              **log.callbacks())
            async with trio.open_nursery() as nursery:
                ports = await nursery.start(gateway.serve)
                stream = await raw_upgrade(ports.ws[0][1])
                await bot.connected.wait()
                nursery.cancel_scope.cancel()
            await stream.aclose()
            with trio.fail_after(10):
                await bot.closed.wait()  # the bot sees its leg end
        gc.collect()
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaked == []
    assert [e[0] for e in log.events] == ["connected", "disconnected"]


async def test_replace_closes_the_predecessor_even_when_the_newcomers_dial_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # SPEC §8: with "replace", the predecessor is closed even if the newcomer's dial fails.
    from support import raw_upgrade_status
    from trio_websocket import serve_websocket

    requests = 0
    bot_closes: list[int] = []

    async def bot(request: Any) -> None:
        nonlocal requests
        requests += 1
        if requests > 1:
            await request.reject(503)
            return
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except ConnectionClosed as exc:
            assert exc.reason is not None
            bot_closes.append(exc.reason.code)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, bot, "127.0.0.1", 0, None)
        config = make_config(f"ws://127.0.0.1:{server.port}/bot")
        async with running(config) as gw:
            with trio.fail_after(BOUND):
                async with open_client(gw.url()) as first:
                    await roundtrip(first)
                    status = await raw_upgrade_status(gw.ws_port, "/ws/generic/a.local")
                    assert status == 502
                    assert await closed_with(first) == (4001, "replaced")
                assert gw.gateway.session_count("a") == 0
        assert requests == 2
        assert bot_closes == [4001]
        nursery.cancel_scope.cancel()
