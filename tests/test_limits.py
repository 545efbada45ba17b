"""Limits that protect the box: /start rate per public key (429 + Retry-After), open
connections per IP and upgrade handshakes in flight, overall and per IP (503 at once).

The token bucket and the connection gate are sans-IO (relay.limits); /start is driven as
an ASGI app on trio's fake clock (the limiter reads trio's clock); the data-plane limits
run on a real gateway on loopback, with clients on distinct loopback source addresses
(127.0.0.1, 127.0.0.2, ...) standing for distinct hosts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
import trio
from support import http, make_config, open_client, read_until, running
from test_control import Harness, assert_error, call
from test_control import make_config as control_config

from relay.config import build_config
from relay.errors import ConfigError
from relay.limits import ConnectionGate, StartRateLimiter, TokenBucket, retry_after

WAIT = 10  # seconds: the bound on every network wait (a refusal is immediate)

UPGRADE = (
    b"GET /ws/generic/a.local HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\n"
    b"connection: Upgrade\r\nsec-websocket-version: 13\r\n"
    b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


# ------------------------------------------------------------------ sans-IO: the bucket


def test_bucket_allows_burst_then_says_how_long_to_wait() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.25) == pytest.approx(0.25)  # refused takes cost nothing
    assert bucket.take(0.5) == 0.0  # one token back after 1/rate
    assert bucket.take(0.5) == pytest.approx(0.5)


def test_bucket_refills_only_up_to_burst() -> None:
    bucket = TokenBucket(rate=100.0, burst=2)
    bucket.take(0.0)
    assert bucket.tokens == 1.0
    assert bucket.take(1000.0) == 0.0
    assert bucket.take(1000.0) == 0.0
    assert bucket.take(1000.0) > 0.0  # an idle hour does not bank more than the burst


def test_bucket_ignores_a_clock_going_backwards() -> None:
    bucket = TokenBucket(rate=1.0, burst=1)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(5.0) == pytest.approx(1.0)  # no refill, no negative time
    assert bucket.take(11.0) == 0.0


@pytest.mark.parametrize("rate, burst", [(0, 1), (-1, 1), (math.inf, 1), (math.nan, 1),
                                         (1, 0), (1, math.inf)])
def test_bucket_refuses_nonsense_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match=r"rate|burst"):
        TokenBucket(rate=rate, burst=burst)


@pytest.mark.parametrize("wait, expected", [(0.001, 1), (0.5, 1), (1.0, 1), (1.0001, 2),
                                            (2.5, 3)])
def test_retry_after_is_whole_seconds_never_early(wait: float, expected: int) -> None:
    assert retry_after(wait) == expected
    assert retry_after(wait) >= wait - 1e-6


def test_limiter_has_one_bucket_per_configured_key_only() -> None:
    limiter = StartRateLimiter(["a", "b"], rate=1.0, burst=1)
    assert limiter.take("a", 0.0) == 0.0
    assert limiter.take("a", 0.0) > 0
    assert limiter.take("b", 0.0) == 0.0  # another key has its own bucket
    for i in range(1000):  # unknown keys never allocate anything
        assert limiter.take(f"x{i}", 0.0) == 0.0
    assert len(limiter._buckets) == 2


# ------------------------------------------------------------------ sans-IO: the gate


def test_gate_counts_connections_and_handshakes_per_ip() -> None:
    gate = ConnectionGate(max_connections_per_ip=3, max_handshakes=3, max_handshakes_per_ip=2)
    assert gate.open("1.1.1.1") is None
    assert gate.open("1.1.1.1") is None
    assert gate.open("1.1.1.1") == "too_many_handshakes_per_ip"  # 2 still handshaking
    assert gate.open("2.2.2.2") is None  # another address is unaffected
    assert gate.open("3.3.3.3") == "too_many_handshakes"  # 3 in flight overall
    gate.handshake_done("1.1.1.1")
    assert gate.open("1.1.1.1") == "too_many_connections_per_ip"  # 4 open from it
    assert gate.handshakes_total == 2
    for ip in ["1.1.1.1"] * 4 + ["2.2.2.2", "3.3.3.3"]:
        gate.close(ip)
    gate.handshake_done("1.1.1.1")
    gate.handshake_done("2.2.2.2")
    assert gate.connections == {} and gate.handshakes == {} and gate.handshakes_total == 0


def test_gate_counts_already_upgraded_connections_with_the_rest() -> None:
    """Gateway.handle's connections: counted per address with the listener's, no handshake."""
    gate = ConnectionGate(max_connections_per_ip=2, max_handshakes=1, max_handshakes_per_ip=1)
    assert gate.open("1.1.1.1") is None  # the listener's, handshaking (the one slot)
    assert gate.open_upgraded("1.1.1.1") is None  # handle's: no handshake slot needed
    assert gate.open_upgraded("1.1.1.1") == "too_many_connections_per_ip"  # 3 open
    assert gate.open_upgraded("2.2.2.2") is None
    assert gate.handshakes_total == 1
    for ip in ["1.1.1.1"] * 3 + ["2.2.2.2"]:
        gate.close(ip)
    gate.handshake_done("1.1.1.1")
    assert gate.connections == {} and gate.handshakes == {} and gate.handshakes_total == 0


def test_gate_refuses_unbalanced_calls() -> None:
    gate = ConnectionGate(max_connections_per_ip=1, max_handshakes=1, max_handshakes_per_ip=1)
    with pytest.raises(ValueError, match="no connection"):
        gate.close("1.1.1.1")
    with pytest.raises(ValueError, match="no handshake"):
        gate.handshake_done("1.1.1.1")


# ------------------------------------------------------------------ config


def test_limit_keys_have_documented_defaults() -> None:
    server = build_config(agents={"a": {"bot": "ws://127.0.0.1:9/"}}).server
    assert (server.start_rate, server.start_burst) == (20.0, 50)
    assert server.max_connections_per_ip == 1000
    assert (server.max_handshakes, server.max_handshakes_per_ip) == (1000, 256)


@pytest.mark.parametrize("key, value, problem", [
    ("start_rate", 0, "positive, finite number per second"),
    ("start_rate", -1.5, "positive, finite number per second"),
    ("start_rate", math.inf, "positive, finite number per second"),
    ("start_rate", "fast", "must be a number per second"),
    ("start_burst", 0, "positive integer"),
    ("start_burst", 2.5, "positive integer"),
    ("max_connections_per_ip", 0, "positive integer"),
    ("max_handshakes", -1, "positive integer"),
    ("max_handshakes_per_ip", True, "positive integer"),
])
def test_bad_limit_values_name_the_key(key: str, value: object, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(server={key: value}, agents={"a": {"bot": "ws://127.0.0.1:9/"}})
    assert info.value.key == f"server.{key}"
    assert problem in str(info.value)


# ------------------------------------------------------------------ /start rate limit


async def test_start_over_rate_is_429_with_retry_after_then_works_again(
        autojump_clock: trio.testing.MockClock) -> None:
    h = Harness(control_config(start_rate=2, start_burst=3))
    for _ in range(3):
        assert (await call(h.app)).status == 200
    limited = await call(h.app)
    assert_error(limited, 429, "rate_limited")
    assert limited.headers["retry-after"] == "1"
    assert limited.delivered == 0  # refused before its body was read
    assert "2 times per second" in limited.json()["detail"]
    await trio.sleep(int(limited.headers["retry-after"]))
    # After Retry-After seconds the key works again: 2 tokens back at 2/s, not the burst.
    assert (await call(h.app)).status == 200
    assert (await call(h.app)).status == 200
    assert_error(await call(h.app), 429, "rate_limited")
    text = h.metrics.render()[0].decode()
    assert "relay_start_rate_limited_total 2.0" in text
    assert 'relay_start_requests_total{status="429"} 2.0' in text


async def test_rate_is_per_public_key(autojump_clock: trio.testing.MockClock) -> None:
    h = Harness(control_config(start_rate=1, start_burst=1))
    assert (await call(h.app)).status == 200
    assert_error(await call(h.app), 429, "rate_limited")
    other = (b"authorization", b"Bearer pk_other")
    assert (await call(h.app, headers=[other])).status == 200  # its own bucket


async def test_unknown_keys_are_401_and_spend_no_ones_bucket(
        autojump_clock: trio.testing.MockClock) -> None:
    h = Harness(control_config(start_rate=1, start_burst=1))
    for _ in range(20):
        assert_error(await call(h.app, headers=[(b"authorization", b"Bearer pk_test_")]),
                     401, "unauthorized")
    assert (await call(h.app)).status == 200


async def test_every_request_of_a_key_counts_whatever_it_asks(
        autojump_clock: trio.testing.MockClock) -> None:
    """A key flooding an unknown agent or bad JSON is limited too: the bucket is spent
    before any other check, so probing costs the prober and nothing else."""
    h = Harness(control_config(start_rate=1, start_burst=2))
    assert_error(await call(h.app, path="/v1/public/nope/start"), 404, "agent_not_found")
    assert_error(await call(h.app, chunks=[b"{"]), 400, "invalid_json")
    assert_error(await call(h.app), 429, "rate_limited")
    await trio.sleep(1)
    assert (await call(h.app)).status == 200


async def test_429_over_http_carries_retry_after_and_the_envelope() -> None:
    config = make_config(server={"public_keys": ["pk_a"], "start_rate": 0.01,
                                 "start_burst": 1}, websocket_auth="token")
    auth = [("authorization", "Bearer pk_a"), ("content-type", "application/json")]
    async with running(config) as gw:
        with trio.fail_after(WAIT):
            first = await http("127.0.0.1", gw.api_port, "POST", "/v1/public/a/start", auth,
                               b'{"transport": "websocket"}')
            second = await http("127.0.0.1", gw.api_port, "POST", "/v1/public/a/start", auth,
                                b'{"transport": "websocket"}')
    assert first[0] == 200
    status, headers, body = second
    assert status == 429
    assert headers["retry-after"] == "100"
    assert json.loads(body)["code"] == "rate_limited"
    assert set(json.loads(body)) == {"error", "code", "detail"}


# ------------------------------------------------------------------ data plane


async def _connect_from(source: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def _upgrade_from(source: str, port: int) -> tuple[int, bytes]:
    """One upgrade request from ``source``: the status and the body of the answer."""
    async with await _connect_from(source, port) as stream:
        await stream.send_all(UPGRADE)
        data = await read_until(stream, b"\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(body) < length:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                body += chunk
        return status, head + b"\r\n\r\n" + body


def _envelope(answer: bytes) -> dict[str, str]:
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert isinstance(body, dict), body
    assert set(body) == {"error", "code", "detail"}
    return body


async def _wait_for(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.lowlevel.checkpoint()


async def test_connections_per_ip_over_the_limit_get_503_others_unaffected() -> None:
    config = make_config(server={"max_connections_per_ip": 2}, max_clients=10)
    async with running(config) as gw:
        gate = gw.gateway.rt.gate
        with trio.fail_after(WAIT):
            held = [await _connect_from("127.0.0.1", gw.ws_port) for _ in range(2)]
            await _wait_for(lambda: gate.connections.get("127.0.0.1") == 2)
            status, answer = await _upgrade_from("127.0.0.1", gw.ws_port)
            assert status == 503
            assert _envelope(answer)["code"] == "too_many_connections_per_ip"
            assert (await _upgrade_from("127.0.0.2", gw.ws_port))[0] == 101
            await held.pop().aclose()
            await _wait_for(lambda: gate.connections.get("127.0.0.1") == 1)
            assert (await _upgrade_from("127.0.0.1", gw.ws_port))[0] == 101
            for stream in held:
                await stream.aclose()
        text = gw.gateway.metrics.render()[0].decode()
        assert 'relay_connections_refused_total{reason="too_many_connections_per_ip"} 1.0' in text


async def test_idle_sockets_of_one_ip_take_only_its_handshake_slots() -> None:
    """The attack of the issue: one host opening sockets and sending nothing. Beyond
    max_handshakes_per_ip it gets 503 at once; another host still connects, and a session
    already relaying keeps relaying."""
    config = make_config(server={"max_handshakes_per_ip": 3}, max_clients=10)
    async with running(config) as gw:
        gate = gw.gateway.rt.gate
        with trio.fail_after(WAIT):
            async with open_client(gw.url()) as session:
                idle = [await _connect_from("127.0.0.1", gw.ws_port) for _ in range(3)]
                await _wait_for(lambda: gate.handshakes.get("127.0.0.1") == 3)
                status, answer = await _upgrade_from("127.0.0.1", gw.ws_port)
                assert status == 503
                assert _envelope(answer)["code"] == "too_many_handshakes_per_ip"
                assert b"\r\nretry-after: 1\r\n" in answer.lower()
                assert (await _upgrade_from("127.0.0.2", gw.ws_port))[0] == 101
                await session.send_message("still here")
                assert await session.get_message() == "still here"
                # A completed request frees its slot (the session above holds none).
                await idle[0].send_all(UPGRADE)
                await _wait_for(lambda: gate.handshakes.get("127.0.0.1") == 2)
                assert (await _upgrade_from("127.0.0.1", gw.ws_port))[0] == 101
                for stream in idle:
                    await stream.aclose()
        text = gw.gateway.metrics.render()[0].decode()
        assert 'relay_connections_refused_total{reason="too_many_handshakes_per_ip"} 1.0' in text
        assert "relay_handshakes_in_flight 0.0" in text


async def test_handshakes_overall_over_the_limit_get_503_and_recover() -> None:
    config = make_config(server={"max_handshakes": 2}, max_clients=10)
    async with running(config) as gw:
        gate = gw.gateway.rt.gate
        with trio.fail_after(WAIT):
            idle = [await _connect_from(f"127.0.0.{i}", gw.ws_port) for i in (2, 3)]
            await _wait_for(lambda: gate.handshakes_total == 2)
            assert "relay_handshakes_in_flight 2.0" in gw.gateway.metrics.render()[0].decode()
            status, answer = await _upgrade_from("127.0.0.4", gw.ws_port)
            assert status == 503
            assert _envelope(answer)["code"] == "too_many_handshakes"
            for stream in idle:
                await stream.aclose()
            await _wait_for(lambda: gate.handshakes_total == 0)
            assert (await _upgrade_from("127.0.0.4", gw.ws_port))[0] == 101
            await _wait_for(lambda: not gate.connections)
        text = gw.gateway.metrics.render()[0].decode()
        assert 'relay_connections_refused_total{reason="too_many_handshakes"} 1.0' in text


async def test_a_silent_socket_frees_its_handshake_slot_at_handshake_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    """Holding a slot costs the holder: after handshake_timeout the gateway answers 408,
    closes, and the slot is free again (fake clock: no real waiting)."""
    config = make_config(server={"max_handshakes_per_ip": 1, "handshake_timeout": 5})
    async with running(config) as gw:
        gate = gw.gateway.rt.gate
        with trio.fail_after(60):
            silent = await _connect_from("127.0.0.1", gw.ws_port)
            await _wait_for(lambda: gate.handshakes_total == 1)
            assert (await silent.receive_some(4096)).startswith(b"HTTP/1.1 408 ")
            await silent.aclose()
            await _wait_for(lambda: gate.handshakes_total == 0)
            assert (await _upgrade_from("127.0.0.1", gw.ws_port))[0] == 101


async def test_the_global_connection_limit_is_counted_too() -> None:
    config = make_config(server={"max_connections": 1})
    async with running(config) as gw:
        with trio.fail_after(WAIT):
            idle = await _connect_from("127.0.0.1", gw.ws_port)
            await _wait_for(lambda: gw.gateway.rt.open_connections == 1)
            status, answer = await _upgrade_from("127.0.0.2", gw.ws_port)
            await idle.aclose()
    assert status == 503 and _envelope(answer)["code"] == "too_many_connections"
    text = gw.gateway.metrics.render()[0].decode()
    assert 'relay_connections_refused_total{reason="too_many_connections"} 1.0' in text
