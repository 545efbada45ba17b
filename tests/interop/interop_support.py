"""Interop harness: `relay serve`, Pipecat bots and Pipecat clients as real processes.

The Pipecat side runs in its own venv, `.venv-interop` (pinned in requirements.txt beside
this file, installed by `scripts/test`), so the core install stays light; the scripts it
runs live in `bots/`. Each process listens on loopback only (bots bind port 0 and report
the port; relay binds port 0 and its ports are read from its ready line, tests/processes.py)
and is stopped by its PID in a `finally`. A bot or client reports to the test as JSON
lines on stdout; its stderr (Pipecat's log) goes to a file whose tail is shown when
something fails.

Real processes mean real time. Every wait is bounded, generously for a loaded 2-core
machine (importing Pipecat takes about 4 s on an idle one), and ends on an event: a
reported line, a process that exits. Nothing sleeps to let time pass.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import pytest
import trio
from processes import relay_serve as serve
from processes import tail
from support import http
from trio_websocket import WebSocketConnection, wrap_client_stream

ROOT = Path(__file__).resolve().parents[2]
BOTS = Path(__file__).resolve().parent / "bots"
START_BOUND = 90.0  # seconds for a process to import Pipecat or relay and listen
CALL_BOUND = 120.0  # seconds for one whole exchange, start-up of the client included
CLOSE_BOUND = 5.0  # seconds for a client's closing handshake
PUBLIC_KEY = "pk_interop"
PUBLIC_URL = "ws://relay.interop.test"  # relay's public_url: Relay.start puts ws_base in
SECRET = "k1:interop-secret-of-at-least-thirty-two-bytes"


def interop_python() -> Path:
    """.venv-interop's Python; a clear failure (never a skip) when it is missing."""
    configured = os.environ.get("RELAY_INTEROP_PYTHON")
    path = Path(configured) if configured else ROOT / ".venv-interop" / "bin" / "python"
    if not path.exists():
        pytest.fail(
            f"the interop tests run real Pipecat with {path}, which does not exist: "
            "`bash scripts/test` creates .venv-interop and installs the pinned "
            "tests/interop/requirements.txt into it", pytrace=False)
    return path


def kill(process: trio.Process) -> None:
    if process.returncode is None:
        try:
            process.kill()  # this PID only
        except ProcessLookupError:
            pass


@attrs.define
class Reporter:
    """A bot or client process and the JSON lines it has reported on stdout."""

    name: str
    process: trio.Process
    stderr: Path
    events: list[dict[str, Any]] = attrs.field(factory=list)
    _buffer: bytearray = attrs.field(factory=bytearray)

    def failure(self, what: str) -> str:
        return (f"{self.name} {what} (exit status {self.process.returncode}); "
                f"reported {self.events}; its stderr ends:\n{tail(self.stderr)}")

    async def next_event(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        while True:
            line, newline, rest = bytes(self._buffer).partition(b"\n")
            if newline:
                self._buffer[:] = rest
                try:
                    event = json.loads(line)
                except ValueError:
                    continue  # something else printed to stdout; not a report
                self.events.append(event)
                return dict(event)
            chunk = await self.process.stdout.receive_some(65_536)
            if not chunk:
                await self.process.wait()
                raise AssertionError(self.failure("ended its output"))
            self._buffer += chunk

    async def wait_for(self, event: str) -> dict[str, Any]:
        """The next report named event (earlier reports are kept in self.events)."""
        while True:
            reported = await self.next_event()
            if reported["event"] == event:
                return reported


@asynccontextmanager
async def reporter(name: str, script: str, *args: str, tmp_path: Path) -> AsyncIterator[Reporter]:
    """Run bots/{script} with .venv-interop's Python; kill it by PID on the way out."""
    python = interop_python()
    stderr = tmp_path / f"{name}.stderr.txt"
    env = {**os.environ, "LOGURU_LEVEL": "INFO", "PYTHONDONTWRITEBYTECODE": "1"}
    with stderr.open("wb") as err:
        process = await trio.lowlevel.open_process(
            [str(python), str(BOTS / script), *args], cwd=str(BOTS), env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
    try:
        yield Reporter(name, process, stderr)
    finally:
        kill(process)
        with trio.move_on_after(10):
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


@asynccontextmanager
async def bot(script: str, tmp_path: Path) -> AsyncIterator[tuple[Reporter, int]]:
    """A bot from bots/ listening on loopback: (its reporter, its port)."""
    async with reporter(Path(script).stem, script, tmp_path=tmp_path) as proc:
        with trio.fail_after(START_BOUND):
            listening = await proc.wait_for("listening")
        yield proc, int(listening["port"])


@attrs.define
class Relay:
    process: trio.Process
    ws_port: int
    api_port: int
    stderr: Path

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}"

    async def start(self, agent: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/public/{agent}/start; the JSON answer (asserting 200).

        relay's ws port is not known when its config is written, so its public_url is
        PUBLIC_URL; the answer's wsUrl must start with it, and has it replaced by ws_base.
        """
        status, _, body = await http(
            "127.0.0.1", self.api_port, "POST", f"/v1/public/{agent}/start",
            headers=[("authorization", f"Bearer {PUBLIC_KEY}"),
                     ("content-type", "application/json")],
            body=json.dumps(payload).encode())
        assert status == 200, f"/start answered {status}: {body!r}"
        answer: dict[str, Any] = json.loads(body)
        if "wsUrl" in answer:
            ws_url = answer["wsUrl"]
            assert ws_url.startswith(PUBLIC_URL + "/"), ws_url
            answer["wsUrl"] = self.ws_base + ws_url.removeprefix(PUBLIC_URL)
        return answer


def relay_config(agents: dict[str, dict[str, Any]]) -> str:
    lines = [
        "[server]",
        'ws_bind = ["127.0.0.1:0"]',
        'api_bind = ["127.0.0.1:0"]',
        f'public_url = "{PUBLIC_URL}"',
        f"public_keys = [{json.dumps(PUBLIC_KEY)}]",
        'secret_env = "RELAY_SECRET"',
        "close_timeout = 1",
    ]
    for name, keys in agents.items():
        lines.append(f"[agents.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


@asynccontextmanager
async def relay_serve(tmp_path: Path, agents: dict[str, dict[str, Any]]) -> AsyncIterator[Relay]:
    """`relay serve --config` (the core venv's relay) with these agents, on loopback."""
    config = tmp_path / "relay.toml"
    config.write_text(relay_config(agents), encoding="utf-8")
    async with serve(config, tmp_path / "relay.stderr.txt",
                     env={**os.environ, "RELAY_SECRET": SECRET},
                     start_bound=START_BOUND) as served:
        yield Relay(served.process, served.ws_port, served.api_port, served.stderr)


@asynccontextmanager
async def open_ws(url: str, extra_headers: list[tuple[bytes, bytes]] | None = None,
                  ) -> AsyncIterator[WebSocketConnection]:
    """A trio-websocket client on a TCP stream this harness owns and always closes.

    `open_websocket_url` leaves the socket of a refused handshake to the garbage
    collector, and its ResourceWarning then fails whichever test is running when it is
    collected; here the stream is closed on the way out, refused or not.
    """
    parts = urlsplit(url)
    assert parts.scheme == "ws" and parts.hostname and parts.port, url
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, f"{parts.hostname}:{parts.port}",
                                          resource, extra_headers=extra_headers)
            try:
                yield ws
            finally:
                with trio.move_on_after(CLOSE_BOUND, shield=True):
                    await ws.aclose()
    finally:
        with trio.move_on_after(CLOSE_BOUND, shield=True):
            await stream.aclose()


# --------------------------------------------------------------------------------------
# Signals: a tone, G.711 mu-law, correlation
# --------------------------------------------------------------------------------------


def tone(frequency: float, seconds: float, rate: int, amplitude: int = 12_000) -> list[int]:
    n = round(seconds * rate)
    return [round(amplitude * math.sin(2 * math.pi * frequency * i / rate)) for i in range(n)]


def pcm16(samples: list[int]) -> bytes:
    return struct.pack(f"<{len(samples)}h", *samples)


def samples16(data: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(data) // 2}h", data[: len(data) // 2 * 2]))


def correlation(a: list[int], b: list[int]) -> float:
    """Normalised cross-correlation at lag 0 over the common length."""
    n = min(len(a), len(b))
    dot = sum(a[i] * b[i] for i in range(n))
    energy = math.sqrt(sum(x * x for x in a[:n]) * sum(y * y for y in b[:n]))
    return dot / energy if energy else 0.0


def first_difference(sent: bytes, received: bytes, chunk: int) -> str | None:
    """Which chunk first differs (for a readable failure), or None when identical."""
    for i in range(0, max(len(sent), len(received)), chunk):
        if sent[i:i + chunk] != received[i:i + chunk]:
            return (f"chunk {i // chunk} (bytes {i}..{i + chunk}) differs; "
                    f"sent {len(sent)} bytes, received {len(received)}")
    return None


_ULAW_BIAS = 0x84
_ULAW_CLIP = 32_635


def ulaw_encode(samples: list[int]) -> bytes:
    """G.711 mu-law, as Twilio carries audio (audioop is deprecated, so by hand)."""
    out = bytearray()
    for sample in samples:
        sign = 0x80 if sample < 0 else 0
        magnitude = min(abs(sample), _ULAW_CLIP) + _ULAW_BIAS
        exponent = 7
        while exponent > 0 and not magnitude & (0x80 << exponent):
            exponent -= 1
        mantissa = (magnitude >> (exponent + 3)) & 0x0F
        out.append(~(sign | exponent << 4 | mantissa) & 0xFF)
    return bytes(out)


def ulaw_decode(data: bytes) -> list[int]:
    out = []
    for byte in data:
        byte = ~byte & 0xFF
        magnitude = (((byte & 0x0F) << 3) + _ULAW_BIAS << ((byte >> 4) & 0x07)) - _ULAW_BIAS
        out.append(-magnitude if byte & 0x80 else magnitude)
    return out
