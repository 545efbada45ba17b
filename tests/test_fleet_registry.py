"""FleetRegistry in-process on a real redis-server: two registries as two instances.

The members are real ``CancellableMember`` objects (what connections are to the
registry); their teardown is "done" as soon as they are cancelled here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import coredis
import trio
from redis_server import RedisServer, fresh_prefix, redis_server  # noqa: F401

from relay.config import AgentConfig
from relay.fleet import FleetRegistry
from relay.registry import CancellableMember
from relay.store.redis import RedisStore

AGENT = AgentConfig(name="x", bot="ws://127.0.0.1:9/", max_clients=1, when_full="replace")


class Member(CancellableMember):
    def cancel(self, reason: str) -> None:
        super().cancel(reason)
        self.done.set()  # no connection to tear down


@asynccontextmanager
async def instance(nursery: trio.Nursery, url: str, prefix: str, *,
                   listen: bool = True) -> AsyncIterator[FleetRegistry]:
    store = RedisStore(url, key_prefix=prefix)
    registry = FleetRegistry(store, lease_ttl=30, agents=[AGENT.name])
    await nursery.start(store.run)
    await nursery.start(lambda task_status: registry.run(listen=listen,
                                                         task_status=task_status))
    yield registry


async def test_replacement_reaches_the_holder_over_its_channel(
        redis_server: RedisServer) -> None:  # noqa: F811
    prefix = fresh_prefix()
    async with trio.open_nursery() as nursery:
        async with instance(nursery, redis_server.url, prefix) as a, \
                instance(nursery, redis_server.url, prefix) as b:
            old, new = Member(), Member()
            assert await a.admit(old, AGENT)
            with trio.fail_after(10):
                assert await b.admit(new, AGENT)
            assert old.cancel_reason == "replaced" and old.done.is_set()
            assert a.count("x") == 0 and b.count("x") == 1
        nursery.cancel_scope.cancel()


async def test_a_lost_close_request_is_found_at_the_holders_next_renewal(
        redis_server: RedisServer) -> None:  # noqa: F811
    prefix = fresh_prefix()
    async with trio.open_nursery() as nursery:
        async with instance(nursery, redis_server.url, prefix, listen=False) as a, \
                instance(nursery, redis_server.url, prefix) as b:
            old, new, other = Member(), Member(), Member()
            assert await a.admit(old, AGENT)
            assert await a.admit(other, AgentConfig(name="y", bot="ws://127.0.0.1:9/"))
            with trio.fail_after(10):
                assert await b.admit(new, AGENT)  # nobody heard: B goes on (logged)
            assert old.cancel_reason is None  # the request was lost
            await a.renew()
            assert old.cancel_reason == "replaced"  # the tombstone said so
            assert other.cancel_reason is None  # only the replaced one
        nursery.cancel_scope.cancel()


async def test_sessions_lost_with_an_emptied_redis_are_leased_again_not_cut(
        redis_server: RedisServer) -> None:  # noqa: F811
    prefix = fresh_prefix()
    async with trio.open_nursery() as nursery:
        async with instance(nursery, redis_server.url, prefix) as a:
            live = Member()
            assert await a.admit(live, AGENT)
            async with coredis.Redis.from_url(redis_server.url) as raw:
                keys = [k async for k in raw.scan_iter(match=f"{prefix}*")]
                assert keys
                await raw.delete(keys)  # as a Redis restarted without persistence
                await a.renew()
                assert live.cancel_reason is None
                assert await raw.zcard(f"{prefix}a:{{x}}:leases".encode()) == 1
        nursery.cancel_scope.cancel()
