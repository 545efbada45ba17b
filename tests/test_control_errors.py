"""Answers hypercorn writes itself on relay's control plane carry the JSON envelope.

SPEC rev 2: no input makes /start answer without the envelope. Requests that never reach
the app (not HTTP/1.1, a head over 16 KiB) used to get hypercorn's bare answer with an
empty body; a WebSocket handshake on the API port got a bare 403. Each is sent here as raw
bytes to `serve_control` on loopback: the status, the envelope, and the server still
serving. Another hypercorn server in the same process keeps hypercorn's own answers.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, cast

import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from support import http
from test_control import Harness, make_config

from relay import control_errors
from relay.control_server import serve_control

WAIT = 10.0  # seconds: a bound, never waited out when things work


@asynccontextmanager
async def control_port() -> AsyncIterator[int]:
    h = Harness(make_config())
    with trio.fail_after(WAIT * 3):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve_control, h.app, h.config)
            yield bound[0][1]
            nursery.cancel_scope.cancel()


async def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes: status, headers, body."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        with trio.fail_after(WAIT):
            await stream.send_all(request)
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def assert_envelope(status: int, headers: dict[str, str], body: bytes, want_status: int,
                    want_code: str) -> None:
    assert status == want_status, (status, body)
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    answer = json.loads(body)
    assert set(answer) == {"error", "code", "detail"}
    assert answer["code"] == want_code
    assert answer["error"] and answer["detail"]


BAD_REQUESTS = [
    pytest.param(b"GARBAGE\r\n\r\n", id="no-request-line"),
    pytest.param(b"POST /v1/public/tok/start HTTP/1.1\r\nhost x\r\n\r\n", id="header-no-colon"),
    pytest.param(b"POST /v1/public/tok/start HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n"
                 b"content-length: 2\r\n\r\n", id="two-lengths"),
    pytest.param(b"POST /v1/public/tok/start HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n",
                 id="negative-length"),
    pytest.param(b"POST /v1/public/tok/start HTTP/1.1\r\nho\x00st: x\r\n\r\n", id="nul"),
]


@pytest.mark.parametrize("request_bytes", BAD_REQUESTS)
async def test_a_request_that_is_not_http_gets_400_with_the_envelope(
        request_bytes: bytes) -> None:
    async with control_port() as port:
        status, headers, body = await exchange(port, request_bytes)
        assert_envelope(status, headers, body, 400, "bad_request")
        assert headers["connection"] == "close"
        # the server is unharmed: the next client is served
        assert (await http("127.0.0.1", port, "GET", "/health"))[0] == 200


async def test_a_transfer_coding_it_cannot_read_gets_501_with_the_envelope() -> None:
    async with control_port() as port:
        status, headers, body = await exchange(
            port, b"POST /v1/public/tok/start HTTP/1.1\r\nhost: x\r\n"
                  b"transfer-encoding: gzip\r\n\r\n")
        assert_envelope(status, headers, body, 501, "not_implemented")
        assert (await http("127.0.0.1", port, "GET", "/health"))[0] == 200


async def test_a_head_over_16_kib_gets_431_with_the_envelope() -> None:
    # Still incomplete past the bound: hypercorn's h11 bounds a head it is still reading
    # (a whole head that arrives in one read goes on to the app).
    async with control_port() as port:
        request = (b"POST /v1/public/tok/start HTTP/1.1\r\nhost: x\r\nx-pad: "
                   + b"a" * (control_errors.MAX_HEAD + 1))
        status, headers, body = await exchange(port, request)
        assert_envelope(status, headers, body, 431, "headers_too_large")
        assert str(control_errors.MAX_HEAD) in json.loads(body)["detail"]
        assert (await http("127.0.0.1", port, "GET", "/health"))[0] == 200


async def test_a_websocket_handshake_on_the_api_port_gets_404_with_the_envelope() -> None:
    async with control_port() as port:
        status, headers, body = await exchange(
            port, b"GET /v1/public/tok/start HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n"
                  b"connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  b"sec-websocket-version: 13\r\n\r\n")
        assert_envelope(status, headers, body, 404, "not_found")
        assert "ws_bind" in json.loads(body)["detail"]


async def test_every_status_has_a_whole_envelope() -> None:
    for status in (400, 404, 408, 413, 414, 431, 500, 501, 505, 418):
        answer = json.loads(control_errors.envelope(status))
        assert set(answer) == {"error", "code", "detail"}
        assert all(isinstance(v, str) and v for v in answer.values())
    await trio.lowlevel.checkpoint()


async def test_another_hypercorn_server_in_the_process_keeps_its_own_answers() -> None:
    # An embedding app's own hypercorn (a plain Config) is not ours to change.
    control_errors.install()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"theirs"})

    config = HypercornConfig()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    port = sock.getsockname()[1]
    with trio.fail_after(WAIT * 3):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(
                worker_serve, wrap_app(cast(Any, app), config.wsgi_max_body_size, "asgi"),
                config, sockets=Sockets(secure_sockets=[], insecure_sockets=[sock],
                                        quic_sockets=[])))
            status, headers, body = await exchange(port, b"GARBAGE\r\n\r\n")
            assert status == 400 and body == b"" and "content-type" not in headers
            nursery.cancel_scope.cancel()
    sock.close()
