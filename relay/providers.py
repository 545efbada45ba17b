"""Telephony provider endpoints, sans-IO: their opening messages and the routing they carry.

Telephony providers open the WebSocket themselves (they cannot call /start), so relay
serves `/ws/twilio`, `/ws/telnyx`, `/ws/plivo` and `/ws/exotel` besides the generic
endpoint. Once the provider has its 101 it sends its opening messages: JSON text
messages, as each provider documents them:

    twilio  {"event": "connected", ...}   then {"event": "start", "start": {"streamSid",
            "callSid", "customParameters": {...}, ...}, ...}
    telnyx  {"event": "connected", ...}   then {"event": "start", "stream_id",
            "start": {"call_control_id", ...}, ...}
    plivo   {"event": "start", "start": {"callId", "streamId", ...}, ...}   (no "connected")
    exotel  {"event": "connected"}        then {"event": "start", "start": {"stream_sid",
            "call_sid", "account_sid", ...}, ...}

The fields required here are the ones Pipecat's `parse_telephony_websocket` reads to
recognise the provider, so whatever passes reaches the bot as a start it can parse, and
reads as this provider's: Pipecat tries the providers in a fixed order, so a start that
also carries an earlier provider's fields is refused rather than misread.

`OpeningReader` is fed the client's bytes after the 101 and answers, once it can: the
opening (its parsed messages and every byte read, for the bot to get unchanged), a
refusal (close 1008 with a reason saying what was wrong), or the client's own close.
It bounds what it reads (`MAX_OPENING_BYTES`); the I/O layer bounds the time
(`handshake_timeout`). `resolve_route()` then decides where the session goes when the
URL did not say (Twilio's `customParameters._pipecatCloudServiceHost`).

No trio here: `provider_connection.py` does the I/O.
"""

from __future__ import annotations

import json
from typing import Any, Final

import attrs

from .handshake import PROVIDERS, Route, split_service_host

__all__ = ["PROVIDERS", "ClientClosed", "Opening", "OpeningReader", "Refused", "resolve_route"]
#: How many opening messages each provider sends before media (its documentation).
OPENING_MESSAGES: Final = {"twilio": 2, "telnyx": 2, "plivo": 1, "exotel": 2}
#: Bytes of frames (headers included) the opening messages may take: a Twilio start with
#: its custom parameters is under 2 KiB; more is not a provider's opening.
MAX_OPENING_BYTES: Final = 16384
#: Twilio's stream URLs take no query, so the hosted service routes by this custom
#: parameter of the `start` message; `token` beside it may carry the session token.
SERVICE_HOST_PARAM: Final = "_pipecatCloudServiceHost"
TOKEN_PARAM: Final = "token"

_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0, 1, 2, 8, 9, 10


@attrs.frozen
class Opening:
    """A provider's opening messages, read whole and recognised."""

    provider: str
    messages: tuple[dict[str, Any], ...]  # the parsed JSON objects, in order
    raw: bytes  # every byte read from the client so far, exactly as it came
    service_host: str | None  # customParameters._pipecatCloudServiceHost (Twilio)
    token: str | None  # customParameters.token (Twilio), when present (even empty)


@attrs.frozen
class Refused:
    """Not this provider's protocol: close 1008 with `reason`; nothing reaches a bot."""

    reason: str


@attrs.frozen
class ClientClosed:
    """The client sent a close frame before its opening messages were complete."""

    payload: bytes  # the close frame's unmasked payload (code + reason, or empty)


Verdict = Opening | Refused | ClientClosed


def _unmask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def _header(buf: bytes | bytearray, pos: int) -> tuple[int, int, int, int] | None:
    """(byte0, byte1, payload length, header length) of the frame at `pos`; None if partial."""
    avail = len(buf) - pos
    if avail < 2:
        return None
    b0, b1 = buf[pos], buf[pos + 1]
    ln, hl = b1 & 0x7F, 2
    if ln == 126:
        if avail < 4:
            return None
        ln, hl = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
    elif ln == 127:
        if avail < 10:
            return None
        ln, hl = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
    if b1 & 0x80:
        hl += 4
    return (b0, b1, ln, hl) if avail >= hl else None


class OpeningReader:
    """Reads a provider's opening messages from the client's first bytes (see module doc)."""

    def __init__(self, provider: str, *, limit: int = MAX_OPENING_BYTES) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}")
        self.provider = provider
        self.limit = limit
        self._buf = bytearray()
        self._pos = 0  # end of the last whole frame in _buf
        self._walkable = True  # False after a frame-level violation
        self._message = bytearray()  # a fragmented text message so far
        self._fragmented = False
        self._messages: list[dict[str, Any]] = []
        self._verdict: Verdict | None = None

    @property
    def unparsed(self) -> bytes | None:
        """Bytes after the last whole frame, or None when the stream cannot be walked."""
        return bytes(self._buf[self._pos :]) if self._walkable else None

    def feed(self, data: bytes) -> Verdict | None:
        """Take the next bytes; a verdict once there is one (then the same one again)."""
        if self._verdict is not None:
            return self._verdict
        self._buf += data
        verdict = self._walk()
        if verdict is None and len(self._buf) > self.limit:
            verdict = Refused(f"{self.provider} opening messages exceed {self.limit} bytes")
        self._verdict = verdict
        return verdict

    def _refuse(self, reason: str, *, walkable: bool = True) -> Refused:
        self._walkable = walkable
        return Refused(reason)

    def _walk(self) -> Verdict | None:
        while True:
            head = _header(self._buf, self._pos)
            if head is None:
                return None
            b0, b1, ln, hl = head
            if not b1 & 0x80:
                return self._refuse("client frame is not masked", walkable=False)
            if b0 & 0x70:
                return self._refuse("RSV bits set: no extension was negotiated",
                                    walkable=False)
            op = b0 & 0x0F
            fin = bool(b0 & 0x80)
            if op >= 8 and (ln > 125 or not fin):
                return self._refuse("bad control frame", walkable=False)
            if op not in (_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG):
                return self._refuse(f"reserved opcode {op}", walkable=False)
            if ln > self.limit:
                return self._refuse(
                    f"{self.provider} opening messages exceed {self.limit} bytes",
                    walkable=False)  # not worth reading through to find its close
            end = self._pos + hl + ln
            if end > len(self._buf):
                return None
            payload = _unmask(bytes(self._buf[self._pos + hl : end]),
                              bytes(self._buf[self._pos + hl - 4 : self._pos + hl]))
            self._pos = end
            if op == _OP_CLOSE:
                return ClientClosed(payload)
            if op in (_OP_PING, _OP_PONG):
                continue  # passed on to the bot with the rest, as on the generic endpoint
            if op == _OP_BINARY or (op == _OP_TEXT and self._fragmented):
                return self._refuse(self._expected("binary frame" if op == _OP_BINARY
                                                   else "new message inside a fragmented one"))
            if op == _OP_CONT and not self._fragmented:
                return self._refuse("continuation frame with no message")
            self._message += payload
            self._fragmented = not fin
            if not fin:
                continue
            verdict = self._on_message(bytes(self._message))
            self._message = bytearray()
            if verdict is not None:
                return verdict

    def _expected(self, got: str) -> str:
        n = len(self._messages) + 1
        return f"{got} where {self.provider}'s opening message {n} (JSON text) was expected"

    def _on_message(self, payload: bytes) -> Verdict | None:
        n = len(self._messages) + 1
        try:
            message = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return self._refuse(f"{self.provider} opening message {n} is not JSON")
        if not isinstance(message, dict):
            return self._refuse(f"{self.provider} opening message {n} is not a JSON object")
        problem = _check(self.provider, len(self._messages), message)
        if problem is not None:
            return self._refuse(f"not a {self.provider} stream: {problem}")
        self._messages.append(message)
        if len(self._messages) < OPENING_MESSAGES[self.provider]:
            return None
        start = self._messages[-1]
        service_host: str | None = None
        token: str | None = None
        if self.provider == "twilio":
            params = start["start"].get("customParameters") or {}
            host = params.get(SERVICE_HOST_PARAM)
            if host is not None and not isinstance(host, str):
                return self._refuse(f"customParameters.{SERVICE_HOST_PARAM} is not a string")
            raw_token = params.get(TOKEN_PARAM)
            if raw_token is not None and not isinstance(raw_token, str):
                return self._refuse(f"customParameters.{TOKEN_PARAM} is not a string")
            service_host, token = host, raw_token
        return Opening(self.provider, tuple(self._messages), bytes(self._buf),
                       service_host, token)


# Per provider: for each opening message, the event it must be and the fields its
# `start` object must hold as strings (top-level fields marked with a leading "^").
_SHAPES: Final[dict[str, tuple[tuple[str, tuple[str, ...]], ...]]] = {
    "twilio": (("connected", ()), ("start", ("streamSid", "callSid"))),
    "telnyx": (("connected", ()), ("start", ("^stream_id", "call_control_id"))),
    "plivo": (("start", ("callId", "streamId")),),
    "exotel": (("connected", ()), ("start", ("stream_sid", "call_sid", "account_sid"))),
}


def _check(provider: str, index: int, message: dict[str, Any]) -> str | None:
    """Why `message` is not this provider's opening message number `index`, or None."""
    event, fields = _SHAPES[provider][index]
    if message.get("event") != event:
        got = message.get("event")
        return (f"opening message {index + 1} has event {got!r}, expected {event!r}"
                if isinstance(got, str) else
                f"opening message {index + 1} has no event (expected {event!r})")
    if event != "start":
        return None
    start = message.get("start")
    if not isinstance(start, dict):
        return "the start message has no start object"
    for field in fields:
        where, name = (message, field[1:]) if field.startswith("^") else (start, field)
        if not isinstance(where.get(name), str):
            prefix = "" if where is message else "start."
            return f"the start message has no {prefix}{name}"
    if provider == "twilio":
        params = start.get("customParameters")
        if params is not None and not isinstance(params, dict):
            return "start.customParameters is not an object"
    reads_as = _reads_as(message)
    if reads_as != provider:  # it also carries an earlier provider's fields
        return f"the start message reads as a {reads_as} stream"
    return None


def _reads_as(message: dict[str, Any]) -> str:
    """The provider Pipecat's `parse_telephony_websocket` takes this start for.

    It tries twilio, telnyx, plivo, exotel in that order and takes the first whose fields
    are there; a start carrying another provider's fields besides its own would reach the
    bot as that provider's, so it is refused rather than passed on to be misread.
    """
    start = message.get("start")
    start = start if isinstance(start, dict) else {}
    event = message.get("event")
    if event == "start" and "streamSid" in start and "callSid" in start:
        return "twilio"
    if "stream_id" in message and "call_control_id" in start:
        return "telnyx"
    if "streamId" in start and "callId" in start:
        return "plivo"
    return "exotel"  # the last: what reaches here passed exotel's own check


def resolve_route(route: Route, opening: Opening) -> Route | Refused:
    """Where the session goes, now that the opening messages are in.

    A route from the URL (`?serviceHost=` or the path) was decided before the 101 and
    stands; a start that names another service host is refused rather than guessed
    between. A deferred route (Twilio without either) takes the start's
    `customParameters._pipecatCloudServiceHost`, and its `customParameters.token` as the
    last token source (after `Authorization` and `?token=`, in place of a path segment).
    """
    host = opening.service_host
    if not route.deferred:
        if host is not None and host != f"{route.agent}.{route.org}":
            return Refused(f"customParameters.{SERVICE_HOST_PARAM} {host!r} differs from "
                           f"the URL's {route.agent}.{route.org}")
        return route
    if host is None:
        return Refused(f"cannot route: no ?serviceHost=, no /ws/{opening.provider}/"
                       f"agent.org path and no customParameters.{SERVICE_HOST_PARAM}")
    parts = split_service_host(host)
    if parts is None:
        return Refused(f"customParameters.{SERVICE_HOST_PARAM} {host!r} is not agent.org")
    return attrs.evolve(route, agent=parts[0], org=parts[1], path_token=opening.token,
                        deferred=False)
