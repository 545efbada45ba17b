"""The upgrade decision, sans-IO: request line and headers in, accept or reject out.

Owns, for the client's upgrade (RFC 6455 §4.2.1) and the bot's answer (§4.1):
- routing `/ws/generic/{agent}.{org}`, `/ws/generic/{agent}.{org}/{token}` and
  `/ws/generic?serviceHost={agent}.{org}`, with the SPEC §8 name rules;
- validating the upgrade headers (method, version, key);
- the headers of the 101 we send the client and of the request we send the bot;
- validating the bot's 101 (its Sec-WebSocket-Accept must match our key).

No trio here: `connection.py` does the I/O and asks these functions what to do. The token
check is a separate step (`tokens.py`): it runs after routing, before admission.
A refusal is a value (`Reject`), not an exception: status, short code and a sentence,
rendered as the JSON envelope of SPEC §3.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Mapping
from urllib.parse import unquote

import attrs
from wsproto.utilities import generate_accept_token

NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
WS_PREFIX = "/ws/generic"
# Telephony provider endpoints `/ws/{provider}` (their opening messages: providers.py).
PROVIDERS = ("twilio", "telnyx", "plivo", "exotel")
# Query parameters that address the gateway itself and are never passed to the bot.
GATEWAY_QUERY_KEYS = frozenset({"token", "serviceHost"})
# Parameters only the gateway may set on the bot's URL: a client's own is dropped whatever
# its spelling (`bod%79`, `body;x`...), so the bot never reads a body the client made up.
GATEWAY_OWNED_PARAMS = frozenset({"body"})

Headers = list[tuple[bytes, bytes]]


@attrs.frozen
class Reject:
    """Refuse the upgrade with a plain HTTP response (no 101, no close frame)."""

    status: int
    code: str
    detail: str
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def body(self) -> bytes:
        return render_error(self.status, self.code, self.detail)


@attrs.frozen
class Route:
    """Where an upgrade request points."""

    agent: str
    org: str
    path_token: str | None  # the `/{token}` path segment, when present (even empty)
    query_pairs: tuple[tuple[str, str], ...]  # decoded, for the token lookup
    bot_query: str  # the client's raw query string without token/serviceHost/body
    provider: str | None = None  # "twilio", ... on `/ws/{provider}`; None on the generic
    # Twilio without ?serviceHost= or a path host: agent and org are empty until its
    # `start` message names them (providers.resolve_route).
    deferred: bool = False


@attrs.frozen
class Upgrade:
    """What a valid upgrade request asks for."""

    key: bytes
    subprotocols: tuple[bytes, ...]  # raw Sec-WebSocket-Protocol header values, in order
    extensions: tuple[bytes, ...]  # raw Sec-WebSocket-Extensions header values, in order
    origin: bytes | None
    user_agent: bytes | None
    authorization: bytes | None


_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def reason_phrase(status: int) -> str:
    return _REASONS.get(status, "Error")


def render_error(status: int, code: str, detail: str) -> bytes:
    """The JSON error envelope: the hosted service's `error` and `code`, plus `detail`."""
    return json.dumps(
        {"error": reason_phrase(status), "code": code, "detail": detail},
        separators=(",", ":"),
    ).encode()


def _split_target(target: str) -> tuple[str, str]:
    path, _, query = target.partition("?")
    return path, query


def _decode(text: str) -> str:
    return unquote(text.replace("+", " "))


def param_names(part: str) -> frozenset[str]:
    """Every name a URL parser could read from one raw `name=value` part (SPEC §8 rev 2).

    The bot's framework decides what `bod%79` or `bo%2564y` means, not us, so a client
    parameter is judged by all its readings: percent-decoded once and again (until nothing
    changes), with `+` as a space, split at `;` (older parsers' separator, so `x=1;body=2`
    has a `body`), stripped of surrounding whitespace, as is and lower-cased. A parameter
    is dropped when any reading is a reserved name.
    """
    names: set[str] = set()
    text = part
    for _ in range(8):  # bounded: each round only shortens the text or stops
        for piece in text.split(";"):
            name = piece.partition("=")[0]
            names.update((name, name.strip(), name.strip().lower()))
        decoded = _decode(text)
        if decoded == text:
            break
        text = decoded
    return frozenset(names)


def query_keys(query: str) -> frozenset[str]:
    """The decoded parameter names a query string sets (the operator's bot URL)."""
    return frozenset(_decode(part.partition("=")[0])
                     for part in query.split("&") if part)


def _parse_query(query: str) -> tuple[tuple[tuple[str, str], ...], str]:
    """Decoded pairs (for lookups) and the raw query for the bot.

    The bot's copy keeps the client's parameters as they came, minus those that speak
    for the gateway: `token` and `serviceHost` (ours) and any reading of `body` (the
    held body's place, SPEC §5: only the gateway may put it there).
    """
    pairs: list[tuple[str, str]] = []
    kept: list[str] = []
    for part in query.split("&"):
        if not part:
            continue
        raw_key, _, raw_value = part.partition("=")
        key = _decode(raw_key)
        value = _decode(raw_value)
        pairs.append((key, value))
        if key in GATEWAY_QUERY_KEYS or GATEWAY_OWNED_PARAMS & param_names(part):
            continue
        kept.append(part)
    return tuple(pairs), "&".join(kept)


def without_params(query: str, names: frozenset[str]) -> str:
    """`query` minus every parameter that any reading of its name puts in `names`."""
    if not names or not query:
        return query
    return "&".join(part for part in query.split("&")
                    if part and not names & param_names(part))


def split_service_host(host: str) -> tuple[str, str] | None:
    """`{agent}.{org}` split at its only dot, both names valid; else None."""
    if host.count(".") != 1:
        return None
    agent, org = host.split(".")
    if not NAME_RE.fullmatch(agent) or not NAME_RE.fullmatch(org):
        return None
    return agent, org


def _endpoint(path: str) -> tuple[str, str | None] | None:
    """(prefix, provider) of the endpoint `path` is under: generic or a provider's."""
    if path == WS_PREFIX or path.startswith(WS_PREFIX + "/"):
        return WS_PREFIX, None
    for provider in PROVIDERS:
        prefix = f"/ws/{provider}"
        if path == prefix or path.startswith(prefix + "/"):
            return prefix, provider
    return None


def route(target: bytes, *, providers: bool = True) -> Route | Reject:
    """Map a request target to (agent, org, path token, query) or a 404.

    `providers=False` (the message-level `Gateway.handle` path) refuses the provider
    endpoints with a 404 saying where they are served.
    """
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        return Reject(400, "bad_target", "The request target is not ASCII.")
    if "#" in text:
        # A fragment is never sent on the wire (RFC 3986 §3.5); one here would hide the
        # rest of the bot's URL, our `body=` included, from the bot's URL parser.
        return Reject(400, "bad_target", "The request target must not contain '#'.")
    path, query = _split_target(text)
    pairs, bot_query = _parse_query(query)
    not_found = Reject(404, "unknown_path", f"No WebSocket endpoint at {path!r}.")
    endpoint = _endpoint(path)
    if endpoint is None:
        return not_found
    prefix, provider = endpoint
    if provider is not None and not providers:
        return Reject(404, "provider_endpoint_unavailable",
                      f"{prefix} is served by relay's own listener (relay serve, "
                      "Gateway.serve), not through Gateway.handle.")
    if path == prefix or path == prefix + "/":
        hosts = [v for k, v in pairs if k == "serviceHost"]
        if not hosts and provider == "twilio":
            # Twilio's stream URLs take no query: the `start` message routes it.
            return Route("", "", None, pairs, bot_query, provider, deferred=True)
        if not hosts:
            return Reject(404, "unknown_service_host", "serviceHost is missing.")
        service_host = hosts[0]
        path_token: str | None = None
    elif path.startswith(prefix + "/"):
        rest = path[len(prefix) + 1 :].split("/")
        if len(rest) == 1:
            service_host, path_token = rest[0], None
        elif len(rest) == 2:
            service_host, path_token = rest[0], unquote(rest[1])
        else:
            return not_found
    else:  # pragma: no cover - _endpoint() matched the prefix or prefix + "/"
        return not_found
    parts = split_service_host(unquote(service_host))
    if parts is None:
        return Reject(
            404,
            "unknown_service_host",
            f"{service_host!r} is not a service host of the form agent.organization.",
        )
    return Route(parts[0], parts[1], path_token, pairs, bot_query, provider)


def check_route(
    r: Route, *, organization: str, agents: Mapping[str, object]
) -> Reject | None:
    """SPEC §5 step 1: unknown service host or another organization → 404."""
    if r.org != organization or r.agent not in agents:
        return Reject(
            404,
            "unknown_service_host",
            f"No agent {r.agent!r} in organization {r.org!r} here.",
        )
    return None


def _index(headers: Headers) -> dict[bytes, list[bytes]]:
    """Each header's values by lowercased name, in order (one pass over the headers)."""
    index: dict[bytes, list[bytes]] = {}
    for k, v in headers:
        index.setdefault(k.lower(), []).append(v)
    return index


def _tokens(values: Iterable[bytes]) -> set[bytes]:
    return {t.strip().lower() for v in values for t in v.split(b",")}


def check_upgrade(method: bytes, http_version: bytes, headers: Headers) -> Upgrade | Reject:
    """Validate a client's WebSocket upgrade request (RFC 6455 §4.2.1)."""
    if method != b"GET":
        return Reject(405, "method_not_allowed", "A WebSocket upgrade must be a GET.",
                      ((b"allow", b"GET"),))
    if http_version != b"1.1":
        return Reject(400, "bad_http_version", "A WebSocket upgrade needs HTTP/1.1.")
    index = _index(headers)
    none: list[bytes] = []
    if b"websocket" not in _tokens(index.get(b"upgrade", none)):
        return Reject(426, "not_websocket", "This endpoint only speaks WebSocket "
                      "(Upgrade: websocket missing).",
                      ((b"upgrade", b"websocket"), (b"connection", b"Upgrade")))
    if b"upgrade" not in _tokens(index.get(b"connection", none)):
        return Reject(400, "bad_connection_header", "Connection: Upgrade is missing.")
    versions = index.get(b"sec-websocket-version", none)
    if versions != [b"13"]:
        return Reject(426, "bad_websocket_version", "Only Sec-WebSocket-Version 13 is spoken.",
                      ((b"sec-websocket-version", b"13"),))
    keys = index.get(b"sec-websocket-key", none)
    if len(keys) != 1:
        return Reject(400, "bad_websocket_key", "Exactly one Sec-WebSocket-Key is required.")
    key = keys[0].strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError("not 16 bytes")
    except (binascii.Error, ValueError):
        return Reject(400, "bad_websocket_key", "Sec-WebSocket-Key must be 16 bytes in base64.")
    if index.get(b"content-length", none) not in ([], [b"0"]) or b"transfer-encoding" in index:
        return Reject(400, "unexpected_body", "A WebSocket upgrade carries no request body.")

    def first(name: bytes) -> bytes | None:
        vals = index.get(name)
        return vals[0] if vals else None

    return Upgrade(
        key=key,
        subprotocols=tuple(index.get(b"sec-websocket-protocol", none)),
        extensions=tuple(index.get(b"sec-websocket-extensions", none)),
        origin=first(b"origin"),
        user_agent=first(b"user-agent"),
        authorization=first(b"authorization"),
    )


def origin_matches(origin: str, allowed: Iterable[str]) -> bool:
    """Whether a browser Origin is one of `allowed` ("*" allows any); case-insensitive."""
    text = origin.lower().rstrip("/")
    return any(c == "*" or c.lower().rstrip("/") == text for c in allowed)


def check_origin(upgrade: Upgrade, allowed: tuple[str, ...]) -> Reject | None:
    """Browser upgrades from origins outside `cors_origins` → 403, once any are configured.

    A page on another site can open a WebSocket to the gateway with the user's network
    position (cross-site WebSocket hijacking); browsers always send Origin, so once the
    operator has listed the origins allowed to call /start, upgrades carrying any other
    Origin are refused too. Requests without Origin (telephony providers, servers) are not
    browsers and pass. With no `cors_origins` configured nothing is checked.
    """
    if not allowed or upgrade.origin is None:
        return None
    origin = upgrade.origin.decode("latin-1")
    if origin_matches(origin, allowed):
        return None
    return Reject(403, "origin_not_allowed",
                  f"Origin {origin} is not in [server] cors_origins.")


@attrs.frozen
class Admit:
    """An upgrade that passed every check before the token: where it goes and what it asks."""

    route: Route
    upgrade: Upgrade


def refuse_early(*, shutting_down: bool, over_capacity: bool) -> Reject | None:
    """Refusals that need no request at all: shutting down, or at the connection limit."""
    if shutting_down:
        return Reject(503, "shutting_down", "The gateway is shutting down.")
    if over_capacity:
        return Reject(503, "too_many_connections", "The gateway is at its connection limit.")
    return None


def decide(
    method: bytes,
    http_version: bytes,
    target: bytes,
    headers: Headers,
    *,
    organization: str,
    agents: Mapping[str, object],
    cors_origins: tuple[str, ...],
    shutting_down: bool = False,
    over_capacity: bool = False,
    providers: bool = False,
) -> Admit | Reject:
    """The handshake decision before the token check, in SPEC §5's order.

    Both data-plane paths (our listener and `Gateway.handle`) ask this one function; only
    our listener serves the provider endpoints (`providers=True`). A deferred provider
    route (Twilio routed by its `start` message) skips the route check here: it runs
    once the start has named the agent.
    """
    early = refuse_early(shutting_down=shutting_down, over_capacity=over_capacity)
    if early is not None:
        return early
    r = route(target, providers=providers)
    if isinstance(r, Reject):
        return r
    bad = None if r.deferred else check_route(r, organization=organization, agents=agents)
    if bad is not None:
        return bad
    upgrade = check_upgrade(method, http_version, headers)
    if isinstance(upgrade, Reject):
        return upgrade
    bad = check_origin(upgrade, cors_origins)
    if bad is not None:
        return bad
    return Admit(r, upgrade)


def accept_headers(
    key: bytes, subprotocol: bytes | None, extensions: Iterable[bytes]
) -> Headers:
    """Headers of the 101 we send the client, carrying what the bot chose."""
    headers: Headers = [
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", generate_accept_token(key)),
    ]
    if subprotocol:
        headers.append((b"sec-websocket-protocol", subprotocol))
    headers.extend((b"sec-websocket-extensions", e) for e in extensions)
    return headers


@attrs.frozen
class BotTarget:
    """Where an upstream bot lives, parsed from `ws://host:port/path?query`."""

    secure: bool
    host: str
    port: int
    path: str  # path with its own query, e.g. "/ws?x=1"

    @property
    def host_header(self) -> str:
        default = 443 if self.secure else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def parse_bot_url(url: str) -> BotTarget:
    """Parse `ws://` / `wss://` URLs; ValueError when it is neither."""
    if url.startswith("ws://"):
        secure, rest = False, url[5:]
    elif url.startswith("wss://"):
        secure, rest = True, url[6:]
    else:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    netloc, slash, path = rest.partition("/")
    path = slash + path if slash else "/"
    if "?" in netloc:
        netloc, _, q = netloc.partition("?")
        path = "/?" + q
    if netloc.startswith("["):
        host, _, port_text = netloc[1:].partition("]")
        port_text = port_text.removeprefix(":")
    else:
        host, _, port_text = netloc.partition(":")
    if not host:
        raise ValueError(f"no host in {url!r}")
    port = int(port_text) if port_text else (443 if secure else 80)
    if not 0 < port < 65536:
        raise ValueError(f"bad port in {url!r}")
    return BotTarget(secure, host, port, path)


def bot_request_target(bot: BotTarget, client_query: str, extra_query: str = "") -> str:
    """The bot's path, with the client's query (minus gateway keys) and ours appended.

    A client parameter the operator's bot URL itself sets is dropped (SPEC §8 rev 2): the
    bot URL speaks for the operator, and a repeated `?mode=debug` must not override it.
    """
    target = bot.path
    client_query = without_params(client_query, query_keys(bot.path.partition("?")[2]))
    for q in (client_query, extra_query):
        if q:
            target += ("&" if "?" in target else "?") + q
    return target


def bot_request_headers(
    bot: BotTarget,
    key: bytes,
    upgrade: Upgrade,
    *,
    session_id: str,
    agent: str,
    organization: str,
    client_addr: str,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> Headers:
    """Headers of our upgrade request to the bot (SPEC §5): never the client's Authorization."""
    headers: Headers = [
        (b"host", bot.host_header.encode()),
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-key", key),
        (b"sec-websocket-version", b"13"),
        (b"x-relay-session-id", session_id.encode()),
        (b"x-relay-agent", agent.encode()),
        (b"x-relay-organization", organization.encode()),
        (b"x-forwarded-for", client_addr.encode()),
    ]
    if upgrade.origin is not None:
        headers.append((b"origin", upgrade.origin))
    if upgrade.user_agent is not None:
        headers.append((b"user-agent", upgrade.user_agent))
    headers.extend((b"sec-websocket-protocol", p) for p in upgrade.subprotocols)
    headers.extend((b"sec-websocket-extensions", e) for e in upgrade.extensions)
    headers.extend(extra)
    return headers


@attrs.frozen
class BotAccepted:
    subprotocol: bytes | None
    extensions: tuple[bytes, ...]


def check_bot_response(key: bytes, status: int, headers: Headers) -> BotAccepted | str:
    """The bot's answer to our upgrade: what it chose, or why it is unusable (→ 502)."""
    if status != 101:
        return f"the bot answered HTTP {status} instead of 101"
    index = _index(headers)
    none: list[bytes] = []
    accepts = index.get(b"sec-websocket-accept", none)
    if accepts != [generate_accept_token(key)]:
        return "the bot's Sec-WebSocket-Accept does not match our key"
    if b"websocket" not in _tokens(index.get(b"upgrade", none)):
        return "the bot's 101 lacks Upgrade: websocket"
    protocols = index.get(b"sec-websocket-protocol", none)
    return BotAccepted(
        subprotocol=protocols[0] if protocols else None,
        extensions=tuple(index.get(b"sec-websocket-extensions", none)),
    )
