"""/start never answers without its envelope; JSON it cannot pass on is 400; slow bodies.

- Non-finite numbers and lone surrogates (in keys or values, as escapes) are 400
  ``invalid_json``, and nothing is held for them.
- Every error path of POST /start (collected from relay/control.py itself, so a new one
  cannot be forgotten) answers with the JSON envelope, the CORS headers and no-store, and
  is counted in relay_start_requests_total; hypothesis throws arbitrary bytes and JSON at
  it with the same check.
- The body is read under ``start_body_timeout`` (408) in one of ``max_start_body_reads``
  slots (503 ``busy`` beyond), on trio's fake clock; and black-box against hypercorn with
  real slow clients on loopback.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import http
from test_control import AUTH, OK_BODY, PK, T0, Harness, Response, make_config
from test_control import drive as drive_app

import relay.control
from relay.control import MAX_PIPECAT_BODY, MAX_START_BODY, ASGIApp, ControlApp
from relay.control_server import _hypercorn_config, serve_control
from relay.metrics import Metrics
from relay.store import MemoryStore

ORIGIN = "https://app.example.com"
ORIGIN_HEADER = (b"origin", ORIGIN.encode())

Receive = Callable[[], Awaitable[dict[str, Any]]]


def harness(**server: Any) -> Harness:
    return Harness(make_config(cors_origins=[ORIGIN], **server))


def feeder(chunks: list[bytes], *, then: str = "disconnect") -> Receive:
    """ASGI receive: ``chunks`` as the body, then "disconnect" or "stall" (never returns)."""
    pending = list(chunks)

    async def receive() -> dict[str, Any]:
        await trio.lowlevel.checkpoint()
        if pending:
            chunk = pending.pop(0)
            more = bool(pending) or then == "stall"
            return {"type": "http.request", "body": chunk, "more_body": more}
        if then == "stall":
            await trio.sleep_forever()
        return {"type": "http.disconnect"}

    return receive


async def drive(app: ASGIApp, receive: Receive, **request: Any) -> Response:
    """One request through the app; by default a browser's, with its Origin."""
    request.setdefault("headers", (AUTH, ORIGIN_HEADER))
    return await drive_app(app, receive, **request)


def start_counts(metrics: Metrics) -> dict[str, float]:
    text = metrics.render()[0].decode()
    found = re.findall(r'^relay_start_requests_total\{status="(\d+)"\} (\S+)$', text, re.M)
    return {status: float(value) for status, value in found}


def assert_enveloped(r: Response, status: int, code: str) -> None:
    """The envelope, CORS headers for the allowed origin, and no-store."""
    assert r.status == status, r.body
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error", "code", "detail"} and body["code"] == code, body
    assert body["error"] and body["detail"]
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert r.headers["vary"] == "Origin"
    assert r.headers["cache-control"] == "no-store"


# ---------------------------------------------------------------------------- item 5: JSON


@pytest.mark.parametrize(
    ("request_body", "why"),
    [
        (b'{"transport":"websocket","body":{"n":1e999}}', "finite"),
        (b'{"transport":"websocket","body":{"n":-1e999}}', "finite"),
        (b'{"transport":"websocket","body":[1, 2.5e400]}', "finite"),
        (b'{"transport":"websocket","body":NaN}', "finite"),
        (b'{"transport":"websocket","body":{"x":Infinity}}', "finite"),
        (b'{"transport":"websocket","body":-Infinity}', "finite"),
        (b'{"transport":"websocket","other":1E+999}', "finite"),  # outside the body too
        (b'{"transport":"websocket","body":{"s":"\\ud800"}}', "surrogate"),
        (b'{"transport":"websocket","body":{"s":"a\\udfffb"}}', "surrogate"),
        (b'{"transport":"websocket","body":{"\\ud800":1}}', "surrogate"),  # in a key
        (b'{"transport":"websocket","body":"\\udc00\\ud800"}', "surrogate"),  # pair reversed
        (b'{"transport":"websocket","body":["\\ud83d"]}', "surrogate"),  # high half alone
        (b'{"\\udbff":0,"transport":"websocket"}', "surrogate"),
    ],
)
async def test_json_that_cannot_be_passed_on_is_400(request_body: bytes, why: str) -> None:
    h = harness()
    r = await drive(h.app, feeder([request_body]))
    assert_enveloped(r, 400, "invalid_json")
    assert why in r.json()["detail"]
    assert start_counts(h.metrics) == {"400": 1.0}
    assert h.store.entry_count == 0  # nothing held for a refused request


@pytest.mark.parametrize(
    ("value", "held"),
    [
        ("\\ud83d\\ude00", "\U0001f600".encode()),  # an escaped pair is one character
        ("\\u00e9", "é".encode()),
    ],
)
async def test_valid_escapes_and_large_finite_numbers_pass(value: str, held: bytes) -> None:
    h = harness()
    request = f'{{"transport":"websocket","body":{{"s":"{value}","n":1e308,"m":-0.0}}}}'
    r = await drive(h.app, feeder([request.encode()]))
    assert r.status == 200, r.body
    stored = await h.store.consume(r.json()["sessionId"], T0)
    assert stored.body == b'{"s":"' + held + b'","n":1e+308,"m":-0.0}'


# -------------------------------------------------------------- every error path of /start


class _BrokenStore(MemoryStore):
    async def put_session(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug in a store")


class _DownStore(MemoryStore):
    async def put_session(self, *args: Any, **kwargs: Any) -> None:
        from relay.store import StoreUnavailable

        raise StoreUnavailable("down")


BIG = b'{"transport":"websocket","body":"' + b"x" * MAX_START_BODY + b'"}'
PC_BODY = json.dumps({"transport": "websocket", "body": "y" * (MAX_PIPECAT_BODY + 1)}).encode()


async def _error_case(code: str) -> tuple[Harness, Response]:
    """Provoke the /start error ``code``: the harness it ran on and the response."""
    h = harness(max_start_body_reads=1)
    app = h.app
    if code == "unauthorized":
        return h, await drive(app, feeder([OK_BODY]), headers=(ORIGIN_HEADER,))
    if code == "agent_not_found":
        return h, await drive(app, feeder([OK_BODY]), path="/v1/public/nobody/start")
    if code == "method_not_allowed":
        return h, await drive(app, feeder([]), method="PUT")
    if code == "payload_too_large":
        return h, await drive(app, feeder([BIG[: MAX_START_BODY + 1]]))
    if code == "request_timeout":
        return h, await drive(app, feeder([OK_BODY[:5]], then="stall"))
    if code == "busy":
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drive, app, feeder([b"{"], then="stall"))
            await trio.testing.wait_all_tasks_blocked()
            r = await drive(app, feeder([OK_BODY]))
            nursery.cancel_scope.cancel()
        return h, r
    if code == "invalid_json":
        return h, await drive(app, feeder([b'{"transport":"websocket","body":1e999}']))
    if code == "invalid_request":
        return h, await drive(app, feeder([OK_BODY]), query=b"shape=server")
    if code == "unsupported_transport":
        return h, await drive(app, feeder([b'{"transport":"webrtc"}']))
    if code == "body_requires_token_auth":
        body = b'{"transport":"websocket","body":{}}'
        return h, await drive(app, feeder([body]), path="/v1/public/open/start")
    if code == "body_too_large":
        return h, await drive(app, feeder([PC_BODY]), path="/v1/public/pc/start")
    if code == "agent_full":
        h.full.add("busy")
        return h, await drive(app, feeder([OK_BODY]), path="/v1/public/busy/start")
    if code == "store_unavailable":
        h = Harness(h.config)
        h.state.store = _DownStore()
        return h, await drive(h.app, feeder([OK_BODY]))
    if code == "store_full":  # a real store at its bound: the one session it holds stays
        h = Harness(h.config)
        h.state.store = h.store = MemoryStore(max_entries=1)
        await h.store.put_session("held-before", b"{}", T0 + 60, now=T0)
        return h, await drive(h.app, feeder([OK_BODY]))
    if code == "draining":  # the operator drains the agent: nothing is held for it
        from relay.admin import LocalOperations
        from relay.registry import Registry

        h = Harness(h.config)
        h.state.operations = LocalOperations(Registry(), lambda: T0)
        await h.state.operations.set_draining("tok", True)
        return h, await drive(h.app, feeder([OK_BODY]))
    if code == "rate_limited":  # the key's one token is spent by a 404, then 429
        h = harness(start_rate=1, start_burst=1)
        await drive(h.app, feeder([OK_BODY]), path="/v1/public/nobody/start")
        return h, await drive(h.app, feeder([OK_BODY]))
    if code == "internal_error":
        h = Harness(h.config)
        h.state.store = _BrokenStore()
        return h, await drive(h.app, feeder([OK_BODY]))
    raise AssertionError(f"no case provokes {code!r}: add one")


def _codes_in_control() -> dict[str, int]:
    """Every (status, code) relay/control.py can refuse with, read from its source."""
    source = Path(relay.control.__file__).read_text()
    found = re.findall(r'_Refuse\(\s*(\d+),\s*"([a-z_]+)"', source)
    not_for_post_start = {"not_found", "origin_not_allowed"}  # other paths, preflights
    return {code: int(status) for status, code in found if code not in not_for_post_start}


def test_the_error_table_is_read_from_the_source() -> None:
    codes = _codes_in_control()
    assert {"unauthorized", "invalid_json", "request_timeout", "busy", "internal_error"} <= set(
        codes
    )


@pytest.mark.parametrize("code", sorted(_codes_in_control()))
async def test_every_start_error_has_the_envelope_cors_and_is_counted(
    code: str, autojump_clock: trio.testing.MockClock
) -> None:
    h, r = await _error_case(code)
    status = _codes_in_control()[code]
    assert_enveloped(r, status, code)
    counts = start_counts(h.metrics)
    if r.status == 405:  # a PUT is not a /start request: refused, not counted
        assert counts == {}
    else:
        assert counts.get(str(status)) == 1.0
    assert h.store.entry_count == (1 if code == "store_full" else 0)


def _lone_surrogates() -> st.SearchStrategy[str]:
    return st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"])


json_text = st.text(st.one_of(st.characters(), _lone_surrogates()), max_size=8)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | json_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(json_text, children, max_size=4)
    ),
    max_leaves=12,
)


def _passable(value: object) -> bool:
    """Whether ``value`` (as parsed from JSON) can be written back as JSON and UTF-8."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, list):
        return all(_passable(v) for v in value)
    if isinstance(value, dict):
        return all(_passable(k) and _passable(v) for k, v in value.items())
    return True


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values)
async def test_any_json_body_is_held_exactly_or_refused_with_the_envelope(value: object) -> None:
    h = harness()
    text = json.dumps({"transport": "websocket", "body": value}, allow_nan=True)
    r = await drive(h.app, feeder([text.encode()]))
    parsed = json.loads(text)["body"]  # what the gateway sees (escaped pairs joined)
    if not _passable(parsed):
        assert_enveloped(r, 400, "invalid_json")
        assert h.store.entry_count == 0
    elif parsed is None:
        assert r.status == 200
    else:
        assert r.status == 200, r.body
        held = (await h.store.consume(r.json()["sessionId"], T0)).body
        assert held is not None and json.loads(held) == parsed
    assert sum(start_counts(h.metrics).values()) == 1.0


@settings(max_examples=300)
@given(raw=st.binary(max_size=200), split=st.integers(0, 200))
async def test_any_bytes_get_an_answer_with_the_envelope(raw: bytes, split: int) -> None:
    h = harness()
    r = await drive(h.app, feeder([raw[:split], raw[split:]]))
    if r.status != 200:
        assert r.status == 400
        assert_enveloped(r, 400, r.json()["code"])
    assert sum(start_counts(h.metrics).values()) == 1.0


# ---------------------------------------------------------------------------- item 3: slow bodies


async def test_body_read_deadline_is_10_seconds_by_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    h = harness()
    assert h.config.server.start_body_timeout == 10.0
    t0 = trio.current_time()
    r = await drive(h.app, feeder([OK_BODY[:3]], then="stall"))
    assert trio.current_time() - t0 == 10.0
    assert_enveloped(r, 408, "request_timeout")
    assert "10 seconds" in r.json()["detail"]
    assert isinstance(h.app, ControlApp)  # make_control_app returns one, typed as ASGIApp
    assert h.app.reading_bodies == 0
    assert start_counts(h.metrics) == {"408": 1.0}


async def test_a_trickling_body_gets_408_at_the_deadline_not_per_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    h = harness(start_body_timeout=2.5)
    pending = list(OK_BODY)

    async def trickle() -> dict[str, Any]:  # one byte a second: never idle for long
        await trio.sleep(1)
        return {"type": "http.request", "body": bytes([pending.pop(0)]), "more_body": True}

    t0 = trio.current_time()
    r = await drive(h.app, trickle)
    assert trio.current_time() - t0 == 2.5
    assert_enveloped(r, 408, "request_timeout")
    assert len(pending) == len(OK_BODY) - 2


async def test_a_body_complete_just_before_the_deadline_passes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    h = harness(start_body_timeout=3)
    parts = [OK_BODY[:5], OK_BODY[5:]]

    async def slow() -> dict[str, Any]:
        await trio.sleep(1.49)
        part = parts.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(parts)}

    r = await drive(h.app, slow)
    assert r.status == 200 and set(r.json()) == {"token", "wsUrl", "sessionId"}


async def test_bodies_read_at_once_are_bounded_and_slots_come_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    h = harness(max_start_body_reads=3)
    app: Any = h.app
    results: list[int] = []

    async def stalled() -> None:
        results.append((await drive(app, feeder([b'{"tra'], then="stall"))).status)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(stalled)
        await trio.testing.wait_all_tasks_blocked()
        assert app.reading_bodies == 3
        t0 = trio.current_time()
        r = await drive(app, feeder([OK_BODY]))
        assert trio.current_time() == t0  # refused at once, not queued
        assert_enveloped(r, 503, "busy")
        assert r.headers["retry-after"] == "1"
        # 413 from Content-Length needs no slot
        too_big = (AUTH, ORIGIN_HEADER, (b"content-length", str(MAX_START_BODY + 1).encode()))
        assert_enveloped(
            await drive(app, feeder([b"x"]), headers=too_big), 413, "payload_too_large"
        )
    assert results == [408, 408, 408] and app.reading_bodies == 0
    assert (await drive(app, feeder([OK_BODY]))).status == 200
    # a client that goes away gives its slot back too
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(drive, app, feeder([b"{"], then="stall"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert app.reading_bodies == 0
    assert start_counts(h.metrics) == {"408": 3.0, "503": 1.0, "413": 1.0, "200": 1.0}


# ---------------------------------------------------------------------------- black box


@pytest.mark.parametrize(("timeout", "read_timeout"), [(10, 12), (2.5, 5), (0.1, 3)])
def test_hypercorn_read_timeout_is_just_above_the_body_deadline(
    timeout: float, read_timeout: int
) -> None:
    """A backstop for reads the app has no say in; the app's 408 always comes first."""
    config = make_config(start_body_timeout=timeout)
    assert _hypercorn_config(config).read_timeout == read_timeout


async def _slow_client(port: int, sent: int, declared: int) -> tuple[int, str, bool]:
    """POST /start declaring ``declared`` body bytes, send ``sent`` of them, then stall.

    Returns (status, code, whether the server then closed the connection).
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        head = (
            "POST /v1/public/tok/start HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            f"authorization: Bearer {PK}\r\norigin: {ORIGIN}\r\n"
            f"content-length: {declared}\r\n\r\n"
        ).encode()
        await stream.send_all(head + b'{"transport":"websocket","body":"' + b"z" * sent)
        data = b""
        closed = False
        with trio.move_on_after(60):  # fake clock: far past every timeout in play
            while chunk := await stream.receive_some(65536):
                data += chunk
            closed = True
        head_text, _, body = data.partition(b"\r\n\r\n")
        status = int(head_text.split(b" ")[1])
        assert b"access-control-allow-origin: " + ORIGIN.encode() in head_text.lower()
        return status, json.loads(body)["code"], closed


@pytest.fixture
def loopback_clock() -> trio.testing.MockClock:
    """A fake clock that jumps only after 50 ms of real idleness: with real sockets, a
    segment may be delivered a little after send() returns on a loaded machine, and no
    timeout may fire while bytes are in flight."""
    return trio.testing.MockClock(autojump_threshold=0.05)


async def test_slow_clients_against_hypercorn_hold_a_bounded_number_of_bodies(
    loopback_clock: trio.testing.MockClock,
) -> None:
    """The review's reproduction, bounded: 12 clients send part of a 1 MB body and stall.

    4 (max_start_body_reads) are read and get 408 after start_body_timeout; the other 8
    get 503 at once; every connection is then closed by the server, none left open.
    """
    h = harness(max_start_body_reads=4, start_body_timeout=10)
    app: Any = h.app
    results: list[tuple[int, str, bool, float]] = []
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serve_control, h.app, h.config)
        port = bound[0][1]
        t0 = trio.current_time()

        async def client() -> None:
            status, code, closed = await _slow_client(port, 16_384, 1_000_000)
            results.append((status, code, closed, trio.current_time() - t0))

        async with trio.open_nursery() as clients:
            for _ in range(12):
                clients.start_soon(client)
            await trio.testing.wait_all_tasks_blocked(0.01)  # real seconds, before a jump
            assert app.reading_bodies <= 4
        assert app.reading_bodies == 0

        # a connection that never finishes its headers is dropped too (hypercorn's own
        # keep-alive timer, 5 s, runs until a whole request head has arrived)
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        await silent.send_all(b"POST /v1/public/tok/start HTTP/1.1\r\nhost: x\r\n")
        read_timeout = _hypercorn_config(h.config).read_timeout
        assert read_timeout is not None
        t1 = trio.current_time()
        assert await silent.receive_some(100) == b""
        assert trio.current_time() - t1 <= read_timeout
        await silent.aclose()

        status, _, body = await http("127.0.0.1", port, "GET", "/metrics")
        assert status == 200
        nursery.cancel_scope.cancel()
    refused = [r for r in results if r[0] == 503]
    timed_out = [r for r in results if r[0] == 408]
    assert len(refused) == 8 and len(timed_out) == 4
    assert all(code == "busy" and when < 1 for _, code, _, when in refused)
    assert all(code == "request_timeout" and 10 <= when < 11 for _, code, _, when in timed_out)
    assert all(closed for *_, closed, _ in results)
    assert b'relay_start_requests_total{status="503"} 8.0' in body
    assert b'relay_start_requests_total{status="408"} 4.0' in body


async def test_the_reviews_json_against_hypercorn_is_400_with_the_envelope() -> None:
    """The review's requests, over HTTP: a lone surrogate was a bare 500, 1e999 a 200."""
    h = harness()
    headers = [("authorization", f"Bearer {PK}"), ("origin", ORIGIN)]
    with trio.fail_after(30):  # backstop only; nothing here waits on time
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve_control, h.app, h.config)
            port = bound[0][1]
            for body in (
                b'{"transport": "websocket", "body": {"s": "\\ud800"}}',
                b'{"transport": "websocket", "body": {"n": 1e999}}',
            ):
                status, got, data = await http(
                    "127.0.0.1", port, "POST", "/v1/public/tok/start", headers, body
                )
                assert status == 400
                assert json.loads(data)["code"] == "invalid_json"
                assert got["access-control-allow-origin"] == ORIGIN
            status, _, data = await http("127.0.0.1", port, "GET", "/metrics")
            assert b'relay_start_requests_total{status="400"} 2.0' in data
            nursery.cancel_scope.cancel()
    assert h.store.entry_count == 0
