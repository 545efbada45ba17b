"""`relay serve` with workers = 2 on a real redis-server: a supervisor and its workers.

Both workers serve (sessions report the PID of the process that runs their bot); a
killed worker is replaced; a token is used once across workers; /metrics from any worker
counts every worker's sessions; SIGTERM ends the whole with 0 within close_timeout + 1 s.
workers > 1 with the memory store is refused with exit 2 naming server.workers.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import attrs
import trio
from fleet import PK, PUBLIC_URL, SECRET, WAIT, Instance, upgrade_status, write_config, ws_path
from processes import relay_serve
from redis_server import RedisServer, fresh_prefix, redis_server  # noqa: F401
from support import open_client
from trio_websocket import WebSocketConnection

TESTS = str(Path(__file__).parent)
CLOSE_TIMEOUT = 1.0  # seconds, in the config: SIGTERM must end the whole within this + 1 s
EXIT_SLACK = 3.0  # seconds more on a loaded machine
ATTEMPT = 3.0  # seconds for one session to open and greet


def config_text(redis_url: str = "", workers: int = 2) -> str:
    store = (f'[store]\nbackend = "redis"\nurl = "{redis_url}"\nkey_prefix = "{fresh_prefix()}"\n'
             if redis_url else "")
    return (
        "[server]\n"
        'ws_bind = ["127.0.0.1:0"]\napi_bind = ["127.0.0.1:0"]\n'
        f'public_url = "{PUBLIC_URL}"\npublic_keys = ["{PK}"]\n'
        f"close_timeout = {CLOSE_TIMEOUT}\nworkers = {workers}\n"
        + store +
        '[agents.pid]\nbot = "python:pid_bot:pid_bot"\nmax_clients = 1000\n'
        '[agents.tok]\nbot = "python:pid_bot:pid_bot"\nwebsocket_auth = "token"\n'
        "max_clients = 1000\n"
    )


def env() -> dict[str, str]:
    return {**os.environ, "RELAY_SECRET": SECRET,
            "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}


@asynccontextmanager
async def supervised(tmp_path: Path, redis_url: str) -> AsyncIterator[Instance]:
    path = write_config(tmp_path / "relay.toml", config_text(redis_url))
    stderr = tmp_path / "stderr.txt"
    # The ready line is the first worker's; the supervisor resolved port 0 for them all.
    # Stopping the supervisor by its PID stops its workers (their stdin closes).
    async with relay_serve(path, stderr, env=env()) as served:
        yield Instance("sup", served.process, served.ws_port, served.api_port, stderr, path)


@attrs.define
class Held:
    ws: WebSocketConnection
    pid: int


async def hold(stack: AsyncExitStack, url: str) -> Held:
    ws = await stack.enter_async_context(open_client(url))
    with trio.fail_after(WAIT):
        greeting = await ws.get_message()
    assert isinstance(greeting, str) and greeting.startswith("pid:"), greeting
    return Held(ws, int(greeting[4:]))


async def until_pids(sup: Instance, count: int, *, exclude: int = 0) -> set[int]:
    """Open sessions until ``count`` distinct worker PIDs (not ``exclude``) answered."""
    pids: set[int] = set()
    with trio.fail_after(WAIT * 2):
        while len(pids - {exclude}) < count:
            # A connection made while a killed worker's socket is going away is reset or
            # hangs (it was queued at that worker): such an attempt is retried.
            with trio.move_on_after(ATTEMPT):
                try:
                    pids.add(await greeting_pid(sup.ws_port))
                except (OSError, trio.BrokenResourceError):
                    await trio.sleep(0.1)
    return pids - {exclude}


async def greeting_pid(port: int) -> int:
    """Open a session over raw TCP, read the bot's first frame ("pid:N"), hang up."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            b"GET /ws/generic/pid.local HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\n"
            b"connection: Upgrade\r\nsec-websocket-version: 13\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        data = b""
        while True:
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep and len(rest) >= 2 and len(rest) >= 2 + (rest[1] & 0x7F):
                break
            chunk = await stream.receive_some(4096)
            assert chunk, data
            data += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    assert rest[0] == 0x81  # one unmasked text frame, FIN
    text = rest[2:2 + (rest[1] & 0x7F)].decode()
    assert text.startswith("pid:"), text
    return int(text[4:])


async def test_two_workers_serve_a_killed_one_is_replaced_and_metrics_are_whole(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    async with supervised(tmp_path, redis_server.url) as sup:
        pids = await until_pids(sup, 2)
        assert len(pids) == 2 and sup.process.pid not in pids
        # /metrics from any worker counts every worker's live sessions
        async with AsyncExitStack() as stack:
            held = [await hold(stack, sup.ws_url("/ws/generic/pid.local")) for _ in range(12)]
            assert len({h.pid for h in held}) == 2  # 2^-11 odds that one worker got all
            for _ in range(6):  # each scrape lands on either worker
                value = await sup.metric('relay_sessions_active{agent="pid"}')
                assert value == 12.0
        # a killed worker is replaced by a new one
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        new = await until_pids(sup, 2, exclude=victim)
        assert victim not in new and len(new) == 2
        assert "restarting" in sup.stderr_text()


async def test_a_token_is_used_once_across_workers(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    async with supervised(tmp_path, redis_server.url) as sup:
        status, answer = await sup.start("tok")
        assert status == 200, answer
        path = ws_path(answer["wsUrl"])
        statuses: list[int] = []

        async def attempt() -> None:
            statuses.append((await upgrade_status(sup.ws_port, path, answer["token"]))[0])

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(attempt)
        assert sorted(statuses) == [101] + [403] * 7


async def test_sigterm_ends_supervisor_and_workers_with_0_in_time(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    async with supervised(tmp_path, redis_server.url) as sup:
        async with AsyncExitStack() as stack:
            held = [await hold(stack, sup.ws_url("/ws/generic/pid.local")) for _ in range(6)]
            sup.process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            with trio.fail_after(CLOSE_TIMEOUT + 1 + EXIT_SLACK):
                status = await sup.process.wait()
            took = time.monotonic() - sent
        assert status == 0, sup.stderr_text()
        assert took <= CLOSE_TIMEOUT + 1 + EXIT_SLACK
        # every worker is gone too (the supervisor waited for them before it exited)
        assert [pid for pid in {h.pid for h in held} if _alive(pid)] == []
        assert "Traceback" not in sup.stderr_text()


def _alive(pid: int) -> bool:
    """Running (a zombie no init has reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


async def test_workers_with_the_memory_store_exit_2_naming_server_workers(
        tmp_path: Path) -> None:
    path = write_config(tmp_path / "relay.toml", config_text())
    for args in (["--config", str(path)], ["--config", str(path), "--workers", "3"]):
        result = await trio.run_process(
            [sys.executable, "-m", "relay", "serve", *args], env=env(),
            capture_stdout=True, capture_stderr=True, check=False)
        assert result.returncode == 2
        assert b"server.workers" in result.stderr and b'backend = "redis"' in result.stderr
    one = write_config(tmp_path / "one.toml", config_text(workers=1))
    result = await trio.run_process(
        [sys.executable, "-m", "relay", "serve", "--config", str(one), "--workers", "2"],
        env=env(), capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 2 and b"server.workers" in result.stderr
    result = await trio.run_process(
        [sys.executable, "-m", "relay", "check-config", str(path)], env=env(),
        capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 2 and b"server.workers" in result.stderr


async def test_workers_stop_when_their_supervisor_is_killed(
        tmp_path: Path, redis_server: RedisServer) -> None:  # noqa: F811
    async with supervised(tmp_path, redis_server.url) as sup:
        pids = await until_pids(sup, 2)
        sup.process.kill()  # SIGKILL: no signal reaches the workers, only EOF on stdin
        with trio.fail_after(WAIT):
            await sup.process.wait()
        with trio.fail_after(CLOSE_TIMEOUT + 1 + EXIT_SLACK):
            while True:
                if not [pid for pid in pids if _alive(pid)]:
                    break
                await trio.sleep(0.05)
        assert "the supervisor is gone: shutting down" in sup.stderr_text()
