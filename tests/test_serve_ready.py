"""`relay serve` says when it is ready: one line on stdout once both planes listen.

Scripts (and the README's walk-throughs) wait for readiness instead of sleeping. Once the
line is out, both ports answer at once, without polling. The process is started here and
stopped by its PID (SIGTERM, then kill) in a `finally`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio
from ports import free_port

from relay.gateway import Ports
from relay.server import ready_line

START_BOUND = 60.0  # seconds for a loaded machine to import and listen
WAIT_READY = Path(__file__).resolve().parent.parent / "scripts" / "wait-ready"


async def test_serve_prints_ready_once_both_planes_listen(tmp_path: Path) -> None:
    ws_port, api_port = free_port(), free_port()
    config = tmp_path / "relay.toml"
    config.write_text(f'[server]\nws_bind = ["127.0.0.1:{ws_port}"]\n'
                      f'api_bind = ["127.0.0.1:{api_port}"]\n'
                      '[agents.echo]\nbot = "python:relay.echo:echo_bot"\n')
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay", "serve", "--config", str(config),
         "--log-level", "error"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert process.stdout is not None
        out = b""
        with trio.fail_after(START_BOUND):
            while b"\n" not in out:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, f"relay serve exited before it was ready: {out!r}"
                out += chunk
        line = out.decode().splitlines()[0]
        assert line == (f"relay ready: WebSocket ws://127.0.0.1:{ws_port}; HTTP "
                        f"http://127.0.0.1:{api_port} (/start, /health, /metrics)")
        for port in (ws_port, api_port):  # no retry: ready means listening
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.aclose()
        # scripts/wait-ready (the README's way to wait) agrees.
        with trio.fail_after(60):
            done = await trio.run_process(
                [str(WAIT_READY), str(process.pid)], capture_stderr=True, check=False,
                env={**os.environ, "RELAY_HEALTH_URL": f"http://127.0.0.1:{api_port}/health",
                     "RELAY_WAIT": "30"})
        assert (done.returncode, done.stderr) == (0, b"")
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5):
                await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


def test_ready_line_names_every_bind_and_tls() -> None:
    ports = Ports(ws=[("127.0.0.1", 1), ("::1", 2)], api=[("0.0.0.0", 3)])
    assert ready_line(ports, tls=True) == (
        "relay ready: WebSocket wss://127.0.0.1:1, wss://[::1]:2; HTTP https://0.0.0.0:3 "
        "(/start, /health, /metrics)")


async def test_wait_ready_gives_up_at_once_when_the_server_has_exited(tmp_path: Path) -> None:
    """A server that died (a failed install, a busy port) fails the wait, without waiting
    out the bound; nothing answers on the URL given here."""
    gone = await trio.lowlevel.open_process(["true"])
    await gone.wait()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/health"  # closed: nothing listens
    with trio.fail_after(60):
        done = await trio.run_process(
            [str(WAIT_READY), str(gone.pid)], capture_stderr=True, check=False,
            env={**os.environ, "RELAY_HEALTH_URL": url, "RELAY_WAIT": "300"})
    assert done.returncode == 1
    assert done.stderr.decode() == f"wait-ready: process {gone.pid} ended before {url} answered\n"
