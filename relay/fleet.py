"""[trio] ``max_clients`` and ``when_full`` across every instance on one Redis.

``FleetRegistry`` is the ``Registry`` of a gateway on the Redis store. Each admitted
session holds a *lease* in Redis, renewed every third of ``lease_ttl``; the sessions of an
instance that vanished (kill -9, power loss) stop counting once their leases lapse, within
``lease_ttl``. Per agent (``P`` = ``key_prefix``; every key expires ``lease_ttl`` + 1 s
after its last write)::

    P a:{agent}:leases   zset  member "<instance>|<id>" -> lease expiry (Redis time, ms)
    P a:{agent}:order    zset  member -> admission time: the oldest is replaced first
    P a:{agent}:info     hash  member -> the session as the operator API lists it (JSON:
                               id, agent, organization, client_addr, connected_at, instance)
    P r:<member>         str   a replaced ("1") or operator-ended ("operator") session's
                               tombstone, for lease_ttl + 1 s

Admission is one script: drop lapsed leases, then admit; or, when full, refuse (reject)
or take the oldest sessions' slots (replace) in the same atomic step, so two newcomers on
two instances never take one slot. The admitting instance then has each replaced
session's holder close it (4001) over the holder's pub/sub channel ``P i:<instance>`` and
waits for the holder's confirmation that its teardown finished, at most
``close_timeout`` + 1 s (then it proceeds and logs), before its own bot is dialled. If
the request never arrives (the holder's channel was down), the holder finds the
tombstone at its next renewal and closes the session then (4001), within lease_ttl / 3.

While Redis does not answer, admission falls back to this instance's own count (auth-none
agents keep admitting; token agents are refused before admission anyway); those sessions
take a lease at the first renewal once Redis is back, so the fleet may briefly hold more
than ``max_clients`` after an outage. ``is_full`` (used for /start's 429) sees the fleet's
count as of the last admission or renewal.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable

import trio
from coredis.retry import NoRetryPolicy

from .admin import OPERATOR_REASON, default_instance
from .config import AgentConfig
from .registry import REPLACE_MARGIN, Member, Registry
from .store import StoreUnavailable
from .store.redis import RedisStore

__all__ = ["FleetRegistry"]

log = logging.getLogger(__name__)

# Seconds a stopping instance waits to give its leases back: with the gateway's 0.5 s
# shutdown margin, still inside close_timeout + 1 s.
FLUSH_TIMEOUT = 0.4
LISTEN_BACKOFF_MAX = 1.0  # seconds: resubscribe quickly, close requests depend on it

_NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function lapse(leases, order, info)
  local gone = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
  for _, m in ipairs(gone) do redis.call('ZREM', order, m); redis.call('HDEL', info, m) end
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
end
"""

# KEYS: leases, order, info. ARGV: member, max_clients, lease ms, when_full, key ttl ms,
# tombstone key prefix.
_ADMIT = _NOW + """
lapse(KEYS[1], KEYS[2], KEYS[3])
local count = redis.call('ZCARD', KEYS[1])
local max = tonumber(ARGV[2])
local victims = {}
if count >= max then
  if ARGV[4] == 'reject' then return {'full', count} end
  victims = redis.call('ZRANGE', KEYS[2], 0, count - max)
  for _, m in ipairs(victims) do
    redis.call('ZREM', KEYS[1], m)
    redis.call('ZREM', KEYS[2], m)
    redis.call('HDEL', KEYS[3], m)
    -- a tombstone: the holder closes it at its next renewal if the request got lost
    redis.call('SET', ARGV[6] .. m, '1', 'PX', ARGV[5])
  end
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
local reply = {'ok', redis.call('ZCARD', KEYS[1])}
for _, m in ipairs(victims) do table.insert(reply, m) end
return reply
"""

# KEYS: leases, order, info. ARGV: lease ms, key ttl ms, tombstone prefix, then pairs of
# leased member and its listing ('' while its upgrade is not accepted yet).
# A leased member still present is renewed; one that is gone was either replaced or ended
# by an operator (its tombstone says so: it is returned with the tombstone's value, for
# the holder to close) or lost with a Redis that restarted empty (it is added again, with
# its listing: Redis blinking never cuts a live session).
_RENEW = _NOW + """
lapse(KEYS[1], KEYS[2], KEYS[3])
local lease = now + tonumber(ARGV[1])
local closed = {}
for i = 4, #ARGV, 2 do
  local m = ARGV[i]
  local stone = nil
  if not redis.call('ZSCORE', KEYS[1], m) then stone = redis.call('GET', ARGV[3] .. m) end
  if stone then
    table.insert(closed, m)
    table.insert(closed, stone)
  else
    redis.call('ZADD', KEYS[1], lease, m)
    redis.call('ZADD', KEYS[2], 'NX', now, m)
    if ARGV[i + 1] ~= '' then redis.call('HSET', KEYS[3], m, ARGV[i + 1]) end
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
local reply = {redis.call('ZCARD', KEYS[1])}
for _, m in ipairs(closed) do table.insert(reply, m) end
return reply
"""

# KEYS: leases, order, info. ARGV: member.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""

# KEYS: leases, order, info. ARGV: member, its listing (JSON), key ttl ms.
# Written only while the member holds its lease (a released session is never listed).
_INFO = _NOW + """
lapse(KEYS[1], KEYS[2], KEYS[3])
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return 1
"""

# KEYS: leases, order, info. Every live leased member with its listing ('' = none yet).
_LIST = _NOW + """
lapse(KEYS[1], KEYS[2], KEYS[3])
local reply = {}
for _, m in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  table.insert(reply, m)
  table.insert(reply, redis.call('HGET', KEYS[3], m) or '')
end
return reply
"""

# KEYS: leases, order, info. ARGV: member, tombstone prefix, key ttl ms.
# An operator ends a session: its slot is freed at once and a tombstone left, so its
# holder closes it (4002) at its next renewal if the request over its channel is lost.
_END = _NOW + """
lapse(KEYS[1], KEYS[2], KEYS[3])
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('SET', ARGV[2] .. ARGV[1], 'operator', 'PX', ARGV[3])
return 1
"""


class FleetRegistry(Registry):
    """A ``Registry`` whose counts and replacements span every instance on one Redis."""

    def __init__(self, store: RedisStore, *, lease_ttl: float,
                 agents: Iterable[str] = (),
                 wall_clock: Callable[[], float] = time.time,
                 name: str | None = None) -> None:
        super().__init__()
        self._agents = list(agents)  # counted at each renewal, for /start's 429
        self.store = store
        self.instance = uuid.uuid4().hex[:16]
        # how the operator API names this instance (``host:pid``)
        self.name = name if name is not None else default_instance()
        self.wall_clock = wall_clock
        self._listing: dict[str, str] = {}  # id -> its listing (JSON), once connected
        self._send_info, self._infos = trio.open_memory_channel[tuple[str, str]](math.inf)
        self.lease_ttl = lease_ttl
        self._ids: dict[int, str] = {}  # id(member) -> its id in Redis
        self._by_id: dict[str, tuple[Member, str]] = {}  # id -> (member, agent)
        self._leased: set[str] = set()  # ids holding a lease (the rest: admitted while down)
        self._fleet_count: dict[str, int] = {}
        self._confirmations: dict[str, trio.Event] = {}
        self._send_release, self._releases = trio.open_memory_channel[tuple[str, str]](
            math.inf)
        self._nursery: trio.Nursery | None = None
        self._pending_releases = 0
        self._released = trio.Event()
        self._released.set()

    # -- keys and messages ----------------------------------------------------------------

    def _keys(self, agent: str) -> list[str]:
        p = self.store.key_prefix
        return [f"{p}a:{{{agent}}}:leases", f"{p}a:{{{agent}}}:order",
                f"{p}a:{{{agent}}}:info"]

    @property
    def agents(self) -> list[str]:
        return list(self._agents)

    def _channel(self, instance: str) -> str:
        return f"{self.store.key_prefix}i:{instance}"

    @property
    def _tombstones(self) -> str:
        return f"{self.store.key_prefix}r:"

    def _member(self, sid: str) -> str:
        return f"{self.instance}|{sid}"

    @property
    def _lease_ms(self) -> int:
        return int(self.lease_ttl * 1000)

    @property
    def _key_ttl_ms(self) -> int:
        return self._lease_ms + 1000

    # -- running --------------------------------------------------------------------------

    async def run(self, *, listen: bool = True,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew leases, hand releases to Redis and answer close requests, until cancelled.

        ``listen=False`` leaves this instance's channel unheard (as while it is down):
        close requests then reach it only through the tombstones, at renewal.
        """
        await self.store.wait_running()
        for name, src in (("fleet_admit", _ADMIT), ("fleet_renew", _RENEW),
                          ("fleet_release", _RELEASE), ("fleet_info", _INFO),
                          ("fleet_list", _LIST), ("fleet_end", _END)):
            self.store.register(name, src)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._renew_loop)
            nursery.start_soon(self._release_loop)
            nursery.start_soon(self._info_loop)
            if listen:
                nursery.start_soon(self._listen_loop)
            task_status.started()

    async def _renew_loop(self) -> None:
        while True:
            await trio.sleep(self.lease_ttl / 3)
            await self.renew()

    async def renew(self) -> None:
        """Extend this instance's leases; take leases for sessions admitted while Redis
        was down; close (4001) any session replaced whose close request got lost."""
        by_agent: dict[str, list[str]] = {agent: [] for agent in self._agents}
        for sid, (_member, agent) in self._by_id.items():
            by_agent.setdefault(agent, []).append(sid)
        for agent, sids in by_agent.items():
            pairs: list[str | bytes] = []
            for s in sids:
                pairs += [self._member(s), self._listing.get(s, "")]
            try:
                reply = await self.store.script(
                    "fleet_renew", self._keys(agent),
                    [str(self._lease_ms), str(self._key_ttl_ms), self._tombstones, *pairs])
            except StoreUnavailable:
                return
            self._leased.update(sids)
            self._fleet_count[agent] = int(reply[0])
            closed = [raw.decode() if isinstance(raw, bytes) else str(raw)
                      for raw in reply[1:]]
            for member, stone in zip(closed[0::2], closed[1::2], strict=True):
                found = self._by_id.get(member.partition("|")[2])
                if found is not None:
                    reason = OPERATOR_REASON if stone == OPERATOR_REASON else "replaced"
                    log.info("session %s of agent %s was %s elsewhere: closing it",
                             member, agent, "ended by an operator"
                             if reason == OPERATOR_REASON else "replaced")
                    found[0].cancel(reason)

    async def _release_loop(self) -> None:
        async for agent, sid in self._releases:
            try:
                await self.store.script("fleet_release", self._keys(agent),
                                        [self._member(sid)])
            except StoreUnavailable:
                pass  # its lease lapses within lease_ttl
            finally:
                self._pending_releases -= 1
                if not self._pending_releases:
                    self._released.set()

    async def _info_loop(self) -> None:
        async for agent, sid in self._infos:
            listing = self._listing.get(sid)
            if listing is None or sid not in self._leased:
                continue  # ended already, or no lease yet: the next renewal writes it
            try:
                await self.store.script("fleet_info", self._keys(agent),
                                        [self._member(sid), listing, str(self._key_ttl_ms)])
            except StoreUnavailable:
                pass  # the next renewal writes it

    def connected(self, member: Member, agent: str) -> None:
        sid = self._ids.get(id(member))
        info = getattr(member, "info", None)
        if sid is None or info is None or info.connected_at is None:
            return
        connected_at = self.wall_clock() - (trio.current_time() - info.connected_at)
        self._listing[sid] = json.dumps({
            "id": info.id, "agent": agent, "organization": info.organization,
            "client_addr": info.client_addr, "connected_at": round(connected_at, 3),
            "instance": self.name}, separators=(",", ":"))
        self._send_info.send_nowait((agent, sid))

    async def listed(self) -> list[tuple[str, str, dict[str, object]]]:
        """Every live session of the fleet that has a listing: (agent, Redis member,
        listing), from the leases; ``StoreUnavailable`` when Redis does not answer."""
        found: list[tuple[str, str, dict[str, object]]] = []
        for agent in self._agents:
            reply = await self.store.script("fleet_list", self._keys(agent), [])
            flat = [raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                    for raw in reply]
            for member, listing in zip(flat[0::2], flat[1::2], strict=True):
                if not listing:
                    continue  # admitted, upgrade not accepted yet
                try:
                    record = json.loads(listing)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    found.append((agent, member, record))
        return found

    async def end_remote(self, agent: str, member: str) -> bool:
        """Have the holder of ``member`` end it (4002); False when its lease is gone.

        The lease is dropped at once (the slot is free, the listing forgets it) and a
        tombstone left; the holder is asked over its channel, and closes it at its next
        renewal if it does not hear (its channel down). A holder that is gone took the
        session with it."""
        if not await self.store.script("fleet_end", self._keys(agent),
                                       [member, self._tombstones, str(self._key_ttl_ms)]):
            return False
        instance, _, sid = member.partition("|")
        listeners = await self.store.call(
            lambda c: c.publish(self._channel(instance), f"end|{sid}"))
        if not listeners:
            log.warning("instance %s holding session %s of agent %s does not listen; it "
                        "closes the session at its next renewal, if it is alive",
                        instance, sid, agent)
        return True

    async def flush(self) -> None:
        """Wait (bounded) until every ended session's lease is given back: a graceful
        stop frees its slots at once instead of after lease_ttl."""
        with trio.move_on_after(FLUSH_TIMEOUT):
            await self._released.wait()

    async def _listen_loop(self) -> None:
        delay = 0.1
        while True:
            client = self.store.client
            try:
                if client is None:
                    raise StoreUnavailable("not running")
                async with client.pubsub(channels=[self._channel(self.instance)],
                                         ignore_subscribe_messages=True,
                                         retry_policy=NoRetryPolicy()) as pubsub:
                    delay = 0.1
                    async for message in pubsub:
                        data = message.get("data")
                        if isinstance(data, bytes):
                            self._on_message(data.decode("utf-8", "replace"))
            except BaseException as exc:
                if trio.current_effective_deadline() == -math.inf:
                    return  # being cancelled (shutdown); coredis may wrap it in a group
                if not isinstance(exc, Exception):
                    raise
                # Redis down: listen again with backoff
                log.debug("fleet channel lost (%s); listening again in %.1f s", exc, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, LISTEN_BACKOFF_MAX)

    def _on_message(self, text: str) -> None:
        kind, _, rest = text.partition("|")
        if kind == "close":
            sid, _, admitter = rest.partition("|")
            assert self._nursery is not None
            self._nursery.start_soon(self._close_for, sid, admitter)
        elif kind == "end":
            found = self._by_id.get(rest)
            if found is not None:
                found[0].cancel(OPERATOR_REASON)
        elif kind == "closed":
            event = self._confirmations.get(rest)
            if event is not None:
                event.set()

    async def _close_for(self, sid: str, admitter: str) -> None:
        """Close our session ``sid`` (4001) for a newcomer elsewhere; confirm its teardown."""
        found = self._by_id.get(sid)
        if found is not None:
            member, agent = found
            member.cancel("replaced")
            await member.done.wait()  # its teardown is bounded by close_timeout
            self.release(member, agent)
        try:
            await self.store.call(lambda c: c.publish(self._channel(admitter),
                                                      f"closed|{sid}"))
        except StoreUnavailable:
            log.warning("could not confirm the replacement of session %s", sid)

    # -- the Registry interface -----------------------------------------------------------

    def is_full(self, agent: AgentConfig) -> bool:
        fleet = self._fleet_count.get(agent.name, 0)
        return max(self.count(agent.name), fleet) >= agent.max_clients

    async def admit(self, member: Member, agent: AgentConfig) -> bool:
        if self._nursery is None:
            return await super().admit(member, agent)  # not running: this instance alone
        # No local lock: the admit script is atomic, so concurrent newcomers (here or on
        # other instances) never share a slot or a victim.
        sid = uuid.uuid4().hex[:16]
        try:
            reply = await self.store.script(
                "fleet_admit", self._keys(agent.name),
                [self._member(sid), str(agent.max_clients), str(self._lease_ms),
                 agent.when_full, str(self._key_ttl_ms), self._tombstones])
        except StoreUnavailable:
            async with self._locks[agent.name]:
                return await self._admit_alone(member, agent, sid)
        status = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        self._fleet_count[agent.name] = int(reply[1])
        if status != "ok":
            return False
        self._leased.add(sid)
        self._add(member, agent.name, sid)
        victims = [v.decode() if isinstance(v, bytes) else str(v) for v in reply[2:]]
        await self._replace(victims, agent)
        return True

    async def _admit_alone(self, member: Member, agent: AgentConfig, sid: str) -> bool:
        # Redis does not answer: count and replace this instance's sessions only (the
        # caller holds the agent's lock, as the single-process Registry does).
        if not await self.make_room(agent):
            return False
        self._add(member, agent.name, sid)
        return True

    def _add(self, member: Member, agent: str, sid: str) -> None:
        self._live[agent][member] = None
        self._ids[id(member)] = sid
        self._by_id[sid] = (member, agent)

    async def _replace(self, victims: list[str], agent: AgentConfig) -> None:
        """Have each victim's holder close it (4001) and wait for its confirmed teardown."""
        bound = agent.limits.close_timeout + REPLACE_MARGIN
        with trio.move_on_after(bound) as scope:
            async with trio.open_nursery() as nursery:
                for victim in victims:
                    nursery.start_soon(self._replace_one, victim, agent)
        if scope.cancelled_caught:
            log.warning("replaced session(s) %s of agent %s did not confirm their teardown "
                        "within %.1f s; going on", ", ".join(victims), agent.name, bound)

    async def _replace_one(self, victim: str, agent: AgentConfig) -> None:
        instance, _, sid = victim.partition("|")
        if instance == self.instance:
            found = self._by_id.get(sid)
            if found is not None:
                member = found[0]
                member.cancel("replaced")
                await member.done.wait()
                self.release(member, agent.name)
            return
        event = self._confirmations[sid] = trio.Event()
        try:
            listeners = await self.store.call(lambda c: c.publish(
                self._channel(instance), f"close|{sid}|{self.instance}"))
            if not listeners:  # that instance is gone: its session went with it
                log.warning("instance %s holding session %s of agent %s is gone; going on",
                            instance, sid, agent.name)
                return
            await event.wait()
        except StoreUnavailable:
            log.warning("could not ask instance %s to close session %s", instance, sid)
        finally:
            self._confirmations.pop(sid, None)

    def release(self, member: Member, agent: str) -> None:
        super().release(member, agent)
        sid = self._ids.pop(id(member), None)
        if sid is None:
            return
        self._by_id.pop(sid, None)
        self._listing.pop(sid, None)
        if sid in self._leased:
            self._leased.discard(sid)
            self._pending_releases += 1
            self._released = trio.Event() if self._released.is_set() else self._released
            self._send_release.send_nowait((agent, sid))
