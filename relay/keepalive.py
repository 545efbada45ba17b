"""One keepalive timer per process (per trio run) instead of two sleeping tasks per session.

An idle session must cost as little as possible. A task per peer that sleeps for
`ping_interval` between pings costs a trio task, its coroutine frames, a cancel scope and
a deadline entry, times two, for the whole life of the session. Here a session only puts
"ping this peer at time T" into a heap; one timer task (a trio system task, started on
first use) wakes when the earliest entry is due and calls its callback, which starts the
short ping task in the session's own nursery. A session that ends cancels its tickets:
a cancelled entry holds nothing of the session, and once cancelled entries are more than
half the heap (and over `COMPACT_MIN`) they are swept, so churn does not grow the heap.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable
from itertools import count

import trio

log = logging.getLogger(__name__)

Due = Callable[[], None]

COMPACT_MIN = 1024  # cancelled entries below this are left to be dropped when they come due


class Ticket:
    """One scheduled call; `cancel()` makes it a no-op and drops the reference to it."""

    __slots__ = ("_timer", "due")

    def __init__(self, due: Due, timer: KeepaliveTimer) -> None:
        self.due: Due | None = due
        self._timer: KeepaliveTimer | None = timer

    def cancel(self) -> None:
        timer, self._timer = self._timer, None
        if self.due is not None:
            self.due = None
            if timer is not None:
                timer._cancelled_one()


class KeepaliveTimer:
    """A heap of (when, callback); one task runs each callback at its time."""

    __slots__ = ("_cancelled", "_heap", "_order", "_scope")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Ticket]] = []
        self._order = count()  # ties: first scheduled runs first (and callables never compare)
        self._scope: trio.CancelScope | None = None
        self._cancelled = 0  # cancelled entries still in the heap

    def schedule(self, when: float, due: Due) -> Ticket:
        """Call `due()` (from the timer task, synchronously) at trio time `when`."""
        ticket = Ticket(due, self)
        heapq.heappush(self._heap, (when, next(self._order), ticket))
        scope = self._scope
        if scope is not None and when < scope.deadline:
            scope.deadline = when
        return ticket

    def __len__(self) -> int:
        return len(self._heap)

    def _cancelled_one(self) -> None:
        self._cancelled += 1
        heap = self._heap
        if self._cancelled >= COMPACT_MIN and self._cancelled * 2 > len(heap):
            heap[:] = [entry for entry in heap if entry[2].due is not None]  # in place: run()
            heapq.heapify(heap)
            self._cancelled = 0

    async def run(self) -> None:
        heap = self._heap
        while True:
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                ticket = heapq.heappop(heap)[2]
                due, ticket.due, ticket._timer = ticket.due, None, None
                if due is None:
                    self._cancelled -= 1
                    continue
                try:
                    due()
                except Exception:  # a bug in one session must not stop every keepalive
                    log.exception("keepalive callback failed")


_TIMER: trio.lowlevel.RunVar[KeepaliveTimer] = trio.lowlevel.RunVar("relay_keepalive_timer")


def keepalive_timer() -> KeepaliveTimer:
    """This trio run's timer, started on first use."""
    try:
        return _TIMER.get()
    except LookupError:
        timer = KeepaliveTimer()
        _TIMER.set(timer)
        trio.lowlevel.spawn_system_task(timer.run, name="relay keepalive timer")
        return timer
