"""[sans-IO] One log line per ended session, on the ``relay.sessions`` logger.

Every session that was accepted (both data-plane paths) ends with one INFO record on the
logger named ``relay.sessions``, so operators can route, filter or silence it with the
standard ``logging`` module. The record carries a `SessionRecord` (``record.relay_session``)
and a message in the text format::

    session ended id=6c1f... agent=my-agent organization=local client=127.0.0.1:50312
    duration=12.034 messages_client_to_bot=40 bytes_client_to_bot=20480
    messages_bot_to_client=38 bytes_bot_to_client=19456 closed_by=client end=client_closed
    code=1000 reason="bye"

(one line). ``relay serve --log-format json`` installs `JsonFormatter`, which writes every
record as one JSON object per line; a session record becomes its fields plus ``ts``,
``level``, ``logger`` and ``event: "session_ended"``.

A client controls its close reason (and, through a proxy, how its address reads): in the
text format a value that is not a plain word is written as a JSON string, so a newline,
a quote or ``key=value`` inside it stays inside that one quoted value and can never start
a line or a field of its own. JSON output is ASCII-only with every control character
escaped.
"""

from __future__ import annotations

import json
import logging
import re
import time

import attrs

__all__ = [
    "SESSION_LOGGER",
    "JsonFormatter",
    "SessionRecord",
    "closed_by",
    "log_session",
    "render_json",
    "render_text",
]

SESSION_LOGGER = "relay.sessions"
logger = logging.getLogger(SESSION_LOGGER)

_PLAIN = re.compile(r"[A-Za-z0-9_.:/@\[\]-]+")

#: End reasons (closing.py) where a peer ended the session itself.
_BY_CLIENT = ("client_closed", "client_gone")
_BY_BOT = ("bot_closed", "bot_gone", "bot_error")


def closed_by(end_reason: str) -> str:
    """Who ended the session: "client", "bot", or "gateway" (timeouts, limits, stalls,
    replacement, shutdown, the operator)."""
    if end_reason in _BY_CLIENT:
        return "client"
    if end_reason in _BY_BOT:
        return "bot"
    return "gateway"


@attrs.frozen
class SessionRecord:
    """What one ended session's log line says."""

    id: str
    agent: str
    organization: str
    client_addr: str
    duration: float  # seconds from the accepted upgrade to the end of teardown
    messages_client_to_bot: int
    bytes_client_to_bot: int
    messages_bot_to_client: int
    bytes_bot_to_client: int
    end_reason: str  # closing.py's reason: client_closed, timeout, operator, ...
    code: int | None  # the close code that ended it (None: the peer vanished, no frame)
    reason: str  # that close frame's reason text

    @property
    def closed_by(self) -> str:
        return closed_by(self.end_reason)

    def fields(self) -> dict[str, object]:
        return {
            "id": self.id,
            "agent": self.agent,
            "organization": self.organization,
            "client_addr": self.client_addr,
            "duration": round(self.duration, 3),
            "messages_client_to_bot": self.messages_client_to_bot,
            "bytes_client_to_bot": self.bytes_client_to_bot,
            "messages_bot_to_client": self.messages_bot_to_client,
            "bytes_bot_to_client": self.bytes_bot_to_client,
            "closed_by": self.closed_by,
            "end": self.end_reason,
            "code": self.code,
            "reason": self.reason,
        }


def _text_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool | int | float):
        return str(value)
    return _text(str(value))


def _text(text: str) -> str:
    if _PLAIN.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=True)  # quoted; \n, \r, ", \ and non-ASCII escaped


def render_text(record: SessionRecord) -> str:
    """The one-line text form: ``session ended key=value ...`` (the fields() order).

    Written out rather than looped over fields(): it runs once per session set-up and
    teardown, on the gateway's one core (docs/performance.md)."""
    r = record
    return (f"session ended id={_text(r.id)} agent={_text(r.agent)} "
            f"organization={_text(r.organization)} client={_text(r.client_addr)} "
            f"duration={round(r.duration, 3)} messages_client_to_bot={r.messages_client_to_bot} "
            f"bytes_client_to_bot={r.bytes_client_to_bot} "
            f"messages_bot_to_client={r.messages_bot_to_client} "
            f"bytes_bot_to_client={r.bytes_bot_to_client} closed_by={r.closed_by} "
            f"end={_text(r.end_reason)} code={'-' if r.code is None else r.code} "
            f"reason={_text(r.reason)}")


def render_json(record: SessionRecord) -> str:
    """The session's fields as one JSON object (no envelope)."""
    return json.dumps({"event": "session_ended", **record.fields()}, ensure_ascii=True)


def log_session(record: SessionRecord) -> None:
    """Emit the record on ``relay.sessions`` (INFO)."""
    logger.info("%s", render_text(record), extra={"relay_session": record})


class JsonFormatter(logging.Formatter):
    """Every log record as one JSON line; session records as their fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        session = getattr(record, "relay_session", None)
        if isinstance(session, SessionRecord):
            out.update({"event": "session_ended", **session.fields()})
        else:
            out["message"] = record.getMessage()
            if record.exc_info:
                out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=True)
