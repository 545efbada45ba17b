"""Fuzz targets for the parsers that face the internet, shared by the test suite
(hypothesis, bounded) and `scripts/fuzz` (atheris when installed, else hypothesis).

Each target takes arbitrary bytes and raises AssertionError (or any other exception) only
when relay misbehaves:

- ``scanner_target``: the frame scanner, client and bot side: any split of the stream
  into reads gives the same result as the whole, and it agrees with wsproto
  (tests/test_frames_differential.py);
- ``upgrade_target``: a real `ClientConnection` (h11 request parsing, the handshake
  decision, token check, admission, the in-process echo bot) over an in-memory stream on
  trio's fake clock: whatever the bytes and however they are split, the answer is a 101
  or an HTTP error with the JSON envelope, the connection ends, and no session, handshake
  slot or connection count is left behind;
- ``start_body_target``: /start's body parser: a 400 with the envelope, or a request
  whose body can be passed on as JSON.
"""

from __future__ import annotations

import json
from typing import Any

import trio
import trio.testing
from test_frames_chunking import chunked, walk
from test_frames_differential import check_against_wsproto

from relay.config import Config, build_config
from relay.connection import ClientConnection
from relay.control import _json, _parse_request, _Refuse
from relay.frames import MAX_FRAME_PAYLOAD, FrameScanner
from relay.gateway import Gateway
from relay.tokens import KeyRing
from relay.wire import StreamConn

KEYS = KeyRing.parse("k1:fuzz-secret-0123456789abcdef0123")
UPGRADE_STATUSES = {101, 400, 403, 404, 405, 408, 426, 431, 501, 503, 505}


def scanner_target(data: bytes) -> None:
    if not data:
        return
    masked = bool(data[0] & 1)
    cuts = [b * (i + 1) for i, b in enumerate(data[1:4])]
    stream = data[4:]
    whole = walk(FrameScanner(masked=masked, max_message_size=MAX_FRAME_PAYLOAD), [stream])
    split = walk(FrameScanner(masked=masked, max_message_size=MAX_FRAME_PAYLOAD),
                 chunked(stream, cuts))
    assert split == whole
    limited = [FrameScanner(masked=masked, max_message_size=100) for _ in range(2)]
    assert walk(limited[0], [stream]) == walk(limited[1], chunked(stream, cuts))
    check_against_wsproto(stream, masked)


def _upgrade_config() -> Config:
    return build_config(
        server={"ws_bind": ["127.0.0.1:0"], "api_bind": ["127.0.0.1:0"],
                "handshake_timeout": 5, "ping_interval": 1000, "ping_timeout": 1000,
                "cors_origins": ["https://app.example"]},
        agents={"a": {"bot": "python:relay.echo:echo_bot", "max_clients": 2},
                "t": {"bot": "python:relay.echo:echo_bot", "websocket_auth": "token"}})


UPGRADE_CONFIG = _upgrade_config()


def _answer(raw: bytes) -> tuple[int, dict[str, Any] | None]:
    """The gateway's answer: its status and, for a refusal, the JSON body."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, raw[:200]
    lines = head.split(b"\r\n")
    version, status, _reason = lines[0].split(b" ", 2)
    assert version == b"HTTP/1.1", lines[0]
    if int(status) == 101:
        return 101, None
    fields = dict(line.lower().split(b": ", 1) for line in lines[1:])
    length = int(fields[b"content-length"])
    assert fields[b"content-type"] == b"application/json"
    assert len(rest) >= length, raw[:300]
    return int(status), json.loads(rest[:length])


async def _upgrade(data: bytes, cut: int, eof: bool = True) -> tuple[bytes, Gateway]:
    gateway = Gateway(UPGRADE_CONFIG, keys=KEYS, wall_clock=trio.current_time)
    client, server = trio.testing.memory_stream_pair()
    connection = ClientConnection(gateway.rt, StreamConn(server, peer="127.0.0.1"))
    received = bytearray()
    with trio.fail_after(600):  # virtual seconds: every timeout of the path is shorter
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.serve)
            await client.send_all(data[:cut])
            await trio.sleep(0.001)  # let the gateway read the first part alone
            await client.send_all(data[cut:])
            if eof:  # the client has said all it will say (else: it goes silent)
                await client.send_stream.aclose()
            while chunk := await client.receive_some(65536):
                received += chunk
    return bytes(received), gateway


def upgrade_target(data: bytes) -> None:
    cut = data[0] if data else 0
    raw, gateway = trio.run(_upgrade, data[1:], cut, clock=trio.testing.MockClock(
        autojump_threshold=0))
    rt = gateway.rt
    assert rt.gate.connections == {} and rt.gate.handshakes_total == 0
    assert not rt.registry.members()
    if not raw:  # the client left before saying anything decidable (EOF mid-request)
        return
    status, body = _answer(raw)
    assert status in UPGRADE_STATUSES, raw[:200]
    if status != 101:
        assert body is not None and set(body) == {"error", "code", "detail"}, raw[:300]


def start_body_target(data: bytes) -> None:
    try:
        request = _parse_request(data)
    except _Refuse as refusal:
        assert refusal.status == 400
        assert set(json.loads(refusal.body())) == {"error", "code", "detail"}
        return
    assert isinstance(request, dict) and request["transport"] == "websocket"
    json.loads(_json(request))  # what is accepted can be written back as JSON


TARGETS = {
    "scanner": scanner_target,
    "upgrade": upgrade_target,
    "start_body": start_body_target,
}
