"""FleetOperations in-process on a real redis-server: two registries as two instances.

The members are real ``CancellableMember`` objects carrying a real ``SessionInfo`` (what
connections are to the registry and the operator API); their teardown is "done" as soon
as they are cancelled. The end-to-end behaviour on real processes is in
test_fleet_admin.py; here the paths a process test cannot force: a holder that does not
hear its channel, a session released before its listing was written.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import coredis
import trio
from redis_server import RedisServer, fresh_prefix, redis_server  # noqa: F401

from relay.admin import LocalOperations
from relay.config import AgentConfig
from relay.fleet import FleetRegistry
from relay.fleet_admin import FleetOperations
from relay.registry import CancellableMember
from relay.runtime import SessionInfo
from relay.store.redis import RedisStore

AGENT = AgentConfig(name="x", bot="ws://127.0.0.1:9/", max_clients=10)
BOUND = 10.0  # seconds: backstop for each wait on Redis


class Member(CancellableMember):
    def __init__(self, sid: str, addr: str = "127.0.0.1:5000") -> None:
        super().__init__()
        self.info = SessionInfo(id=sid, agent=AGENT.name, organization="org",
                                client_addr=addr)

    def cancel(self, reason: str) -> None:
        super().cancel(reason)
        self.done.set()  # no connection to tear down

    def traffic(self) -> tuple[int, int, int, int]:
        return (3, 30, 2, 20)


@asynccontextmanager
async def instance(nursery: trio.Nursery, url: str, prefix: str, name: str, *,
                   listen: bool = True) -> AsyncIterator[tuple[FleetRegistry, FleetOperations]]:
    store = RedisStore(url, key_prefix=prefix)
    # renewals every 100 s: within a test only the channel (or an explicit renew) ends one
    registry = FleetRegistry(store, lease_ttl=300, agents=[AGENT.name], name=name)
    ops = FleetOperations(registry, LocalOperations(registry, time.time, name))
    await nursery.start(store.run)
    await nursery.start(lambda task_status: registry.run(listen=listen,
                                                         task_status=task_status))
    yield registry, ops


async def connect(registry: FleetRegistry, member: Member) -> None:
    assert await registry.admit(member, AGENT)
    member.info.connected_at = trio.current_time()
    registry.connected(member, AGENT.name)


async def until_listed(ops: FleetOperations, count: int) -> None:
    with trio.fail_after(BOUND):
        while len(await ops.sessions()) != count:  # noqa: ASYNC110 - polls Redis
            await trio.sleep(0.02)


async def test_another_instances_session_is_listed_and_ended_over_its_channel(
        redis_server: RedisServer) -> None:  # noqa: F811
    async with trio.open_nursery() as nursery:
        async with instance(nursery, redis_server.url, fresh_prefix(), "A") as (a, _), \
                instance(nursery, redis_server.url, a.store.key_prefix, "B") as (_, ops_b):
            member = Member("s-1", "203.0.113.9:4242")
            await connect(a, member)
            await until_listed(ops_b, 1)
            (s,) = await ops_b.sessions()
            assert (s.id, s.agent, s.organization, s.client_addr, s.instance) == (
                "s-1", "x", "org", "203.0.113.9:4242", "A")
            assert abs(s.connected_at - time.time()) < BOUND
            assert s.to_json().keys() == {"id", "agent", "organization", "client_addr",
                                          "connected_at", "instance"}  # no counts: A's
            assert not await ops_b.end_session("s-2")
            assert member.cancel_reason is None
            with trio.fail_after(BOUND):
                assert await ops_b.end_session("s-1")
                await member.done.wait()  # heard over A's channel, no renewal needed
            assert member.cancel_reason == "operator"
            assert await ops_b.sessions() == []
        nursery.cancel_scope.cancel()


async def test_a_holder_that_does_not_hear_closes_with_4002_at_its_next_renewal(
        redis_server: RedisServer) -> None:  # noqa: F811
    async with trio.open_nursery() as nursery:
        async with instance(nursery, redis_server.url, fresh_prefix(), "A",
                            listen=False) as (a, _), \
                instance(nursery, redis_server.url, a.store.key_prefix, "B") as (_, ops_b):
            ended, other = Member("s-1"), Member("s-2")
            await connect(a, ended)
            await connect(a, other)
            await until_listed(ops_b, 2)
            assert await ops_b.end_session("s-1")
            assert ended.cancel_reason is None  # the request was not heard
            assert [s.id for s in await ops_b.sessions()] == ["s-2"]  # its slot is free
            await a.renew()
            assert ended.cancel_reason == "operator"  # the tombstone said so: 4002
            assert other.cancel_reason is None
        nursery.cancel_scope.cancel()


async def test_a_session_released_before_its_listing_is_written_is_never_listed(
        redis_server: RedisServer) -> None:  # noqa: F811
    async with trio.open_nursery() as nursery:
        async with instance(nursery, redis_server.url, fresh_prefix(), "A") as (a, ops_a), \
                instance(nursery, redis_server.url, a.store.key_prefix, "B") as (_, ops_b):
            gone, kept = Member("gone"), Member("kept")
            await connect(a, gone)
            a.release(gone, AGENT.name)  # before the listing's write ran
            await connect(a, kept)
            await until_listed(ops_b, 1)
            await a.flush()
            await a.renew()
            assert [s.id for s in await ops_b.sessions()] == ["kept"]
            assert [s.id for s in await ops_a.sessions()] == ["kept"]
            async with coredis.Redis.from_url(redis_server.url) as raw:
                listings = await raw.hkeys(f"{a.store.key_prefix}a:{{x}}:info")
            assert len(listings) == 1
        nursery.cancel_scope.cancel()


async def test_a_drain_reaches_every_instance_at_its_refresh_and_has_no_expiry(
        redis_server: RedisServer) -> None:  # noqa: F811
    async with trio.open_nursery() as nursery:
        async with instance(nursery, redis_server.url, fresh_prefix(), "A") as (a, ops_a), \
                instance(nursery, redis_server.url, a.store.key_prefix, "B") as (_, ops_b):
            await ops_b.set_draining("x", True)
            assert ops_b.is_draining("x")  # the instance that set it knows at once
            await ops_a.refresh()
            assert ops_a.is_draining("x") and ops_a.draining() == frozenset({"x"})
            assert not ops_a.is_draining("y")
            async with coredis.Redis.from_url(redis_server.url) as raw:
                assert await raw.pttl(f"{a.store.key_prefix}drain") == -1  # no expiry
            await ops_a.set_draining("x", False)
            await ops_b.refresh()
            assert not ops_b.is_draining("x") and ops_b.draining() == frozenset()
        nursery.cancel_scope.cancel()
