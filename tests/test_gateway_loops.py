"""The gateway's own background work on relay's listener: metrics flushes, the store purge,
and the refusal of connections that start while it shuts down.

None of these has a client-visible event of its own, so each test drives the fake clock
past the loop's interval and looks at what an operator sees (/metrics samples, the store's
size) or at what a client is answered.
"""

from __future__ import annotations

import json
import socket

import pytest
import trio
import trio.testing
from support import KEYS, bot_server, make_config, open_client, running

from relay.connection import ClientConnection
from relay.gateway import METRICS_INTERVAL, PURGE_INTERVAL, Gateway
from relay.store import MemoryStore
from relay.wire import SocketConn

WAIT = 10  # seconds: the bound on a wait that involves only loopback I/O


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """Jump only after 50 ms of real idleness: bytes may still be in flight on loopback."""
    return trio.testing.MockClock(autojump_threshold=0.05)


@pytest.fixture
def idle_clock() -> trio.testing.MockClock:
    """Jump at once: for tests with no bytes in flight while time passes."""
    return trio.testing.MockClock(autojump_threshold=0)


def relayed(gateway: Gateway, direction: str) -> tuple[float, float]:
    """(messages, bytes) relayed in one direction, as /metrics shows them."""
    registry = gateway.metrics.registry
    labels = {"direction": direction}
    return (registry.get_sample_value("relay_messages_relayed_total", labels) or 0.0,
            registry.get_sample_value("relay_bytes_relayed_total", labels) or 0.0)


async def test_relayed_counts_reach_metrics_while_the_session_lasts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with bot_server() as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT + METRICS_INTERVAL):
            async with open_client(gw.url()) as ws:
                for _ in range(3):
                    await ws.send_message("abc")
                    assert await ws.get_message() == "abc"
                await trio.sleep(METRICS_INTERVAL + 0.1)
                during = relayed(gw.gateway, "client_to_bot"), relayed(gw.gateway,
                                                                       "bot_to_client")
                assert gw.gateway.session_count() == 1  # still open
    (c_msgs, c_bytes), (b_msgs, b_bytes) = during
    assert (c_msgs, b_msgs) == (3, 3)
    assert c_bytes >= 9 and b_bytes >= 9  # at least the payloads


async def test_relayed_counts_reach_metrics_when_the_session_ends() -> None:
    ended = trio.Event()
    async with bot_server() as bot, running(make_config(bot.url),
                                            on_client_disconnected=lambda _: ended.set()) as gw:
        with trio.fail_after(WAIT):
            async with open_client(gw.url()) as ws:
                for message in ("a", b"bc", "def"):
                    await ws.send_message(message)
                    assert await ws.get_message() == message
                await ws.aclose(1000)
            await ended.wait()
        assert relayed(gw.gateway, "client_to_bot")[0] == 3
        assert relayed(gw.gateway, "bot_to_client")[0] == 3


async def test_expired_tokens_and_bodies_are_swept_without_any_traffic(
    idle_clock: trio.testing.MockClock,
) -> None:
    async with running(make_config()) as gw:
        store = gw.gateway.rt.store
        assert isinstance(store, MemoryStore)  # no store configured: the in-memory one
        now = trio.current_time()  # the gateway's wall clock in these tests
        await store.put_session("pending", b'{"held":1}', now + 300)
        await store.put_session("used", None, now + 300)
        assert (await store.consume("used", now)).ok
        assert (store.entry_count, store.consumed_count) == (1, 1)
        await trio.sleep(300 + PURGE_INTERVAL)  # nobody calls the store meanwhile
        assert (store.entry_count, store.consumed_count, store.body_bytes) == (0, 0, 0)


async def test_connection_that_starts_while_shutting_down_is_refused_503(
    idle_clock: trio.testing.MockClock,
) -> None:
    """A connection accepted in the same batch as shutdown() began (its handler starts
    after the flag is set) is answered 503 at once; it never reaches a bot."""
    gateway = Gateway(make_config(), keys=KEYS, wall_clock=trio.current_time)
    await gateway.shutdown()  # not serving: only the flag and the bounded wait
    ours, theirs = socket.socketpair()
    client = trio.SocketStream(trio.socket.from_stdlib_socket(theirs))
    async with client:
        with trio.fail_after(WAIT):
            await client.send_all(
                b"GET /ws/generic/a.local HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n"
                b"connection: Upgrade\r\nsec-websocket-version: 13\r\n"
                b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
            await ClientConnection(gateway.rt, SocketConn(ours)).serve()
            answer = b""
            while chunk := await client.receive_some(65536):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert json.loads(body)["code"] == "shutting_down"
    assert gateway.session_count() == 0
