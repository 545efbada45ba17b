"""`relay serve` as a real process: start, answer, stop on SIGTERM/SIGINT, refuse busy binds.

These tests run `python -m relay serve --config FILE` as a subprocess, so real time is
inherent: readiness is the process's ready line under an overall bound (tests/processes.py),
and exit times are measured with `time.monotonic()` around the wait for the process. The
config binds port 0 and the ports are read from the ready line. Every process started here
is stopped by PID in a `finally`.

The embedded default (no --config) binds 127.0.0.1:8700/8701, which may be busy on a
shared machine; it is tested in-process from `relay.config.default_config()` with its
binds replaced by port 0.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
from processes import START_BOUND, Served, relay_serve
from support import KEYS, open_client, read_until
from trio_websocket import ConnectionClosed

import relay
from relay.config import ECHO_BOT, Bind, default_config
from relay.gateway import Gateway

CLOSE_TIMEOUT = 1.0  # seconds, set in the config: the shutdown bound is this + 1 s (SPEC §8)
EXIT_SLACK = 3.0  # seconds beyond close_timeout we allow a loaded CI machine


def write_config(tmp_path: Path, ws_port: int = 0, api_port: int = 0) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(
        "[server]\n"
        f'ws_bind = ["127.0.0.1:{ws_port}"]\n'
        f'api_bind = ["127.0.0.1:{api_port}"]\n'
        f"close_timeout = {CLOSE_TIMEOUT}\n"
        "[agents.echo]\n"
        f'bot = "{ECHO_BOT}"\n',
        encoding="utf-8",
    )
    return path


def echo_url(served: Served) -> str:
    return f"ws://127.0.0.1:{served.ws_port}/ws/generic/echo.local"


@asynccontextmanager
async def serving(tmp_path: Path, *args: str) -> AsyncIterator[Served]:
    """`relay serve` on the echo config, ports 0; stopped by PID on the way out."""
    async with relay_serve(write_config(tmp_path), tmp_path / "stderr.txt", *args) as served:
        yield served


async def echo_once(url: str, message: str = "hello") -> None:
    with trio.fail_after(10):
        async with open_client(url) as ws:
            await ws.send_message(message)
            assert await ws.get_message() == message


async def http_status(port: int, path: str) -> bytes:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
                                  .encode())
            data = await read_until(stream, b"\r\n")
    return data.split(b"\r\n", 1)[0]


async def timed_exit(process: trio.Process) -> tuple[int, float]:
    """Wait for the process to exit; its status and the seconds it took."""
    start = time.monotonic()
    with trio.fail_after(CLOSE_TIMEOUT + EXIT_SLACK + 5):
        status = await process.wait()
    elapsed = time.monotonic() - start
    return status, elapsed


# --------------------------------------------------------------------------------------
# Start, answer, stop
# --------------------------------------------------------------------------------------


async def test_serve_process_answers_on_both_planes(tmp_path: Path) -> None:
    async with serving(tmp_path) as served:
        await echo_once(echo_url(served))
        await echo_once(echo_url(served), "again")
        assert (await http_status(served.api_port, "/health")).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_exits_0_within_close_timeout_with_idle_gateway(
    tmp_path: Path, signum: signal.Signals
) -> None:
    async with serving(tmp_path) as served:
        await echo_once(echo_url(served))
        served.process.send_signal(signum)
        status, elapsed = await timed_exit(served.process)
        assert status == 0, served.stderr_text()
        assert elapsed < CLOSE_TIMEOUT + EXIT_SLACK
        assert "Traceback" not in served.stderr_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_closes_live_sessions_with_1001_and_exits_0(
    tmp_path: Path, signum: signal.Signals
) -> None:
    async with serving(tmp_path) as served:
        with trio.fail_after(CLOSE_TIMEOUT + EXIT_SLACK + 10):
            async with open_client(echo_url(served)) as ws:
                await ws.send_message("hi")
                assert await ws.get_message() == "hi"
                served.process.send_signal(signum)
                start = time.monotonic()
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason is not None
                assert closed.value.reason.code == 1001
            status = await served.process.wait()
            elapsed = time.monotonic() - start
        assert status == 0, served.stderr_text()
        assert elapsed < CLOSE_TIMEOUT + EXIT_SLACK


async def test_sigterm_is_bounded_by_close_timeout_when_a_client_never_answers(
    tmp_path: Path,
) -> None:
    """A client that completed its upgrade and then reads nothing cannot hold the exit."""
    async with serving(tmp_path) as served:
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", served.ws_port)
        async with stream:
            await stream.send_all(
                b"GET /ws/generic/echo.local HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n"
                b"connection: Upgrade\r\nsec-websocket-version: 13\r\n"
                b"sec-websocket-key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n\r\n")
            with trio.fail_after(10):
                head = await read_until(stream, b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            served.process.send_signal(signal.SIGTERM)
            status, elapsed = await timed_exit(served.process)
        assert status == 0, served.stderr_text()
        assert elapsed < CLOSE_TIMEOUT + EXIT_SLACK


# --------------------------------------------------------------------------------------
# Binds that cannot be opened
# --------------------------------------------------------------------------------------


def run_with_busy_port(tmp_path: Path, which: str) -> tuple[int, str, int]:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ws, api = (port, 0) if which == "ws" else (0, port)
        config = write_config(tmp_path, ws, api)
        process = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _, stderr = process.communicate(timeout=START_BOUND)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return process.returncode, stderr, port


@pytest.mark.parametrize("which", ["ws", "api"])
def test_busy_bind_exits_2_naming_the_address(tmp_path: Path, which: str) -> None:
    status, stderr, port = run_with_busy_port(tmp_path, which)
    assert status == 2, stderr
    assert f"127.0.0.1:{port}" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("which", ["ws", "api"])
async def test_gateway_serve_raises_bind_error_for_a_busy_bind(which: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        busy_bind, free_bind = (Bind("127.0.0.1", port),), (Bind("127.0.0.1", 0),)
        ws_bind, api_bind = (busy_bind, free_bind) if which == "ws" else (free_bind, busy_bind)
        config = default_config()
        config = attrs.evolve(config, server=attrs.evolve(
            config.server, ws_bind=ws_bind, api_bind=api_bind))
        gateway = Gateway(config, keys=KEYS)
        async with trio.open_nursery() as nursery:
            with pytest.raises(relay.BindError) as exc:
                await nursery.start(gateway.serve)
        assert f"127.0.0.1:{port}" in str(exc.value)


# --------------------------------------------------------------------------------------
# The embedded default
# --------------------------------------------------------------------------------------


async def test_default_config_serves_echo_local_without_tokens() -> None:
    config = default_config()
    assert config.server.ws_bind == (Bind("127.0.0.1", 8700),)
    assert config.server.api_bind == (Bind("127.0.0.1", 8701),)
    assert list(config.agents) == ["echo"]
    assert config.agents["echo"].websocket_auth == "none"
    assert config.server.organization == "local"
    assert config.store.backend == "memory"
    config = attrs.evolve(config, server=attrs.evolve(
        config.server, ws_bind=(Bind("127.0.0.1", 0),), api_bind=(Bind("127.0.0.1", 0),)))
    gateway = Gateway(config, environ={})  # no RELAY_SECRET: a random key, as SPEC §8
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(gateway.serve)
        await echo_once(f"ws://127.0.0.1:{ports.ws[0][1]}/ws/generic/echo.local")
        await gateway.shutdown()
        nursery.cancel_scope.cancel()
