"""[ASGI] The HTTP control plane: ``POST /v1/public/{agent}/start``, ``/health``, ``/metrics``.

A raw ASGI app (no framework) served by hypercorn on trio (``serve_control``). It never
starts a bot: /start only mints a token and holds the body in the store (SPEC §3, §4).

/start decides in the order of SPEC §8, each failure a JSON envelope
``{"error", "code", "detail"}``:

    401 unauthorized              no ``Authorization: Bearer`` or a key not in public_keys
    429 rate_limited              this public key is over ``[server] start_rate`` per second
                                  (a bucket of ``start_burst``); ``Retry-After`` says when
                                  it may call again. Counted before anything else is done:
                                  in this process (memory store), or for the whole fleet
                                  in Redis (``ControlState.fleet_rate``,
                                  ``relay.fleet_rate``). While Redis does not answer, this
                                  process's own bucket counts instead (as with one
                                  process) and the request goes on to its other checks:
                                  a token agent then gets 503 store_unavailable as before,
                                  an auth-none agent its 200 (SPEC §9).
    404 agent_not_found           no such agent
    503 draining                  the operator is draining this agent (admin.py)
    413 payload_too_large         request body over 1 MiB: decided from Content-Length or
                                  while the body arrives, never buffering more than the limit
    503 busy                      ``[server] max_start_body_reads`` bodies already being read
    408 request_timeout           body not received within ``[server] start_body_timeout``
    400 invalid_json              body not UTF-8 JSON, or JSON that cannot be passed on as
                                  JSON: non-finite numbers (NaN, Infinity, 1e999) and lone
                                  surrogates (an escaped "\\ud800" alone), in keys or values
    400 invalid_request           not an object, or an unknown ``?shape=``
    400 unsupported_transport     ``transport`` missing or not "websocket"
    400 body_requires_token_auth  a non-null body for an agent with websocket_auth "none"
    413 body_too_large            pipecat-cloud agent, body over 4 KiB as compact JSON
    429 agent_full                agent at max_clients and when_full = "reject"
    503 store_unavailable         token agent while the store is down (SPEC §8)
    503 store_full                a bound of the store is reached (pending sessions, body
                                  bytes, remembered tokens): nothing held is ever dropped
    500 internal_error            anything unexpected (logged): still the envelope, CORS
                                  headers and counted, like every other /start answer

An oversized body cannot be parsed, so the raw size check necessarily comes before the
JSON checks; the 4 KiB pipecat-cloud limit applies to the parsed body and comes after.
``?shape=client`` answers exactly ``{"wsUrl", "token"}``; for an auth-none agent, which
has no token (SPEC §8), just ``{"wsUrl"}``.

CORS (SPEC §3): a preflight (OPTIONS with Origin and Access-Control-Request-Method) from
an origin in ``cors_origins`` (or any, with ``"*"``) gets 204 with the allowed methods and
headers; from another origin 403. Other responses carry Access-Control-Allow-Origin only
for allowed origins. /start and error responses are ``Cache-Control: no-store``.

``/``, ``/live.*`` and ``/v1/admin/...`` belong to the operator API and live page
(``relay.admin_api``), 404 unless ``[server] admin_keys`` is set.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Protocol
from urllib.parse import parse_qsl

import attrs
import trio

from relay.admin import Operations
from relay.admin_api import handle_admin, is_admin_path
from relay.config import Config
from relay.handshake import origin_matches
from relay.limits import StartRateLimiter, retry_after
from relay.metrics import Metrics
from relay.store import Store, StoreFull, StoreUnavailable
from relay.tokens import TOKEN_LIFETIME, KeyRing, mint

__all__ = [
    "MAX_PIPECAT_BODY",
    "MAX_START_BODY",
    "ASGIApp",
    "ControlState",
    "FleetRate",
    "make_control_app",
]

logger = logging.getLogger("relay.control")

MAX_START_BODY = 1_048_576  # bytes of /start request body (SPEC §3: "over 1 MiB" is 413)
MAX_PIPECAT_BODY = 4096  # bytes of compact-JSON body for pipecat-cloud agents (SPEC §5)
STORE_HEALTH_TIMEOUT = 1.0  # seconds: /health must answer even when the store hangs
CORS_MAX_AGE = 600  # seconds browsers may cache a preflight
CORS_ALLOW_HEADERS = "Authorization, Content-Type"

Scope = Mapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_START_PATH = re.compile(r"/v1/public/([^/]+)/start")
_START_METHODS = ("POST", "OPTIONS")
_READ_METHODS = ("GET", "HEAD", "OPTIONS")


def _never_full(agent: str) -> bool:
    return False


class FleetRate(Protocol):
    """The /start rate limit shared by a fleet (``relay.fleet_rate.FleetStartLimiter``)."""

    async def take(self, public_key: str, now: float) -> float:
        """0.0 when allowed, else seconds to wait; ``now`` is wall-clock unix seconds.
        Raises ``StoreUnavailable`` when the shared store does not answer."""
        ...


@attrs.define
class ControlState:
    """Everything the control plane reads; shared with the data plane by the server.

    ``now`` is wall-clock unix seconds (token expiry); ``is_full(agent)`` tells whether
    the agent is at max_clients (for 429); ``store_up``, when given, is a cached store
    health flag (a shared store's watcher), used instead of asking the store per request.
    """

    config: Config
    keyring: KeyRing
    store: Store
    metrics: Metrics
    now: Callable[[], float]
    is_full: Callable[[str], bool] = _never_full
    store_up: Callable[[], bool] | None = None
    operations: Operations | None = None  # operator API and drains (admin.py); None = off
    before_metrics: Callable[[], None] | None = None  # brings relayed counts up to date
    clock: Callable[[], float] = trio.current_time  # monotonic seconds: /start rate limit
    # the fleet's /start buckets (Redis), read with ``now``; None: this process's own
    fleet_rate: FleetRate | None = None


class _Refuse(Exception):
    """An error response, raised inside a handler and rendered once at the top."""

    def __init__(
        self,
        status: int,
        code: str,
        error: str,
        detail: str,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.error = error
        self.detail = detail
        self.headers = headers

    def body(self) -> bytes:
        return _json({"error": self.error, "code": self.code, "detail": self.detail})


class _Disconnected(Exception):
    """The client went away while we read its body: nothing to answer."""


def _json(value: object) -> bytes:
    """Compact JSON; ValueError for a non-finite float, UnicodeEncodeError for a lone surrogate."""
    return json.dumps(
        value, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


class _NotFinite(ValueError):
    """A number JSON cannot carry: NaN, Infinity, or a literal that overflows a double."""


def _reject_constant(name: str) -> object:
    raise _NotFinite(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf and would be written as Infinity
        raise _NotFinite(f"{text} is not a finite number")
    return value


class ControlApp:
    """The ASGI callable; one per gateway (``make_control_app``)."""

    def __init__(self, state: ControlState) -> None:
        self.state = state
        #: /start bodies being read right now (bounded by [server] max_start_body_reads)
        self.reading_bodies = 0
        server = state.config.server
        self.start_limiter = StartRateLimiter(server.public_keys, rate=server.start_rate,
                                              burst=server.start_burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":  # the data plane is another listener (SPEC §1)
            await receive()  # websocket.connect
            if "websocket.http.response" in scope.get("extensions", {}):
                # Refused before the handshake, as an HTTP answer with the envelope
                # (hypercorn would otherwise answer a bare 403 with no body).
                body = _Refuse(404, "not_found", "Not found.",
                               "WebSocket sessions are served on the data plane "
                               "(ws_bind), not on this HTTP port.").body()
                await send({"type": "websocket.http.response.start", "status": 404,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "websocket.http.response.body", "body": body})
            else:
                await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ---------------------------------------------------------------- routing

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        if is_admin_path(path):  # the operator API and live page (admin_api.py)
            await handle_admin(scope, receive, send, self.state.config, self.state.operations)
            return
        cors = self._cors_headers(scope)
        start = _START_PATH.fullmatch(path)
        allowed = _START_METHODS if start else _READ_METHODS
        try:
            if not start and path not in ("/health", "/metrics"):
                raise _Refuse(404, "not_found", "Not found.", f"No route for {path}.")
            if method not in allowed:
                raise _Refuse(
                    405,
                    "method_not_allowed",
                    "Method not allowed.",
                    f"{path} accepts {', '.join(allowed)}.",
                    ((b"allow", ", ".join(allowed).encode()),),
                )
            if method == "OPTIONS":
                await self._options(scope, send, allowed)
                return
            if start:
                status, body = await self._start(scope, receive, start.group(1))
                self.state.metrics.start_request(status)
                await _respond(send, status, body, "application/json", cors, no_store=True)
            elif path == "/health":
                await _respond(
                    send,
                    200,
                    await self._health(),
                    "application/json",
                    cors,
                    head=method == "HEAD",
                    no_store=True,
                )
            else:
                if self.state.before_metrics is not None:
                    self.state.before_metrics()
                data, content_type = self.state.metrics.render()
                await _respond(send, 200, data, content_type, cors, head=method == "HEAD")
        except _Refuse as refusal:
            if start and method == "POST":
                self.state.metrics.start_request(refusal.status)
            await _respond(
                send,
                refusal.status,
                refusal.body(),
                "application/json",
                cors + list(refusal.headers),
                head=method == "HEAD",
                no_store=True,
            )
        except _Disconnected:
            return
        except Exception:  # a bug: still answer with the envelope, CORS headers, counted
            logger.exception("control plane: %s %s failed", method, path)
            failure = _Refuse(
                500,
                "internal_error",
                "Internal error.",
                "The gateway could not answer this request; the error has been logged.",
            )
            if start and method == "POST":
                self.state.metrics.start_request(500)
            await _respond(
                send,
                500,
                failure.body(),
                "application/json",
                cors,
                head=method == "HEAD",
                no_store=True,
            )

    # ---------------------------------------------------------------- CORS

    def _allowed_origin(self, origin: bytes | None) -> str | None:
        if origin is None:
            return None
        allowed = self.state.config.server.cors_origins
        if "*" in allowed:
            return "*"
        text = origin.decode("latin-1")
        return text if origin_matches(text, allowed) else None

    def _cors_headers(self, scope: Scope) -> list[tuple[bytes, bytes]]:
        if not self.state.config.server.cors_origins:
            return []
        headers = [(b"vary", b"Origin")]
        allowed = self._allowed_origin(_header(scope, b"origin"))
        if allowed is not None:
            headers.append((b"access-control-allow-origin", allowed.encode("latin-1")))
        return headers

    async def _options(self, scope: Scope, send: Send, allowed: tuple[str, ...]) -> None:
        origin = _header(scope, b"origin")
        methods = ", ".join(allowed).encode()
        if origin is None or _header(scope, b"access-control-request-method") is None:
            await _respond(send, 204, b"", None, [(b"allow", methods)])
            return
        allow_origin = self._allowed_origin(origin)
        if allow_origin is None:
            raise _Refuse(
                403,
                "origin_not_allowed",
                "Origin not allowed.",
                f"Origin {origin.decode('latin-1')} is not in [server] cors_origins.",
            )
        await _respond(
            send,
            204,
            b"",
            None,
            [
                (b"vary", b"Origin"),
                (b"access-control-allow-origin", allow_origin.encode("latin-1")),
                (b"access-control-allow-methods", methods),
                (b"access-control-allow-headers", CORS_ALLOW_HEADERS.encode()),
                (b"access-control-max-age", str(CORS_MAX_AGE).encode()),
            ],
        )

    # ---------------------------------------------------------------- /health

    async def _store_is_up(self) -> bool:
        if self.state.store_up is not None:
            return self.state.store_up()
        with trio.move_on_after(STORE_HEALTH_TIMEOUT):
            try:
                return await self.state.store.healthy()
            except StoreUnavailable:
                return False
        return False

    async def _health(self) -> bytes:
        config = self.state.config
        return _json(
            {
                "status": "ok",
                "store": "up" if await self._store_is_up() else "down",
                "backend": config.store.backend,
                "agents": len(config.agents),
            }
        )

    # ---------------------------------------------------------------- /start

    async def _start(self, scope: Scope, receive: Receive, agent_name: str) -> tuple[int, bytes]:
        state = self.state
        server = state.config.server
        key = self._check_public_key(scope)
        await self._check_rate(key)
        agent = state.config.agents.get(agent_name)
        if agent is None:
            raise _Refuse(
                404,
                "agent_not_found",
                "Agent not found.",
                f"There is no agent named {agent_name!r} on this gateway.",
            )
        if state.operations is not None and state.operations.is_draining(agent_name):
            raise _Refuse(
                503,
                "draining",
                "Agent is draining.",
                f"Agent {agent_name!r} is being drained by its operator: it takes no new "
                "sessions now; try again later or elsewhere.",
                ((b"retry-after", b"5"),),
            )
        raw = await self._read_start_body(scope, receive)
        request = _parse_request(raw)
        shape = _parse_shape(scope)
        body = request.get("body")
        token_auth = agent.websocket_auth == "token"
        held: bytes | None = None
        if body is not None:
            if not token_auth:
                raise _Refuse(
                    400,
                    "body_requires_token_auth",
                    "A body needs token authentication.",
                    f'Agent {agent_name!r} uses websocket_auth "none": a body can only be '
                    "handed to the bot of a token-authenticated session.",
                )
            held = _json(body)
            if agent.bot_protocol == "pipecat-cloud" and len(held) > MAX_PIPECAT_BODY:
                raise _Refuse(
                    413,
                    "body_too_large",
                    "Body too large.",
                    f"Agent {agent_name!r} passes the body in the bot's URL: at most "
                    f"{MAX_PIPECAT_BODY} bytes of compact JSON, got {len(held)}. An agent "
                    'with bot_protocol = "relay" carries bodies up to 1 MiB (as its '
                    "bot's first frame).",
                )
        if agent.when_full == "reject" and state.is_full(agent_name):
            raise _Refuse(
                429,
                "agent_full",
                "Agent is full.",
                f"Agent {agent_name!r} has its maximum of {agent.max_clients} clients; "
                "try again later.",
            )
        ws_url = f"{server.public_url}/ws/generic/{agent_name}.{server.organization}"
        session_id = str(uuid.uuid4())
        if not token_auth:
            return 200, _json(
                {"wsUrl": ws_url}
                if shape
                else {
                    "wsUrl": ws_url,
                    "sessionId": session_id,
                }
            )
        if not await self._store_is_up_for_start():
            raise _store_down()
        now = state.now()
        token = mint(
            state.keyring,
            agent=agent_name,
            org=server.organization,
            session_id=session_id,
            now=now,
            body=held is not None,
        )
        try:
            await state.store.put_session(session_id, held, now + TOKEN_LIFETIME, now=now)
        except StoreUnavailable:
            raise _store_down() from None
        except StoreFull as full:
            state.metrics.store_full(full.bound)
            raise _Refuse(
                503,
                "store_full",
                "Session store full.",
                f"{str(full).capitalize()}; nothing held was dropped. Try again shortly.",
                ((b"retry-after", b"5"),),
            ) from None
        if shape:
            return 200, _json({"wsUrl": ws_url, "token": token})
        return 200, _json({"token": token, "wsUrl": ws_url, "sessionId": session_id})

    async def _read_start_body(self, scope: Scope, receive: Receive) -> bytes:
        """The body, read under ``start_body_timeout`` (408) in one of a bounded number of
        slots (503 when all ``max_start_body_reads`` are taken): slow clients hold at most
        that many buffers of at most MAX_START_BODY bytes, each for a bounded time."""
        server = self.state.config.server
        _check_declared_length(scope, MAX_START_BODY)  # 413 needs no slot
        if self.reading_bodies >= server.max_start_body_reads:
            raise _Refuse(
                503,
                "busy",
                "Too many /start requests at once.",
                f"{server.max_start_body_reads} /start request bodies are being received "
                "already; try again shortly.",
                ((b"retry-after", b"1"),),
            )
        self.reading_bodies += 1
        try:
            with trio.move_on_after(server.start_body_timeout):
                return await _read_body(scope, receive, MAX_START_BODY)
        finally:
            self.reading_bodies -= 1
        raise _Refuse(
            408,
            "request_timeout",
            "Request body not received in time.",
            f"The /start request body must arrive within {server.start_body_timeout:g} "
            "seconds of its headers.",
        )

    async def _store_is_up_for_start(self) -> bool:
        # Asking a shared store per /start would add a round trip; its put fails fast
        # with StoreUnavailable anyway. Only a cached flag is consulted here.
        return self.state.store_up() if self.state.store_up is not None else True

    async def _rate_wait(self, key: str) -> float:
        """Seconds ``key`` must wait before its next /start (0.0: go on)."""
        fleet = self.state.fleet_rate
        if fleet is not None and await self._store_is_up_for_start():
            try:
                return await fleet.take(key, self.state.now())
            except StoreUnavailable:
                pass  # Redis stopped answering: as while it is known to be down, below
        # The memory store, or Redis down: this process's bucket. The request then meets
        # the store's own failure where it needs the store (503 for token agents), as it
        # did before the fleet had a shared bucket; auth-none agents stay limited.
        return self.start_limiter.take(key, self.state.clock())

    async def _check_rate(self, key: str) -> None:
        """429 with Retry-After when this public key is over its /start rate."""
        wait = await self._rate_wait(key)
        if wait <= 0:
            return
        server = self.state.config.server
        seconds = retry_after(wait)
        self.state.metrics.start_rate_limited()
        raise _Refuse(
            429,
            "rate_limited",
            "Too many /start requests.",
            f"This public key may call /start {server.start_rate:g} times per second "
            f"(bursts of {server.start_burst}); try again in {seconds} s.",
            ((b"retry-after", str(seconds).encode()),),
        )

    def _check_public_key(self, scope: Scope) -> str:
        value = _header(scope, b"authorization")
        presented = b""
        if value is not None:
            scheme, _, rest = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                presented = rest.strip()
        matched = False
        found = ""
        for key in self.state.config.server.public_keys:  # no early exit: constant time
            same = hmac.compare_digest(presented, key.encode())
            matched |= same
            found = key if same else found
        if not presented or not matched:
            raise _Refuse(
                401,
                "unauthorized",
                "Missing or unknown public key.",
                "Send the gateway's public key as 'Authorization: Bearer <key>'.",
                ((b"www-authenticate", b"Bearer"),),
            )
        return found


def _store_down() -> _Refuse:
    return _Refuse(
        503,
        "store_unavailable",
        "Session store unavailable.",
        "Tokens cannot be issued while the session store is down; try again shortly.",
        ((b"retry-after", b"5"),),
    )


def _too_large(limit: int) -> _Refuse:
    return _Refuse(
        413,
        "payload_too_large",
        "Request body too large.",
        f"The /start request body may be at most {limit} bytes.",
    )


def _check_declared_length(scope: Scope, limit: int) -> None:
    """413 when Content-Length already says the body is over ``limit``."""
    length = _header(scope, b"content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise _too_large(limit)


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed ``limit``.

    Content-Length over the limit is refused before reading; otherwise bytes are counted
    as ``http.request`` messages arrive and the first byte past the limit refuses, so at
    most ``limit`` bytes are ever held.
    """
    _check_declared_length(scope, limit)
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk: bytes = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _parse_request(raw: bytes) -> dict[str, Any]:
    try:
        request = json.loads(
            raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float
        )
        _json(request)  # what cannot be written back as JSON cannot reach the bot
    except _NotFinite:
        raise _Refuse(
            400,
            "invalid_json",
            "Request body has a number JSON cannot carry.",
            "Numbers must be finite: NaN, Infinity and literals such as 1e999 (too large "
            "for a double) cannot be passed on as JSON.",
        ) from None
    except UnicodeEncodeError:
        raise _Refuse(
            400,
            "invalid_json",
            "Request body has a string that is not Unicode.",
            "Strings and keys must be valid Unicode: a lone surrogate escape such as "
            "\\ud800 (without its pair) cannot be passed on as JSON.",
        ) from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _Refuse(
            400,
            "invalid_json",
            "Request body is not JSON.",
            'Send a JSON object such as {"transport": "websocket"}.',
        ) from None
    if not isinstance(request, dict):
        raise _Refuse(
            400,
            "invalid_request",
            "Request body must be a JSON object.",
            'Send a JSON object such as {"transport": "websocket"}.',
        )
    if request.get("transport") != "websocket":
        raise _Refuse(
            400,
            "unsupported_transport",
            "Unsupported transport.",
            'This gateway only starts sessions with "transport": "websocket".',
        )
    return request


def _parse_shape(scope: Scope) -> bool:
    """Whether ``?shape=client`` was asked for; any other shape is a 400."""
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    shapes = [value for name, value in parse_qsl(query, keep_blank_values=True) if name == "shape"]
    if not shapes:
        return False
    if shapes != ["client"]:
        raise _Refuse(
            400,
            "invalid_request",
            "Unknown response shape.",
            'The only shape is "client" (?shape=client answers {"wsUrl", "token"}).',
        )
    return True


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str | None,
    extra: list[tuple[bytes, bytes]],
    *,
    head: bool = False,
    no_store: bool = False,
) -> None:
    headers = list(extra)
    if content_type is not None:
        headers.append((b"content-type", content_type.encode("latin-1")))
    headers.append((b"content-length", str(len(body)).encode()))
    if no_store:
        headers.append((b"cache-control", b"no-store"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


def make_control_app(state: ControlState) -> ASGIApp:
    """The control plane of one gateway as an ASGI app (mountable in any ASGI server)."""
    return ControlApp(state)


# -------------------------------------------------------------------- serving
