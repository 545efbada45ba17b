"""Provider endpoints (`/ws/twilio`, `/ws/telnyx`, `/ws/plivo`, `/ws/exotel`) end to end.

A real `Gateway` on loopback port 0; the provider is a raw TCP client speaking WebSocket
with wsproto for the handshake and events, and sending its frames as exact bytes
(`relay.frames.encode_frame`, masked), so what the bot receives can be compared byte for
byte. Bots are real upstream WebSocket servers (`support.bot_server`), a raw TCP bot that
records every byte, or the built-in in-process echo bot. The opening messages are each
provider's published examples (tests/fixtures/providers/). The handshake timeout runs on
trio's fake clock; every other wait is bounded by WAIT and nothing sleeps.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import pytest
import trio
import trio.testing
from support import KEYS, BotServer, bot_server, make_config, read_until, running
from support import http as support_http
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Message,
    RejectConnection,
    RejectData,
)
from wsproto.events import Request as WsRequest
from wsproto.utilities import generate_accept_token

from relay.frames import (
    OP_CLOSE,
    OP_TEXT,
    ControlFrame,
    FrameScanner,
    encode_close,
    encode_frame,
    parse_close,
)
from relay.store import MemoryStore, StoreUnavailable
from relay.tokens import mint

FIXTURES = Path(__file__).parent / "fixtures" / "providers"
PROVIDERS = ("twilio", "telnyx", "plivo", "exotel")
WAIT = 10  # seconds: backstop for every network wait


def fixture(provider: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{provider}.json").read_text("utf-8"))
    return data


def frame(message: str | dict[str, Any]) -> bytes:
    payload = message if isinstance(message, str) else json.dumps(message)
    return encode_frame(OP_TEXT, payload.encode(), mask=True)


def twilio_opening(**params: Any) -> list[str]:
    connected, start = fixture("twilio")["opening"]
    parsed = json.loads(start)
    parsed["start"]["customParameters"] = params
    return [connected, json.dumps(parsed)]


# ------------------------------------------------------------------ the provider's side


@attrs.define
class Refusal:
    """The gateway answered the upgrade with an HTTP error."""

    status: int
    body: dict[str, Any]


@attrs.define
class Provider:
    """A provider's WebSocket after its 101: exact frames out, wsproto events in."""

    stream: trio.SocketStream
    ws: WSConnection
    pending: list[Event] = attrs.field(factory=list)
    received: bytearray = attrs.field(factory=bytearray)  # every byte after the 101

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def event(self) -> Event:
        with trio.fail_after(WAIT):
            while not self.pending:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError("the gateway closed TCP")
                self.received += data
                self.ws.receive_data(data)
                self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def message(self) -> str | bytes:
        text: list[str | bytes] = []
        while True:
            event = await self.event()
            assert isinstance(event, Message), event
            text.append(event.data)
            if event.message_finished:
                break
        return "".join(t for t in text if isinstance(t, str)) if isinstance(
            text[0], str) else b"".join(t for t in text if isinstance(t, bytes))

    async def closed(self) -> tuple[int, str]:
        """Wait for the gateway's close frame, answer it, and return (code, reason).

        Read from the frame itself: wsproto reports a received 1014 as 1002.
        """
        event = await self.event()
        assert isinstance(event, CloseConnection), event
        await self.stream.send_all(encode_close(1000, "", mask=True))
        with trio.fail_after(WAIT):  # then the gateway closes TCP first
            while await self.stream.receive_some(65536):
                pass
        scanner = FrameScanner(masked=False, max_message_size=1 << 30)
        closes = [parse_close(piece.payload) for piece in scanner.feed(memoryview(
            bytes(self.received))) if isinstance(piece, ControlFrame)
            and piece.opcode == OP_CLOSE]
        assert len(closes) == 1, closes
        code, reason = closes[0]
        assert code is not None
        return code, reason


@asynccontextmanager
async def provider(port: int, target: str,
                   headers: list[tuple[bytes, bytes]] | None = None
                   ) -> AsyncIterator[Provider | Refusal]:
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(WsRequest(host="127.0.0.1", target=target,
                                                extra_headers=headers or [])))
        status, body, accepted, finished = 0, b"", False, False
        pending: list[Event] = []
        with trio.fail_after(WAIT):
            while not accepted and not finished:
                data = await stream.receive_some(65536)
                assert data, "EOF before an answer to the upgrade"
                ws.receive_data(data)
                for event in ws.events():
                    if isinstance(event, AcceptConnection):
                        accepted = True
                    elif isinstance(event, RejectConnection):
                        status = event.status_code
                    elif isinstance(event, RejectData):
                        body += event.data
                        finished = event.body_finished
                    elif accepted:
                        pending.append(event)
        if accepted:
            yield Provider(stream, ws, pending)
        else:
            yield Refusal(status, json.loads(body))


async def refused_with_1008(p: Provider | Refusal, data: bytes) -> str:
    assert isinstance(p, Provider), p
    await p.send(data)
    code, reason = await p.closed()
    assert code == 1008, (code, reason)
    return reason


# ------------------------------------------------------------------ gateways and bots


def config(bot: str, **agent: Any) -> Any:
    return make_config(bot, agent="bot", **agent)


def token(session_id: str = "s-1", agent: str = "bot") -> str:
    return mint(KEYS, agent=agent, org="local", session_id=session_id,
                now=trio.current_time())


@attrs.define
class RawBot:
    """An upstream bot on raw TCP: accepts the upgrade and records every byte after it."""

    port: int = 0
    target: bytes = b""
    headers: dict[bytes, bytes] = attrs.field(factory=dict)
    data: bytearray = attrs.field(factory=bytearray)
    got: trio.Event = attrs.field(factory=trio.Event)
    want: int = 0


@asynccontextmanager
async def raw_bot(want: int) -> AsyncIterator[RawBot]:
    bot = RawBot(want=want)

    async def handler(stream: trio.SocketStream) -> None:
        head = await read_until(stream, b"\r\n\r\n")
        if b"\r\n\r\n" not in head:
            return
        head, _, rest = head.partition(b"\r\n\r\n")
        request_line, *lines = head.split(b"\r\n")
        bot.target = request_line.split(b" ")[1]
        bot.headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(b":") for line in lines)}
        accept = generate_accept_token(bot.headers[b"sec-websocket-key"])
        await stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                              b"connection: Upgrade\r\nsec-websocket-accept: " + accept
                              + b"\r\n\r\n")
        bot.data += rest
        while len(bot.data) < bot.want:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            bot.data += chunk
        bot.got.set()  # then the bot leaves (closing TCP): the test has what it needs

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0,
                                                host="127.0.0.1"))
        bot.port = listeners[0].socket.getsockname()[1]
        yield bot
        nursery.cancel_scope.cancel()


def bot_headers(bot: BotServer) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in bot.requests[0].headers}


def bot_query(bot: BotServer) -> dict[str, list[str]]:
    return parse_qs(urlsplit(bot.requests[0].path).query)


# ------------------------------------------------------------------ opening, replay, relay


@pytest.mark.parametrize("provider_name", PROVIDERS)
@pytest.mark.parametrize("routing", ["path", "query"])
async def test_opening_reaches_the_bot_unchanged_then_relays(provider_name: str,
                                                             routing: str) -> None:
    fx = fixture(provider_name)
    target = (f"/ws/{provider_name}/bot.local?sample-rate=16000" if routing == "path" else
              f"/ws/{provider_name}?serviceHost=bot.local&sample-rate=16000")
    async with bot_server() as bot, running(config(bot.url)) as gw, \
            provider(gw.ws_port, target) as p:
        assert isinstance(p, Provider)
        await p.send(b"".join(frame(m) for m in fx["opening"]) + frame(fx["media"]))
        # echoed by the bot, through the relay: the opening, then the media
        assert [await p.message() for _ in fx["opening"]] == fx["opening"]
        assert await p.message() == fx["media"]
        await p.send(frame(fx["media"]))
        assert await p.message() == fx["media"]
    # the bot got the published opening messages as sent, then the media, in order
    assert bot.received == [*fx["opening"], fx["media"], fx["media"]]
    # pipecat-cloud (the default): session id header, the provider's query, no serviceHost
    assert bot_query(bot) == {"sample-rate": ["16000"]}
    assert b"x-daily-session-id" in bot_headers(bot)


@pytest.mark.parametrize("provider_name", PROVIDERS)
async def test_replay_reaches_the_bot_byte_for_byte(provider_name: str) -> None:
    fx = fixture(provider_name)
    sent = b"".join(frame(m) for m in fx["opening"]) + frame(fx["media"])
    async with raw_bot(len(sent)) as bot, running(config(f"ws://127.0.0.1:{bot.port}/b")) \
            as gw, provider(gw.ws_port, f"/ws/{provider_name}/bot.local") as p:
        assert isinstance(p, Provider)
        # the opening split across writes, as a network may deliver it
        for i in range(0, len(sent), 7):
            await p.send(sent[i:i + 7])
        with trio.fail_after(WAIT):
            await bot.got.wait()
    assert bytes(bot.data) == sent  # the provider's masked frames, unchanged
    assert bot.target == b"/b"


async def test_twilio_routed_by_its_start_custom_parameters() -> None:
    opening = twilio_opening(_pipecatCloudServiceHost="bot.local", caller="+15550100")
    async with bot_server() as bot, running(config(bot.url)) as gw, \
            provider(gw.ws_port, "/ws/twilio") as p:
        assert isinstance(p, Provider)
        await p.send(b"".join(frame(m) for m in opening))
        media = fixture("twilio")["media"]
        await p.send(frame(media))
        assert [await p.message() for _ in range(3)] == [*opening, media]
    assert bot.received == [*opening, media]


async def test_twilio_start_token_admits_a_token_agent_once() -> None:
    async with bot_server() as bot, \
            running(config(bot.url, websocket_auth="token")) as gw:
        opening = twilio_opening(_pipecatCloudServiceHost="bot.local", token=token())
        async with provider(gw.ws_port, "/ws/twilio") as p:
            assert isinstance(p, Provider)
            await p.send(b"".join(frame(m) for m in opening))
            await p.send(frame("ping"))
            assert [await p.message() for _ in range(3)] == [*opening, "ping"]
        assert bot_headers(bot)[b"x-daily-session-id"] == b"s-1"
        # the same token again: refused after the opening, nothing dialled
        async with provider(gw.ws_port, "/ws/twilio") as p:
            reason = await refused_with_1008(p, b"".join(frame(m) for m in opening))
        assert reason == "token refused: replayed"
    assert len(bot.requests) == 1


@pytest.mark.parametrize(("params", "reason"), [
    ({"_pipecatCloudServiceHost": "bot.local"}, "token refused: missing"),
    ({"_pipecatCloudServiceHost": "bot.local", "token": "x.y"}, "token refused: malformed"),
])
async def test_twilio_start_without_a_good_token_is_1008(params: dict[str, str],
                                                         reason: str) -> None:
    async with bot_server() as bot, \
            running(config(bot.url, websocket_auth="token")) as gw, \
            provider(gw.ws_port, "/ws/twilio") as p:
        got = await refused_with_1008(p, b"".join(frame(m) for m in twilio_opening(**params)))
    assert got == reason
    assert bot.requests == []


async def test_path_token_on_a_provider_endpoint_twilio_function_flow() -> None:
    """The seed's Twilio Function: `<Stream url="{wsUrl}/{token}">`, on /ws/twilio too."""
    async with bot_server() as bot, \
            running(config(bot.url, websocket_auth="token")) as gw, \
            provider(gw.ws_port, f"/ws/twilio/bot.local/{token()}") as p:
        assert isinstance(p, Provider)
        opening = fixture("twilio")["opening"]
        await p.send(b"".join(frame(m) for m in opening))
        await p.send(frame("after"))
        assert [await p.message() for _ in range(3)] == [*opening, "after"]
    assert bot.received == [*opening, "after"]


async def start_token(api_port: int, body: Any) -> dict[str, Any]:
    """POST /start on the control plane (real HTTP) for agent "bot" with `body`."""
    status, _, answer = await support_http(
        "127.0.0.1", api_port, "POST", "/v1/public/bot/start",
        [("authorization", "Bearer pk_p"), ("content-type", "application/json")],
        json.dumps({"transport": "websocket", "body": body}).encode())
    assert status == 200, answer
    result: dict[str, Any] = json.loads(answer)
    return result


@pytest.mark.parametrize("protocol", ["pipecat-cloud", "relay"])
async def test_held_body_reaches_the_bot_as_its_protocol_says(protocol: str) -> None:
    """A /start token in the stream URL's path (the Twilio Function flow, with a body)."""
    body = {"from": "+15550100"}
    opening = fixture("twilio")["opening"]
    async with bot_server() as bot:
        cfg = make_config(bot.url, agent="bot", server={"public_keys": ["pk_p"]},
                          websocket_auth="token", bot_protocol=protocol)
        async with running(cfg) as gw:
            answer = await start_token(gw.api_port, body)
            async with provider(gw.ws_port, f"/ws/twilio/bot.local/{answer['token']}") as p:
                assert isinstance(p, Provider)
                await p.send(b"".join(frame(m) for m in opening))
                echoed = [await p.message() for _ in range(len(opening))]
    assert bot_headers(bot)[b"x-relay-session-id"] == answer["sessionId"].encode()
    if protocol == "pipecat-cloud":
        assert echoed == opening and bot.received == opening  # nothing injected
        assert bot_query(bot)["body"] == [base64.b64encode(b'{"from":"+15550100"}').decode()]
        assert bot_headers(bot)[b"x-daily-session-id"] == answer["sessionId"].encode()
    else:
        first = bot.received[0]
        assert isinstance(first, str)
        assert json.loads(first) == {"type": "relay.session", "sessionId": answer["sessionId"],
                                     "agent": "bot", "body": body}
        assert bot.received[1:] == opening


async def test_in_process_bot_gets_the_opening_as_messages() -> None:
    fx = fixture("telnyx")
    async with running(config("python:relay.echo:echo_bot")) as gw, \
            provider(gw.ws_port, "/ws/telnyx/bot.local") as p:
        assert isinstance(p, Provider)
        await p.send(b"".join(frame(m) for m in fx["opening"]))
        assert [await p.message() for _ in fx["opening"]] == fx["opening"]


# ------------------------------------------------------------------ refusals before the 101


@pytest.mark.parametrize("target", ["/ws/twilio/nope.local", "/ws/plivo/bot.other",
                                    "/ws/telnyx?serviceHost=nope.local", "/ws/exotel"])
async def test_unknown_agent_from_the_url_is_404_before_the_101(target: str) -> None:
    async with bot_server() as bot, running(config(bot.url)) as gw, \
            provider(gw.ws_port, target) as p:
        assert isinstance(p, Refusal)
        assert p.status == 404 and p.body["code"] in ("unknown_service_host",)
    assert bot.requests == []


@pytest.mark.parametrize("suffix", ["", "/not-a-token", "?serviceHost=bot.local&token="])
async def test_bad_url_token_is_403_before_the_101(suffix: str) -> None:
    target = f"/ws/twilio/bot.local{suffix}" if not suffix.startswith("?") else \
        f"/ws/twilio{suffix}"
    async with bot_server() as bot, \
            running(config(bot.url, websocket_auth="token")) as gw, \
            provider(gw.ws_port, target) as p:
        assert isinstance(p, Refusal)
        assert p.status == 403
        assert p.body["code"] in ("missing", "malformed")
    assert bot.requests == []


# ------------------------------------------------------------------ refusals after the 101


def wrong(provider_name: str) -> bytes:
    return b"".join(frame(m) for m in fixture(provider_name)["opening"])


@pytest.mark.parametrize(("target", "data", "reason"), [
    ("/ws/twilio/bot.local", wrong("plivo"),
     "not a twilio stream: opening message 1 has event 'start', expected 'connected'"),
    ("/ws/plivo/bot.local", wrong("telnyx"),
     "not a plivo stream: opening message 1 has event 'connected', expected 'start'"),
    ("/ws/telnyx/bot.local", encode_frame(OP_TEXT, b"{nope", mask=True),
     "telnyx opening message 1 is not JSON"),
    ("/ws/exotel/bot.local", encode_frame(2, b"\x00\x01", mask=True),
     "binary frame where exotel's opening message 1 (JSON text) was expected"),
    ("/ws/twilio/bot.local", encode_frame(OP_TEXT, b" " * 20000, mask=True)[:14],
     "twilio opening messages exceed 16384 bytes"),
    ("/ws/twilio", wrong("twilio"),
     "cannot route: no ?serviceHost=, no /ws/twilio/agent.org path and no "
     "customParameters._pipecatCloudServiceHost"),
    ("/ws/twilio", b"".join(frame(m) for m in twilio_opening(
        _pipecatCloudServiceHost="nope.local")),
     "no agent 'nope' in organization 'local' here"),
    ("/ws/twilio", b"".join(frame(m) for m in twilio_opening(
        _pipecatCloudServiceHost="bot.other")),
     "no agent 'bot' in organization 'other' here"),
    ("/ws/twilio/bot.local", b"".join(frame(m) for m in twilio_opening(
        _pipecatCloudServiceHost="other.local")),
     "customParameters._pipecatCloudServiceHost 'other.local' differs from the URL's "
     "bot.local"),
])
async def test_not_the_providers_protocol_or_unroutable_is_1008_nothing_dialled(
        target: str, data: bytes, reason: str) -> None:
    async with bot_server() as bot, running(config(bot.url)) as gw, \
            provider(gw.ws_port, target) as p:
        assert await refused_with_1008(p, data) == reason
    assert bot.requests == []


async def test_too_slow_opening_is_1008_at_handshake_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
    cfg = make_config("ws://127.0.0.1:9/never", agent="bot",
                      server={"handshake_timeout": 5})
    async with running(cfg) as gw, provider(gw.ws_port, "/ws/twilio/bot.local") as p:
        assert isinstance(p, Provider)
        began = trio.current_time()
        await p.send(frame(fixture("twilio")["opening"][0]))  # connected, then nothing
        code, reason = await p.closed()
        waited = trio.current_time() - began
    assert (code, reason) == (1008, "twilio opening messages not received within 5.0 s")
    assert 5 <= waited < 5.5


async def test_refused_opening_gives_the_url_token_back() -> None:
    """A connection that never proved to be a provider's stream does not burn the token."""
    async with bot_server() as bot, \
            running(config(bot.url, websocket_auth="token")) as gw:
        tok = token()
        async with provider(gw.ws_port, f"/ws/twilio/bot.local/{tok}") as p:
            await refused_with_1008(p, wrong("plivo"))
        assert bot.requests == []
        async with provider(gw.ws_port, f"/ws/twilio/bot.local/{tok}") as p:
            assert isinstance(p, Provider)
            await p.send(wrong("twilio") + frame("hi"))
            assert [await p.message() for _ in range(3)][-1] == "hi"
    assert len(bot.requests) == 1


async def test_one_token_on_two_provider_connections_admits_one() -> None:
    """The token is reserved before the 101: a second upgrade with it is 403 `replayed`
    while the first is still reading its opening; once the first is refused, it is free."""
    tok = token()
    target = f"/ws/twilio/bot.local/{tok}"
    async with bot_server() as bot, \
            running(config(bot.url, websocket_auth="token")) as gw:
        async with provider(gw.ws_port, target) as first:
            assert isinstance(first, Provider)  # holding the token, opening not sent yet
            async with provider(gw.ws_port, target) as second:
                assert isinstance(second, Refusal)
                assert (second.status, second.body["code"]) == (403, "replayed")
            await refused_with_1008(first, wrong("telnyx"))
        async with provider(gw.ws_port, target) as third:
            assert isinstance(third, Provider)
            await third.send(wrong("twilio"))
            assert [await third.message() for _ in range(2)] == fixture("twilio")["opening"]
    assert len(bot.requests) == 1


class _DownStore(MemoryStore):
    """The store as a network store is while unreachable: every reservation fails."""

    async def reserve(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("connection refused")


async def test_store_down_when_the_start_names_the_token_is_1013() -> None:
    """After the 101 a 503 cannot be sent: the provider is told to try again (1013)."""
    opening = twilio_opening(_pipecatCloudServiceHost="bot.local", token=token())
    async with bot_server() as bot, \
            running(config(bot.url, websocket_auth="token")) as gw:
        gw.gateway.rt.store = _DownStore()
        async with provider(gw.ws_port, "/ws/twilio") as p:
            assert isinstance(p, Provider)
            await p.send(b"".join(frame(m) for m in opening))
            assert await p.closed() == (1013, "try again later: store_unavailable")
    assert bot.requests == []


async def test_client_close_during_the_opening_is_answered_nothing_dialled() -> None:
    async with bot_server() as bot, running(config(bot.url)) as gw, \
            provider(gw.ws_port, "/ws/telnyx/bot.local") as p:
        assert isinstance(p, Provider)
        close = encode_frame(8, (1000).to_bytes(2, "big") + b"hang up", mask=True)
        await p.send(frame(fixture("telnyx")["opening"][0]) + close)
        event = await p.event()
        assert isinstance(event, CloseConnection)
        assert (event.code, event.reason) == (1000, "hang up")
    assert bot.requests == []


async def test_unreachable_bot_after_the_opening_is_1014() -> None:
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with running(config(f"ws://127.0.0.1:{port}/bot")) as gw, \
            provider(gw.ws_port, "/ws/plivo/bot.local") as p:
        assert isinstance(p, Provider)
        await p.send(wrong("plivo"))
        assert await p.closed() == (1014, "bot unreachable")


async def test_full_agent_that_rejects_is_1013_after_the_opening() -> None:
    async with bot_server() as bot, \
            running(config(bot.url, when_full="reject")) as gw, \
            provider(gw.ws_port, "/ws/exotel/bot.local") as first:
        assert isinstance(first, Provider)
        await first.send(wrong("exotel") + frame("x"))
        assert [await first.message() for _ in range(3)][-1] == "x"
        async with provider(gw.ws_port, "/ws/exotel/bot.local") as second:
            assert isinstance(second, Provider)
            await second.send(wrong("exotel"))
            assert await second.closed() == (1013, "try again later")
    assert len(bot.requests) == 1


async def test_shutdown_during_the_opening_is_1001_nothing_dialled() -> None:
    async with bot_server() as bot, running(config(bot.url)) as gw, \
            provider(gw.ws_port, "/ws/twilio/bot.local") as p:
        assert isinstance(p, Provider)
        await p.send(frame(fixture("twilio")["opening"][0]))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(gw.gateway.shutdown)
            assert await p.closed() == (1001, "")
    assert bot.requests == []
