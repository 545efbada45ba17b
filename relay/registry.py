"""Live client connections per agent: admission, replacement, and their done-events.

An agent holds at most `max_clients` sessions. A newcomer beyond that either replaces the
oldest (`when_full = "replace"`: the oldest is cancelled with reason "replaced" and its
teardown has *finished* — bot leg closed, on_client_disconnected fired — before admission
returns) or is refused (`"reject"`). Admissions to one agent are serialised by a lock held
across the predecessor's teardown, so two newcomers never replace the same predecessor or
overshoot the limit. The wait for a predecessor is bounded: its teardown is itself bounded
by close_timeout, and we give it that plus a margin before removing it by force.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Protocol

import trio

from .config import AgentConfig

REPLACE_MARGIN = 1.0  # seconds beyond close_timeout to wait for a predecessor's teardown


class Member(Protocol):
    """What the registry needs of a live connection."""

    done: trio.Event

    def cancel(self, reason: str) -> None: ...


class CancellableMember:
    """A live connection the registry (and shutdown) can end: its scope and done-event.

    `cancel(reason)` records why ("replaced", "shutdown"; the first reason wins) and
    cancels the connection's scope; `done` is set once its teardown has finished.
    """

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.cancel_reason: str | None = None

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.scope.cancel()


class Registry:
    def __init__(self) -> None:
        # Per agent, its members oldest first: a dict used as an ordered set, so a session
        # that ends leaves in O(1) however many are live (a list's remove scanned them all).
        self._live: dict[str, dict[Member, None]] = defaultdict(dict)
        self._locks: dict[str, trio.Lock] = defaultdict(trio.Lock)

    def count(self, agent: str) -> int:
        return len(self._live.get(agent, ()))

    def is_full(self, agent: AgentConfig) -> bool:
        return self.count(agent.name) >= agent.max_clients

    def members(self) -> list[Member]:
        return [m for members in self._live.values() for m in members]

    async def admit(self, member: Member, agent: AgentConfig) -> bool:
        """Reserve a slot for member; False when the agent is full and rejects newcomers."""
        lock = self._locks[agent.name]
        if not lock.locked() and self.count(agent.name) < agent.max_clients:
            # Room, and nobody is replacing: taken at once (no await between the check and
            # the append), without the lock's scheduling round trip.
            self._live[agent.name][member] = None
            return True
        async with lock:
            if not await self.make_room(agent):
                return False
            # Looked up afresh: a release while we waited may have dropped the old dict.
            self._live[agent.name][member] = None
            return True

    async def make_room(self, agent: AgentConfig) -> bool:
        """Replace this process's oldest sessions of `agent` until one more fits, each
        torn down before the next is asked; False when it is full and rejects newcomers.
        The caller holds the agent's lock."""
        while self.count(agent.name) >= agent.max_clients:
            if agent.when_full == "reject":
                return False
            oldest = next(iter(self._live[agent.name]))
            oldest.cancel("replaced")
            with trio.move_on_after(agent.limits.close_timeout + REPLACE_MARGIN):
                await oldest.done.wait()
            self.release(oldest, agent.name)
        return True

    def connected(self, member: Member, agent: str) -> None:
        """The member's upgrade was accepted (its ``info`` is complete). A fleet lists it
        for the operator API of every instance; this process lists its members itself."""

    def release(self, member: Member, agent: str) -> None:
        live = self._live.get(agent)
        if live is not None and member in live:
            del live[member]
            if not live:
                del self._live[agent]
