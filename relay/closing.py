"""Why a session ends, and which close frame each side gets from the gateway (sans-IO).

This is SPEC §5's close-code table as data. A session ends for exactly one reason: the
first one recorded wins (a replacement that races a client's own close is still a client
close). `to_client` / `to_bot` is the close the *gateway* sends that side; `None` means the
gateway sends nothing of its own, because the side's close is passed through from the other
end (a peer's own close) or the side is gone.

A close a peer sends is relayed byte for byte, so it never appears here. The gateway itself
never sends 1005, 1006 or 1015 (RFC 6455 §7.4.1: those are for reporting, not the wire).
"""

from __future__ import annotations

import attrs

CloseCode = tuple[int, str]

GOING_AWAY: CloseCode = (1001, "")
BAD_GATEWAY: CloseCode = (1014, "bad gateway")
SESSION_TIMEOUT: CloseCode = (4000, "session timeout")
REPLACED: CloseCode = (4001, "replaced")
ENDED_BY_OPERATOR: CloseCode = (4002, "ended by operator")
STALLED: CloseCode = (1008, "stalled")
TRY_AGAIN_LATER: CloseCode = (1013, "try again later")
BOT_ERROR: CloseCode = (1011, "bot error")


@attrs.frozen
class Outcome:
    """How a session ended: a reason (for metrics and events) and the gateway's closes."""

    reason: str
    to_client: CloseCode | None
    to_bot: CloseCode | None


CLIENT_CLOSED = Outcome("client_closed", None, None)
BOT_CLOSED = Outcome("bot_closed", None, None)
CLIENT_GONE = Outcome("client_gone", None, GOING_AWAY)
BOT_GONE = Outcome("bot_gone", BAD_GATEWAY, None)
TIMEOUT = Outcome("timeout", SESSION_TIMEOUT, SESSION_TIMEOUT)
REPLACED_BY_NEWER = Outcome("replaced", REPLACED, REPLACED)
SHUTDOWN = Outcome("shutdown", GOING_AWAY, GOING_AWAY)
OPERATOR = Outcome("operator", ENDED_BY_OPERATOR, ENDED_BY_OPERATOR)
CLIENT_STALLED = Outcome("client_stalled", STALLED, GOING_AWAY)
BOT_STALLED = Outcome("bot_stalled", GOING_AWAY, STALLED)
BOT_CRASHED = Outcome("bot_error", BOT_ERROR, None)


def session_outcome(cancel_reason: str | None, timed_out: bool,
                    relay_outcome: Outcome | None) -> Outcome:
    """How a session that ran ended: a reason from outside wins, then the timeout, then
    what the relay itself recorded. Cancelled from outside with no reason is a shutdown."""
    if cancel_reason == "replaced":
        return REPLACED_BY_NEWER
    if cancel_reason == "shutdown":
        return SHUTDOWN
    if cancel_reason == "operator":
        return OPERATOR
    if timed_out and relay_outcome is None:
        return TIMEOUT
    return relay_outcome or SHUTDOWN


def client_violation(code: int, text: str = "") -> Outcome:
    """The client broke the protocol or a limit (1002, 1007, 1009): it gets the code."""
    reason = "client_too_big" if code == 1009 else "client_protocol_error"
    return Outcome(reason, (code, text), GOING_AWAY)


def bot_violation(code: int, text: str = "") -> Outcome:
    """The bot broke the protocol or a limit: it gets the code, the client 1001."""
    reason = "bot_too_big" if code == 1009 else "bot_protocol_error"
    return Outcome(reason, GOING_AWAY, (code, text))


def close_reason_text(text: str) -> str:
    """A close reason must fit a control frame: 123 bytes of UTF-8 after the code."""
    data = text.encode()[:123]
    return data.decode("utf-8", errors="ignore")
