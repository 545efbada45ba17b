"""[trio] The session store: held bodies and one-time use of tokens.

/start puts a session (its id, the body if any, the token's expiry); the upgrade that
passed every other check consumes it exactly once (SPEC §4). ``Store`` is the interface
the control and data planes code against; ``MemoryStore`` is the single-process
implementation. A shared implementation (Redis, for several instances) implements the
same protocol: ``consume`` must be atomic there too (one ``GETDEL``-like round trip, a
consumed marker with the token's TTL), and its I/O failures become ``StoreUnavailable``,
which the control plane answers with 503.

Consume results::

    ok        first use: here is the held body (or None)
    replayed  the session was already consumed and its token has not expired yet
    unknown   nothing is known of the session and the caller gave no token expiry

Two structures, bounded separately: *pending* sessions (put by /start, with their bodies;
a /start flood evicts the oldest first, counted in metrics) and *consumed* markers (one
per used token, kept until the token expires). A token that verifies but whose pending
entry is unknown (minted by `relay mint-token`, or its body evicted) is a first use
without a body, as long as no consumed marker names it. Floods of /start cannot push a
consumed marker out, so eviction never allows a second use.

Time is passed in (``now``, unix seconds), so tests drive it with a fake clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Literal, Protocol

import attrs
import trio

from relay.errors import RelayError

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_CONSUMED",
    "MAX_ENTRIES",
    "ConsumeResult",
    "MemoryStore",
    "Store",
    "StoreUnavailable",
]

# Both bounds stop a /start flood (anyone holding the public key, which browsers embed)
# from exhausting memory; past them the oldest pending sessions are forgotten first.
MAX_ENTRIES = 100_000  # sessions: 5 min of tokens at ~330 /start per second; ~30 MB of entries
MAX_CONSUMED = 1_000_000  # used tokens remembered until expiry: ~3,300 upgrades/s for 5 min
MAX_BODY_BYTES = 64 * 1024 * 1024  # bytes: 64 bodies at the 1 MiB /start limit, or many small


class StoreUnavailable(RelayError):
    """The store cannot be reached: token paths answer 503 until it is back (SPEC §8)."""

    status = 503


@attrs.frozen
class ConsumeResult:
    """The outcome of ``Store.consume`` (see the module docstring)."""

    status: Literal["ok", "replayed", "unknown"]
    body: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Store(Protocol):
    """What the planes need from a store; every method may raise ``StoreUnavailable``."""

    async def put_session(
        self, session_id: str, body: bytes | None, expires_at: float, *, now: float | None = None
    ) -> None:
        """Hold ``body`` (compact JSON, or None) for ``session_id`` until ``expires_at``."""
        ...

    async def is_consumed(self, session_id: str, now: float | None = None) -> bool:
        """Whether a consumed marker names ``session_id`` (a replay, refused early)."""
        ...

    async def consume(
        self, session_id: str, now: float, *, expires_at: float | None = None
    ) -> ConsumeResult:
        """Atomically use ``session_id`` once; see ``ConsumeResult``."""
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


class MemoryStore:
    """The ``Store`` of one process: a bounded, insertion-ordered dict.

    Every method checkpoints first and then runs without awaiting, so under trio each
    call is atomic: two upgrades racing with one token get one "ok" and one "replayed".
    Expired entries are dropped lazily from the oldest end on every call (entries are
    inserted roughly in expiry order, so this is amortised O(1)) and fully by ``purge``.
    """

    def __init__(
        self,
        *,
        max_entries: int = MAX_ENTRIES,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_consumed: int = MAX_CONSUMED,
        on_evict: Callable[[], None] | None = None,
    ) -> None:
        if max_entries < 1 or max_body_bytes < 0:
            raise ValueError("store bounds must be positive")
        self.max_entries = max_entries
        self.max_body_bytes = max_body_bytes
        self._on_evict = on_evict
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._consumed: OrderedDict[str, float] = OrderedDict()  # session id → token expiry
        self.max_consumed = max_consumed
        self._body_bytes = 0

    @property
    def entry_count(self) -> int:
        return len(self._entries)

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
        self._remove(session_id)
        while self._entries and (
            len(self._entries) >= self.max_entries or self._body_bytes + size > self.max_body_bytes
        ):
            _, evicted = self._entries.popitem(last=False)
            self._body_bytes -= evicted.size
            if self._on_evict is not None:
                self._on_evict()
        self._entries[session_id] = _Entry(body, expires_at)
        self._body_bytes += size

    async def is_consumed(self, session_id: str, now: float | None = None) -> bool:
        await trio.lowlevel.checkpoint()
        expiry = self._consumed.get(session_id)
        return expiry is not None and (now is None or now < expiry)

    async def consume(
        self, session_id: str, now: float, *, expires_at: float | None = None
    ) -> ConsumeResult:
        await trio.lowlevel.checkpoint()
        self._drop_expired_head(now)
        if session_id in self._consumed and now < self._consumed[session_id]:
            return ConsumeResult("replayed")
        entry = self._entries.pop(session_id, None)
        body = None
        if entry is not None:
            self._body_bytes -= entry.size
            if now < entry.expires_at:
                body = entry.body
                expires_at = entry.expires_at if expires_at is None else expires_at
        if expires_at is None or now >= expires_at:
            return ConsumeResult("unknown")
        # The marker lives until the token expires, so a replay is named as one.
        self._consumed[session_id] = expires_at
        self._consumed.move_to_end(session_id)
        while len(self._consumed) > self.max_consumed:
            self._consumed.popitem(last=False)
        return ConsumeResult("ok", body)

    async def purge(self, now: float) -> int:
        await trio.lowlevel.checkpoint()
        expired = [sid for sid, entry in self._entries.items() if now >= entry.expires_at]
        for session_id in expired:
            self._remove(session_id)
        used = [sid for sid, expiry in self._consumed.items() if now >= expiry]
        for session_id in used:
            del self._consumed[session_id]
        return len(expired) + len(used)

    async def healthy(self) -> bool:
        await trio.lowlevel.checkpoint()
        return True

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self._entries.clear()
        self._consumed.clear()
        self._body_bytes = 0

    def _remove(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is not None:
            self._body_bytes -= entry.size

    def _drop_expired_head(self, now: float) -> None:
        while self._entries:
            session_id, entry = next(iter(self._entries.items()))
            if now < entry.expires_at:
                break
            self._remove(session_id)
        while self._consumed:
            session_id, expiry = next(iter(self._consumed.items()))
            if now < expiry:
                break
            del self._consumed[session_id]

    @property
    def consumed_count(self) -> int:
        return len(self._consumed)
