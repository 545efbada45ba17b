"""[trio] ``RedisStore``: the ``Store`` shared by several instances on one Redis (or Valkey).

Each ``Store`` operation is one Lua script (``EVALSHA``), so it is atomic across every
instance on the same Redis: of several upgrades with one token, on any instances, exactly
one gets "ok"; ``consume`` takes the held body in the same step, so exactly one bot gets it.
The results are those of ``MemoryStore`` (see ``relay.store.base``); time is the caller's
``now`` (unix seconds), so the fleet's clocks should agree to well under a token's life.

Keys (``P`` is ``[store] key_prefix``; ``{id}`` is a hash tag, so one session's two keys
share a slot on a Redis Cluster):

    P s:{id}   hash  e = token expiry, b = held body (absent: none)    expires with the token
    P m:{id}   str   "r:<expiry>" reserved / "c:<expiry>" consumed     expires with the token
    P epoch    str   unix second this Redis began remembering uses     never

Every per-token key is written with an expiry (``PX``), so nothing outlives its token.
``P epoch`` is written when it is missing, by the store's start, its health check (every
``HEALTH_INTERVAL``) or any token operation (in the same script), whichever comes first: on
a new Redis, or on one that restarted without persistence (or was flushed) and so forgot
which tokens were used. A token with no session key that was issued before the epoch may
have been used already, and nothing can say: it is refused as "unverifiable", never
honoured, as ``MemoryStore(remembers_since=...)`` refuses tokens from before a process
restart. The store's size is bounded by Redis itself: run it with ``maxmemory`` and
``maxmemory-policy noeviction`` (an evicting policy could forget a used token early); a
write Redis refuses for memory is answered as ``StoreUnavailable``.

Any I/O failure or an answer slower than ``op_timeout`` is ``StoreUnavailable`` (503): a
token is never accepted unverified. No command is retried (a script whose answer was lost
may have run); the client reconnects by itself on the next command, and ``run`` pings
every ``HEALTH_INTERVAL`` (backing off while Redis is down) so ``up`` says whether it
answers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import coredis
import coredis.exceptions
import trio
from coredis.retry import NoRetryPolicy

from ..tokens import TOKEN_LIFETIME
from .base import MAX_BODY_BYTES, ConsumeResult, Status, StoreUnavailable

__all__ = ["OP_TIMEOUT", "RedisStore"]

log = logging.getLogger(__name__)

OP_TIMEOUT = 1.0  # seconds: a store call slower than this is answered 503, never waited on
HEALTH_INTERVAL = 1.0  # seconds between pings while Redis answers
HEALTH_BACKOFF_MAX = 5.0  # seconds: the longest wait between pings while it does not

T = TypeVar("T")

# No grace before the epoch (unlike a restarted process's, relay.gateway.RESTART_GRACE):
# Redis can restart empty in well under a second, and a token used just before must not
# be taken again just after. EPOCH_SLACK only absorbs float rounding: a token's issue time
# is its expiry less TOKEN_LIFETIME, which may land a few ulps before the instant itself.
EPOCH_SLACK = 0.001

_EPOCH = """
local function remembers_since(ekey, now)
  local e = redis.call('GET', ekey)
  if e then return tonumber(e) end
  redis.call('SET', ekey, string.format('%.17g', now))
  return now
end
"""

# KEYS: epoch. ARGV: now. The health check: notes the epoch if Redis lost it.
_NOTE_EPOCH = _EPOCH + """
return tostring(remembers_since(KEYS[1], tonumber(ARGV[1])))
"""

_LIB = _EPOCH + f"""
local LIFETIME = {TOKEN_LIFETIME!r}
local SLACK = {EPOCH_SLACK!r}
local function session(key, now)
  local v = redis.call('HMGET', key, 'e', 'b')
  if not v[1] then return nil end
  if now >= tonumber(v[1]) then redis.call('DEL', key); return nil end
  return v
end
local function marker(key, now)
  local m = redis.call('GET', key)
  if not m then return nil end
  if now >= tonumber(string.sub(m, 3)) then redis.call('DEL', key); return nil end
  return string.sub(m, 1, 1)
end
local function reserve(skey, mkey, ekey, now, exp, with_body)
  local since = remembers_since(ekey, now)
  if marker(mkey, now) then return 'replayed' end
  local s = session(skey, now)
  if s then
    exp = s[1]
  elseif exp == '' or now >= tonumber(exp) then
    return 'unknown'
  end
  if with_body == '1' and (not s or not s[2]) then return 'body_unavailable' end
  if not s and tonumber(exp) - LIFETIME < since - SLACK then return 'unverifiable' end
  local ttl = math.ceil((tonumber(exp) - now) * 1000)
  redis.call('SET', mkey, 'r:' .. exp, 'PX', math.max(ttl, 1))
  return 'ok'
end
"""

# KEYS: session, marker, epoch. ARGV: now, token expiry ('' = take the session's),
# with_body.
_RESERVE = _LIB + """
return reserve(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]), ARGV[2], ARGV[3])
"""

_CONSUME = _LIB + """
local now = tonumber(ARGV[1])
local kind = marker(KEYS[2], now)
if kind == 'c' then return {'replayed'} end
if not kind then
  local status = reserve(KEYS[1], KEYS[2], KEYS[3], now, ARGV[2], ARGV[3])
  if status ~= 'ok' then return {status} end
end
local m = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], 'c' .. string.sub(m, 2), 'KEEPTTL')
local s = session(KEYS[1], now)
redis.call('DEL', KEYS[1])
if s and s[2] then return {'ok', s[2]} end
return {'ok'}
"""

# KEYS: marker.
_RELEASE = """
local m = redis.call('GET', KEYS[1])
if m and string.sub(m, 1, 1) == 'r' then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: session, epoch. ARGV: expiry, ttl in ms, body ('' with has_body '0' = none),
# has_body, now. A put notes the epoch too, so a Redis that comes back empty has one before
# the first token it holds.
_PUT = _EPOCH + """
remembers_since(KEYS[2], tonumber(ARGV[5]))
redis.call('DEL', KEYS[1])
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'e', ARGV[1], 'b', ARGV[3])
else
  redis.call('HSET', KEYS[1], 'e', ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

_FAILURES = (coredis.exceptions.RedisError, OSError, trio.BrokenResourceError,
             trio.ClosedResourceError)


def _is_failure(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_failure(e) for e in exc.exceptions)
    return isinstance(exc, _FAILURES)


def _ttl_ms(expires_at: float, now: float) -> int:
    return max(1, math.ceil((expires_at - now) * 1000))


class RedisStore:
    """The shared ``Store``: every operation one atomic script on the Redis at ``url``.

    Use inside ``run`` (``await nursery.start(store.run)``): it holds the connection pool
    and the health watcher. A call outside it, or while Redis does not answer within
    ``op_timeout``, raises ``StoreUnavailable``.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "relay:",
        op_timeout: float = OP_TIMEOUT,
        max_body_bytes: int = MAX_BODY_BYTES,
        on_state: Callable[[bool], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.wall_clock = wall_clock  # the callers' clock: the epoch is written in it
        self.key_prefix = key_prefix
        self.op_timeout = op_timeout
        self.max_body_bytes = max_body_bytes
        self.up = False  # whether the last ping (or command) got an answer
        self._on_state = on_state
        self._client: coredis.Redis[bytes] | None = None
        self._scripts: dict[str, Any] = {}
        self._running = trio.Event()

    # -- lifecycle ------------------------------------------------------------------------

    def _new_client(self) -> coredis.Redis[bytes]:
        return coredis.Redis.from_url(
            self.url, decode_responses=False, retry_policy=NoRetryPolicy(),
            connect_timeout=self.op_timeout, stream_timeout=self.op_timeout,
            verify_version=False,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Hold the client and watch Redis's health until cancelled.

        Starts even when Redis is down (the gateway then answers 503 on token paths and
        keeps serving the rest); the client connects on first use.
        """
        client = self._new_client()
        async with client:
            self._client = client
            self._scripts = {}
            for name, src in (("reserve", _RESERVE), ("consume", _CONSUME),
                              ("release", _RELEASE), ("put", _PUT),
                              ("epoch", _NOTE_EPOCH)):
                self.register(name, src)
            self._running.set()
            try:
                await self._ping()
                if not self.up:
                    if self._on_state is not None:
                        self._on_state(False)
                    log.warning("the Redis store at %s does not answer; token paths answer "
                                "503 until it does", self.safe_url)
                task_status.started()
                await self._watch()
            finally:
                self._client = None

    async def _watch(self) -> None:
        delay = HEALTH_INTERVAL
        while True:
            await trio.sleep(delay)
            await self._ping()
            delay = HEALTH_INTERVAL if self.up else min(delay * 2, HEALTH_BACKOFF_MAX)

    async def _ping(self) -> None:
        # A ping that also writes the epoch if Redis lost it (a restart without
        # persistence): from then on, tokens issued before are "unverifiable".
        try:
            await self._script("epoch", [self.epoch_key], [repr(self.wall_clock())])
        except StoreUnavailable:
            pass

    def _set_up(self, up: bool) -> None:
        if up == self.up:
            return
        self.up = up
        if up:
            log.info("the Redis store at %s answers again", self.safe_url)
        else:
            log.warning("the Redis store at %s stopped answering", self.safe_url)
        if self._on_state is not None:
            self._on_state(up)

    @property
    def safe_url(self) -> str:
        """``url`` without its password, for logs."""
        scheme, sep, rest = self.url.partition("://")
        _userinfo, at, host = rest.partition("@")
        return f"{scheme}{sep}***@{host}" if at else self.url

    def register(self, name: str, source: str) -> None:
        """Make the Lua ``source`` callable as ``script(name, ...)`` (inside ``run``)."""
        assert self._client is not None, "register scripts inside run()"
        self._scripts[name] = self._client.register_script(source)

    async def wait_running(self) -> None:
        await self._running.wait()

    @property
    def client(self) -> coredis.Redis[bytes] | None:
        """The client while ``run`` holds it (for pub/sub), else None."""
        return self._client

    async def call(self, op: Callable[[coredis.Redis[bytes]], Awaitable[T]]) -> T:
        """Run ``op`` on the client, bounded by ``op_timeout``; failures are unavailability."""
        return await self._call(op)

    async def script(self, name: str, keys: list[str], args: list[str | bytes]) -> Any:
        """Run the registered script ``name`` atomically; ``StoreUnavailable`` on failure."""
        return await self._script(name, keys, args)

    async def _call(self, op: Callable[[coredis.Redis[bytes]], Awaitable[T]]) -> T:
        client = self._client
        if client is None:
            raise StoreUnavailable("the Redis store is not running")
        failure: BaseException | None = None
        with trio.move_on_after(self.op_timeout):
            try:
                result = await op(client)
            except BaseException as exc:
                if not _is_failure(exc):
                    raise
                failure = exc
            else:
                self._set_up(True)
                return result
        self._set_up(False)
        raise StoreUnavailable(
            f"the Redis store did not answer: {failure or 'timed out'}") from None

    async def _script(self, name: str, keys: list[str], args: list[str | bytes]) -> Any:
        script = self._scripts.get(name)
        if script is None:
            raise StoreUnavailable("the Redis store is not running")
        return await self._call(lambda c: script(keys=keys, args=args))

    def _keys(self, session_id: str) -> tuple[str, str]:
        return (f"{self.key_prefix}s:{{{session_id}}}", f"{self.key_prefix}m:{{{session_id}}}")

    @property
    def epoch_key(self) -> str:
        """Holds the unix second since which this Redis remembers uses (see the module)."""
        return f"{self.key_prefix}epoch"

    # -- the Store protocol ---------------------------------------------------------------

    async def put_session(
        self, session_id: str, body: bytes | None, expires_at: float, *, now: float | None = None
    ) -> None:
        size = len(body) if body is not None else 0
        if size > self.max_body_bytes:
            raise ValueError(f"body of {size} bytes exceeds the store's {self.max_body_bytes}")
        now = self.wall_clock() if now is None else now
        skey, _ = self._keys(session_id)
        await self._script("put", [skey, self.epoch_key],
                           [repr(expires_at), str(_ttl_ms(expires_at, now)),
                            body if body is not None else b"",
                            "1" if body is not None else "0", repr(now)])

    async def is_consumed(self, session_id: str, now: float | None = None) -> bool:
        _, mkey = self._keys(session_id)
        marker = await self._call(lambda c: c.get(mkey))
        if marker is None:
            return False
        return now is None or now < float(marker[2:])

    async def reserve(
        self, session_id: str, now: float, *, expires_at: float, with_body: bool = False
    ) -> ConsumeResult:
        skey, mkey = self._keys(session_id)
        status = await self._script("reserve", [skey, mkey, self.epoch_key],
                                    [repr(now), repr(expires_at), "1" if with_body else "0"])
        return ConsumeResult(_status(status))

    async def release(self, session_id: str, now: float) -> None:
        _, mkey = self._keys(session_id)
        await self._script("release", [mkey], [])

    async def consume(
        self, session_id: str, now: float, *, expires_at: float | None = None,
        with_body: bool = False,
    ) -> ConsumeResult:
        skey, mkey = self._keys(session_id)
        reply = await self._script("consume", [skey, mkey, self.epoch_key], [
            repr(now), repr(expires_at) if expires_at is not None else "",
            "1" if with_body else "0"])
        status = _status(reply[0])
        body = bytes(reply[1]) if len(reply) > 1 else None
        return ConsumeResult(status, body)

    async def purge(self, now: float) -> int:
        # Redis expires every key itself (each is written with its token's expiry).
        await trio.lowlevel.checkpoint()
        return 0

    async def healthy(self) -> bool:
        try:
            await self._call(lambda c: c.ping())
        except StoreUnavailable:
            return False
        return True

    async def aclose(self) -> None:
        # The connections are closed when ``run`` ends.
        await trio.lowlevel.checkpoint()


def _status(raw: Any) -> Status:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    if text not in ("ok", "replayed", "body_unavailable", "unknown", "unverifiable"):
        raise StoreUnavailable(f"the Redis store answered {text!r}")
    return text  # type: ignore[return-value]
