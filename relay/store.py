"""[trio] The session store: held bodies and one-time use of tokens.

/start puts a session (its id, the body if any, the token's expiry); the upgrade that
passed every other check uses it exactly once (SPEC §4, §8). ``Store`` is the interface
the control and data planes code against; ``MemoryStore`` is the single-process
implementation. A shared implementation (Redis, for several instances) implements the
same protocol; its I/O failures become ``StoreUnavailable`` (503 ``store_unavailable``).

Using a token is three operations, each of which a shared store makes atomic (one
script or ``SET NX`` round trip each, with the token's TTL):

    reserve   at the token check, before admission can replace anyone: the one upgrade
              that gets "ok" holds the session; every other upgrade with the same token
              gets "replayed" at once, so one token can never close more than one
              incumbent. A token minted with a body whose body is not held gets
              "body_unavailable".
    release   a refusal before anyone was replaced (a full agent that rejects): the
              reservation goes, the pending session (and its body) stays, the token is
              usable again.
    consume   just before the dial: the reservation becomes a consumed marker and the
              held body is handed over with it (exactly one bot ever gets it). A
              failed dial after this still burns the token.

``consume`` of a session nobody reserved does reserve + consume in one step.

Results (``ConsumeResult.status``)::

    ok                first use (reserved, or consumed: here is the held body or None)
    replayed          reserved or consumed already, and its token has not expired yet
    body_unavailable  the token says it carries a body, and no body is held for it
    unknown           nothing is known of the session and the caller gave no token
                      expiry, or the token has expired

Nothing is dropped to make room, ever. Three bounds, each answered by ``StoreFull``
(/start answers 503 ``store_full``; an upgrade that would need a new marker, 503 too):
*pending* sessions (``max_entries``), the bytes of held bodies (``max_body_bytes``), and
*markers* (``max_markers``: pending sessions plus reserved and consumed tokens, each kept
until its token expires). Because every pending session is counted among the markers,
a token /start issued always finds room for its marker when it is used. A marker is
forgotten only once its token has expired, so no flood can make a used token usable
again.

Time is passed in (``now``, unix seconds), so tests drive it with a fake clock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal, Protocol

import attrs
import trio

from relay.errors import RelayError

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_ENTRIES",
    "MAX_MARKERS",
    "ConsumeResult",
    "MemoryStore",
    "Store",
    "StoreFull",
    "StoreUnavailable",
]

# The bounds stop a /start flood (anyone holding the public key, which browsers embed)
# from exhausting memory; past them /start answers 503 store_full and nothing is dropped.
MAX_ENTRIES = 100_000  # sessions: 5 min of tokens at ~330 /start per second; ~30 MB of entries
MAX_MARKERS = 1_000_000  # pending + used tokens until expiry: ~3,300 upgrades/s for 5 min
MAX_BODY_BYTES = 64 * 1024 * 1024  # bytes: 64 bodies at the 1 MiB /start limit, or many small

Bound = Literal["sessions", "body_bytes", "markers"]
_BOUND_TEXT = {"sessions": "pending sessions", "body_bytes": "bytes of held bodies",
               "markers": "tokens remembered until they expire"}


class StoreUnavailable(RelayError):
    """The store cannot be reached: token paths answer 503 until it is back (SPEC §8)."""

    status = 503


class StoreFull(RelayError):
    """A bound of the store is reached: 503 ``store_full``; nothing held was dropped."""

    status = 503

    def __init__(self, bound: Bound, limit: int) -> None:
        self.bound: Bound = bound
        self.limit = limit
        super().__init__(f"the session store holds its maximum of {limit} "
                         f"{_BOUND_TEXT[bound]}")


Status = Literal["ok", "replayed", "body_unavailable", "unknown"]


@attrs.frozen
class ConsumeResult:
    """The outcome of ``Store.reserve`` and ``Store.consume`` (see the module docstring)."""

    status: Status
    body: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Store(Protocol):
    """What the planes need from a store; every method may raise ``StoreUnavailable``."""

    async def put_session(
        self, session_id: str, body: bytes | None, expires_at: float, *, now: float | None = None
    ) -> None:
        """Hold ``body`` (compact JSON, or None) for ``session_id`` until ``expires_at``.

        Raises ``StoreFull`` (naming the bound) rather than drop anything held.
        """
        ...

    async def is_consumed(self, session_id: str, now: float | None = None) -> bool:
        """Whether a reserved or consumed marker names ``session_id`` (a peek)."""
        ...

    async def reserve(
        self, session_id: str, now: float, *, expires_at: float, with_body: bool = False
    ) -> ConsumeResult:
        """Atomically hold ``session_id`` for one upgrade; "ok" carries no body yet.

        ``with_body``: the token says /start held a body for it. Raises ``StoreFull``
        when a token never put here (``relay mint-token``) finds the markers full.
        """
        ...

    async def release(self, session_id: str, now: float) -> None:
        """Undo a reservation (not a consumption): the token is usable again."""
        ...

    async def consume(
        self, session_id: str, now: float, *, expires_at: float | None = None,
        with_body: bool = False,
    ) -> ConsumeResult:
        """Atomically use ``session_id`` once (reserved or not); "ok" carries the body."""
        ...

    async def purge(self, now: float) -> int:
        """Forget everything expired at ``now``; returns how many entries went."""
        ...

    async def healthy(self) -> bool:
        """Whether the store answers now (for /health and the 503 decision)."""
        ...

    async def aclose(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...


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
    ) -> None:
        if max_entries < 1 or max_body_bytes < 0 or max_markers < 1:
            raise ValueError("store bounds must be positive")
        self.max_entries = max_entries
        self.max_body_bytes = max_body_bytes
        self.max_markers = max_markers
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._markers: OrderedDict[str, _Marker] = OrderedDict()
        self._body_bytes = 0

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
