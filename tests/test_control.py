"""relay.control: the /start table of SPEC §3 and §8, CORS, /health, /metrics, serving.

Most tests drive the ASGI app directly (messages in, messages out), so the size limit can
be checked chunk by chunk. A few run it under hypercorn (``serve_control``) on 127.0.0.1
port 0 and talk HTTP/1.1 to it with h11 over a trio TCP stream. Wall-clock time (token
expiry) is an injected number; no test sleeps.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from support import http

from relay.config import Config, build_config
from relay.control import (
    MAX_PIPECAT_BODY,
    MAX_START_BODY,
    ASGIApp,
    ControlState,
    make_control_app,
)
from relay.control_server import serve_control
from relay.errors import BindError, ConfigError
from relay.metrics import Metrics
from relay.store import ConsumeResult, MemoryStore, StoreUnavailable
from relay.tokens import TOKEN_LIFETIME, Claims, KeyRing, verify

T0 = 1_700_000_000.0
PK = "pk_test_1"
AUTH = (b"authorization", f"Bearer {PK}".encode())
OK_BODY = b'{"transport": "websocket"}'


def make_config(**server: Any) -> Config:
    return build_config(
        server={
            "public_url": "wss://relay.example.com/",
            "organization": "acme",
            "public_keys": ["pk_other", PK],
            "api_bind": ["127.0.0.1:0"],
            **server,
        },
        agents={
            # "relay" explicitly: these tests are about the 1 MiB /start limit, which
            # only bot_protocol "relay" carries (the default's bodies stop at 4 KiB).
            "tok": {"bot": "ws://127.0.0.1:9/ws", "websocket_auth": "token",
                    "bot_protocol": "relay"},
            "open": {"bot": "ws://127.0.0.1:9/ws"},
            "pc": {
                "bot": "ws://127.0.0.1:9/ws",
                "websocket_auth": "token",
                "bot_protocol": "pipecat-cloud",
            },
            "busy": {
                "bot": "ws://127.0.0.1:9/ws",
                "websocket_auth": "token",
                "when_full": "reject",
                "max_clients": 2,
            },
            "busy-replace": {"bot": "ws://127.0.0.1:9/ws", "when_full": "replace"},
            "dflt": {"bot": "ws://127.0.0.1:9/ws", "websocket_auth": "token"},
        },
    )


class Harness:
    def __init__(self, config: Config | None = None, **state: Any) -> None:
        self.config = config or make_config()
        self.keys = KeyRing.parse("k1:secret-one")
        self.store = MemoryStore()
        self.metrics = Metrics()
        self.clock = T0
        self.full: set[str] = set()
        self.state = ControlState(
            config=self.config,
            keyring=self.keys,
            store=self.store,
            metrics=self.metrics,
            now=lambda: self.clock,
            is_full=lambda agent: agent in self.full,
            **state,
        )
        self.app = make_control_app(self.state)


Receive = Callable[[], Awaitable[dict[str, Any]]]

class Response:
    def __init__(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, delivered: int
    ) -> None:
        self.status = status
        self.headers = {k.decode().lower(): v.decode() for k, v in headers}
        self.body = body
        self.delivered = delivered  # request body bytes the app received

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: ASGIApp,
    method: str = "POST",
    path: str = "/v1/public/tok/start",
    *,
    headers: Sequence[tuple[bytes, bytes]] = (AUTH,),
    chunks: Iterable[bytes] = (OK_BODY,),
    query: bytes = b"",
) -> Response:
    pending = list(chunks)
    delivered = 0

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        await trio.lowlevel.checkpoint()
        if not pending:
            return {"type": "http.disconnect"}
        chunk = pending.pop(0)
        delivered += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    response = await drive(app, receive, method=method, path=path, headers=tuple(headers),
                           query=query)
    response.delivered = delivered
    return response


async def drive(
    app: ASGIApp,
    receive: Receive,
    *,
    method: str = "POST",
    path: str = "/v1/public/tok/start",
    headers: tuple[tuple[bytes, bytes], ...] = (AUTH,),
    query: bytes = b"",
) -> Response:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        await trio.lowlevel.checkpoint()
        sent.append(dict(message))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "headers": list(headers),
        "scheme": "http",
        "server": ("127.0.0.1", 8701),
    }
    await app(scope, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    return Response(sent[0]["status"], sent[0]["headers"], sent[1]["body"], 0)


def assert_error(response: Response, status: int, code: str) -> None:
    assert response.status == status, response.body
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "code", "detail"}
    assert body["code"] == code
    assert body["error"] and body["detail"]


# ------------------------------------------------------------------ /start: success rows


async def test_start_token_agent() -> None:
    h = Harness()
    r = await call(h.app)
    assert r.status == 200
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert set(body) == {"token", "wsUrl", "sessionId"}
    assert body["wsUrl"] == "wss://relay.example.com/ws/generic/tok.acme"
    claims = verify(body["token"], h.keys, agent="tok", org="acme", now=T0 + 1)
    assert claims == Claims(body["sessionId"], "tok", "acme", T0 + TOKEN_LIFETIME)
    # The session (no body) is held until the token expires, usable once.
    assert await h.store.consume(body["sessionId"], T0 + 1) == ConsumeResult("ok", None)


async def test_start_token_agent_holds_body_as_compact_json() -> None:
    h = Harness()
    request = {"transport": "websocket", "body": {"user": "ada", "n": [1, 2], "é": "ü"}}
    r = await call(h.app, chunks=[json.dumps(request, indent=2).encode()])
    assert r.status == 200
    held = await h.store.consume(r.json()["sessionId"], T0)
    assert held.body == '{"user":"ada","n":[1,2],"é":"ü"}'.encode()
    assert json.loads(held.body) == request["body"]


@pytest.mark.parametrize("body", [0, "text", [1], False, {}])
async def test_start_any_json_value_is_a_body(body: object) -> None:
    h = Harness()
    r = await call(h.app, chunks=[json.dumps({"transport": "websocket", "body": body}).encode()])
    assert r.status == 200
    assert (await h.store.consume(r.json()["sessionId"], T0)).body == json.dumps(body).encode()


async def test_start_auth_none_agent_has_no_token() -> None:
    h = Harness()
    r = await call(h.app, path="/v1/public/open/start")
    assert r.status == 200
    assert set(r.json()) == {"wsUrl", "sessionId"}
    assert r.json()["wsUrl"] == "wss://relay.example.com/ws/generic/open.acme"
    assert h.store.entry_count == 0


async def test_start_null_body_means_no_body() -> None:
    h = Harness()
    r = await call(
        h.app, path="/v1/public/open/start", chunks=[b'{"transport":"websocket","body":null}']
    )
    assert r.status == 200
    r = await call(h.app, chunks=[b'{"transport":"websocket","body":null}'])
    assert (await h.store.consume(r.json()["sessionId"], T0)).body is None


async def test_start_shape_client() -> None:
    h = Harness()
    r = await call(h.app, query=b"shape=client")
    assert r.status == 200 and set(r.json()) == {"wsUrl", "token"}
    r = await call(h.app, path="/v1/public/open/start", query=b"shape=client")
    assert r.status == 200 and set(r.json()) == {"wsUrl"}
    assert_error(await call(h.app, query=b"shape=server"), 400, "invalid_request")


async def test_start_ws_url_identical_whatever_the_body() -> None:
    h = Harness()
    small = await call(h.app)
    big = await call(
        h.app, chunks=[json.dumps({"transport": "websocket", "body": "x" * 100_000}).encode()]
    )
    assert small.json()["wsUrl"] == big.json()["wsUrl"]
    assert small.json()["sessionId"] != big.json()["sessionId"]


async def test_start_extra_request_fields_are_ignored() -> None:
    h = Harness()
    r = await call(h.app, chunks=[b'{"transport":"websocket","createDailyRoom":false}'])
    assert r.status == 200


# ------------------------------------------------------------------ /start: error rows


@pytest.mark.parametrize(
    "headers",
    [
        (),
        ((b"authorization", b"Bearer "),),
        ((b"authorization", b"Bearer pk_wrong"),),
        ((b"authorization", f"Basic {PK}".encode()),),
        ((b"authorization", f"Bearer {PK}x".encode()),),
    ],
)
async def test_start_401(headers: tuple[tuple[bytes, bytes], ...]) -> None:
    h = Harness()
    r = await call(h.app, headers=headers)
    assert_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.delivered == 0  # refused before reading the body


async def test_start_401_comes_before_404() -> None:
    assert_error(
        await call(Harness().app, path="/v1/public/nope/start", headers=()), 401, "unauthorized"
    )


@pytest.mark.parametrize("agent", ["nope", "tok.acme", "%2e%2e", "x" * 65])
async def test_start_404_unknown_agent(agent: str) -> None:
    r = await call(Harness().app, path=f"/v1/public/{agent}/start")
    assert_error(r, 404, "agent_not_found")
    assert r.delivered == 0


@pytest.mark.parametrize(
    ("chunks", "code"),
    [
        ([b""], "invalid_json"),
        ([b"not json"], "invalid_json"),
        ([b'{"transport": "websocket"'], "invalid_json"),
        ([b'{"transport": "websocket", "body": NaN}'], "invalid_json"),
        ([b'{"transport": "websocket", "body": Infinity}'], "invalid_json"),
        ([b'{"transport": "websocket", "body": undefined}'], "invalid_json"),
        ([b'{"transport": "websocket", "body": "\xff"}'], "invalid_json"),
        ([b"[" * 100_000], "invalid_json"),
        ([b'"websocket"'], "invalid_request"),
        ([b'["websocket"]'], "invalid_request"),
        ([b"{}"], "unsupported_transport"),
        ([b'{"transport": "daily"}'], "unsupported_transport"),
        ([b'{"transport": "WebSocket"}'], "unsupported_transport"),
        ([b'{"transport": null}'], "unsupported_transport"),
    ],
)
async def test_start_400(chunks: list[bytes], code: str) -> None:
    assert_error(await call(Harness().app, chunks=chunks), 400, code)


async def test_start_400_body_with_auth_none_agent() -> None:
    r = await call(
        Harness().app,
        path="/v1/public/open/start",
        chunks=[b'{"transport":"websocket","body":{"a":1}}'],
    )
    assert_error(r, 400, "body_requires_token_auth")


def _request_of_size(size: int) -> bytes:
    """A valid /start request body of exactly ``size`` bytes."""
    head, tail = b'{"transport":"websocket","body":"', b'"}'
    data = head + b"x" * (size - len(head) - len(tail)) + tail
    assert len(data) == size
    return data


def _chunked(data: bytes, size: int = 65_536) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def test_start_413_edge_exactly_1_mib_passes_the_size_check() -> None:
    h = Harness()
    r = await call(h.app, chunks=_chunked(_request_of_size(MAX_START_BODY)))
    assert r.status == 200, r.body
    assert r.delivered == MAX_START_BODY


async def test_start_413_edge_one_more_byte_is_refused() -> None:
    h = Harness()
    data = _request_of_size(MAX_START_BODY + 1)
    r = await call(h.app, chunks=_chunked(data))
    assert_error(r, 413, "payload_too_large")
    assert h.store.entry_count == 0


async def test_start_413_stops_reading_at_the_first_byte_over() -> None:
    # 16 chunks of 64 KiB fill the limit exactly; the 17th (1 byte) tips it; the rest
    # must never be read.
    chunks = [b" " * 65_536] * 16 + [b" "] + [b" " * 65_536] * 10
    r = await call(Harness().app, chunks=chunks)
    assert_error(r, 413, "payload_too_large")
    assert r.delivered == MAX_START_BODY + 1


async def test_start_413_from_content_length_without_reading() -> None:
    r = await call(Harness().app, headers=[AUTH, (b"content-length", b"1048577")], chunks=[b"x"])
    assert_error(r, 413, "payload_too_large")
    assert r.delivered == 0


async def test_start_413_comes_before_400_for_an_oversized_non_json_body() -> None:
    r = await call(Harness().app, chunks=[b"!" * (MAX_START_BODY + 1)])
    assert_error(r, 413, "payload_too_large")


async def test_start_pipecat_cloud_body_limit_on_compact_json() -> None:
    h = Harness()
    head = b'{"transport":"websocket","body":"'
    # Compact JSON of the body is the string in quotes: 4096 bytes passes...
    ok = head + b"y" * (MAX_PIPECAT_BODY - 2) + b'"}'
    assert (await call(h.app, path="/v1/public/pc/start", chunks=[ok])).status == 200
    # ...one more byte is 413, even though the request itself is small.
    over = head + b"y" * (MAX_PIPECAT_BODY - 1) + b'"}'
    held_before = h.store.entry_count
    refused = await call(h.app, path="/v1/public/pc/start", chunks=[over])
    assert_error(refused, 413, "body_too_large")
    # ...and the detail tells the operator the way out: the opt-in relay protocol.
    assert 'bot_protocol = "relay"' in refused.json()["detail"]
    assert "1 MiB" in refused.json()["detail"]
    assert h.store.entry_count == held_before  # nothing held for the refused body
    # Whitespace in the request does not count: the limit is on compact JSON.
    spaced = json.dumps({"transport": "websocket", "body": {"k": "v" * 4000}}, indent=8)
    assert (await call(h.app, path="/v1/public/pc/start", chunks=[spaced.encode()])).status == 200


async def test_start_default_bot_protocol_is_pipecat_cloud_with_its_4_kib_limit() -> None:
    h = Harness()
    assert h.config.agents["dflt"].bot_protocol == "pipecat-cloud"
    head = b'{"transport":"websocket","body":"'
    ok = head + b"y" * (MAX_PIPECAT_BODY - 2) + b'"}'
    assert (await call(h.app, path="/v1/public/dflt/start", chunks=[ok])).status == 200
    over = head + b"y" * (MAX_PIPECAT_BODY - 1) + b'"}'
    assert_error(await call(h.app, path="/v1/public/dflt/start", chunks=[over]), 413,
                 "body_too_large")


async def test_start_429_when_full_and_reject() -> None:
    h = Harness()
    h.full = {"busy", "busy-replace"}
    assert_error(await call(h.app, path="/v1/public/busy/start"), 429, "agent_full")
    # when_full = "replace" never refuses: the newcomer replaces the oldest at upgrade.
    assert (await call(h.app, path="/v1/public/busy-replace/start")).status == 200
    h.full = set()
    assert (await call(h.app, path="/v1/public/busy/start")).status == 200


async def test_start_400_comes_before_429() -> None:
    h = Harness()
    h.full = {"busy"}
    assert_error(
        await call(h.app, path="/v1/public/busy/start", chunks=[b"{}"]),
        400,
        "unsupported_transport",
    )


class _DownStore(MemoryStore):
    async def put_session(
        self, session_id: str, body: bytes | None, expires_at: float, *, now: float | None = None
    ) -> None:
        raise StoreUnavailable("connection refused")

    async def healthy(self) -> bool:
        return False


async def test_start_503_when_store_down_token_agents_only() -> None:
    h = Harness()
    h.state.store = _DownStore()
    r = await call(h.app)
    assert_error(r, 503, "store_unavailable")
    assert r.headers["retry-after"]
    assert (await call(h.app, path="/v1/public/open/start")).status == 200


async def test_start_503_from_a_cached_store_flag() -> None:
    up = False
    h = Harness(store_up=lambda: up)
    assert_error(await call(h.app), 503, "store_unavailable")
    up = True
    assert (await call(h.app)).status == 200


@pytest.mark.parametrize(
    ("bounds", "bound"),
    [({"max_entries": 2}, "sessions"), ({"max_markers": 2}, "markers"),
     ({"max_body_bytes": 2 * len(b'{"n":1}')}, "body_bytes")],
)
async def test_start_503_store_full_at_each_bound_drops_nothing(
    bounds: dict[str, int], bound: str
) -> None:
    h = Harness()
    h.store = h.state.store = MemoryStore(**bounds)
    held = [await call(h.app, chunks=[b'{"transport":"websocket","body":{"n":1}}'])
            for _ in range(2)]
    assert [r.status for r in held] == [200, 200]
    r = await call(h.app, chunks=[b'{"transport":"websocket","body":{"n":1}}'])
    assert_error(r, 503, "store_full")
    assert r.headers["retry-after"] and r.headers["cache-control"] == "no-store"
    assert "nothing held was dropped" in r.json()["detail"]
    text = h.metrics.render()[0].decode()
    assert f'relay_store_full_total{{bound="{bound}"}} 1.0' in text
    assert 'relay_start_requests_total{status="503"} 1.0' in text
    for answer in held:  # both bodies still there, for their tokens only
        sid = answer.json()["sessionId"]
        assert await h.store.consume(sid, T0, with_body=True) == ConsumeResult("ok", b'{"n":1}')
    # auth-none agents hold nothing and are never refused for the store
    assert (await call(h.app, path="/v1/public/open/start")).status == 200


async def test_start_token_says_whether_a_body_is_held() -> None:
    h = Harness()
    with_body = (await call(h.app, chunks=[b'{"transport":"websocket","body":[]}'])).json()
    without = (await call(h.app, chunks=[b'{"transport":"websocket","body":null}'])).json()
    for answer, has_body in ((with_body, True), (without, False)):
        claims = verify(answer["token"], h.keys, agent="tok", org="acme", now=T0)
        assert isinstance(claims, Claims) and claims.has_body is has_body


async def test_start_never_reads_body_for_refused_auth_and_is_counted() -> None:
    h = Harness()
    await call(h.app)
    await call(h.app, headers=())
    await call(h.app, path="/v1/public/busy/start")
    text = h.metrics.render()[0].decode()
    assert 'relay_start_requests_total{status="200"} 2.0' in text
    assert 'relay_start_requests_total{status="401"} 1.0' in text


async def test_start_token_expiry_follows_the_injected_clock() -> None:
    h = Harness()
    h.clock = T0 + 1000
    token = (await call(h.app)).json()["token"]
    claims = verify(token, h.keys, agent="tok", org="acme", now=T0 + 1000)
    assert isinstance(claims, Claims) and claims.expires_at == T0 + 1000 + TOKEN_LIFETIME


# ------------------------------------------------------------------ routing


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/", 404, "not_found"),
        ("GET", "/v1/public/tok/start/", 404, "not_found"),
        ("GET", "/v1/public/tok/stop", 404, "not_found"),
        ("POST", "/v1/public//start", 404, "not_found"),
        ("GET", "/v1/public/tok/start", 405, "method_not_allowed"),
        ("PUT", "/v1/public/tok/start", 405, "method_not_allowed"),
        ("POST", "/health", 405, "method_not_allowed"),
        ("DELETE", "/metrics", 405, "method_not_allowed"),
    ],
)
async def test_routing_errors(method: str, path: str, status: int, code: str) -> None:
    r = await call(Harness().app, method, path)
    assert_error(r, status, code)
    if status == 405:
        assert r.headers["allow"]


async def test_health_and_metrics() -> None:
    h = Harness()
    r = await call(h.app, "GET", "/health", headers=())
    assert r.status == 200
    assert r.json()["status"] == "ok" and r.json()["store"] == "up"
    r = await call(h.app, "GET", "/metrics", headers=())
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    assert b"relay_sessions_active" in r.body
    r = await call(h.app, "HEAD", "/health", headers=())
    assert r.status == 200 and r.body == b"" and int(r.headers["content-length"]) > 0


async def test_health_reports_store_down_but_stays_200() -> None:
    h = Harness()
    h.state.store = _DownStore()
    r = await call(h.app, "GET", "/health", headers=())
    assert r.status == 200 and r.json()["store"] == "down"


async def test_lifespan_startup_and_shutdown() -> None:
    app = Harness().app
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        return inbox.pop(0)

    async def send(message: Any) -> None:
        await trio.lowlevel.checkpoint()
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# ------------------------------------------------------------------ CORS


def _preflight(origin: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"origin", origin),
        (b"access-control-request-method", b"POST"),
        (b"access-control-request-headers", b"authorization, content-type"),
    ]


async def test_cors_preflight_allowed_origin() -> None:
    h = Harness(make_config(cors_origins=["https://app.example.com"]))
    r = await call(h.app, "OPTIONS", headers=_preflight(b"https://app.example.com"), chunks=[])
    assert r.status == 204 and r.body == b""
    assert r.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = r.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert int(r.headers["access-control-max-age"]) > 0
    assert r.headers["vary"] == "Origin"


async def test_cors_preflight_disallowed_origin_is_403() -> None:
    h = Harness(make_config(cors_origins=["https://app.example.com"]))
    r = await call(h.app, "OPTIONS", headers=_preflight(b"https://evil.example"), chunks=[])
    assert_error(r, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in r.headers
    # No cors_origins at all (the default): every preflight is refused.
    r = await call(Harness().app, "OPTIONS", headers=_preflight(b"https://app.example.com"))
    assert_error(r, 403, "origin_not_allowed")


async def test_cors_wildcard() -> None:
    h = Harness(make_config(cors_origins=["*"]))
    r = await call(h.app, "OPTIONS", headers=_preflight(b"https://anything.test"), chunks=[])
    assert r.status == 204 and r.headers["access-control-allow-origin"] == "*"
    r = await call(h.app, headers=[AUTH, (b"origin", b"https://anything.test")])
    assert r.status == 200 and r.headers["access-control-allow-origin"] == "*"


async def test_cors_actual_responses_carry_allow_origin_only_when_allowed() -> None:
    h = Harness(make_config(cors_origins=["https://app.example.com"]))
    r = await call(h.app, headers=[AUTH, (b"origin", b"https://app.example.com")])
    assert r.status == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example.com"
    r = await call(h.app, headers=[(b"origin", b"https://app.example.com")])  # 401 too
    assert r.status == 401
    assert r.headers["access-control-allow-origin"] == "https://app.example.com"
    r = await call(h.app, headers=[AUTH, (b"origin", b"https://evil.example")])
    assert r.status == 200 and "access-control-allow-origin" not in r.headers


async def test_plain_options_lists_methods() -> None:
    r = await call(Harness().app, "OPTIONS", "/health", headers=(), chunks=[])
    assert r.status == 204 and "GET" in r.headers["allow"]


# ------------------------------------------------------------------ end to end (hypercorn)


async def test_serve_control_end_to_end() -> None:
    h = Harness()
    with trio.fail_after(30):  # backstop only; nothing here waits on time
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve_control, h.app, h.config)
            assert len(bound) == 1
            host, port = bound[0]
            assert host == "127.0.0.1" and port != 0

            status, headers, body = await http(host, port, "GET", "/health")
            assert status == 200 and json.loads(body)["store"] == "up"
            assert "server" not in headers

            auth = ("authorization", f"Bearer {PK}")
            status, _, body = await http(
                host,
                port,
                "POST",
                "/v1/public/tok/start",
                [auth, ("content-type", "application/json")],
                OK_BODY,
            )
            assert status == 200 and set(json.loads(body)) == {"token", "wsUrl", "sessionId"}

            status, _, body = await http(
                host, port, "POST", "/v1/public/tok/start", [auth], _request_of_size(MAX_START_BODY)
            )
            assert status == 200

            status, _, body = await http(
                host,
                port,
                "POST",
                "/v1/public/tok/start",
                [auth],
                _request_of_size(MAX_START_BODY + 1),
            )
            assert status == 413 and json.loads(body)["code"] == "payload_too_large"

            status, _, body = await http(host, port, "POST", "/v1/public/tok/start", [], OK_BODY)
            assert status == 401

            status, headers, body = await http(host, port, "GET", "/metrics")
            assert status == 200 and headers["content-type"].startswith("text/plain")
            assert b'relay_start_requests_total{status="200"} 2.0' in body
            assert b'relay_start_requests_total{status="413"} 1.0' in body

            nursery.cancel_scope.cancel()


async def test_serve_control_several_binds_and_clean_cancel() -> None:
    config = make_config(api_bind=["127.0.0.1:0", "127.0.0.1:0"])
    h = Harness(config)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve_control, h.app, config)
            assert len(bound) == 2 and bound[0][1] != bound[1][1]
            for host, port in bound:
                assert (await http(host, port, "GET", "/health"))[0] == 200
            nursery.cancel_scope.cancel()
    # Once cancelled, the ports are closed.
    with pytest.raises(OSError):
        await trio.open_tcp_stream(*bound[0])


async def test_serve_control_bind_error_names_the_address() -> None:
    h = Harness()
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config(api_bind=["127.0.0.1:0", f"127.0.0.1:{port}"])
        with pytest.raises(BindError) as info:
            await serve_control(h.app, config)  # raises before serving anything
        assert f"127.0.0.1:{port}" in str(info.value)


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as files (made by trustme, no openssl)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    key_path.write_bytes(cert.private_key_pem.bytes())
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    return str(cert_path), str(key_path)


async def test_serve_control_over_tls(self_signed: tuple[str, str]) -> None:
    cert, key = self_signed
    config = make_config(certfile=cert, keyfile=key)
    h = Harness(config)
    context = ssl.create_default_context(cafile=str(Path(cert).parent / "ca.pem"))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            ((host, port),) = await nursery.start(serve_control, h.app, config)
            stream = await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=context, https_compatible=True
            )
            async with stream:
                await stream.send_all(
                    b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
                )
                data = b""
                while chunk := await stream.receive_some(65_536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200")
            assert b'"store":"up"' in data
            nursery.cancel_scope.cancel()


async def test_serve_control_unreadable_tls_files_are_a_config_error(tmp_path: Path) -> None:
    config = make_config(certfile=str(tmp_path / "no.pem"), keyfile=str(tmp_path / "no.key"))
    with pytest.raises(ConfigError) as info:
        await serve_control(Harness(config).app, config)
    assert "certfile" in str(info.value)


async def test_serve_control_shutdown_trigger_stops_gracefully() -> None:
    h = Harness()
    stop = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            ((host, port),) = await nursery.start(
                partial(serve_control, h.app, h.config, shutdown_trigger=stop.wait)
            )
            assert (await http(host, port, "GET", "/health"))[0] == 200
            stop.set()
        # serve_control returned on its own: the nursery closed without a cancel.
    with pytest.raises(OSError):
        await trio.open_tcp_stream(host, port)
