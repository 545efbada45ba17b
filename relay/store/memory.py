"""[trio] ``MemoryStore``: the ``Store`` of one process (the embedded default).

The protocol it implements, and the meaning of each result, are in ``relay.store.base``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import attrs
import trio

from ..tokens import TOKEN_LIFETIME
from .base import MAX_BODY_BYTES, MAX_ENTRIES, MAX_MARKERS, ConsumeResult, StoreFull

__all__ = ["MemoryStore"]


@attrs.define
class _Entry:
    body: bytes | None
    expires_at: float

    @property
    def size(self) -> int:
        return len(self.body) if self.body is not None else 0


@attrs.define
class _Marker:
    """A used token until it expires: reserved by one upgrade, then consumed."""

    expires_at: float
    consumed: bool = False


class MemoryStore:
    """The ``Store`` of one process: bounded, insertion-ordered dicts.

    Every method checkpoints first and then runs without awaiting, so under trio each
    call is atomic: upgrades racing with one token get one "ok" and the rest "replayed".
    A reserved session stays pending (its body counted) until consumed or released.
    Expired entries are dropped lazily from the oldest end on every call (entries are
    inserted roughly in expiry order, so this is amortised O(1)) and fully by ``purge``.
    """

    def __init__(
        self,
        *,
        max_entries: int = MAX_ENTRIES,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_markers: int = MAX_MARKERS,
        remembers_since: float = -math.inf,
    ) -> None:
        if max_entries < 1 or max_body_bytes < 0 or max_markers < 1:
            raise ValueError("store bounds must be positive")
        self.max_entries = max_entries
        self.max_body_bytes = max_body_bytes
        self.max_markers = max_markers
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._markers: OrderedDict[str, _Marker] = OrderedDict()
        self._body_bytes = 0
        # Wall-clock second this store began remembering uses. A token issued before it
        # (by an earlier run of this process, with the same key) may have been used
        # already, and nothing here can say: it is refused as "unverifiable", never
        # honoured, so a restart cannot make a used one-time token usable again.
        self.remembers_since = remembers_since

    @property
    def entry_count(self) -> int:
        """Pending sessions: put and not yet consumed (a reserved one is still pending)."""
        return len(self._entries)

    @property
    def consumed_count(self) -> int:
        """Markers: reserved and consumed tokens whose expiry has not been reached."""
        return len(self._markers)

    @property
    def body_bytes(self) -> int:
        return self._body_bytes

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._entries

    async def put_session(
        self, session_id: str, body: bytes | None, expires_at: float, *, now: float | None = None
    ) -> None:
        await trio.lowlevel.checkpoint()
        size = len(body) if body is not None else 0
        if size > self.max_body_bytes:
            raise ValueError(f"body of {size} bytes exceeds the store's {self.max_body_bytes}")
        if now is not None:
            self._drop_expired_head(now)
        previous = self._entries.get(session_id)
        if previous is None and len(self._entries) >= self.max_entries:
            raise StoreFull("sessions", self.max_entries)
        freed = previous.size if previous is not None else 0
        if self._body_bytes - freed + size > self.max_body_bytes:
            raise StoreFull("body_bytes", self.max_body_bytes)
        if previous is None and len(self._entries) + len(self._markers) >= self.max_markers:
            raise StoreFull("markers", self.max_markers)
        self._remove(session_id)
        self._entries[session_id] = _Entry(body, expires_at)
        self._body_bytes += size

    async def is_consumed(self, session_id: str, now: float | None = None) -> bool:
        await trio.lowlevel.checkpoint()
        marker = self._markers.get(session_id)
        return marker is not None and (now is None or now < marker.expires_at)

    async def reserve(
        self, session_id: str, now: float, *, expires_at: float, with_body: bool = False
    ) -> ConsumeResult:
        await trio.lowlevel.checkpoint()
        return self._reserve(session_id, now, expires_at, with_body)

    async def release(self, session_id: str, now: float) -> None:
        await trio.lowlevel.checkpoint()
        marker = self._markers.get(session_id)
        if marker is not None and not marker.consumed:
            del self._markers[session_id]  # the pending session stays: usable again

    async def consume(
        self, session_id: str, now: float, *, expires_at: float | None = None,
        with_body: bool = False,
    ) -> ConsumeResult:
        await trio.lowlevel.checkpoint()
        self._drop_expired(session_id, now)
        marker = self._markers.get(session_id)
        if marker is None:
            if expires_at is None:
                entry = self._entries.get(session_id)
                if entry is None:
                    return ConsumeResult("unknown")
                expires_at = entry.expires_at
            reserved = self._reserve(session_id, now, expires_at, with_body)
            if not reserved.ok:
                return reserved
            marker = self._markers[session_id]
        elif marker.consumed:
            return ConsumeResult("replayed")
        # The marker stays until the token expires, so a replay is named as one.
        marker.consumed = True
        entry = self._entries.pop(session_id, None)
        if entry is None:
            return ConsumeResult("ok")
        self._body_bytes -= entry.size
        return ConsumeResult("ok", entry.body)

    async def purge(self, now: float) -> int:
        await trio.lowlevel.checkpoint()
        expired = [sid for sid, entry in self._entries.items() if now >= entry.expires_at]
        for session_id in expired:
            self._remove(session_id)
        used = [sid for sid, marker in self._markers.items() if now >= marker.expires_at]
        for session_id in used:
            del self._markers[session_id]
        return len(expired) + len(used)

    async def healthy(self) -> bool:
        await trio.lowlevel.checkpoint()
        return True

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self._entries.clear()
        self._markers.clear()
        self._body_bytes = 0

    # -- no checkpoints below: each public method runs as one atomic step ------------------

    def _reserve(self, session_id: str, now: float, expires_at: float,
                 with_body: bool) -> ConsumeResult:
        self._drop_expired(session_id, now)
        if session_id in self._markers:
            return ConsumeResult("replayed")
        entry = self._entries.get(session_id)
        if entry is not None:
            expires_at = entry.expires_at
        elif now >= expires_at:
            return ConsumeResult("unknown")
        if with_body and (entry is None or entry.body is None):
            # Minted with a body that is not held: the bot must never start as if the
            # client had sent none.
            return ConsumeResult("body_unavailable")
        if entry is None and expires_at - TOKEN_LIFETIME < self.remembers_since:
            return ConsumeResult("unverifiable")
        if entry is None and len(self._entries) + len(self._markers) >= self.max_markers:
            raise StoreFull("markers", self.max_markers)
        self._markers[session_id] = _Marker(expires_at)
        return ConsumeResult("ok")

    def _remove(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            self._body_bytes -= entry.size

    def _drop_expired(self, session_id: str, now: float) -> None:
        """Expired entries at the oldest end, and ``session_id``'s wherever they are."""
        self._drop_expired_head(now)
        entry = self._entries.get(session_id)
        if entry is not None and now >= entry.expires_at:
            self._remove(session_id)
        marker = self._markers.get(session_id)
        if marker is not None and now >= marker.expires_at:
            del self._markers[session_id]

    def _drop_expired_head(self, now: float) -> None:
        while self._entries:
            session_id, entry = next(iter(self._entries.items()))
            if now < entry.expires_at:
                break
            self._remove(session_id)
        while self._markers:
            session_id, marker = next(iter(self._markers.items()))
            if now < marker.expires_at:
                break
            del self._markers[session_id]
