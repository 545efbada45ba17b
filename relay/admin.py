"""Operator operations: list live sessions, end one by id, drain an agent.

`Operations` is the interface the operator API (``relay.admin_api``) and both data-plane
paths (our own listener and ``Gateway.handle``) use. `LocalOperations` implements it over
this process's registry of live sessions: with the memory store the gateway is one
process, so "every live session of the gateway" is this process's. A fleet of instances
on a shared store implements the same four operations over that store (sessions listed
from every instance's leases, an end request delivered to the instance holding the
session, the drain set shared): ``relay.fleet_admin.FleetOperations``, which the gateway
uses instead whenever ``[store] backend = "redis"``.

Ending a session cancels it with reason ``"operator"``: client and bot get 4002 "ended
by operator" (``closing.OPERATOR``), and it is counted and logged with that reason.
Draining an agent refuses its new /start requests and upgrades with 503 ``draining``;
its live sessions go on.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import attrs
import trio

from .handshake import Reject

if TYPE_CHECKING:
    from .registry import Registry

__all__ = [
    "OPERATOR_REASON",
    "LiveSession",
    "LocalOperations",
    "Operations",
    "default_instance",
    "draining_reject",
]

OPERATOR_REASON = "operator"  # the cancel reason (and metrics / session-log reason)


@attrs.frozen
class LiveSession:
    """One live session as the operator sees it (``GET /v1/admin/sessions``)."""

    id: str
    agent: str
    organization: str
    client_addr: str
    connected_at: float  # unix seconds the client's upgrade was accepted
    instance: str  # which gateway process holds it
    # Counted by the holding instance only: None (omitted) for another instance's session.
    messages_client_to_bot: int | None = 0
    messages_bot_to_client: int | None = 0
    bytes_client_to_bot: int | None = 0
    bytes_bot_to_client: int | None = 0

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "id": self.id,
            "agent": self.agent,
            "organization": self.organization,
            "client_addr": self.client_addr,
            "connected_at": round(self.connected_at, 3),
            "instance": self.instance,
        }
        if self.messages_client_to_bot is not None:
            out["messages"] = {
                "client_to_bot": self.messages_client_to_bot,
                "bot_to_client": self.messages_bot_to_client,
            }
        if self.bytes_client_to_bot is not None:
            out["bytes"] = {
                "client_to_bot": self.bytes_client_to_bot,
                "bot_to_client": self.bytes_bot_to_client,
            }
        return out


class Operations(Protocol):
    """What an operator can do to a gateway; local now, fleet-wide over a shared store."""

    async def sessions(self) -> list[LiveSession]:
        """Every live session (accepted upgrade, not yet ended)."""
        ...

    async def end_session(self, session_id: str) -> bool:
        """Start closing that session with 4002; False when no live session has that id."""
        ...

    async def set_draining(self, agent: str, draining: bool) -> None:
        """Start (True) or end (False) the drain of an agent."""
        ...

    def is_draining(self, agent: str) -> bool:
        """Whether new sessions of this agent are refused. Synchronous: asked on every
        /start and upgrade, so a shared implementation answers from a local copy."""
        ...

    def draining(self) -> frozenset[str]:
        """The agents being drained."""
        ...


def default_instance() -> str:
    """This process's name in session listings: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _Live(Protocol):
    """What LocalOperations reads of a registry member (both connection kinds have it)."""

    @property
    def info(self) -> _Info | None: ...

    def traffic(self) -> tuple[int, int, int, int]: ...

    def cancel(self, reason: str) -> None: ...


class _Info(Protocol):
    id: str
    agent: str
    organization: str
    client_addr: str
    connected_at: float | None


class LocalOperations:
    """`Operations` over one process's registry (the memory store's whole gateway)."""

    def __init__(self, registry: Registry, wall_clock: Callable[[], float],
                 instance: str | None = None) -> None:
        self._registry = registry
        self._wall_clock = wall_clock
        self.instance = instance if instance is not None else default_instance()
        self._draining: set[str] = set()

    def _live(self) -> list[_Live]:
        live: list[_Live] = []
        for member in self._registry.members():
            info = getattr(member, "info", None)
            if info is not None and info.connected_at is not None and hasattr(
                    member, "traffic"):
                live.append(member)  # type: ignore[arg-type]
        return live

    async def sessions(self) -> list[LiveSession]:
        wall, now = self._wall_clock(), trio.current_time()
        listed = []
        for member in self._live():
            info = member.info
            assert info is not None and info.connected_at is not None
            c2b_m, c2b_b, b2c_m, b2c_b = member.traffic()
            listed.append(LiveSession(
                id=info.id, agent=info.agent, organization=info.organization,
                client_addr=info.client_addr,
                connected_at=wall - (now - info.connected_at), instance=self.instance,
                messages_client_to_bot=c2b_m, bytes_client_to_bot=c2b_b,
                messages_bot_to_client=b2c_m, bytes_bot_to_client=b2c_b))
        listed.sort(key=lambda s: (s.connected_at, s.id))
        return listed

    async def end_session(self, session_id: str) -> bool:
        found = False
        for member in self._live():
            info = member.info
            if info is not None and info.id == session_id:
                member.cancel(OPERATOR_REASON)
                found = True
        return found

    async def set_draining(self, agent: str, draining: bool) -> None:
        if draining:
            self._draining.add(agent)
        else:
            self._draining.discard(agent)

    def is_draining(self, agent: str) -> bool:
        return agent in self._draining

    def draining(self) -> frozenset[str]:
        return frozenset(self._draining)


def draining_reject(agent: str) -> Reject:
    """The data plane's answer to an upgrade for a draining agent (no token is used)."""
    return Reject(503, "draining",
                  f"Agent {agent!r} is being drained by its operator: it takes no new "
                  "sessions now; try again later or elsewhere.",
                  ((b"retry-after", b"5"),))
