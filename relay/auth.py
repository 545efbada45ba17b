"""Token auth at the upgrade: find, verify, and (later, once admitted) consume.

Two steps, because SPEC §4 says a valid token is burned only by an upgrade that passed
every other check: `authenticate()` runs before admission and only verifies (signature,
scope, expiry — sans-IO in `tokens.py`) and peeks for a replay; `consume()` runs after
admission, just before the bot is dialled, and uses the token atomically in the store.
Auth-none agents get a fresh session id and ignore any token.

A `Grant` also knows how the held body reaches the bot: as the first text frame
`{"type": "relay.session", ...}` (bot_protocol "relay"), or as `?body=` (percent-encoded
standard base64) plus `X-Daily-Session-Id` (bot_protocol "pipecat-cloud").
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any
from urllib.parse import quote

import attrs

from .config import AgentConfig
from .handshake import Reject, Route
from .runtime import Runtime
from .store import StoreUnavailable
from .tokens import Claims, Refusal, find_token, verify

_DETAIL = {
    "missing": "No token was given; call /start for one.",
    "malformed": "The token is not one this gateway issued.",
    "bad_signature": "The token's signature does not verify.",
    "expired": "The token has expired; tokens last 5 minutes. Call /start again.",
    "not_yet_valid": "The token is not valid yet (clock skew?).",
    "wrong_scope": "The token was issued for another agent or organization.",
    "replayed": "The token was already used; tokens are one-time. Call /start again.",
}


def refuse(rt: Runtime, reason: str) -> Reject:
    rt.metrics.token_refused(reason)
    return Reject(403, reason, _DETAIL.get(reason, "The token was refused."))


@attrs.frozen
class Grant:
    """A session the upgrade may open: its id, and once consumed, its held body."""

    session_id: str
    expires_at: float | None = None  # token expiry; None for auth-none agents
    body: bytes | None = None  # compact JSON, when /start held one
    token: bool = False

    @property
    def body_value(self) -> Any:
        return json.loads(self.body) if self.body is not None else None

    def first_frame(self, agent: AgentConfig) -> bytes | None:
        """The `relay.session` text frame the bot gets first (bot_protocol "relay")."""
        if self.body is None or agent.bot_protocol != "relay":
            return None
        head = json.dumps({"type": "relay.session", "sessionId": self.session_id,
                           "agent": agent.name}, separators=(",", ":"))
        return (head[:-1] + ',"body":').encode() + self.body + b"}"

    def bot_extras(self, agent: AgentConfig) -> tuple[str, list[tuple[bytes, bytes]]]:
        """Extra query and headers for the bot's upgrade request (pipecat-cloud)."""
        if agent.bot_protocol != "pipecat-cloud":
            return "", []
        headers = [(b"x-daily-session-id", self.session_id.encode())]
        if self.body is None:
            return "", headers
        encoded = quote(base64.b64encode(self.body).decode("ascii"), safe="")
        return f"body={encoded}", headers


async def authenticate(rt: Runtime, agent: AgentConfig, route: Route,
                       headers: list[tuple[bytes, bytes]]) -> Grant | Reject:
    """Verify the upgrade's token (without using it up)."""
    if agent.websocket_auth != "token":
        return Grant(session_id=str(uuid.uuid4()))
    token = find_token(headers, {k: [v for kk, v in route.query_pairs if kk == k]
                                 for k, _ in route.query_pairs}, route.path_token)
    if token is None:
        return refuse(rt, "missing")
    result = verify(token, rt.keys, agent=agent.name, org=rt.config.server.organization,
                    now=rt.wall_clock())
    if isinstance(result, Refusal):
        return refuse(rt, result.reason)
    assert isinstance(result, Claims)
    try:
        if await rt.store.is_consumed(result.session_id):
            return refuse(rt, "replayed")
    except StoreUnavailable:
        return Reject(503, "store_unavailable", "The token store is unreachable; try again.")
    return Grant(session_id=result.session_id, expires_at=result.expires_at, token=True)


async def consume(rt: Runtime, agent: AgentConfig, grant: Grant) -> Grant | Reject:
    """Use the token once, atomically; returns the grant with its held body."""
    if not grant.token:
        return grant
    assert grant.expires_at is not None
    try:
        result = await rt.store.consume(grant.session_id, rt.wall_clock(),
                                        expires_at=grant.expires_at)
    except StoreUnavailable:
        return Reject(503, "store_unavailable", "The token store is unreachable; try again.")
    if not result.ok:
        return refuse(rt, "replayed")
    return attrs.evolve(grant, body=result.body)
