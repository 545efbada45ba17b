"""The gateway of scripts/soak: `relay.Gateway` on a config file, in its own process,
answering "stats" lines on stdin with one JSON line: trio tasks, open fds, RSS, sessions.
SIGTERM shuts it down gracefully (exit 0)."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Any

import trio

import relay


def count_tasks(task: Any) -> int:
    return 1 + sum(count_tasks(child) for nursery in task.child_nurseries
                   for child in nursery.child_tasks)


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def main(path: str) -> None:
    gateway = relay.Gateway(relay.load_config(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.serve)
        print("ready", flush=True)

        async def stats() -> None:
            stdin = trio.lowlevel.FdStream(os.dup(0))
            buf = b""
            while chunk := await stdin.receive_some(4096):
                buf += chunk
                while b"\n" in buf:
                    _, buf = buf.split(b"\n", 1)
                    for cc in list(gateway.connections):
                        cc.flush_counts()
                    print(json.dumps({
                        "tasks": count_tasks(trio.lowlevel.current_root_task()),
                        "fds": len(os.listdir("/proc/self/fd")),
                        "rss": rss(),
                        "sessions": gateway.session_count(),
                        "connections": len(gateway.connections),
                    }), flush=True)

        async def on_term() -> None:
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    await gateway.shutdown()
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(stats)
        nursery.start_soon(on_term)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    trio.run(main, sys.argv[1])
