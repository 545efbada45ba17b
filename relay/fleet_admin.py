"""[trio] ``FleetOperations``: the operator API over every instance on one Redis.

Used whenever ``[store] backend = "redis"``. What each operation reaches:

- ``sessions()``: this instance's sessions (with their relayed counts), and every other
  instance's from the leases in Redis (``P a:{agent}:info``, written once per session when
  its upgrade is accepted and again at each lease renewal; nothing per message). A session
  of another instance is listed without ``messages`` and ``bytes``: those are counted
  only by the instance holding it (its own listing and ``/metrics`` have them).
- ``end_session(id)``: a session of this instance is cancelled here; one elsewhere has
  its lease dropped (the slot is free at once), a tombstone left, and its holder asked
  over its channel to close it with 4002. A holder that does not hear (its channel down)
  finds the tombstone at its next renewal, within lease_ttl / 3 of Redis answering it;
  a holder that is gone (killed) took the session with it. Unknown id: False (404).
- drains: the set ``P drain`` in Redis, without expiry: a drain holds for the whole fleet,
  instances started later included, until an operator ends it. Each instance keeps a copy
  refreshed every ``DRAIN_REFRESH`` seconds, so ``is_draining`` (asked on every /start
  and upgrade) never waits on Redis; the instance that changed it knows at once. While
  Redis does not answer the last copy holds.

Redis down: every operation that needs it raises ``StoreUnavailable`` (the API's 503
``store_unavailable``); ending a session of this instance still works, and live sessions
are untouched.
"""

from __future__ import annotations

import logging

import trio

from .admin import LiveSession, LocalOperations
from .fleet import FleetRegistry
from .store import StoreUnavailable

__all__ = ["DRAIN_REFRESH", "FleetOperations"]

log = logging.getLogger(__name__)

DRAIN_REFRESH = 0.5  # seconds between reads of the fleet's drain set


def _text(raw: object) -> str:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


class FleetOperations:
    """`relay.admin.Operations` for a fleet on Redis (see the module's docstring)."""

    def __init__(self, fleet: FleetRegistry, local: LocalOperations) -> None:
        self._fleet = fleet
        self._local = local
        self._draining: frozenset[str] = frozenset()

    @property
    def _drain_key(self) -> str:
        return f"{self._fleet.store.key_prefix}drain"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Keep the copy of the drain set fresh until cancelled."""
        await self._fleet.store.wait_running()
        task_status.started()
        while True:
            await self.refresh()
            await trio.sleep(DRAIN_REFRESH)

    async def refresh(self) -> None:
        """Read the drain set from Redis (the copy stays as it was if Redis is down)."""
        try:
            members = await self._fleet.store.call(lambda c: c.smembers(self._drain_key))
        except StoreUnavailable:
            return
        self._draining = frozenset(_text(m) for m in members)

    async def sessions(self) -> list[LiveSession]:
        listed = await self._fleet.listed()  # first: Redis down is 503, not a partial list
        mine = await self._local.sessions()
        local_ids = {s.id for s in mine}
        for _agent, member, record in listed:
            if member.partition("|")[0] == self._fleet.instance:
                continue  # listed with its counts from this process
            try:
                session = LiveSession(
                    id=str(record["id"]), agent=str(record["agent"]),
                    organization=str(record["organization"]),
                    client_addr=str(record["client_addr"]),
                    connected_at=float(record["connected_at"]),  # type: ignore[arg-type]
                    instance=str(record["instance"]), messages_client_to_bot=None,
                    messages_bot_to_client=None, bytes_client_to_bot=None,
                    bytes_bot_to_client=None)
            except (KeyError, TypeError, ValueError):
                continue
            if session.id not in local_ids:
                mine.append(session)
        mine.sort(key=lambda s: (s.connected_at, s.id))
        return mine

    async def end_session(self, session_id: str) -> bool:
        if await self._local.end_session(session_id):
            return True
        ended = False
        for agent, member, record in await self._fleet.listed():
            if record.get("id") == session_id and await self._fleet.end_remote(agent, member):
                ended = True
        return ended

    async def set_draining(self, agent: str, draining: bool) -> None:
        key = self._drain_key
        if draining:
            await self._fleet.store.call(lambda c: c.sadd(key, [agent]))
            self._draining = self._draining | {agent}
        else:
            await self._fleet.store.call(lambda c: c.srem(key, [agent]))
            self._draining = self._draining - {agent}
        log.info("agent %s: drain %s for the fleet", agent, "started" if draining else "ended")

    def is_draining(self, agent: str) -> bool:
        return agent in self._draining

    def draining(self) -> frozenset[str]:
        return self._draining
