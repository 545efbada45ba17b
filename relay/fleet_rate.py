"""[trio] The /start rate limit across every instance on one Redis.

``FleetStartLimiter`` is ``relay.limits.StartRateLimiter`` with its buckets in Redis: one
bucket per configured public key for the whole fleet, so ``[server] start_rate`` /
``start_burst`` hold however a load balancer spreads a key's calls over instances and
workers. ``take`` is one Lua script (atomic in Redis): ``TokenBucket.take`` transcribed,
with the same arithmetic in doubles. Per public key (``P`` = ``key_prefix``)::

    P rate:<h>   hash  t = tokens left, s = stamp (unix seconds)   expires when full again

``<h>`` is the first 32 hex digits of the key's SHA-256: the public key itself (a
credential) is never written to Redis, and the name depends on nothing but the key, so
instances whose configs list the keys in another order, or that differ during a rollout
adding or removing a key, share each key's bucket. Unknown keys never reach Redis (the
401 check answers them first, and ``take`` ignores them).

Time is ``now`` from the calling instance's wall clock, as the rest of the Redis store
(tokens already require the fleet's clocks in step). A ``now`` earlier than the bucket's
stamp (a peer instance's clock slightly ahead) refills nothing and keeps the later stamp,
so clock skew never grants more than ``burst``. Each write sets the key's expiry to the
time a refill from empty takes plus a margin (``relay.limits.bucket_expiry``): a bucket
Redis forgot is full, as it would be by then.

A Redis failure is ``StoreUnavailable`` (as every store call); the control plane then
limits with this process's own bucket (see ``relay.control``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Any

import trio

from .limits import bucket_expiry, check_bucket
from .store import StoreUnavailable
from .store.redis import RedisStore

__all__ = ["FleetStartLimiter", "bucket_name"]

SCRIPT = "start_rate"

# KEYS: the bucket. ARGV: now (unix seconds), rate (per second), burst, expiry (ms).
# Returns the seconds to wait as a string ('0': allowed); numbers are written with 17
# significant digits, so a double survives the round trip exactly.
_TAKE = """
local now = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 't', 's')
local tokens, stamp = burst, now
if v[1] and v[2] then
  tokens, stamp = tonumber(v[1]), tonumber(v[2])
  if now > stamp then
    tokens = math.min(burst, tokens + (now - stamp) * rate)
    stamp = now
  end
end
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens),
           's', string.format('%.17g', stamp))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return string.format('%.17g', wait)
"""


def bucket_name(public_key: str) -> str:
    """The public key's part of its bucket's Redis key (a hash: never the key itself)."""
    return hashlib.sha256(public_key.encode("utf-8")).hexdigest()[:32]


class FleetStartLimiter:
    """One token bucket per configured public key, shared by every instance on Redis."""

    def __init__(self, store: RedisStore, keys: Iterable[str], *, rate: float,
                 burst: float) -> None:
        check_bucket(rate, burst)
        self.store = store
        self.rate = rate
        self.burst = burst
        self._names = {key: f"{store.key_prefix}rate:{bucket_name(key)}" for key in keys}
        self._expiry_ms = str(math.ceil(bucket_expiry(rate, burst) * 1000))

    def redis_key(self, public_key: str) -> str | None:
        """The Redis key of ``public_key``'s bucket; None for a key not configured."""
        return self._names.get(public_key)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Register the script once the store runs (start it after the store)."""
        await self.store.wait_running()
        self.store.register(SCRIPT, _TAKE)
        task_status.started()

    async def take(self, public_key: str, now: float) -> float:
        """0.0 when ``public_key`` may call /start now, else the seconds to wait;
        ``StoreUnavailable`` when Redis does not answer."""
        name = self._names.get(public_key)
        if name is None:  # not a configured key: the 401 check answers it
            await trio.lowlevel.checkpoint()
            return 0.0
        reply = await self.store.script(SCRIPT, [name], [
            repr(float(now)), repr(float(self.rate)), repr(float(self.burst)),
            self._expiry_ms])
        return _seconds(reply)


def _seconds(raw: Any) -> float:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        wait = float(text)
    except ValueError:
        raise StoreUnavailable(f"the Redis store answered {text!r}") from None
    if not (wait >= 0 and math.isfinite(wait)):
        raise StoreUnavailable(f"the Redis store answered {text!r}")
    return wait
