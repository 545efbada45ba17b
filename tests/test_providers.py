"""relay.providers, sans-IO: a telephony provider's opening messages and their routing.

Bytes in, verdicts out: `OpeningReader` is fed what a provider sends after its 101 (masked
client frames, built here with `relay.frames.encode_frame`) and answers `Opening`,
`Refused` (close 1008, with the reason the provider's connection gets) or `ClientClosed`.
The opening messages are each provider's published examples (tests/fixtures/providers/).
The end-to-end twins (a real gateway, a real upstream bot) are in test_provider_e2e.py.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from relay.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, encode_frame
from relay.handshake import Reject, Route, route
from relay.providers import (
    MAX_OPENING_BYTES,
    ClientClosed,
    Opening,
    OpeningReader,
    Refused,
    resolve_route,
)

FIXTURES = Path(__file__).parent / "fixtures" / "providers"
PROVIDERS = ("twilio", "telnyx", "plivo", "exotel")


def fixture(provider: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{provider}.json").read_text("utf-8"))
    return data


def text(message: str | dict[str, Any], *, fin: bool = True, op: int = OP_TEXT) -> bytes:
    payload = message if isinstance(message, str) else json.dumps(message)
    return encode_frame(op, payload.encode(), mask=True, fin=fin)


def opening_bytes(provider: str) -> bytes:
    return b"".join(text(m) for m in fixture(provider)["opening"])


def twilio_start(**params: Any) -> str:
    start = json.loads(fixture("twilio")["opening"][1])
    start["start"]["customParameters"] = params
    return json.dumps(start)


# ------------------------------------------------------------------ published openings


@pytest.mark.parametrize("provider", PROVIDERS)
def test_published_opening_is_recognised_whole(provider: str) -> None:
    data = opening_bytes(provider)
    verdict = OpeningReader(provider).feed(data)
    assert isinstance(verdict, Opening)
    assert verdict.provider == provider
    assert verdict.raw == data  # exactly the bytes read, for the bot to get unchanged
    assert [json.dumps(m) for m in verdict.messages] == [
        json.dumps(json.loads(m)) for m in fixture(provider)["opening"]]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_opening_verdict_does_not_depend_on_how_bytes_were_split(provider: str) -> None:
    data = opening_bytes(provider) + text(fixture(provider)["media"])
    whole = OpeningReader(provider).feed(data)
    reader = OpeningReader(provider)
    verdict = None
    fed = 0
    for i in range(len(data)):
        verdict = reader.feed(data[i:i + 1])
        fed = i + 1
        if verdict is not None:
            break
    assert isinstance(whole, Opening) and isinstance(verdict, Opening)
    assert verdict.messages == whole.messages
    # byte by byte, the verdict comes with the last byte of the start message
    assert fed == len(opening_bytes(provider))
    assert verdict.raw == data[:fed]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bytes_after_the_opening_are_kept_for_the_bot(provider: str) -> None:
    media = text(fixture(provider)["media"])
    data = opening_bytes(provider) + media + media[:5]  # a media frame and part of one
    verdict = OpeningReader(provider).feed(data)
    assert isinstance(verdict, Opening)
    assert verdict.raw == data  # nothing read is lost: the relay goes on from here


def test_opening_is_incomplete_until_the_start_arrives() -> None:
    connected = fixture("twilio")["opening"][0]
    reader = OpeningReader("twilio")
    assert reader.feed(text(connected)) is None
    assert reader.feed(text(fixture("twilio")["opening"][1])[:-1]) is None


def test_pings_and_fragmented_text_inside_the_opening_pass() -> None:
    connected, start = fixture("twilio")["opening"]
    half = len(start) // 2
    data = (encode_frame(OP_PING, b"p", mask=True) + text(connected)
            + text(start[:half], fin=False)
            + encode_frame(OP_PING, b"q", mask=True)
            + encode_frame(OP_CONT, start[half:].encode(), mask=True))
    verdict = OpeningReader("twilio").feed(data)
    assert isinstance(verdict, Opening)
    assert verdict.messages[1] == json.loads(start)
    assert verdict.raw == data  # the pings reach the bot too, as on the generic endpoint


def test_twilio_custom_parameters_route_and_carry_a_token() -> None:
    connected = fixture("twilio")["opening"][0]
    data = text(connected) + text(twilio_start(_pipecatCloudServiceHost="bot.local",
                                               token="tok.en", other="x"))
    verdict = OpeningReader("twilio").feed(data)
    assert isinstance(verdict, Opening)
    assert (verdict.service_host, verdict.token) == ("bot.local", "tok.en")


def test_the_published_twilio_start_carries_no_route() -> None:
    verdict = OpeningReader("twilio").feed(opening_bytes("twilio"))
    assert isinstance(verdict, Opening)
    assert (verdict.service_host, verdict.token) == (None, None)


def test_unknown_provider_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown provider"):
        OpeningReader("vonage")


# ------------------------------------------------------------------ refusals


def refusal(provider: str, data: bytes) -> str:
    verdict = OpeningReader(provider).feed(data)
    assert isinstance(verdict, Refused), verdict
    return verdict.reason


@pytest.mark.parametrize("provider", ["twilio", "telnyx", "exotel"])
def test_start_without_connected_is_not_that_providers_protocol(provider: str) -> None:
    start = fixture(provider)["opening"][1]
    assert refusal(provider, text(start)) == (
        f"not a {provider} stream: opening message 1 has event 'start', expected "
        "'connected'")


@pytest.mark.parametrize(("endpoint", "sender"), [
    ("twilio", "plivo"), ("telnyx", "twilio"), ("plivo", "twilio"), ("exotel", "telnyx"),
    ("twilio", "telnyx"), ("plivo", "exotel"),
])
def test_another_providers_opening_is_refused(endpoint: str, sender: str) -> None:
    reason = refusal(endpoint, opening_bytes(sender))
    assert reason.startswith(f"not a {endpoint} stream: ")


@pytest.mark.parametrize(("provider", "missing", "reason"), [
    ("twilio", ("start", "streamSid"), "the start message has no start.streamSid"),
    ("twilio", ("start", "callSid"), "the start message has no start.callSid"),
    ("telnyx", ("stream_id",), "the start message has no stream_id"),
    ("telnyx", ("start", "call_control_id"), "the start message has no start.call_control_id"),
    ("plivo", ("start", "callId"), "the start message has no start.callId"),
    ("plivo", ("start", "streamId"), "the start message has no start.streamId"),
    ("exotel", ("start", "account_sid"), "the start message has no start.account_sid"),
    ("twilio", ("start",), "the start message has no start object"),
])
def test_start_without_what_pipecat_needs_is_refused(provider: str, missing: tuple[str, ...],
                                                     reason: str) -> None:
    messages = [json.loads(m) for m in fixture(provider)["opening"]]
    where = messages[-1]
    for key in missing[:-1]:
        where = where[key]
    del where[missing[-1]]
    assert refusal(provider, b"".join(text(m) for m in messages)) == (
        f"not a {provider} stream: {reason}")


@pytest.mark.parametrize(("provider", "extra", "reads_as"), [
    ("exotel", {"streamSid": "MZ1", "callSid": "CA1"}, "twilio"),
    ("exotel", {"streamId": "s", "callId": "c"}, "plivo"),
    ("plivo", {"streamSid": "MZ1", "callSid": "CA1"}, "twilio"),
])
def test_start_that_pipecat_would_read_as_another_provider_is_refused(
        provider: str, extra: dict[str, str], reads_as: str) -> None:
    """Pipecat tries twilio, telnyx, plivo, exotel in turn: what matches an earlier one
    would reach the bot as that provider's stream."""
    messages = [json.loads(m) for m in fixture(provider)["opening"]]
    messages[-1]["start"].update(extra)
    assert refusal(provider, b"".join(text(m) for m in messages)) == (
        f"not a {provider} stream: the start message reads as a {reads_as} stream")


def test_telnyx_start_with_extra_twilio_looking_top_level_fields_passes() -> None:
    """Only what Pipecat looks at decides: a top-level streamSid changes nothing."""
    messages = [json.loads(m) for m in fixture("telnyx")["opening"]]
    messages[-1]["streamSid"] = "MZ1"
    assert isinstance(OpeningReader("telnyx").feed(b"".join(text(m) for m in messages)),
                      Opening)


def test_non_string_id_is_refused() -> None:
    start = json.loads(fixture("plivo")["opening"][0])
    start["start"]["callId"] = 12
    assert refusal("plivo", text(start)) == (
        "not a plivo stream: the start message has no start.callId")


@pytest.mark.parametrize(("payload", "reason"), [
    (b"{not json", "twilio opening message 1 is not JSON"),
    (b"\xff\xfe", "twilio opening message 1 is not JSON"),
    (b"[1, 2]", "twilio opening message 1 is not a JSON object"),
    (b'{"protocol": "Call"}', "not a twilio stream: opening message 1 has no event "
                              "(expected 'connected')"),
    (b'{"event": 7}', "not a twilio stream: opening message 1 has no event "
                      "(expected 'connected')"),
])
def test_bad_json_is_refused(payload: bytes, reason: str) -> None:
    assert refusal("twilio", encode_frame(OP_TEXT, payload, mask=True)) == reason


def test_binary_frame_is_refused() -> None:
    data = encode_frame(OP_BINARY, fixture("plivo")["opening"][0].encode(), mask=True)
    assert refusal("plivo", data) == (
        "binary frame where plivo's opening message 1 (JSON text) was expected")


def test_media_before_start_is_refused() -> None:
    connected = fixture("twilio")["opening"][0]
    reason = refusal("twilio", text(connected) + text(fixture("twilio")["media"]))
    assert reason == ("not a twilio stream: opening message 2 has event 'media', "
                      "expected 'start'")


@pytest.mark.parametrize(("custom", "reason"), [
    ({"_pipecatCloudServiceHost": 5}, "customParameters._pipecatCloudServiceHost is not a string"),
    ({"token": ["t"]}, "customParameters.token is not a string"),
])
def test_twilio_custom_parameters_of_the_wrong_type_are_refused(custom: dict[str, Any],
                                                               reason: str) -> None:
    data = text(fixture("twilio")["opening"][0]) + text(twilio_start(**custom))
    assert refusal("twilio", data) == reason


def test_twilio_custom_parameters_not_an_object_is_refused() -> None:
    start = json.loads(fixture("twilio")["opening"][1])
    start["start"]["customParameters"] = "bot.local"
    data = text(fixture("twilio")["opening"][0]) + text(start)
    assert refusal("twilio", data) == (
        "not a twilio stream: start.customParameters is not an object")


def test_oversize_single_frame_is_refused_from_its_header() -> None:
    header_only = encode_frame(OP_TEXT, b"x" * (MAX_OPENING_BYTES + 1), mask=True)[:14]
    assert refusal("twilio", header_only) == (
        f"twilio opening messages exceed {MAX_OPENING_BYTES} bytes")


def test_oversize_in_many_small_frames_is_refused() -> None:
    """Fragments that never end (each one small) are bounded by the bytes read."""
    reader = OpeningReader("twilio", limit=1000)
    verdict = reader.feed(text('{"event": "connected"', fin=False))
    chunk = encode_frame(OP_CONT, b" " * 100, mask=True, fin=False)
    for _ in range(20):
        verdict = reader.feed(chunk)
        if verdict is not None:
            break
    assert verdict == Refused("twilio opening messages exceed 1000 bytes")
    assert len(reader._buf) <= 1000 + len(chunk)  # read no more than one chunk past it


def test_oversize_in_many_whole_pings_is_refused() -> None:
    reader = OpeningReader("plivo", limit=1000)
    verdict = None
    for _ in range(20):
        verdict = reader.feed(encode_frame(OP_PING, b"p" * 100, mask=True))
        if verdict is not None:
            break
    assert verdict == Refused("plivo opening messages exceed 1000 bytes")


@pytest.mark.parametrize(("frame", "reason"), [
    (encode_frame(OP_TEXT, b"{}", mask=False), "client frame is not masked"),
    (bytes([0xC1]) + encode_frame(OP_TEXT, b"{}", mask=True)[1:],
     "RSV bits set: no extension was negotiated"),
    (bytes([0x83]) + encode_frame(OP_TEXT, b"{}", mask=True)[1:], "reserved opcode 3"),
    (bytes([0x09]) + encode_frame(OP_PING, b"p", mask=True)[1:], "bad control frame"),
    (encode_frame(OP_CONT, b"{}", mask=True), "continuation frame with no message"),
])
def test_frame_level_violations_are_refused(frame: bytes, reason: str) -> None:
    assert refusal("twilio", frame) == reason


def test_new_text_inside_a_fragmented_message_is_refused() -> None:
    data = text('{"event":', fin=False) + text('"connected"}')
    assert refusal("twilio", data) == (
        "new message inside a fragmented one where twilio's opening message 1 (JSON text) "
        "was expected")


def test_client_close_before_the_opening_ends_it() -> None:
    close = encode_frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"bye", mask=True)
    verdict = OpeningReader("telnyx").feed(text(fixture("telnyx")["opening"][0]) + close)
    assert verdict == ClientClosed((1000).to_bytes(2, "big") + b"bye")


def test_verdict_is_final() -> None:
    reader = OpeningReader("twilio")
    first = reader.feed(b'\x81\x02{}')  # unmasked
    assert isinstance(first, Refused)
    assert reader.feed(opening_bytes("twilio")) is first
    assert reader.unparsed is None  # the stream cannot be walked after that violation


# ------------------------------------------------------------------ routing


def provider_route(target: bytes) -> Route:
    r = route(target)
    assert isinstance(r, Route), r
    return r


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("suffix", "agent", "token"), [
    ("/bot.local", "bot", None),
    ("/bot.local/tok", "bot", "tok"),
    ("?serviceHost=bot.local&sample-rate=16000", "bot", None),
])
def test_provider_paths_route_as_the_generic_endpoint(provider: str, suffix: str, agent: str,
                                                      token: str | None) -> None:
    r = provider_route(f"/ws/{provider}{suffix}".encode())
    assert (r.provider, r.agent, r.org, r.path_token, r.deferred) == (
        provider, agent, "local", token, False)


def test_provider_query_reaches_the_bot_as_on_the_generic_endpoint() -> None:
    r = provider_route(b"/ws/exotel?serviceHost=bot.local&sample-rate=16000&body=x&token=t")
    assert r.bot_query == "sample-rate=16000"


def test_twilio_without_a_host_is_deferred_to_its_start() -> None:
    r = provider_route(b"/ws/twilio")
    assert (r.provider, r.deferred, r.agent) == ("twilio", True, "")


@pytest.mark.parametrize("provider", ["telnyx", "plivo", "exotel"])
def test_other_providers_without_a_host_are_404(provider: str) -> None:
    r = route(f"/ws/{provider}".encode())
    assert isinstance(r, Reject) and (r.status, r.code) == (404, "unknown_service_host")


@pytest.mark.parametrize("target", [b"/ws/vonage/bot.local", b"/ws/twilioX/bot.local",
                                    b"/ws/twilio/bot.local/tok/more"])
def test_unknown_provider_paths_are_404(target: bytes) -> None:
    r = route(target)
    assert isinstance(r, Reject) and r.status == 404


def test_message_level_path_refuses_provider_endpoints_clearly() -> None:
    r = route(b"/ws/twilio/bot.local", providers=False)
    assert isinstance(r, Reject)
    assert (r.status, r.code) == (404, "provider_endpoint_unavailable")
    assert "Gateway.handle" in r.detail


def opening_with(**params: Any) -> Opening:
    data = text(fixture("twilio")["opening"][0]) + text(twilio_start(**params))
    verdict = OpeningReader("twilio").feed(data)
    assert isinstance(verdict, Opening)
    return verdict


def test_deferred_route_takes_the_start_host_and_token() -> None:
    resolved = resolve_route(provider_route(b"/ws/twilio"),
                             opening_with(_pipecatCloudServiceHost="bot.local", token="tk"))
    assert isinstance(resolved, Route)
    assert (resolved.agent, resolved.org, resolved.path_token, resolved.deferred) == (
        "bot", "local", "tk", False)


def test_deferred_route_without_a_host_anywhere_is_refused() -> None:
    resolved = resolve_route(provider_route(b"/ws/twilio"), opening_with(FirstName="Jane"))
    assert resolved == Refused(
        "cannot route: no ?serviceHost=, no /ws/twilio/agent.org path and no "
        "customParameters._pipecatCloudServiceHost")


@pytest.mark.parametrize("host", ["bot", "a.b.c", "", "b@d.local"])
def test_deferred_route_with_a_malformed_host_is_refused(host: str) -> None:
    resolved = resolve_route(provider_route(b"/ws/twilio"),
                             opening_with(_pipecatCloudServiceHost=host))
    assert resolved == Refused(
        f"customParameters._pipecatCloudServiceHost {host!r} is not agent.org")


def test_url_route_stands_and_a_contradicting_start_is_refused() -> None:
    r = provider_route(b"/ws/twilio/bot.local")
    assert resolve_route(r, opening_with(_pipecatCloudServiceHost="bot.local")) == r
    assert resolve_route(r, opening_with()) == r
    assert resolve_route(r, opening_with(_pipecatCloudServiceHost="other.local")) == Refused(
        "customParameters._pipecatCloudServiceHost 'other.local' differs from the URL's "
        "bot.local")


def test_url_route_ignores_a_start_token() -> None:
    """The URL's token sources are decided before the 101; the start cannot add one."""
    r = provider_route(b"/ws/twilio/bot.local")
    resolved = resolve_route(r, opening_with(token="from-start"))
    assert isinstance(resolved, Route) and resolved.path_token is None


def test_providers_module_is_sans_io() -> None:
    import relay.providers as mod

    tree = ast.parse(Path(mod.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
    assert not imported & {"trio", "socket", "ssl", "trio_websocket", "h11", "asyncio"}
