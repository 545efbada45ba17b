"""Real Pipecat through relay: a Twilio Media Streams call to a Pipecat telephony bot.

The client here plays Twilio: it speaks the message shapes Twilio's Media Streams
documentation publishes (`connected`, `start` with `customParameters`, `media` as base64
mu-law at 8 kHz in 20 ms chunks, `dtmf`, `mark`, `stop`). The bot (bots/twilio_echo_bot.py,
a real process in .venv-interop) reads the opening messages with Pipecat's own
`parse_telephony_websocket`, then runs `TwilioFrameSerializer` (auto hang-up off) and
echoes the audio; on a DTMF digit it sends a mark, which the client answers as Twilio
does. What this proves: Pipecat's parser still reads what reaches the bot through relay,
media is echoed sample for sample, marks go out and their answers come back.

Two ways in: the generic endpoint with a path token, as the hosted service's Twilio
Function example does (/start from the webhook, `{wsUrl}/{token}` in the TwiML), and the
provider endpoint `/ws/twilio` (routing by path, or by the `_pipecatCloudServiceHost`
custom parameter since Twilio's stream URLs take no query).
"""

from __future__ import annotations

import base64
import itertools
import json
from pathlib import Path
from typing import Any

import attrs
import trio
from interop_support import (
    CALL_BOUND,
    Reporter,
    bot,
    correlation,
    open_ws,
    relay_serve,
    tone,
    ulaw_decode,
    ulaw_encode,
)

ACCOUNT_SID = "AC0123456789abcdef0123456789abcdef"
CALL_SID = "CA0123456789abcdef0123456789abcdef"
STREAM_SID = "MZ0123456789abcdef0123456789abcdef"
RATE = 8_000  # Hz: Twilio's mu-law
CHUNK = 160  # samples: Twilio sends 20 ms of audio per media message
CHUNKS = 50  # one second of tone
DTMF_AFTER = 24  # media messages before the caller presses a key
CUSTOM = {"caller": "+15550100", "campaign": "spring & summer"}


def agents(bot_port: int) -> dict[str, dict[str, Any]]:
    bot_url = f"ws://127.0.0.1:{bot_port}/ws"
    return {  # on the default bot_protocol, "pipecat-cloud"
        "twilio": {"bot": bot_url, "websocket_auth": "token"},
        "twilio-open": {"bot": bot_url},
    }


# Twilio Media Streams messages, in the shapes Twilio documents them.


class TwilioMessages:
    def __init__(self) -> None:
        self._sequence = itertools.count(1)

    def _next(self) -> str:
        return str(next(self._sequence))

    def connected(self) -> dict[str, Any]:
        return {"event": "connected", "protocol": "Call", "version": "1.0.0"}

    def start(self, custom: dict[str, str]) -> dict[str, Any]:
        return {
            "event": "start", "sequenceNumber": self._next(),
            "start": {
                "accountSid": ACCOUNT_SID, "streamSid": STREAM_SID, "callSid": CALL_SID,
                "tracks": ["inbound"], "customParameters": custom,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE,
                                "channels": 1},
            },
            "streamSid": STREAM_SID,
        }

    def media(self, chunk: int, payload: bytes) -> dict[str, Any]:
        return {
            "event": "media", "sequenceNumber": self._next(),
            "media": {"track": "inbound", "chunk": str(chunk + 1),
                      "timestamp": str(chunk * 20),
                      "payload": base64.b64encode(payload).decode()},
            "streamSid": STREAM_SID,
        }

    def dtmf(self, digit: str) -> dict[str, Any]:
        return {"event": "dtmf", "streamSid": STREAM_SID, "sequenceNumber": self._next(),
                "dtmf": {"track": "inbound_track", "digit": digit}}

    def mark(self, name: str) -> dict[str, Any]:
        return {"event": "mark", "sequenceNumber": self._next(), "streamSid": STREAM_SID,
                "mark": {"name": name}}

    def stop(self) -> dict[str, Any]:
        return {"event": "stop", "sequenceNumber": self._next(), "streamSid": STREAM_SID,
                "stop": {"accountSid": ACCOUNT_SID, "callSid": CALL_SID}}


@attrs.define
class Call:
    sent: bytes  # mu-law
    received: bytes = b""  # mu-law of every outbound media message, in order
    stream_sids: set[str] = attrs.field(factory=set)
    marks: list[str] = attrs.field(factory=list)
    other: list[dict[str, Any]] = attrs.field(factory=list)


async def twilio_call(url: str, custom: dict[str, str], echo_bot: Reporter) -> Call:
    """One call as Twilio makes it; returns once the bot has read the mark answer."""
    call = Call(sent=ulaw_encode(tone(440.0, CHUNKS * CHUNK / RATE, RATE)))
    say = TwilioMessages()
    async with open_ws(url) as ws:

        async def send(message: dict[str, Any]) -> None:
            await ws.send_message(json.dumps(message))

        await send(say.connected())
        await send(say.start(custom))
        for i in range(CHUNKS):
            await send(say.media(i, call.sent[i * CHUNK:(i + 1) * CHUNK]))
            if i + 1 == DTMF_AFTER:
                await send(say.dtmf("1"))
        while len(call.received) < len(call.sent) or not call.marks:
            message = json.loads(await ws.get_message())
            if message.get("event") == "media":
                call.received += base64.b64decode(message["media"]["payload"])
                call.stream_sids.add(message["streamSid"])
            elif message.get("event") == "mark":
                call.marks.append(message["mark"]["name"])
                call.stream_sids.add(message["streamSid"])
                await send(say.mark(message["mark"]["name"]))  # played: Twilio answers
            else:
                call.other.append(message)
        await echo_bot.wait_for("mark")  # the answer reached the bot before we hang up
        await send(say.stop())
    return call


def assert_call_went_through(call: Call, echo_bot: Reporter, ended: dict[str, Any],
                             custom: dict[str, str], session_id: str | None) -> None:
    by_name = {event["event"]: event for event in echo_bot.events}
    # Pipecat's parser read the opening messages as Twilio sent them.
    start = by_name["start"]
    assert start["transport_type"] == "twilio"
    assert (start["stream_id"], start["call_id"]) == (STREAM_SID, CALL_SID)
    assert start["body"] == custom
    assert start["session_id"] == session_id
    # Media echoed: every sample back, in order, as the tone that was sent.
    assert len(call.received) == len(call.sent)
    assert ulaw_decode(call.received) == ulaw_decode(call.sent)
    assert correlation(ulaw_decode(call.sent), ulaw_decode(call.received)) >= 0.9
    assert ended["frames"] == CHUNKS and ended["bytes"] == CHUNKS * CHUNK * 2
    # DTMF read, the bot's mark sent, Twilio's answer read by the bot.
    assert by_name["dtmf"]["digit"] == "1"
    assert call.marks == ["dtmf-1"]
    assert (by_name["mark"]["name"], by_name["mark"]["stream_sid"]) == ("dtmf-1", STREAM_SID)
    assert call.stream_sids == {STREAM_SID}
    assert call.other == []


async def test_twilio_call_on_the_generic_endpoint_with_a_path_token(tmp_path: Path) -> None:
    """The seed's Twilio Function flow: /start from the webhook, then `{wsUrl}/{token}`."""
    with trio.fail_after(CALL_BOUND):
        async with bot("twilio_echo_bot.py", tmp_path) as (echo_bot, port), \
                relay_serve(tmp_path, agents(port)) as relay:
            start = await relay.start("twilio", {"transport": "websocket"})
            call = await twilio_call(f"{start['wsUrl']}/{start['token']}", CUSTOM, echo_bot)
            ended = await echo_bot.wait_for("ended")
    assert_call_went_through(call, echo_bot, ended, CUSTOM, start["sessionId"])


async def test_twilio_call_on_ws_twilio_routed_by_path_with_a_path_token(
        tmp_path: Path) -> None:
    with trio.fail_after(CALL_BOUND):
        async with bot("twilio_echo_bot.py", tmp_path) as (echo_bot, port), \
                relay_serve(tmp_path, agents(port)) as relay:
            start = await relay.start("twilio", {"transport": "websocket"})
            url = f"{relay.ws_base}/ws/twilio/twilio.local/{start['token']}"
            call = await twilio_call(url, CUSTOM, echo_bot)
            ended = await echo_bot.wait_for("ended")
    assert_call_went_through(call, echo_bot, ended, CUSTOM, start["sessionId"])


async def test_twilio_call_on_ws_twilio_routed_by_custom_parameter(tmp_path: Path) -> None:
    """Twilio's stream URL takes no query: the service host rides in customParameters,
    and reaches the bot unchanged with the rest of the opening messages."""
    custom = {**CUSTOM, "_pipecatCloudServiceHost": "twilio-open.local"}
    with trio.fail_after(CALL_BOUND):
        async with bot("twilio_echo_bot.py", tmp_path) as (echo_bot, port), \
                relay_serve(tmp_path, agents(port)) as relay:
            call = await twilio_call(f"{relay.ws_base}/ws/twilio", custom, echo_bot)
            ended = await echo_bot.wait_for("ended")
    start = next(event for event in echo_bot.events if event["event"] == "start")
    assert_call_went_through(call, echo_bot, ended, custom, start["session_id"])
    assert start["session_id"]  # relay made one, as for every session
