"""relay.client against `relay serve` as a real process: echo, a gateway restart, a killed
bot, attempts running out, a bad public key.

Real time is inherent here: readiness is the process's ready line under an overall bound
(tests/processes.py), and reconnection policies use small delays with overall bounds
(``trio.fail_after``). The config is written by the test; `RELAY_SECRET` is set so a
restarted gateway verifies the same tokens. relay.client follows the wsUrl that /start
answers, so public_url must name the real ws port before the first start: that port is
picked by binding port 0 and closing (a start that loses it to another process is tried
again on a new one); the API binds port 0. A restart reuses the ports of the first start.
Every process started here is stopped by PID in a `finally`.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
from ports import free_port
from processes import NotReady, relay_serve
from support import BotServer, bot_server
from trio_websocket import WebSocketConnection

import relay.client
from relay.client import (
    ConnectionLost,
    Reconnect,
    Reconnected,
    ReconnectFailed,
    StartError,
)

PK = "pk_process_test"
SECRET = "k1:" + "s" * 40
START_ATTEMPTS = 3  # first starts, in case the picked ws port was taken in the meantime
FAST = Reconnect(attempts=200, first_delay=0.1, factor=1.5, max_delay=0.5, jitter=0.25,
                 give_up_after=40)


@attrs.define
class Gateway:
    """One `relay serve` process at a time, restartable on the ports of its first start."""

    tmp_path: Path
    bot: str
    stack: AsyncExitStack
    ws_port: int = 0  # 0 until the first start
    api_port: int = 0
    process: trio.Process | None = None
    runs: int = 0
    agent: str = "demo"  # the agent the config file declares

    @property
    def start_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/v1/public/demo/start"

    def stderr(self) -> str:
        return "".join(p.read_text(errors="replace")
                       for p in sorted(self.tmp_path.glob("stderr-*.txt")))

    async def start(self) -> None:
        if self.ws_port:
            await self._start(self.ws_port, self.api_port)
            return
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                await self._start(free_port(), 0)
                return
            except NotReady as error:
                if error.status != 2 or attempt == START_ATTEMPTS:  # 2: a bind failed
                    raise

    async def _start(self, ws_port: int, api_port: int) -> None:
        config = self.tmp_path / "relay.toml"
        config.write_text(
            "[server]\n"
            f'ws_bind = ["127.0.0.1:{ws_port}"]\n'
            f'api_bind = ["127.0.0.1:{api_port}"]\n'
            f'public_url = "ws://127.0.0.1:{ws_port}"\n'
            f'public_keys = ["{PK}"]\n'
            "close_timeout = 1\n"
            f"[agents.{self.agent}]\n"
            f'bot = "{self.bot}"\n'
            'websocket_auth = "token"\n'
            'bot_protocol = "pipecat-cloud"\n', encoding="utf-8")
        self.runs += 1
        served = await self.stack.enter_async_context(relay_serve(
            config, self.tmp_path / f"stderr-{self.runs}.txt",
            env={**os.environ, "RELAY_SECRET": SECRET}))
        assert served.ws_port == ws_port, (served.ws_port, ws_port)
        self.process, self.ws_port, self.api_port = (
            served.process, served.ws_port, served.api_port)

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        process = self.process
        assert process is not None
        process.send_signal(signum)
        with trio.fail_after(10):
            return await process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            try:
                self.process.kill()  # this process's PID only
            except ProcessLookupError:
                pass


@asynccontextmanager
async def served(tmp_path: Path, bot: str = "python:relay.echo:echo_bot"
                 ) -> AsyncIterator[Gateway]:
    async with AsyncExitStack() as stack:  # stops every process started, by PID
        gateway = Gateway(tmp_path, bot, stack)
        await gateway.start()
        yield gateway


async def upgrade_answer(port: int, path: str) -> bytes:
    """The whole HTTP answer to one upgrade request (a refusal closes the connection)."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nupgrade: websocket\r\n"
                "connection: Upgrade\r\nsec-websocket-version: 13\r\n"
                "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
            data = b""
            while chunk := await stream.receive_some(4096):
                data += chunk
    return data


async def metric(port: int, line_start: str) -> str:
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    return "\n".join(line for line in data.decode().splitlines() if line.startswith(line_start))


class Events:
    def __init__(self) -> None:
        self.seen: list[relay.client.Event] = []
        self.lost = trio.Event()
        self.reconnected = trio.Event()

    def __call__(self, event: relay.client.Event) -> None:
        self.seen.append(event)
        if isinstance(event, ConnectionLost):
            self.lost.set()
        elif isinstance(event, Reconnected):
            self.reconnected.set()


async def test_echo_through_start_on_a_real_gateway(tmp_path: Path) -> None:
    async with served(tmp_path) as gw:
        with trio.fail_after(20):
            async with relay.client.connect(gw.start_url, PK, body={"caller": "x"}) as session:
                await session.send("hello")
                assert await session.receive() == "hello"
                await session.send(b"\xff" * 70_000)
                assert await session.receive() == b"\xff" * 70_000


async def test_gateway_restart_mid_session_the_same_session_works_with_a_new_token(
        tmp_path: Path) -> None:
    events = Events()
    async with served(tmp_path) as gw:
        with trio.fail_after(60):
            async with relay.client.connect(gw.start_url, PK, reconnect=FAST,
                                            on_event=events) as session:
                await session.send("before")
                assert await session.receive() == "before"
                first_token = session.token
                assert await gw.stop(signal.SIGTERM) == 0, gw.stderr()
                await events.lost.wait()
                await gw.start()  # the same ports, the same key material
                await events.reconnected.wait()
                await session.send("after")
                assert await session.receive() == "after"
                assert session.token != first_token and session.reconnects == 1
                # The new connection's token is spent on this gateway: refused if replayed.
                answer = await upgrade_answer(gw.ws_port,
                                              f"/ws/generic/demo.local/{session.token}")
                assert answer.startswith(b"HTTP/1.1 403 ") and b'"replayed"' in answer
        lost = events.seen[0]
        assert isinstance(lost, ConnectionLost) and lost.code == 1001
        assert isinstance(events.seen[-1], Reconnected)
        assert "Traceback" not in gw.stderr()


async def vanish_on_die(ws: WebSocketConnection, bot: BotServer) -> None:
    while True:
        message = await ws.get_message()
        if message == "die":
            await ws._stream.aclose()  # the bot's TCP connection drops: a killed bot
            return
        await ws.send_message(message)


async def test_killed_bot_is_1014_and_the_first_token_is_refused_when_replayed(
        tmp_path: Path) -> None:
    events = Events()
    async with bot_server(vanish_on_die) as bot, served(tmp_path, bot.url) as gw:
        with trio.fail_after(30):
            async with relay.client.connect(gw.start_url, PK, reconnect=FAST,
                                            token_in="path", on_event=events) as session:
                await session.send("one")
                assert await session.receive() == "one"
                first_token = session.token
                await session.send("die")
                await events.reconnected.wait()
                await session.send("two")
                assert await session.receive() == "two"
                answer = await upgrade_answer(gw.ws_port, f"/ws/generic/demo.local/{first_token}")
                assert answer.startswith(b"HTTP/1.1 403 ") and b'"replayed"' in answer
        lost = events.seen[0]
        assert isinstance(lost, ConnectionLost)
        assert (lost.code, lost.reason) == (1014, "bad gateway")


async def test_gateway_gone_for_good_attempts_run_out_with_a_clear_error(
        tmp_path: Path) -> None:
    policy = Reconnect(attempts=3, first_delay=0.05, factor=2, jitter=0, give_up_after=20)
    async with served(tmp_path) as gw:
        with trio.fail_after(30):
            async with relay.client.connect(gw.start_url, PK, reconnect=policy) as session:
                await session.send("x")
                assert await session.receive() == "x"
                gw.kill()  # SIGKILL: no close frame, the TCP connection just ends
                with pytest.raises(ReconnectFailed) as failed:
                    await session.receive()
    assert failed.value.code == 1006 and failed.value.attempts == 3
    assert isinstance(failed.value.last_error, StartError)
    assert failed.value.last_error.code == "unreachable"
    assert "not reconnected after 3 attempt(s)" in str(failed.value)


async def test_bad_public_key_is_401_at_once_without_a_retry_loop(tmp_path: Path) -> None:
    async with served(tmp_path) as gw:
        with trio.fail_after(20):
            with pytest.raises(StartError) as refused:
                async with relay.client.connect(gw.start_url, "pk_not_this_one", reconnect=FAST):
                    pass
            assert (refused.value.status, refused.value.code) == (401, "unauthorized")
            counted = await metric(gw.api_port, "relay_start_requests_total")
        assert counted == 'relay_start_requests_total{status="401"} 1.0'


async def test_a_try_refused_for_good_ends_the_reconnect_at_once(tmp_path: Path) -> None:
    events = Events()
    async with served(tmp_path) as gw:
        with trio.fail_after(60):
            async with relay.client.connect(gw.start_url, PK, reconnect=FAST,
                                            on_event=events) as session:
                await session.send("x")
                assert await session.receive() == "x"
                assert await gw.stop(signal.SIGTERM) == 0
                await events.lost.wait()
                gw.agent = "renamed"  # the restarted gateway no longer has our agent: 404
                await gw.start()
                with pytest.raises(ReconnectFailed) as failed:
                    await session.receive()
    assert isinstance(failed.value.last_error, StartError)
    assert (failed.value.last_error.status, failed.value.last_error.code) == (
        404, "agent_not_found")
    assert "refused" in str(failed.value) and failed.value.code == 1001
    tries = [e for e in events.seen if isinstance(e, relay.client.AttemptFailed)]
    assert tries[-1].error is failed.value.last_error and not tries[-1].retrying
    assert all(isinstance(t.error, StartError) and t.error.code == "unreachable" and t.retrying
               for t in tries[:-1])
    assert failed.value.attempts == len(tries)
