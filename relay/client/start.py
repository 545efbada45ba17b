"""POST /start from the trio client: h11 over a trio TCP (or TLS) stream.

One request per connection (``Connection: close``), the answer read up to
``MAX_START_ANSWER`` bytes. A 200 must be JSON with a string ``wsUrl`` (ws:// or wss://,
and wss:// when /start itself was https, so a token never travels in the clear), and a
``token`` made of the characters tokens use (``[A-Za-z0-9._~-]``, safe in a path, a query
or a header) when there is one; anything else is a ``StartError``. Errors carry the
gateway's ``{"error", "code", "detail"}`` envelope when it sent one.
"""

from __future__ import annotations

import json
import re
import ssl
from typing import Any
from urllib.parse import urlsplit

import attrs
import h11
import trio

from relay.client.errors import StartError

__all__ = [
    "MAX_START_ANSWER",
    "StartAnswer",
    "host_header",
    "network_error",
    "open_stream",
    "post_start",
    "start_request",
    "split_url",
]

MAX_START_ANSWER = 65_536  # bytes of /start answer body; relay's are a few hundred
_TOKEN = re.compile(r"[A-Za-z0-9._~-]+")
_PUBLIC_KEY = re.compile(r"[!-~]+")  # what the gateway accepts as a public key


@attrs.frozen
class StartAnswer:
    ws_url: str
    token: str | None  # None for agents with websocket_auth "none"
    session_id: str | None


def split_url(url: str, schemes: tuple[str, str]) -> tuple[str, int, str, bool]:
    """``(host, port, target, tls)`` of an http(s) or ws(s) URL; ValueError otherwise."""
    parts = urlsplit(url)
    plain, secure = schemes
    try:
        port_given = parts.port
    except ValueError:  # not a number, or out of range
        port_given = -1
    if parts.scheme not in schemes or not parts.hostname or port_given == -1:
        raise ValueError(f"not a {plain}:// or {secure}:// URL: {url!r}")
    tls = parts.scheme == secure
    port = port_given or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, target, tls


async def open_stream(host: str, port: int, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    """A TCP stream, or a TLS stream when ``ssl_context`` is given (handshake done)."""
    tcp = await trio.open_tcp_stream(host, port)
    if ssl_context is None:
        return tcp
    stream = trio.SSLStream(tcp, ssl_context, server_hostname=host)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return stream


def network_error(exc: BaseException) -> tuple[str, str]:
    """A short code and a sentence for a failure to reach a peer (TLS failures named)."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        return "tls_failed", f"TLS handshake failed: {cause}"
    return "unreachable", str(exc) or repr(exc)


def host_header(host: str, port: int, tls: bool) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == (443 if tls else 80) else f"{shown}:{port}"


def start_request(public_key: str, body: Any) -> bytes:
    """The /start request body; ValueError for a key or body that cannot be sent."""
    if not _PUBLIC_KEY.fullmatch(public_key):
        raise ValueError("public_key must be visible ASCII (it travels in a Bearer header)")
    payload: dict[str, Any] = {"transport": "websocket"}
    if body is not None:
        payload["body"] = body
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"body is not JSON: {exc}") from None


async def post_start(start_url: str, public_key: str, data: bytes, *,
                     ssl_context: ssl.SSLContext | None) -> StartAnswer:
    """Call /start once with ``data`` (``start_request``). Raises ``StartError``; the
    caller bounds the time it takes."""
    host, port, target, tls = split_url(start_url, ("http", "https"))
    try:
        stream = await open_stream(host, port, (ssl_context or ssl.create_default_context())
                                   if tls else None)
    except (OSError, trio.BrokenResourceError) as exc:
        code, why = network_error(exc)
        raise StartError(None, code, f"cannot reach {host}:{port}: {why}") from exc
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="POST", target=target, headers=[
            ("host", host_header(host, port, tls)),
            ("authorization", f"Bearer {public_key}"),
            ("content-type", "application/json"),
            ("content-length", str(len(data))),
            ("connection", "close"),
        ])
        try:
            await stream.send_all(conn.send(request) + conn.send(h11.Data(data=data))
                                  + conn.send(h11.EndOfMessage()))
            status, answer = await _read_answer(conn, stream)
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            raise StartError(None, "bad_answer", f"/start at {host}:{port}: {exc!r}") from exc
    return _parse(status, answer, tls)


async def _read_answer(conn: h11.Connection, stream: trio.abc.Stream) -> tuple[int, bytes]:
    status = 0
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(16_384)))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_START_ANSWER:
                raise StartError(status, "answer_too_large",
                                 f"the /start answer exceeds {MAX_START_ANSWER} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return status, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise StartError(None, "bad_answer", "the connection closed before an answer")


def _parse(status: int, answer: bytes, tls: bool) -> StartAnswer:
    try:
        value = json.loads(answer)
    except ValueError:
        value = None
    if status != 200:
        if isinstance(value, dict) and isinstance(value.get("code"), str):
            detail = value.get("detail") or value.get("error") or ""
            raise StartError(status, value["code"], str(detail))
        raise StartError(status, f"http_{status}", answer[:200].decode("utf-8", "replace"))
    if not isinstance(value, dict) or not isinstance(value.get("wsUrl"), str):
        raise StartError(status, "bad_answer", "the answer has no wsUrl")
    ws_url: str = value["wsUrl"]
    try:
        ws_tls = split_url(ws_url, ("ws", "wss"))[3]
    except ValueError:
        ws_tls = None
    if ws_tls is None or (tls and not ws_tls):
        wanted = "a wss:// URL" if tls else "a ws:// or wss:// URL"
        raise StartError(status, "bad_answer", f"wsUrl {ws_url[:200]!r} is not {wanted}")
    token = value.get("token")
    if token is not None and not (isinstance(token, str) and _TOKEN.fullmatch(token)):
        raise StartError(status, "bad_answer", "the token is not [A-Za-z0-9._~-]+")
    session_id = value.get("sessionId")
    return StartAnswer(ws_url, token, session_id if isinstance(session_id, str) else None)
