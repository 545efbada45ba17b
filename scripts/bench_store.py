"""The session store's cost per session set-up: MemoryStore against RedisStore.

One set-up is what /start and one token upgrade ask of the store: put_session (with a
small body), reserve, consume; plus, on Redis, the fleet admission and release of the
live session's lease. Run with the project's venv, a redis-server on PATH:

    .venv/bin/python scripts/bench_store.py [--setups 5000] [--concurrency 50]

Prints set-ups per second and this process's CPU (user+sys) per set-up for each store.
Redis runs as its own process on a free loopback port (no persistence) and is stopped by
PID; its own CPU is not included. Messages relayed never touch the store, so the store
has no per-message cost.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import trio

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from relay.config import AgentConfig
from relay.fleet import FleetRegistry
from relay.registry import CancellableMember, Registry
from relay.store import MemoryStore, Store
from relay.store.redis import RedisStore

BODY = b'{"caller":"+15550100","lang":"en"}'
AGENT = AgentConfig(name="bench", bot="ws://127.0.0.1:9/", max_clients=1_000_000)


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def setups(store: Store, registry: Registry, count: int, concurrency: int) -> None:
    limit = trio.Semaphore(concurrency)

    async def one() -> None:
        async with limit:
            sid = uuid.uuid4().hex
            now = time.time()
            await store.put_session(sid, BODY, now + 300, now=now)
            assert (await store.reserve(sid, now, expires_at=now + 300, with_body=True)).ok
            member = CancellableMember()
            assert await registry.admit(member, AGENT)
            result = await store.consume(sid, now, expires_at=now + 300, with_body=True)
            assert result.body == BODY
            registry.release(member, AGENT.name)

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)


async def measure(name: str, store: Store, registry: Registry, count: int,
                  concurrency: int) -> None:
    await setups(store, registry, min(500, count), concurrency)  # warm up
    c0, t0 = cpu(), time.perf_counter()
    await setups(store, registry, count, concurrency)
    c1, t1 = cpu(), time.perf_counter()
    print(f"{name:<8} {count / (t1 - t0):>9.0f} set-ups/s   "
          f"{(c1 - c0) / count * 1e6:>7.0f} µs CPU per set-up (this process)")


async def main(count: int, concurrency: int, url: str) -> None:
    await measure("memory", MemoryStore(), Registry(), count, concurrency)
    redis = RedisStore(url, key_prefix=f"bench{uuid.uuid4().hex[:6]}:")
    fleet = FleetRegistry(redis, lease_ttl=15)
    async with trio.open_nursery() as nursery:
        await nursery.start(redis.run)
        await nursery.start(fleet.run)
        await measure("redis", redis, fleet, count, concurrency)
        nursery.cancel_scope.cancel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        server = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", directory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            trio.run(main, args.setups, args.concurrency, f"redis://127.0.0.1:{port}/0")
        finally:
            server.kill()
            server.wait()
