"""What the trio client raises, and the events it reports while it reconnects.

    RelayError (relay.errors)
    └── ClientError
        ├── StartError          /start refused (status, code, detail) or unreachable
        ├── ConnectError        the WebSocket upgrade refused (403 replayed, 502 ...) or the
        │                       network failed (status None)
        └── SessionClosed       the session is over: the close code and reason, from
            │                   receive()/send() (a normal close: 1000, 4000, 4001, 1008...)
            └── ReconnectFailed a lost connection could not be replaced: attempts or time
                                ran out, or a try was refused for good (``last_error``)

``retryable`` says whether another try may succeed: network failures, timeouts and HTTP
408, 429, 500, 502, 503, 504. Any other refusal (401 bad public key, 404 unknown agent,
400, 413, 403 token refused) is final, so a bad key never loops.
"""

from __future__ import annotations

import attrs

from relay.errors import RelayError

__all__ = [
    "RETRYABLE_STATUSES",
    "AttemptFailed",
    "ClientError",
    "ConnectError",
    "ConnectionLost",
    "Event",
    "ReconnectFailed",
    "Reconnected",
    "SessionClosed",
    "StartError",
]

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class ClientError(RelayError):
    """Base of the client's errors."""


class _Refusal(ClientError):
    """A refusal by the gateway (``status``) or a failure to reach it (``status`` None)."""

    what = "request"

    def __init__(self, status: int | None, code: str, detail: str) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        where = f"{status} {code}" if status is not None else code
        super().__init__(f"{self.what} failed: {where}: {detail}")

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status in RETRYABLE_STATUSES


class StartError(_Refusal):
    """POST /start did not give a token and wsUrl."""

    what = "/start"


class ConnectError(_Refusal):
    """The WebSocket connection to the wsUrl could not be opened."""

    what = "WebSocket upgrade"


class SessionClosed(ClientError):
    """The session ended with this close ``code`` and ``reason``; nothing more comes."""

    def __init__(self, code: int, reason: str, *, detail: str = "") -> None:
        self.code = code
        self.reason = reason
        super().__init__(detail or f"session closed: {code} {reason!r}".rstrip())


class ReconnectFailed(SessionClosed):
    """A lost connection (``code``, ``reason``) was not replaced after ``attempts`` tries."""

    def __init__(self, code: int, reason: str, *, attempts: int, why: str,
                 last_error: ClientError | None) -> None:
        self.attempts = attempts
        self.last_error = last_error
        detail = f"connection lost ({code} {reason!r}), not reconnected after {attempts} " \
                 f"attempt(s): {why}"
        if last_error is not None:
            detail += f"; last error: {last_error}"
        super().__init__(code, reason, detail=detail)


@attrs.frozen
class ConnectionLost:
    """The connection closed abnormally; the client is reconnecting.

    What was lost: the gateway session ``session_id`` (its bot, and the body it held),
    and any of the ``messages_sent`` on it that the bot had not handled yet. Every message
    received on it before the loss was delivered to ``receive()`` first.
    """

    code: int
    reason: str
    session_id: str | None
    messages_sent: int
    messages_received: int


@attrs.frozen
class AttemptFailed:
    """Reconnection try ``attempt`` failed with ``error``; ``retrying`` says if another comes."""

    attempt: int
    error: ClientError
    retrying: bool


@attrs.frozen
class Reconnected:
    """Try ``attempt`` connected: a fresh token, a new gateway session and a new bot."""

    attempt: int
    session_id: str | None
    previous_session_id: str | None


Event = ConnectionLost | AttemptFailed | Reconnected
