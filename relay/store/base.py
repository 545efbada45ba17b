"""[sans-IO] The session store's interface: held bodies and one-time use of tokens.

/start puts a session (its id, the body if any, the token's expiry); the upgrade that
passed every other check uses it exactly once (SPEC §4, §8). ``Store`` is the interface
the control and data planes code against; ``relay.store.memory.MemoryStore`` is the
single-process implementation, ``relay.store.redis.RedisStore`` the shared one (several
instances on one Redis); its I/O failures become ``StoreUnavailable`` (503
``store_unavailable``).

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

from typing import Literal, Protocol

import attrs

from relay.errors import RelayError

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_ENTRIES",
    "MAX_MARKERS",
    "ConsumeResult",
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


Status = Literal["ok", "replayed", "body_unavailable", "unknown", "unverifiable"]


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
