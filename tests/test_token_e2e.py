"""Token auth end to end, through both planes on loopback (SPEC §3, §4, §5, §8).

Every test talks real HTTP/1.1 to the control plane (/start, /metrics, with h11 over a
trio TCP stream) and a real WebSocket (trio-websocket) to the data plane of a real
`Gateway` on port 0; the bot is a real upstream WebSocket server (`support.bot_server`)
or an in-process bot defined in this module. Token expiry runs on a fake clock: either
trio's (`autojump_clock`, the gateway's wall clock being `trio.current_time`) or a
hand-moved `FakeWallClock`. Nothing sleeps on real time; every wait is bounded.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import pytest
import trio
import trio.lowlevel
import trio.testing
from support import BotServer, bot_server, running
from support import http as support_http
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    open_websocket_url,
)
from wsproto import ConnectionType, WSConnection
from wsproto.events import CloseConnection
from wsproto.events import Request as WsRequest

from relay.config import Config, build_config, load_config
from relay.inprocess import ClientDisconnected, Session
from relay.store import MemoryStore
from relay.tokens import KeyRing, mint

PK = "pk_e2e_1"
PUBLIC_URL = "wss://relay.example.test:9443"
ORG = "local"
WAIT = 10  # seconds: backstop for every network wait (nothing here waits on time)


# ------------------------------------------------------------------ in-process bots


seen_by_in_process_bot: list[tuple[str, str, Any]] = []  # (session.id, session.agent, session.body)


async def your_bot(session: Session) -> None:
    """Records what the gateway told it about the session, then echoes."""
    seen_by_in_process_bot.append((session.id, session.agent, session.body))
    try:
        while True:
            await session.send(await session.receive())
    except ClientDisconnected:
        return


# ------------------------------------------------------------------ config and clocks


class FakeWallClock:
    """A wall clock (unix seconds) that moves only when told to."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def e2e_config(bot_url: str, *, dead_port: int = 9, **extra_agents: dict[str, Any]) -> Config:
    token = {"bot": bot_url, "websocket_auth": "token"}
    return build_config(
        server={
            "ws_bind": ["127.0.0.1:0"],
            "api_bind": ["127.0.0.1:0"],
            "ping_interval": 1000,
            "ping_timeout": 1000,
            "public_url": PUBLIC_URL + "/",
            "organization": ORG,
            "public_keys": ["pk_other", PK],
            "start_rate": 10000,  # 1000 /start cycles as fast as the machine goes
            "start_burst": 10000,
        },
        agents={
            "tok": dict(token),
            "tok2": dict(token),
            "open": {"bot": bot_url},
            "pc": {**token, "bot_protocol": "pipecat-cloud"},
            "rel": {**token, "bot_protocol": "relay"},  # opt-in: the relay.session frame
            "full": {**token, "when_full": "reject", "max_clients": 1},
            "openfull": {"bot": bot_url, "when_full": "reject", "max_clients": 1},
            "inproc": {"bot": "python:test_token_e2e:your_bot", "websocket_auth": "token"},
            "inecho": {"bot": "python:relay.echo:echo_bot", "websocket_auth": "token"},
            "dead": {"bot": f"ws://127.0.0.1:{dead_port}/bot", "websocket_auth": "token"},
            **extra_agents,
        },
    )


@asynccontextmanager
async def closed_port() -> AsyncIterator[int]:
    """A loopback port that is bound but not listening: a connect to it is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()


# ------------------------------------------------------------------ HTTP (control plane)


async def http(
    port: int,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    host: str = "127.0.0.1",
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request to the control plane (support.http), bounded."""
    with trio.fail_after(WAIT):
        return await support_http(host, port, method, target, headers, body)


async def start(
    api_port: int,
    agent: str,
    payload: Any = None,
    *,
    key: str | None = PK,
    query: str = "",
    raw: bytes | None = None,
) -> tuple[int, Any]:
    """POST /v1/public/{agent}/start; (status, parsed JSON answer)."""
    if raw is None:
        raw = json.dumps({"transport": "websocket"} if payload is None else payload).encode()
    headers = [("content-type", "application/json")]
    if key is not None:
        headers.append(("authorization", f"Bearer {key}"))
    status, _, body = await http(api_port, "POST", f"/v1/public/{agent}/start{query}", headers, raw)
    return status, json.loads(body)


async def start_ok(api_port: int, agent: str, payload: Any = None) -> dict[str, Any]:
    status, answer = await start(api_port, agent, payload)
    assert status == 200, answer
    assert isinstance(answer, dict), answer
    return answer


async def refusal_count(api_port: int, reason: str) -> float:
    """relay_token_refusals_total{reason=...} from a real GET /metrics (0 when absent)."""
    status, _, body = await http(api_port, "GET", "/metrics")
    assert status == 200
    prefix = f'relay_token_refusals_total{{reason="{reason}"}} '
    for line in body.decode().splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


# ------------------------------------------------------------------ WebSocket (data plane)


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


async def echo_once(ws: WebSocketConnection, message: str | bytes = "ping") -> None:
    with trio.fail_after(WAIT):
        await ws.send_message(message)
        assert await ws.get_message() == message


async def relay_works(url: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Connect, one echo round trip (text and binary), close cleanly."""
    with trio.fail_after(WAIT):
        async with open_websocket_url(url, extra_headers=headers) as ws:
            await echo_once(ws, "hello")
            await echo_once(ws, b"\x00\xff")


async def rejected(
    url: str, headers: list[tuple[bytes, bytes]] | None = None, *, accept_ok: bool = False
) -> tuple[int, dict[str, str], Any]:
    """A WebSocket upgrade (raw, over h11) expected to be refused with plain HTTP.

    (trio-websocket leaves its socket open after ConnectionRejected, so refusals are
    read with h11 directly.) Returns (status, headers, parsed JSON body).
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    request_headers = [
        (b"host", f"{host}:{port}".encode()),
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-key", base64.b64encode(os.urandom(16))),
        (b"sec-websocket-version", b"13"),
        *(headers or []),
    ]
    # written by hand: h11 would refuse to send a header value such as "Bearer "
    head = b"".join(
        [
            f"GET {target} HTTP/1.1\r\n".encode(),
            *(name + b": " + value + b"\r\n" for name, value in request_headers),
            b"\r\n",
        ]
    )
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            conn.send(
                h11.Request(
                    method="GET",
                    target=target,  # h11's state: request sent
                    headers=request_headers[:3],
                )
            )
            await stream.send_all(head)
            status, response_headers, chunks = 0, {}, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65_536))
                elif isinstance(event, h11.InformationalResponse):
                    if accept_ok and event.status_code == 101:
                        return 101, {}, None  # dropped at once: the client vanishes
                    raise AssertionError(f"upgrade to {url} was accepted ({event.status_code})")
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    response_headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
    return status, response_headers, json.loads(b"".join(chunks) or b"null")


async def refused_with(
    url: str, status: int, code: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    got_status, got_headers, body = await rejected(url, headers)
    assert (got_status, body.get("code")) == (status, code), body
    assert set(body) == {"error", "code", "detail"}
    assert got_headers.get("content-type") == "application/json"


async def until(condition: Callable[[], bool]) -> None:
    """Checkpoint until ``condition()`` holds (gateway-side teardown after a client left)."""
    with trio.fail_after(WAIT):
        while not condition():  # no public gateway event for this
            await trio.lowlevel.checkpoint()


def bot_header(bot: BotServer, index: int, name: str) -> str | None:
    for key, value in bot.requests[index].headers:
        if key.decode().lower() == name:
            return value.decode()
    return None


@asynccontextmanager
async def e2e(**agents: dict[str, Any]) -> AsyncIterator[tuple[BotServer, Any]]:
    async with (
        bot_server() as bot,
        closed_port() as dead,
        running(e2e_config(bot.url, dead_port=dead, **agents)) as gw,
    ):
        yield bot, gw


# ------------------------------------------------------------------ placements


@pytest.mark.parametrize("placement", ["header", "query", "path", "service_host_query"])
async def test_start_token_in_each_placement_relays_and_bot_sees_start_session_id(
    placement: str,
) -> None:
    async with e2e() as (bot, gw):
        answer = await start_ok(gw.api_port, "tok")
        assert set(answer) == {"token", "wsUrl", "sessionId"}
        token = answer["token"]
        headers = None
        if placement == "header":
            url = gw.url("tok")
            headers = bearer(token)
        elif placement == "query":
            url = gw.url("tok", f"?token={token}")
        elif placement == "path":
            url = gw.url("tok", f"/{token}")
        else:
            url = f"{gw.ws_base}/ws/generic?serviceHost=tok.{ORG}&token={token}"
        await relay_works(url, headers)
        assert len(bot.requests) == 1
        assert bot_header(bot, 0, "x-relay-session-id") == answer["sessionId"]
        assert bot_header(bot, 0, "x-relay-agent") == "tok"
        assert bot_header(bot, 0, "x-relay-organization") == ORG
        assert bot_header(bot, 0, "authorization") is None  # never the client's
        assert token not in bot.requests[0].path  # the token never reaches the bot
        assert bot.received == ["hello", b"\x00\xff"]


# ------------------------------------------------------------------ first present source


async def test_bad_bearer_header_is_authoritative_over_valid_query_token() -> None:
    async with e2e() as (bot, gw):
        token = (await start_ok(gw.api_port, "tok"))["token"]
        await refused_with(
            gw.url("tok", f"?token={token}"), 403, "malformed", bearer("not-a-token")
        )
        # a forged header next to the valid token: bad_signature, still authoritative
        forged = mint(
            KeyRing.parse("k1:someone-else"),
            agent="tok",
            org=ORG,
            session_id="x",
            now=trio.current_time(),
        )
        await refused_with(gw.url("tok", f"/{token}"), 403, "bad_signature", bearer(forged))
        assert bot.requests == []
        # an auth refusal never burned the valid token
        await relay_works(gw.url("tok", f"?token={token}"))


async def test_empty_query_token_is_present_and_refused_despite_valid_path_token() -> None:
    async with e2e() as (bot, gw):
        token = (await start_ok(gw.api_port, "tok"))["token"]
        await refused_with(gw.url("tok", f"/{token}?token="), 403, "missing")
        assert bot.requests == []
        await relay_works(gw.url("tok", f"/{token}"))


async def test_empty_bearer_header_is_present_and_refused_despite_valid_query_token() -> None:
    async with e2e() as (bot, gw):
        token = (await start_ok(gw.api_port, "tok"))["token"]
        await refused_with(
            gw.url("tok", f"?token={token}"), 403, "missing", [(b"authorization", b"Bearer ")]
        )
        assert bot.requests == []


async def test_basic_authorization_is_not_a_token_source_query_token_used() -> None:
    async with e2e() as (bot, gw):
        answer = await start_ok(gw.api_port, "tok")
        basic = base64.b64encode(b"user:pass")
        await relay_works(
            gw.url("tok", f"?token={answer['token']}"), [(b"authorization", b"Basic " + basic)]
        )
        assert bot_header(bot, 0, "x-relay-session-id") == answer["sessionId"]
        assert bot_header(bot, 0, "authorization") is None


# ------------------------------------------------------------------ replay


async def test_second_upgrade_with_same_token_is_403_replayed_and_bot_sees_nothing() -> None:
    async with e2e() as (bot, gw):
        token = (await start_ok(gw.api_port, "tok"))["token"]
        await relay_works(gw.url("tok", f"/{token}"))
        assert len(bot.requests) == 1
        before = await refusal_count(gw.api_port, "replayed")
        # whatever the placement, the second use is a replay
        await refused_with(gw.url("tok", f"/{token}"), 403, "replayed")
        await refused_with(gw.url("tok", f"?token={token}"), 403, "replayed")
        await refused_with(gw.url("tok"), 403, "replayed", bearer(token))
        assert len(bot.requests) == 1
        assert await refusal_count(gw.api_port, "replayed") == before + 3


async def test_replayed_token_leaves_the_live_session_alone() -> None:
    """max_clients = 1, replace: a replay of the incumbent's own token must be refused
    before admission, so it never closes the incumbent (one token, one session)."""
    closes: list[int | None] = []
    async with e2e() as (bot, gw):
        token = (await start_ok(gw.api_port, "tok"))["token"]
        with trio.fail_after(WAIT):
            async with open_websocket_url(gw.url("tok", f"/{token}")) as incumbent:
                await echo_once(incumbent, "before")
                await refused_with(gw.url("tok", f"/{token}"), 403, "replayed")
                await echo_once(incumbent, "after")  # still open, still relaying
                assert gw.gateway.session_count("tok") == 1
                closes.extend(bot.close_codes)  # the incumbent's bot leg was not closed
    assert closes == []
    assert len(bot.requests) == 1


async def test_token_that_expires_while_its_upgrade_waits_for_the_predecessor_is_403() -> None:
    """The newcomer's token is valid at its upgrade, but the predecessor's teardown (its
    on_client_disconnected moves the wall clock 2 s) outlasts it: the token is refused
    as expired after admission, never used, and no bot is dialled for it."""
    clock = FakeWallClock()
    async with bot_server() as bot, running(
        e2e_config(bot.url), wall_clock=clock,
        on_client_disconnected=lambda info: clock.advance(2),
    ) as gw:
        first = (await start_ok(gw.api_port, "tok"))["token"]
        late = (await start_ok(gw.api_port, "tok"))["token"]  # expires at +300 s
        with trio.fail_after(WAIT):
            async with open_websocket_url(gw.url("tok", f"/{first}")) as incumbent:
                await echo_once(incumbent)
                clock.advance(299)  # 1 s left on `late`
                await refused_with(gw.url("tok", f"/{late}"), 403, "expired")
                with pytest.raises(ConnectionClosed) as closed:
                    await incumbent.get_message()
                await incumbent._stream.aclose()
        assert closed.value.reason is not None
        assert closed.value.reason.code == 4001  # the incumbent was replaced all the same
        assert len(bot.requests) == 1


async def test_two_concurrent_upgrades_with_one_token_exactly_one_is_accepted() -> None:
    async with bot_server() as bot, closed_port() as dead:
        config = e2e_config(
            bot.url,
            dead_port=dead,
            many={"bot": bot.url, "websocket_auth": "token", "max_clients": 5},
        )
        async with running(config) as gw:
            token = (await start_ok(gw.api_port, "many"))["token"]
            statuses: list[int] = []

            async def attempt() -> None:
                status, _, body = await rejected(gw.url("many", f"/{token}"), accept_ok=True)
                statuses.append(status)
                if status != 101:
                    assert body["code"] == "replayed"

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(attempt)
            assert sorted(statuses) == [101, 403, 403, 403]
            assert len(bot.requests) == 1


# ------------------------------------------------------------------ refusal codes


@pytest.mark.parametrize("reason", ["missing", "malformed", "bad_signature", "wrong_scope"])
async def test_refusal_reason_is_403_with_its_code_and_counted_in_metrics(reason: str) -> None:
    async with e2e() as (bot, gw):
        if reason == "missing":
            url = gw.url("tok")
        elif reason == "malformed":
            url = gw.url("tok", "/abc.def.ghi")
        elif reason == "bad_signature":
            answer = await start_ok(gw.api_port, "tok")
            forged = mint(
                KeyRing.parse("k1:another-secret"),
                agent="tok",
                org=ORG,
                session_id=answer["sessionId"],
                now=trio.current_time(),
            )
            url = gw.url("tok", f"/{forged}")
        else:
            other = (await start_ok(gw.api_port, "tok2"))["token"]  # same gateway, other agent
            url = gw.url("tok", f"/{other}")
        assert await refusal_count(gw.api_port, reason) == 0
        await refused_with(url, 403, reason)
        assert await refusal_count(gw.api_port, reason) == 1
        assert bot.requests == []
        assert gw.gateway.session_count() == 0


async def test_token_expires_300s_after_start_403_expired(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with e2e() as (bot, gw):
        token = (await start_ok(gw.api_port, "tok"))["token"]
        await trio.sleep(300)
        await refused_with(gw.url("tok", f"/{token}"), 403, "expired")
        assert await refusal_count(gw.api_port, "expired") == 1
        assert bot.requests == []


async def test_token_still_valid_299s_after_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with e2e() as (bot, gw):
        answer = await start_ok(gw.api_port, "tok")
        await trio.sleep(299)
        await relay_works(gw.url("tok", f"/{answer['token']}"))
        assert bot_header(bot, 0, "x-relay-session-id") == answer["sessionId"]
        assert await refusal_count(gw.api_port, "expired") == 0


# ------------------------------------------------------------------ non-auth refusals


async def test_wrong_org_unknown_agent_and_wrong_scope_do_not_burn_a_valid_token() -> None:
    async with e2e() as (bot, gw):
        answer = await start_ok(gw.api_port, "tok")
        token = answer["token"]
        await refused_with(
            f"{gw.ws_base}/ws/generic/tok.other-org/{token}", 404, "unknown_service_host"
        )
        await refused_with(
            f"{gw.ws_base}/ws/generic/nosuch.{ORG}?token={token}", 404, "unknown_service_host"
        )
        await refused_with(gw.url("tok2", f"/{token}"), 403, "wrong_scope")
        assert bot.requests == []
        await relay_works(gw.url("tok", f"/{token}"))
        assert bot_header(bot, 0, "x-relay-session-id") == answer["sessionId"]


async def test_full_agent_in_reject_mode_1013_does_not_burn_a_valid_token() -> None:
    async with e2e() as (bot, gw):
        first = await start_ok(gw.api_port, "full")
        second = await start_ok(gw.api_port, "full")  # taken while the agent is not full
        with trio.fail_after(WAIT):
            async with open_websocket_url(gw.url("full", f"/{first['token']}")) as holder:
                await echo_once(holder)
                # accepted, then at once closed 1013
                async with open_websocket_url(gw.url("full", f"/{second['token']}")) as ws:
                    try:
                        with pytest.raises(ConnectionClosed) as closed:
                            await ws.get_message()
                    finally:
                        # trio-websocket never closes its socket when the server closes
                        # first (a ResourceWarning later); the test closes it itself.
                        await ws._stream.aclose()
                    assert closed.value.reason is not None
                    assert closed.value.reason.code == 1013
                assert len(bot.requests) == 1  # no bot dialled for the refused one
        await until(lambda: gw.gateway.session_count("full") == 0)  # the holder's teardown
        await relay_works(gw.url("full", f"/{second['token']}"))
        assert bot_header(bot, 1, "x-relay-session-id") == second["sessionId"]


async def test_full_agent_1013_gateway_closes_tcp_right_after_the_close_exchange(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with e2e() as (_bot, gw):
        first = await start_ok(gw.api_port, "full")
        second = await start_ok(gw.api_port, "full")
        with trio.fail_after(WAIT):
            async with open_websocket_url(gw.url("full", f"/{first['token']}")) as holder:
                await echo_once(holder)
                stream = await trio.open_tcp_stream("127.0.0.1", gw.ws_port)
                async with stream:
                    ws = WSConnection(ConnectionType.CLIENT)
                    target = f"/ws/generic/full.{ORG}/{second['token']}"
                    await stream.send_all(ws.send(WsRequest(host="127.0.0.1", target=target)))
                    closed_at = None
                    while closed_at is None:
                        data = await stream.receive_some(65_536)
                        assert data, "EOF before the close frame"
                        ws.receive_data(data)
                        for event in ws.events():
                            if isinstance(event, CloseConnection):
                                assert event.code == 1013
                                # the gateway waits for our answer (RFC 6455 §7.1.1):
                                # no EOF while we take 0.5 s to send it
                                with trio.move_on_after(0.5):
                                    assert await stream.receive_some(65_536) != b"", (
                                        "the gateway closed TCP before our close reply")
                                await stream.send_all(ws.send(event.response()))
                                closed_at = trio.current_time()
                    # the server now closes TCP first: EOF without the client closing
                    while await stream.receive_some(65_536):
                        pass
                    waited = trio.current_time() - closed_at
        assert waited < 0.5, f"gateway held the TCP connection {waited:.2f} s"


# ------------------------------------------------------------------ held bodies


async def test_held_body_is_first_frame_relay_session_then_client_frames_in_order() -> None:
    body = {"caller": "+15550001", "nested": {"list": [1, 2.5, None, True]}, "u": "é"}
    async with e2e() as (bot, gw):
        answer = await start_ok(gw.api_port, "rel", {"transport": "websocket", "body": body})
        with trio.fail_after(WAIT):
            async with open_websocket_url(gw.url("rel", f"/{answer['token']}")) as ws:
                for message in ("one", b"two", "three"):
                    await ws.send_message(message)
                echoed = [await ws.get_message() for _ in range(4)]
        first = bot.received[0]
        assert isinstance(first, str)  # a text frame
        assert json.loads(first) == {
            "type": "relay.session",
            "sessionId": answer["sessionId"],
            "agent": "rel",
            "body": body,
        }
        assert bot.received[1:] == ["one", b"two", "three"]
        assert echoed[1:] == ["one", b"two", "three"]
        assert bot_header(bot, 0, "x-relay-session-id") == answer["sessionId"]
        assert gw.gateway.rt.store.entry_count == 0
        assert gw.gateway.rt.store.body_bytes == 0


async def test_no_body_means_no_relay_session_frame() -> None:
    async with e2e() as (bot, gw):
        answer = await start_ok(gw.api_port, "tok", {"transport": "websocket", "body": None})
        await relay_works(gw.url("tok", f"/{answer['token']}"))
        assert bot.received == ["hello", b"\x00\xff"]


PIPECAT_BODY = {"q": "?>>>>?", "n": 0}  # standard base64 of its compact JSON has + / =


async def test_pipecat_cloud_body_is_percent_encoded_base64_query_and_daily_session_id() -> None:
    compact = json.dumps(PIPECAT_BODY, separators=(",", ":")).encode()
    encoded = base64.b64encode(compact).decode()
    assert "+" in encoded and "/" in encoded and "=" in encoded  # the test's own premise
    async with e2e() as (bot, gw):
        answer = await start_ok(gw.api_port, "pc", {"transport": "websocket", "body": PIPECAT_BODY})
        await relay_works(gw.url("pc", f"/{answer['token']}?lang=en"))
        target = bot.requests[0].path
        query = urlsplit(target).query
        assert "%2B" in query and "%2F" in query and "%3D" in query, target  # percent-encoded
        params = parse_qs(query, keep_blank_values=True, strict_parsing=True)
        assert params["lang"] == ["en"]  # the client's own query still passes
        assert "token" not in params
        assert base64.b64decode(params["body"][0], validate=True) == compact
        assert json.loads(base64.b64decode(params["body"][0])) == PIPECAT_BODY
        assert bot_header(bot, 0, "x-daily-session-id") == answer["sessionId"]
        assert bot_header(bot, 0, "x-relay-session-id") == answer["sessionId"]
        assert bot.received == ["hello", b"\x00\xff"]  # no relay.session frame


CLIENT_BODY_SPELLINGS = ["body=e30", "bod%79=e30", "%62ody=e30", "bo%2564y=e30",
                         "body+=e30", "Body=e30", "x=1;body=e30", "body"]


def bot_params(bot: BotServer, index: int = 0) -> dict[str, list[str]]:
    """The query of the bot's upgrade request as the bot's URL parser reads it."""
    return parse_qs(urlsplit(bot.requests[index].path).query, keep_blank_values=True)


async def test_default_protocol_client_body_never_reaches_the_bot_next_to_the_held_one() -> None:
    """SPEC §8 rev 2: only the gateway puts `body` on the bot's URL, whatever the spelling."""
    async with e2e() as (bot, gw):
        assert gw.gateway.rt.config.agents["tok"].bot_protocol == "pipecat-cloud"  # default
        answer = await start_ok(gw.api_port, "tok", {"transport": "websocket", "body": {"a": 1}})
        query = "&".join(["lang=en", *CLIENT_BODY_SPELLINGS])
        await relay_works(gw.url("tok", f"/{answer['token']}?{query}"))
        params = bot_params(bot)
        assert params["lang"] == ["en"]
        assert params["body"] == [base64.b64encode(b'{"a":1}').decode()]  # the held one, once
        assert set(params) == {"lang", "body"}, params  # none of the client's spellings
        assert bot_header(bot, 0, "x-daily-session-id") == answer["sessionId"]
        assert bot.received == ["hello", b"\x00\xff"]  # nothing injected into the stream


async def test_default_protocol_client_body_dropped_when_there_is_no_held_body() -> None:
    async with e2e() as (bot, gw):
        query = "&".join(["keep=1", *CLIENT_BODY_SPELLINGS])
        await relay_works(gw.url("open", f"?{query}"))
        assert bot_params(bot) == {"keep": ["1"]}


async def test_client_cannot_repeat_a_parameter_the_bot_url_sets() -> None:
    async with bot_server() as bot, closed_port() as dead:
        fixed = {"bot": bot.url + "?mode=prod&lang=en"}
        async with running(e2e_config(bot.url, dead_port=dead, fixed=fixed)) as gw:
            await relay_works(gw.url("fixed", "?mode=debug&m%6Fde=debug&lang=fr&own=1"))
        assert bot_params(bot) == {"mode": ["prod"], "lang": ["en"], "own": ["1"]}
        assert urlsplit(bot.requests[0].path).query == "mode=prod&lang=en&own=1"


async def test_fragment_in_the_upgrade_target_is_400_and_no_bot_is_dialled() -> None:
    async with e2e() as (bot, gw):
        answer = await start_ok(gw.api_port, "tok", {"transport": "websocket", "body": {"a": 1}})
        url = gw.url("tok", f"/{answer['token']}?x=1")
        status, _, refusal = await rejected_raw_target(url + "#body=e30")
        assert status == 400 and refusal["code"] == "bad_target"
        assert set(refusal) == {"error", "code", "detail"}
        assert bot.requests == []
        # nothing lost: the token was not burned, the held body still reaches the bot
        await relay_works(url)
        assert bot_params(bot)["body"] == [base64.b64encode(b'{"a":1}').decode()]


async def rejected_raw_target(url: str) -> tuple[int, dict[str, str], Any]:
    """Like `rejected`, for a target h11 (and urlsplit) would not send: a raw '#'."""
    base, _, fragment = url.partition("#")
    parts = urlsplit(base)
    target = parts.path + (f"?{parts.query}" if parts.query else "") + "#" + fragment
    head = (f"GET {target} HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\n"
            "connection: Upgrade\r\nsec-websocket-version: 13\r\n"
            f"sec-websocket-key: {base64.b64encode(os.urandom(16)).decode()}\r\n\r\n")
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 80)
        async with stream:
            await stream.send_all(head.encode())
            conn = h11.Connection(h11.CLIENT)
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            conn.send(h11.EndOfMessage())
            status, headers, chunks = 0, {}, []
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65_536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    return status, headers, json.loads(b"".join(chunks))


async def test_pipecat_cloud_body_limit_4096_bytes_compact_json_at_start() -> None:
    async with e2e() as (_bot, gw):
        at_limit = {"p": "x" * (4096 - len('{"p":""}'))}
        over = {"p": "x" * (4097 - len('{"p":""}'))}
        assert len(json.dumps(at_limit, separators=(",", ":"))) == 4096
        status, _ = await start(gw.api_port, "pc", {"transport": "websocket", "body": at_limit})
        assert status == 200
        # non-compact spacing in the request does not count: the compact form does
        spaced = json.dumps({"transport": "websocket", "body": at_limit}, indent=8).encode()
        status, _ = await start(gw.api_port, "pc", raw=spaced)
        assert status == 200
        status, answer = await start(gw.api_port, "pc", {"transport": "websocket", "body": over})
        assert status == 413 and answer["code"] == "body_too_large"
        assert set(answer) == {"error", "code", "detail"}
        # the same body is fine for a relay-protocol agent
        status, _ = await start(gw.api_port, "rel", {"transport": "websocket", "body": over})
        assert status == 200


async def test_in_process_bot_gets_start_session_id_and_no_body_as_none() -> None:
    seen_by_in_process_bot.clear()
    async with e2e() as (_bot, gw):
        with_body = await start_ok(
            gw.api_port, "inproc", {"transport": "websocket", "body": {"a": 1}}
        )
        await relay_works(gw.url("inproc", f"/{with_body['token']}"))
        without = await start_ok(gw.api_port, "inproc")
        await relay_works(gw.url("inproc"), bearer(without["token"]))
        await refused_with(gw.url("inproc", f"/{with_body['token']}"), 403, "replayed")
    assert [(sid, agent) for sid, agent, _ in seen_by_in_process_bot] == [
        (with_body["sessionId"], "inproc"),
        (without["sessionId"], "inproc"),
    ]
    assert seen_by_in_process_bot[1][2] is None


async def test_in_process_bot_gets_session_body_as_the_json_value_from_start() -> None:
    seen_by_in_process_bot.clear()
    body = {"greeting": "hi", "n": [1, 2, 3]}
    async with e2e() as (_bot, gw):
        answer = await start_ok(gw.api_port, "inproc", {"transport": "websocket", "body": body})
        await relay_works(gw.url("inproc", f"/{answer['token']}"))
    expected = [(answer["sessionId"], "inproc", body)]
    assert seen_by_in_process_bot == expected


# ------------------------------------------------------------------ SPEC §3 rows


async def test_start_auth_none_without_body_gives_wsurl_and_session_id_no_token() -> None:
    async with e2e() as (bot, gw):
        status, answer = await start(gw.api_port, "open")
        assert status == 200
        assert set(answer) == {"wsUrl", "sessionId"}
        assert answer["wsUrl"] == f"{PUBLIC_URL}/ws/generic/open.{ORG}"
        status, answer = await start(gw.api_port, "open", {"transport": "websocket", "body": None})
        assert status == 200 and set(answer) == {"wsUrl", "sessionId"}
        # auth none ignores tokens, even a bad one
        await relay_works(gw.url("open", "/whatever?token=junk"), bearer("junk"))
        assert bot_header(bot, 0, "authorization") is None


async def test_start_auth_none_with_body_is_400() -> None:
    async with e2e() as (_bot, gw):
        status, answer = await start(
            gw.api_port, "open", {"transport": "websocket", "body": {"a": 1}}
        )
        assert status == 400 and answer["code"] == "body_requires_token_auth"
        assert set(answer) == {"error", "code", "detail"}


async def test_start_shape_client_is_exactly_wsurl_and_token_and_token_works() -> None:
    async with e2e() as (bot, gw):
        status, answer = await start(gw.api_port, "tok", query="?shape=client")
        assert status == 200
        assert set(answer) == {"wsUrl", "token"}
        assert answer["wsUrl"] == f"{PUBLIC_URL}/ws/generic/tok.{ORG}"
        await relay_works(gw.url("tok", f"/{answer['token']}"))
        assert len(bot.requests) == 1


async def test_start_wsurl_is_public_url_agent_org_whatever_the_body() -> None:
    async with e2e() as (_bot, gw):
        plain = await start_ok(gw.api_port, "rel")
        big = await start_ok(
            gw.api_port, "rel", {"transport": "websocket", "body": {"x": "y" * 100_000}}
        )
        assert plain["wsUrl"] == big["wsUrl"] == f"{PUBLIC_URL}/ws/generic/rel.{ORG}"
        assert plain["sessionId"] != big["sessionId"]


async def test_start_401_404_400_envelopes() -> None:
    async with e2e() as (_bot, gw):
        for key in (None, "pk_wrong"):
            status, answer = await start(gw.api_port, "tok", key=key)
            assert status == 401 and set(answer) == {"error", "code", "detail"}
        status, answer = await start(gw.api_port, "nosuch")
        assert status == 404 and set(answer) == {"error", "code", "detail"}
        # 401 comes before 404 (SPEC §8 order)
        status, _ = await start(gw.api_port, "nosuch", key="pk_wrong")
        assert status == 401
        for raw in (b"not json", b'{"transport": "webrtc"}', b"[1]"):
            status, answer = await start(gw.api_port, "tok", raw=raw)
            assert status == 400 and set(answer) == {"error", "code", "detail"}, raw


async def test_start_429_when_agent_full_and_rejecting() -> None:
    async with e2e() as (_bot, gw):
        status, _ = await start(gw.api_port, "openfull")
        assert status == 200
        with trio.fail_after(WAIT):
            async with open_websocket_url(gw.url("openfull")) as ws:
                await echo_once(ws)
                status, answer = await start(gw.api_port, "openfull")
                assert status == 429 and answer["code"] == "agent_full"
                assert set(answer) == {"error", "code", "detail"}


# ------------------------------------------------------------------ dial failure


async def test_dial_failure_after_consume_is_502_then_same_token_is_replayed() -> None:
    async with e2e() as (_bot, gw):
        answer = await start_ok(
            gw.api_port, "dead", {"transport": "websocket", "body": {"held": True}}
        )
        assert gw.gateway.rt.store.entry_count == 1
        await refused_with(gw.url("dead", f"/{answer['token']}"), 502, "bad_gateway")
        # consumed just before the dial: the token and its body are gone
        assert gw.gateway.rt.store.entry_count == 0
        assert gw.gateway.rt.store.body_bytes == 0
        await refused_with(gw.url("dead", f"/{answer['token']}"), 403, "replayed")
        assert gw.gateway.session_count() == 0


# ------------------------------------------------------------------ many cycles


CYCLES = 1000


async def test_1000_start_connect_cycles_leave_no_bodies_and_purge_clears_markers() -> None:
    clock = FakeWallClock()
    async with bot_server() as bot, running(e2e_config(bot.url), wall_clock=clock) as gw:
        store = gw.gateway.rt.store
        assert isinstance(store, MemoryStore)  # no store configured: the in-memory one
        for i in range(CYCLES):
            # Bound each cycle, not the run: a hang fails at once, a loaded machine is slow
            # but never wrong (the whole run took 7 s idle and 60 s with 10 busy loops).
            with trio.fail_after(WAIT):
                answer = await start_ok(
                    gw.api_port, "inecho", {"transport": "websocket", "body": {"i": i}}
                )
                async with open_websocket_url(gw.url("inecho", f"/{answer['token']}")) as ws:
                    await ws.send_message(f"m{i}")
                    assert await ws.get_message() == f"m{i}"
        await until(lambda: gw.gateway.session_count() == 0)
        assert store.entry_count == 0
        assert store.body_bytes == 0
        assert store.consumed_count == CYCLES
        clock.advance(300)
        await store.purge(clock())
        assert store.entry_count == 0
        assert store.consumed_count == 0
        assert store.body_bytes == 0


# ------------------------------------------------------------------ relay mint-token


def _mint_config(tmp_path: Path, bot_url: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(
        "[server]\n"
        'ws_bind = ["127.0.0.1:0"]\n'
        'api_bind = ["127.0.0.1:0"]\n'
        f'public_url = "{PUBLIC_URL}"\n'
        "ping_interval = 1000\n"
        "ping_timeout = 1000\n"
        "\n[agents.tok]\n"
        f'bot = "{bot_url}"\n'
        'websocket_auth = "token"\n'
    )
    return path


async def _relay_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "relay", *args],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def test_mint_token_cli_token_is_accepted_once_by_gateway_with_same_secret(
    tmp_path: Path,
) -> None:
    secret = "k9:e2e-mint-secret,k1:older"
    async with bot_server() as bot:
        path = _mint_config(tmp_path, bot.url)
        env = {**os.environ, "RELAY_SECRET": secret}
        config = load_config(path)
        # minted while the gateway runs: the memory store refuses tokens issued before
        # it started (it cannot know whether they were used)
        async with running(config, keys=KeyRing.parse(secret), wall_clock=time.time) as gw:
            done = await _relay_cli("mint-token", "tok", "--config", str(path), env=env)
            assert done.returncode == 0, done.stderr
            printed = json.loads(done.stdout)
            assert printed["wsUrl"] == f"{PUBLIC_URL}/ws/generic/tok.local"
            await relay_works(gw.url("tok", f"/{printed['token']}"))
            assert bot_header(bot, 0, "x-relay-session-id") == printed["sessionId"]
            await refused_with(gw.url("tok", f"/{printed['token']}"), 403, "replayed")
            assert len(bot.requests) == 1


async def test_mint_token_cli_without_secret_exits_2_naming_the_variable(
    tmp_path: Path,
) -> None:
    path = _mint_config(tmp_path, "ws://127.0.0.1:9/bot")
    env = {k: v for k, v in os.environ.items() if k != "RELAY_SECRET"}
    done = await _relay_cli("mint-token", "tok", "--config", str(path), env=env)
    assert done.returncode == 2
    assert b"RELAY_SECRET" in done.stderr
    assert done.stdout == b""


# ------------------------------------------------------------------ browser Origin


async def test_foreign_origin_is_403_and_does_not_burn_a_valid_token() -> None:
    config = build_config(
        server={"ws_bind": ["127.0.0.1:0"], "api_bind": ["127.0.0.1:0"],
                "ping_interval": 1000, "ping_timeout": 1000, "organization": ORG,
                "public_keys": [PK], "cors_origins": ["https://app.example"]},
        agents={"tok": {"bot": "python:relay.echo:echo_bot", "websocket_auth": "token"}},
    )
    async with running(config) as gw:
        answer = await start_ok(gw.api_port, "tok")
        url = gw.url("tok", f"/{answer['token']}")
        await refused_with(url, 403, "origin_not_allowed",
                           [(b"origin", b"https://evil.example")])
        # the same token from an allowed page works, once
        await relay_works(url, [(b"origin", b"https://app.example")])
        await refused_with(url, 403, "replayed")
        # clients without Origin (telephony providers, servers) are not browsers: unaffected
        await relay_works(gw.url("tok", f"/{(await start_ok(gw.api_port, 'tok'))['token']}"))
