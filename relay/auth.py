"""Token auth at the upgrade: find, verify and reserve; then consume, or release.

SPEC §4 and §8: a valid token is burned only by an upgrade that passed every other check,
and one token can never close more than one incumbent. So `authenticate()` runs before
admission, verifies (signature, scope, expiry — sans-IO in `tokens.py`) and *reserves*
the session in the store: of several upgrades with one token exactly one gets a grant,
the others 403 `replayed` at once, before any of them can replace anyone. After
admission `consume()` turns the reservation into a use and takes the held body, just
before the bot is dialled; a refusal before anyone was replaced (a full agent that
rejects) calls `release()`, and the token stays usable. An upgrade cancelled while it
waits for admission (shutdown) keeps its reservation until the token expires: it may
already have replaced someone. A token minted with a body whose body is gone is refused
(403 `body_unavailable`), never passed on as "no body".
Auth-none agents get a fresh session id and ignore any token.

A `Grant` also knows how the held body reaches the bot: as the first text frame
`{"type": "relay.session", ...}` (bot_protocol "relay"), or as `?body=` (percent-encoded
standard base64) plus `X-Daily-Session-Id` (bot_protocol "pipecat-cloud").
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from typing import Any
from urllib.parse import quote

import attrs
import trio

from .config import AgentConfig
from .handshake import Reject, Route
from .runtime import Runtime
from .store import ConsumeResult, StoreFull, StoreUnavailable
from .tokens import Claims, Refusal, find_token, verify

log = logging.getLogger(__name__)

RELEASE_TIMEOUT = 1.0  # seconds: a release must not hold a refused client's teardown

_DETAIL = {
    "missing": "No token was given; call /start for one.",
    "malformed": "The token is not one this gateway issued.",
    "bad_signature": "The token's signature does not verify.",
    "expired": "The token has expired; tokens last 5 minutes. Call /start again.",
    "not_yet_valid": "The token is not valid yet (clock skew?).",
    "wrong_scope": "The token was issued for another agent or organization.",
    "replayed": "The token was already used; tokens are one-time. Call /start again.",
    "unverifiable": "The token was issued before this gateway (or its Redis store) "
                    "restarted and forgot which tokens were used, so its one-time use "
                    "cannot be checked. Call /start again.",
    "body_unavailable": "The body held for this token is no longer available. "
                        "Call /start again.",
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
    token: bool = False  # a token's session, reserved in the store until used or released
    has_body: bool = False  # the token says /start held a body for it

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


def _store_error(rt: Runtime, exc: StoreUnavailable | StoreFull) -> Reject:
    if isinstance(exc, StoreFull):
        rt.metrics.store_full(exc.bound)
        return Reject(503, "store_full", f"The token store is full ({exc}); try again.",
                      ((b"retry-after", b"5"),))
    return Reject(503, "store_unavailable", "The token store is unreachable; try again.")


def _refusal(rt: Runtime, result: ConsumeResult) -> Reject:
    # "unknown": the token expired while its upgrade waited (admission is bounded)
    return refuse(rt, "expired" if result.status == "unknown" else result.status)


async def authenticate(rt: Runtime, agent: AgentConfig, route: Route,
                       headers: list[tuple[bytes, bytes]]) -> Grant | Reject:
    """Verify the upgrade's token and reserve its session (without using it up)."""
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
        reserved = await rt.store.reserve(result.session_id, rt.wall_clock(),
                                          expires_at=result.expires_at,
                                          with_body=result.has_body)
    except (StoreUnavailable, StoreFull) as exc:
        return _store_error(rt, exc)
    if not reserved.ok:
        return _refusal(rt, reserved)
    return Grant(session_id=result.session_id, expires_at=result.expires_at, token=True,
                 has_body=result.has_body)


async def release(rt: Runtime, grant: Grant) -> None:
    """Give back a reservation nobody was replaced for: the token stays usable."""
    if not grant.token:
        return
    with trio.move_on_after(RELEASE_TIMEOUT, shield=True):
        try:
            await rt.store.release(grant.session_id, rt.wall_clock())
        except StoreUnavailable:
            # The reservation then ends with the token: the client calls /start again.
            log.warning("could not release the reservation of session %s", grant.session_id)


async def consume(rt: Runtime, agent: AgentConfig, grant: Grant) -> Grant | Reject:
    """Use the reserved token, atomically; returns the grant with its held body."""
    if not grant.token:
        return grant
    assert grant.expires_at is not None
    try:
        result = await rt.store.consume(grant.session_id, rt.wall_clock(),
                                        expires_at=grant.expires_at, with_body=grant.has_body)
    except (StoreUnavailable, StoreFull) as exc:
        return _store_error(rt, exc)
    if not result.ok:
        return _refusal(rt, result)
    return attrs.evolve(grant, body=result.body)
