"""[ASGI] The operator API and the live page, on the control plane.

Served only when ``[server] admin_keys`` is set; otherwise every path here is 404, as if
it did not exist. Routes (all JSON answers are ``Cache-Control: no-store``)::

    GET    /                               the live page (HTML; asks for an admin key)
    GET    /live.js, /live.css, /live.svg  its script, style, icon (served by relay, no CDN)
    GET    /v1/admin/sessions              200 {"sessions": [...]}      every live session
    DELETE /v1/admin/sessions/{id}         204 once it is closing (4002); unknown id 404
    GET    /v1/admin/agents                200 {"agents": [{"name", "draining", "sessions"}]}
    POST   /v1/admin/agents/{agent}/drain  204: new /start and upgrades get 503 draining
    DELETE /v1/admin/agents/{agent}/drain  204: the drain ends; unknown agent 404

The ``/v1/admin/`` paths need ``Authorization: Bearer <admin key>``: 401 without one or
with a key not in admin_keys (compared in constant time against every key). The page and
its two files need no key (they hold no data); the page's script sends the key the user
types, kept in the tab's sessionStorage. The page is served with a strict
Content-Security-Policy (``default-src 'none'``; script, style and fetches from this
origin only; no inline script, no framing), and its script writes every value with
``textContent``: session fields a client controls never become HTML.

With the Redis store the operations are fleet-wide (``relay.fleet_admin``); when Redis
does not answer, the ``/v1/admin/`` paths answer 503 ``store_unavailable``.

No CORS headers are ever added here: the admin API is for the page on this origin and
for tools such as curl, not for other sites' scripts.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from importlib import resources
from typing import Any

from .admin import Operations
from .config import Config
from .store import StoreUnavailable

__all__ = ["LIVE_PAGE_CSP", "handle_admin", "is_admin_path"]

Scope = Mapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

LIVE_PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_STATIC = {
    "/": ("live.html", "text/html; charset=utf-8"),
    "/live.js": ("live.js", "text/javascript; charset=utf-8"),
    "/live.css": ("live.css", "text/css; charset=utf-8"),
    "/live.svg": ("live.svg", "image/svg+xml"),
}
_SESSION = re.compile(r"/v1/admin/sessions/([^/]+)")
_DRAIN = re.compile(r"/v1/admin/agents/([^/]+)/drain")
_PAGE_HEADERS = (
    (b"content-security-policy", LIVE_PAGE_CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)


def is_admin_path(path: str) -> bool:
    """Whether the control plane routes this path here."""
    return path in _STATIC or path == "/v1/admin" or path.startswith("/v1/admin/")


def _static(name: str) -> bytes:
    return resources.files("relay").joinpath("static", name).read_bytes()


def _envelope(error: str, code: str, detail: str) -> bytes:
    return json.dumps({"error": error, "code": code, "detail": detail},
                      separators=(",", ":")).encode()


async def _send(send: Send, status: int, body: bytes, content_type: str | None,
                headers: tuple[tuple[bytes, bytes], ...] = (), *, head: bool = False) -> None:
    out = list(headers)
    if content_type is not None:
        out.append((b"content-type", content_type.encode()))
    out.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _json(send: Send, status: int, body: bytes,
                headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    await _send(send, status, body, "application/json",
                (*headers, (b"cache-control", b"no-store"),
                 (b"x-content-type-options", b"nosniff")))


def _authorized(scope: Scope, keys: tuple[str, ...]) -> bool:
    presented = b""
    for name, value in scope.get("headers", ()):
        if bytes(name).lower() == b"authorization":
            scheme, _, rest = bytes(value).strip().partition(b" ")
            if scheme.lower() == b"bearer":
                presented = rest.strip()
            break
    matched = False
    for key in keys:  # every key compared, no early exit: constant time
        matched |= hmac.compare_digest(presented, key.encode())
    return bool(presented) and matched


async def _drain_request_body(receive: Receive) -> None:
    """Read (and drop) whatever body came with the request, up to its end."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def handle_admin(scope: Scope, receive: Receive, send: Send, config: Config,
                       operations: Operations | None) -> None:
    """Answer one request for an `is_admin_path` path."""
    method: str = scope["method"]
    path: str = scope["path"]
    keys = config.server.admin_keys
    if not keys or operations is None:
        await _json(send, 404, _envelope("Not found.", "not_found", f"No route for {path}."))
        return
    static = _STATIC.get(path)
    if static is not None:
        if method not in ("GET", "HEAD"):
            await _method_not_allowed(send, path, ("GET", "HEAD"))
            return
        name, content_type = static
        await _send(send, 200, _static(name), content_type, _PAGE_HEADERS,
                    head=method == "HEAD")
        return
    if not _authorized(scope, keys):
        await _json(send, 401, _envelope(
            "Missing or unknown admin key.", "unauthorized",
            "Send one of [server] admin_keys as 'Authorization: Bearer <key>'."),
            ((b"www-authenticate", b"Bearer"),))
        return
    await _drain_request_body(receive)
    try:
        await _route(send, method, path, config, operations)
    except StoreUnavailable:
        # a fleet's shared store does not answer: nothing was changed or could be listed
        await _json(send, 503, _envelope(
            "The session store is unavailable.", "store_unavailable",
            "The fleet's Redis store does not answer; live sessions go on. Try again "
            "later."), ((b"retry-after", b"5"),))


async def _route(send: Send, method: str, path: str, config: Config,
                 operations: Operations) -> None:
    if path == "/v1/admin/sessions":
        if method != "GET":
            await _method_not_allowed(send, path, ("GET",))
            return
        sessions = await operations.sessions()
        await _json(send, 200, json.dumps(
            {"sessions": [s.to_json() for s in sessions]}, ensure_ascii=True).encode())
        return
    if path == "/v1/admin/agents":
        if method != "GET":
            await _method_not_allowed(send, path, ("GET",))
            return
        sessions = await operations.sessions()
        draining = operations.draining()
        agents = [{"name": name, "draining": name in draining,
                   "sessions": sum(1 for s in sessions if s.agent == name)}
                  for name in sorted(config.agents)]
        await _json(send, 200, json.dumps({"agents": agents}).encode())
        return
    session = _SESSION.fullmatch(path)
    if session is not None:
        if method != "DELETE":
            await _method_not_allowed(send, path, ("DELETE",))
            return
        if await operations.end_session(session.group(1)):
            await _send(send, 204, b"", None, ((b"cache-control", b"no-store"),))
        else:
            await _json(send, 404, _envelope(
                "Session not found.", "session_not_found",
                "No live session has this id; it may have ended already."))
        return
    drain = _DRAIN.fullmatch(path)
    if drain is not None:
        agent = drain.group(1)
        if method not in ("POST", "DELETE"):
            await _method_not_allowed(send, path, ("POST", "DELETE"))
            return
        if agent not in config.agents:
            await _json(send, 404, _envelope(
                "Agent not found.", "agent_not_found",
                "There is no agent by this name on this gateway."))
            return
        await operations.set_draining(agent, method == "POST")
        await _send(send, 204, b"", None, ((b"cache-control", b"no-store"),))
        return
    await _json(send, 404, _envelope("Not found.", "not_found", f"No route for {path}."))


async def _method_not_allowed(send: Send, path: str, allowed: tuple[str, ...]) -> None:
    await _json(send, 405, _envelope("Method not allowed.", "method_not_allowed",
                                     f"{path} accepts {', '.join(allowed)}."),
                ((b"allow", ", ".join(allowed).encode()),))
