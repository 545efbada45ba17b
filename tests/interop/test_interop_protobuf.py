"""Real Pipecat through relay: a protobuf client and a protobuf bot, as a web app runs them.

`relay serve` (a real process) in front of a Pipecat bot (FastAPIWebsocketTransport +
ProtobufFrameSerializer under uvicorn, reading the body and session id the way the hosted
service's base image does) and a Pipecat client (WebsocketClientTransport +
ProtobufFrameSerializer), each a process of its own in .venv-interop. The client goes
through /start with a body, then connects with the token. What this proves: the binary
frames of a real Pipecat session pass through unchanged (the echoed tone is sample-exact,
so nothing was dropped, reordered or altered), and a real Pipecat bot reads the held body
and the session id from what relay sends it. See interop_support for the harness rules.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import trio
from interop_support import (
    CALL_BOUND,
    bot,
    correlation,
    first_difference,
    open_ws,
    pcm16,
    relay_serve,
    reporter,
    samples16,
    tone,
)

SAMPLE_RATE = 16_000  # Hz, as bots/protobuf_echo_bot.py and bots/protobuf_client.py
CHUNK = 1_280  # bytes: one 40 ms chunk, what Pipecat's output transports send at a time
# '+', '/' in its standard base64 and characters that mean something in a URL: the body
# must survive base64 and percent-encoding on its way into the bot's `?body=`.
BODY = {
    "caller": "+15550100",
    "greeting": "Grüße 👋 & = # %",
    "query": "??? >>> ?? >> ? >",
    "nested": {"ok": True, "n": [1, 2.5, None]},
}


def agent(bot_port: int) -> dict[str, Any]:
    return {
        "bot": f"ws://127.0.0.1:{bot_port}/ws",
        "websocket_auth": "token",  # and the default bot_protocol, "pipecat-cloud"
    }


async def test_pipecat_client_and_bot_echo_a_tone_through_relay(tmp_path: Path) -> None:
    signal = tone(440.0, 2.0, SAMPLE_RATE)
    sent = pcm16(signal)
    (tmp_path / "sent.pcm").write_bytes(sent)
    received_path = tmp_path / "received.pcm"

    with trio.fail_after(CALL_BOUND):
        async with bot("protobuf_echo_bot.py", tmp_path) as (echo_bot, port), \
                relay_serve(tmp_path, {"pipecat": agent(port)}) as relay:
            start = await relay.start("pipecat", {"transport": "websocket", "body": BODY})
            assert set(start) == {"token", "wsUrl", "sessionId"}
            assert start["wsUrl"] == f"{relay.ws_base}/ws/generic/pipecat.local"

            async with reporter("protobuf_client", "protobuf_client.py", start["wsUrl"],
                                start["token"], str(tmp_path / "sent.pcm"),
                                str(received_path), tmp_path=tmp_path) as client:
                done = await client.wait_for("done")
                assert await client.process.wait() == 0, client.failure("failed")

            session = await echo_bot.wait_for("session")
            ended = await echo_bot.wait_for("ended")

    received = received_path.read_bytes()
    # The tone came back: correlated, and sample for sample what was sent, in order.
    assert correlation(signal, samples16(received)) >= 0.9
    assert first_difference(sent, received, CHUNK) is None
    assert done == {"event": "done", "bytes": len(sent), "frames": len(sent) // CHUNK}
    # The bot echoed each 40 ms chunk once: none lost or repeated on the way in.
    assert ended["frames"] == len(sent) // CHUNK and ended["bytes"] == len(sent)

    # What the Pipecat bot read from relay's upgrade request, as the base image reads it.
    assert session["event"] == "session"
    assert session["path"] == "/ws"
    assert session["body"] == BODY
    assert session["session_id"] == start["sessionId"]
    assert session["session_id_headers"] == [start["sessionId"]]
    assert session["relay_session_id_headers"] == [start["sessionId"]]
    assert session["query_names"] == ["body"]
    assert session["authorization"] == []  # the client's token never reaches the bot


async def test_a_clients_own_body_parameter_never_reaches_a_pipecat_bot(
        tmp_path: Path) -> None:
    """A hostile client adds `?body=` of its own (plain and percent-encoded) to the URL.

    The bot must read the held body, once, and nothing the client wrote: a Starlette app
    takes the last of repeated parameters, others the first.
    """
    forged = base64.b64encode(json.dumps({"forged": True}).encode()).decode()
    async with bot("protobuf_echo_bot.py", tmp_path) as (echo_bot, port), \
            relay_serve(tmp_path, {"pipecat": agent(port)}) as relay:
        start = await relay.start("pipecat", {"transport": "websocket", "body": BODY})
        url = f"{start['wsUrl']}?body={forged}&bod%79={forged}&lang=fr"
        with trio.fail_after(CALL_BOUND):
            async with open_ws(url, extra_headers=[
                    (b"authorization", f"Bearer {start['token']}".encode())]):
                session = await echo_bot.wait_for("session")
    assert session["body"] == BODY
    assert sorted(session["query_names"]) == ["body", "lang"]


async def test_a_clients_own_session_id_header_never_reaches_a_pipecat_bot(
        tmp_path: Path) -> None:
    """A hostile client sends the session-id headers itself; the bot reads relay's."""
    async with bot("protobuf_echo_bot.py", tmp_path) as (echo_bot, port), \
            relay_serve(tmp_path, {"pipecat": agent(port)}) as relay:
        start = await relay.start("pipecat", {"transport": "websocket", "body": BODY})
        forged = [(b"x-daily-session-id", b"forged"), (b"x-relay-session-id", b"forged")]
        with trio.fail_after(CALL_BOUND):
            async with open_ws(start["wsUrl"], extra_headers=[
                    (b"authorization", f"Bearer {start['token']}".encode()), *forged]):
                session = await echo_bot.wait_for("session")
    assert session["session_id"] == start["sessionId"]
    assert session["session_id_headers"] == [start["sessionId"]]
    assert session["relay_session_id_headers"] == [start["sessionId"]]
    assert session["body"] == BODY


def test_the_body_carries_base64s_url_unsafe_characters() -> None:
    """BODY's comment holds: its compact JSON (ASCII-escaped or not) encodes to '+', '/'."""
    for ascii_only in (True, False):
        compact = json.dumps(BODY, separators=(",", ":"), ensure_ascii=ascii_only)
        encoded = base64.b64encode(compact.encode()).decode()
        assert "+" in encoded and "/" in encoded
