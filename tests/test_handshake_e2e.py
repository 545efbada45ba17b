"""Bad upgrade requests at the data plane, over a raw TCP socket.

Each test writes bytes to the gateway's WebSocket port with `trio.open_tcp_stream` and
reads the whole answer. For every refusal we pin: the exact status, the JSON envelope
`{"error", "code", "detail"}` as the body (Content-Length exact, nothing after it: no 101,
no close frame), the connection closed by the gateway afterwards, no bot dialled, nothing
left in the gateway's books, and the gateway still serving a normal client (a trio-websocket
round trip to the in-process echo agent).

Rules for these tests (after trio-websocket's): loopback port 0 only; every wait bounded
by `trio.fail_after`; time-dependent cases (the 408) run on `autojump_clock` and assert the
exact virtual time.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing
from support import KEYS, BotServer, Running, bot_server, open_client, read_until

from relay.config import Config, build_config
from relay.gateway import Gateway

HANDSHAKE_TIMEOUT = 7.0  # seconds: distinct from every other timeout in play
WAIT = 5  # seconds: bound on every read in the tests that do not advance the clock
KEY = base64.b64encode(b"0123456789abcdef").decode()


def e2e_config(bot_url: str) -> Config:
    return build_config(
        server={"ws_bind": ["127.0.0.1:0"], "api_bind": ["127.0.0.1:0"],
                "ping_interval": 1000, "ping_timeout": 1000,
                "handshake_timeout": HANDSHAKE_TIMEOUT},
        agents={"echo": {"bot": "python:relay.echo:echo_bot"},
                "up": {"bot": bot_url}},
    )


@attrs.define
class Env:
    gw: Running
    bot: BotServer


@asynccontextmanager
async def gateway_and_bot() -> AsyncIterator[Env]:
    async with bot_server() as bot:
        gateway = Gateway(e2e_config(bot.url), keys=KEYS, wall_clock=trio.current_time)
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(gateway.serve)
            try:
                yield Env(Running(gateway, ports), bot)
            finally:
                # Also after a failed assertion: cancelling a live session from outside
                # would leak its bot socket (see test_lifecycle.py).
                with trio.CancelScope(shield=True):
                    await gateway.shutdown()
                nursery.cancel_scope.cancel()


@attrs.frozen
class Answer:
    raw: bytes
    reset: bool  # the gateway reset the connection instead of closing it cleanly


@attrs.frozen
class Response:
    status: int
    reason: bytes
    headers: dict[bytes, bytes]
    body: bytes


async def read_to_eof(stream: trio.SocketStream) -> Answer:
    chunks: list[bytes] = []
    while True:
        try:
            data = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            return Answer(b"".join(chunks), reset=True)
        if not data:
            return Answer(b"".join(chunks), reset=False)
        chunks.append(data)
        so_far = b"".join(chunks)
        if so_far.startswith(b"HTTP/1.1 101 ") and b"\r\n\r\n" in so_far:
            return Answer(so_far, reset=False)  # upgraded: the gateway will not close


async def exchange(port: int, request: bytes, *, bound: float = WAIT) -> Answer:
    """Write request, then read until the gateway closes the connection."""
    with trio.fail_after(bound):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            if request:
                await stream.send_all(request)
            return await read_to_eof(stream)


def parse_response(answer: Answer) -> Response:
    """One complete HTTP/1.1 response and nothing after it."""
    assert not answer.reset, f"connection reset; got {answer.raw!r}"
    head, sep, body = answer.raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head: {answer.raw!r}"
    status_line, *lines = head.split(b"\r\n")
    version, status, reason = status_line.split(b" ", 2)
    assert version == b"HTTP/1.1"
    headers: dict[bytes, bytes] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        name = name.lower()
        # A repeated header is one comma-separated list (RFC 9110 §5.3), except these.
        assert name not in headers or name not in (b"content-length", b"content-type")
        headers[name] = headers[name] + b", " + value.strip() if name in headers \
            else value.strip()
    # The body is exactly Content-Length bytes: no close frame, no second response.
    assert int(headers[b"content-length"]) == len(body), answer.raw
    return Response(int(status), reason, headers, body)


def assert_refused(answer: Answer, status: int, code: str) -> Response:
    response = parse_response(answer)
    assert response.status == status, answer.raw
    assert response.status != 101
    assert b"sec-websocket-accept" not in response.headers
    assert response.headers[b"content-type"] == b"application/json"
    connection = response.headers.get(b"connection", b"").lower()
    assert b"close" in [t.strip() for t in connection.split(b",")], connection
    envelope = json.loads(response.body)
    assert set(envelope) == {"error", "code", "detail"}, envelope
    assert envelope["code"] == code, envelope
    assert isinstance(envelope["error"], str) and envelope["error"]
    assert isinstance(envelope["detail"], str) and envelope["detail"]
    return response


async def assert_still_serving(env: Env) -> None:
    """Nothing of the refused connection is left, and a normal client is served."""
    await trio.testing.wait_all_tasks_blocked()
    assert not env.gw.gateway.connections
    assert env.gw.gateway.session_count() == 0
    assert env.gw.gateway.rt.open_connections == 0
    with trio.fail_after(WAIT):
        async with open_client(env.gw.url("echo")) as ws:
            await ws.send_message("still here")
            assert await ws.get_message() == "still here"
    # A refused upgrade never dials the bot.
    assert env.bot.requests == []


def upgrade(target: str = "/ws/generic/up.local", *, method: str = "GET",
            version: str = "HTTP/1.1", drop: tuple[str, ...] = (),
            extra: tuple[str, ...] = (), **override: str) -> bytes:
    """A WebSocket upgrade request; drop or override headers by lower-case name."""
    headers = {
        "host": "127.0.0.1",
        "upgrade": "websocket",
        "connection": "Upgrade",
        "sec-websocket-version": "13",
        "sec-websocket-key": KEY,
    }
    headers.update({k.replace("_", "-"): v for k, v in override.items()})
    lines = [f"{method} {target} {version}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k not in drop]
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --------------------------------------------------------------------------------------
# The cases: (request bytes, status, code)
# --------------------------------------------------------------------------------------

REFUSALS = {
    "garbage bytes": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
                      400, "bad_request"),
    "not an http request line": (b"HELLO\r\n\r\n", 400, "bad_request"),
    "non-GET": (upgrade(method="POST", content_length="0"), 405, "method_not_allowed"),
    "HTTP/1.0": (upgrade(version="HTTP/1.0"), 400, "bad_http_version"),
    "missing Upgrade": (upgrade(drop=("upgrade",)), 426, "not_websocket"),
    "missing Connection: Upgrade": (upgrade(connection="keep-alive"), 400,
                                    "bad_connection_header"),
    "wrong version": (upgrade(sec_websocket_version="8"), 426, "bad_websocket_version"),
    "missing version": (upgrade(drop=("sec-websocket-version",)), 426,
                        "bad_websocket_version"),
    "bad key (not base64)": (upgrade(sec_websocket_key="not base64!"), 400,
                             "bad_websocket_key"),
    "bad key (15 bytes)": (upgrade(sec_websocket_key=base64.b64encode(b"x" * 15).decode()),
                           400, "bad_websocket_key"),
    "missing key": (upgrade(drop=("sec-websocket-key",)), 400, "bad_websocket_key"),
    "unknown path": (upgrade("/ws/other/up.local"), 404, "unknown_path"),
    "root path": (upgrade("/"), 404, "unknown_path"),
    "unknown agent": (upgrade("/ws/generic/nobody.local"), 404, "unknown_service_host"),
    "other org": (upgrade("/ws/generic/up.elsewhere"), 404, "unknown_service_host"),
    "service host with two dots": (upgrade("/ws/generic/up.local.x"), 404,
                                   "unknown_service_host"),
    "agent name of 65 chars": (upgrade("/ws/generic/" + "a" * 65 + ".local"), 404,
                               "unknown_service_host"),
    "serviceHost of another org": (upgrade("/ws/generic?serviceHost=up.elsewhere"), 404,
                                   "unknown_service_host"),
    "fragment after the query": (upgrade("/ws/generic/up.local?x=1#body=e30"), 400,
                                 "bad_target"),
    "fragment after the path": (upgrade("/ws/generic/up.local#x"), 400, "bad_target"),
    "request with a body": (upgrade(content_length="5") + b"hello", 400,
                            "unexpected_body"),
    "request with a chunked body": (upgrade(transfer_encoding="chunked")
                                    + b"5\r\nhello\r\n0\r\n\r\n", 400, "unexpected_body"),
}


@pytest.mark.parametrize(("request_bytes", "status", "code"), list(REFUSALS.values()),
                         ids=list(REFUSALS))
async def test_bad_upgrade_is_refused_with_status_and_envelope(
    request_bytes: bytes, status: int, code: str
) -> None:
    async with gateway_and_bot() as env:
        answer = await exchange(env.gw.ws_port, request_bytes)
        response = assert_refused(answer, status, code)
        if status == 405:
            assert response.headers[b"allow"] == b"GET"
        if code == "not_websocket":
            assert response.headers[b"upgrade"] == b"websocket"
        if code == "bad_websocket_version":
            assert response.headers[b"sec-websocket-version"] == b"13"
        await assert_still_serving(env)


async def test_oversized_header_block_is_431() -> None:
    async with gateway_and_bot() as env:
        request = upgrade(extra=(f"x-filler: {'a' * 64 * 1024}",))
        answer = await exchange(env.gw.ws_port, request)
        assert_refused(attrs.evolve(answer, reset=False), 431, "headers_too_large")
        await assert_still_serving(env)


@pytest.mark.parametrize("size", [16385, 17 * 1024, 19 * 1024])
async def test_header_block_over_16_kib_sent_at_once_is_431(size: int) -> None:
    async with gateway_and_bot() as env:
        request = upgrade(extra=(f"x-filler: {'a' * size}",))
        assert len(request) > 16 * 1024
        answer = await exchange(env.gw.ws_port, request)
        assert_refused(attrs.evolve(answer, reset=False), 431, "headers_too_large")
        await assert_still_serving(env)


async def test_oversized_refusal_ends_with_a_clean_close_not_a_reset() -> None:
    async with gateway_and_bot() as env:
        request = upgrade(extra=(f"x-filler: {'a' * 64 * 1024}",))
        answer = await exchange(env.gw.ws_port, request)
        assert not answer.reset
        assert_refused(answer, 431, "headers_too_large")


async def test_oversized_header_block_sent_slowly_is_431() -> None:
    """The limit holds however the head is split across reads."""
    async with gateway_and_bot() as env:
        with trio.fail_after(WAIT):
            stream = await trio.open_tcp_stream("127.0.0.1", env.gw.ws_port)
            async with stream:
                await stream.send_all(b"GET /ws/generic/up.local HTTP/1.1\r\n")
                line = b"x-filler: " + b"a" * 1000 + b"\r\n"
                try:
                    for _ in range(17):  # 17 KiB of headers, a line at a time
                        await stream.send_all(line)
                        await trio.testing.wait_all_tasks_blocked()
                except trio.BrokenResourceError:
                    pass  # the gateway may refuse (and stop reading) before we finish
                answer = await read_to_eof(stream)
        assert_refused(answer, 431, "headers_too_large")
        await assert_still_serving(env)


async def test_header_block_just_under_the_limit_is_served() -> None:
    async with gateway_and_bot() as env:
        with trio.fail_after(WAIT):
            headers = [("x-filler", "a" * 14000)]
            async with open_client(env.gw.url("echo"), extra_headers=[
                    (k.encode(), v.encode()) for k, v in headers]) as ws:
                await ws.send_message("ok")
                assert await ws.get_message() == "ok"


async def test_half_request_then_stall_is_408_after_handshake_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with gateway_and_bot() as env:
        with trio.fail_after(HANDSHAKE_TIMEOUT + 5):
            stream = await trio.open_tcp_stream("127.0.0.1", env.gw.ws_port)
            t0 = trio.current_time()
            async with stream:
                await stream.send_all(upgrade()[:40])  # the request line and a bit more
                answer = await read_to_eof(stream)
        assert trio.current_time() == t0 + HANDSHAKE_TIMEOUT
        assert_refused(answer, 408, "handshake_timeout")
        await assert_still_serving(env)


async def test_silent_client_is_408_after_handshake_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with gateway_and_bot() as env:
        with trio.fail_after(HANDSHAKE_TIMEOUT + 5):
            stream = await trio.open_tcp_stream("127.0.0.1", env.gw.ws_port)
            t0 = trio.current_time()
            async with stream:
                answer = await read_to_eof(stream)
        assert trio.current_time() == t0 + HANDSHAKE_TIMEOUT
        assert_refused(answer, 408, "handshake_timeout")
        await assert_still_serving(env)


async def test_slow_but_steady_request_still_times_out_as_a_whole(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """handshake_timeout bounds the whole head, not each read (slowloris)."""
    async with gateway_and_bot() as env:
        request = upgrade()
        with trio.fail_after(HANDSHAKE_TIMEOUT + 5):
            stream = await trio.open_tcp_stream("127.0.0.1", env.gw.ws_port)
            t0 = trio.current_time()
            async with stream:
                for i in range(len(request) - 1):
                    if trio.current_time() >= t0 + HANDSHAKE_TIMEOUT:
                        break
                    try:
                        await stream.send_all(request[i:i + 1])
                    except trio.BrokenResourceError:
                        break
                    await trio.sleep(1)  # virtual: one byte a second
                answer = await read_to_eof(stream)
        assert trio.current_time() == t0 + HANDSHAKE_TIMEOUT
        assert_refused(answer, 408, "handshake_timeout")
        await assert_still_serving(env)


async def test_client_that_connects_and_closes_gets_nothing_and_is_forgotten() -> None:
    async with gateway_and_bot() as env:
        with trio.fail_after(WAIT):
            stream = await trio.open_tcp_stream("127.0.0.1", env.gw.ws_port)
            await stream.aclose()
        await assert_still_serving(env)


async def test_client_that_half_closes_without_a_request_gets_no_response() -> None:
    async with gateway_and_bot() as env:
        with trio.fail_after(WAIT):
            stream = await trio.open_tcp_stream("127.0.0.1", env.gw.ws_port)
            async with stream:
                await stream.send_eof()
                answer = await read_to_eof(stream)
        assert answer == Answer(b"", reset=False)
        await assert_still_serving(env)


async def test_client_that_sends_half_a_request_and_closes_is_forgotten() -> None:
    async with gateway_and_bot() as env:
        with trio.fail_after(WAIT):
            stream = await trio.open_tcp_stream("127.0.0.1", env.gw.ws_port)
            async with stream:
                await stream.send_all(upgrade()[:30])
                await stream.send_eof()
                answer = await read_to_eof(stream)
        # The truncated request is answered 400 (the client still reads): never a 101,
        # never a hang.
        assert_refused(answer, 400, "bad_request")
        await assert_still_serving(env)


async def test_many_refusals_in_a_row_leave_nothing_behind() -> None:
    async with gateway_and_bot() as env:
        for request_bytes, status, code in REFUSALS.values():
            assert_refused(await exchange(env.gw.ws_port, request_bytes), status, code)
        await assert_still_serving(env)


async def test_valid_upgrade_over_raw_socket_gets_101_from_the_bot() -> None:
    """The control case: the same helper, a good request, a 101 carrying our accept key."""
    async with gateway_and_bot() as env:
        with trio.fail_after(WAIT):
            stream = await trio.open_tcp_stream("127.0.0.1", env.gw.ws_port)
            async with stream:
                await stream.send_all(upgrade())
                data = await read_until(stream, b"\r\n\r\n")
        head = data.partition(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 101 ")
        assert b"sec-websocket-accept: " in head
        assert len(env.bot.requests) == 1


async def test_connections_over_max_connections_get_503_and_the_server_recovers() -> None:
    from support import make_config, raw_upgrade_status, running

    config = make_config(server={"max_connections": 1})
    async with running(config) as gw:
        with trio.fail_after(10):
            idle = await trio.open_tcp_stream("127.0.0.1", gw.ws_port)  # holds the one slot
            while gw.gateway.rt.open_connections < 1:
                await trio.lowlevel.checkpoint()
            assert await raw_upgrade_status(gw.ws_port, "/ws/generic/a.local") == 503
            await idle.aclose()
            while gw.gateway.rt.open_connections:
                await trio.lowlevel.checkpoint()
            assert await raw_upgrade_status(gw.ws_port, "/ws/generic/a.local") == 101


async def test_plain_get_is_426_with_one_consistent_connection_header() -> None:
    """A browser's plain GET to a WebSocket path: 426 naming the Upgrade it needs, and one
    Connection header saying both that Upgrade is hop-by-hop and that we close."""
    async with gateway_and_bot() as env:
        request = b"GET /ws/generic/up.local HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"
        answer = await exchange(env.gw.ws_port, request)
        assert_refused(answer, 426, "not_websocket")
        head = answer.raw.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]
        connection = [line.partition(b":")[2] for line in head
                      if line.lower().startswith(b"connection:")]
        assert len(connection) == 1, head
        assert {t.strip().lower() for t in connection[0].split(b",")} == {b"upgrade", b"close"}
        assert [line for line in head if line.lower().startswith(b"upgrade:")] == [
            b"upgrade: websocket"]
        await assert_still_serving(env)
