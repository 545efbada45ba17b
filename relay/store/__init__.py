"""The session store: held bodies and one-time use of tokens (see ``relay.store.base``).

``MemoryStore`` (``relay.store.memory``) is the embedded default, for one process;
``RedisStore`` (``relay.store.redis``, imported on demand so coredis loads only when used)
is shared by several instances on one Redis.
"""

from .base import (
    MAX_BODY_BYTES,
    MAX_ENTRIES,
    MAX_MARKERS,
    ConsumeResult,
    Store,
    StoreFull,
    StoreUnavailable,
)
from .memory import MemoryStore

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
