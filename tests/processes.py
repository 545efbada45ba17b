"""`relay serve` as a real process for tests: start it, learn its ports, stop it.

A config can bind ``127.0.0.1:0`` for both planes: once both listen, the process prints
one line on stdout (relay/server.py ``ready_line``) and the ports are read from it, so no
port is picked before the process itself binds it. A process that exits before that line
fails the test with its stderr's tail. The process is stopped by its PID in a ``finally``:
SIGTERM, then SIGKILL if it has not exited within STOP_BOUND.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import attrs
import trio

START_BOUND = 30.0  # seconds for a process to import and listen on a loaded machine
STOP_BOUND = 10.0  # seconds for SIGTERM to end it before it is killed
READY = "relay ready: WebSocket "


@attrs.define
class Served:
    process: trio.Process
    ws_port: int
    api_port: int
    stderr: Path

    def stderr_text(self) -> str:
        return self.stderr.read_text(encoding="utf-8", errors="replace")


def tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def ready_ports(line: str) -> tuple[int, int]:
    """The first WebSocket port and the first HTTP port named by a ready line."""
    assert line.startswith(READY), line
    ws, _, api = line.removeprefix(READY).partition("; HTTP ")
    ws_port = urlsplit(ws.split(", ")[0]).port
    api_port = urlsplit(api.split(" ")[0].rstrip(",")).port
    assert ws_port and api_port, line
    return ws_port, api_port


class NotReady(AssertionError):
    """The process exited before its ready line."""

    def __init__(self, status: int, stderr: Path) -> None:
        super().__init__(f"relay serve exited (status {status}) before it was ready; "
                         f"its stderr ends:\n{tail(stderr)}")
        self.status = status


async def read_ready(process: trio.Process, stderr: Path,
                     bound: float = START_BOUND) -> tuple[int, int]:
    """Read stdout up to the ready line, within bound seconds; its (ws, api) ports."""
    assert process.stdout is not None
    data = b""
    with trio.fail_after(bound):
        while b"\n" not in data:
            chunk = await process.stdout.receive_some(4096)
            if not chunk:
                raise NotReady(await process.wait(), stderr)
            data += chunk
    return ready_ports(data.split(b"\n", 1)[0].decode())


async def stop(process: trio.Process) -> None:
    """SIGTERM, then SIGKILL after STOP_BOUND; by this process's PID only."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if process.returncode is not None:
            return
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            return
        with trio.move_on_after(STOP_BOUND):
            await process.wait()


@asynccontextmanager
async def relay_serve(config: Path, stderr: Path, *args: str,
                      env: Mapping[str, str] | None = None,
                      cwd: Path | None = None,
                      start_bound: float = START_BOUND) -> AsyncIterator[Served]:
    """`python -m relay serve --config CONFIG ARGS`, ready; stopped on the way out."""
    with stderr.open("wb") as err:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "relay", "serve", "--config", str(config), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            env=None if env is None else dict(env), cwd=None if cwd is None else str(cwd))
    try:
        ws_port, api_port = await read_ready(process, stderr, start_bound)
        # stdout stays open until the end: a worker restarted by its supervisor prints
        # its own ready line, and a closed pipe would make that print fail.
        yield Served(process, ws_port, api_port, stderr)
    finally:
        with trio.CancelScope(shield=True):
            await stop(process)
            if process.stdout is not None:
                await process.stdout.aclose()
