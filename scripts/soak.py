"""The driver behind scripts/soak (run that: it sets up .venv).

Processes: bench/echo_bot.py (the upstream bot), scripts/soak_gateway.py (relay.Gateway
on a generated config, answering "stats" on stdin), and this load generator (trio, raw
sockets): --sessions slots, each running one session after another: connect (a third
with a token from /start), send a 64-byte binary message every 1/--rate s (each carries
its sequence number) for a random 5-60 s, then close cleanly (after every echo is back)
or drop TCP (half of those with a reset). Beside them a /start request every 250 ms.

Checked: every echo comes back in order with no gap (reordered/lost); a clean close gets
every echo before it (lost otherwise); /start answers 200. Phases: warm (10 % of the
time, at least 15 s), drain to idle, baseline; main; drain to idle, final. The final open
fds, trio tasks and RSS of the gateway must be within 5 % of the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from relay.frames import ControlFrame, FrameScanner, Violation, encode_frame  # noqa: E402

PK = "pk_soak_public_key_0123456789"
PAD = b"\x00" * 56
FRAME = 2 + 64  # an echoed message: 2-byte header, 8-byte sequence, 56 bytes of padding
TOLERANCE = 0.05


@attrs.define
class Totals:
    sessions: int = 0
    clean: int = 0
    dropped: int = 0
    sent: int = 0
    echoed: int = 0
    lost: int = 0
    reordered: int = 0
    corrupt: int = 0
    connect_errors: list[str] = attrs.field(factory=list)
    starts: int = 0
    start_errors: list[str] = attrs.field(factory=list)
    active: int = 0
    peak: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http_start(api: int, agent: str) -> tuple[int, dict[str, Any]]:
    body = b'{"transport": "websocket"}'
    stream = await trio.open_tcp_stream("127.0.0.1", api)
    async with stream:
        await stream.send_all(
            f"POST /v1/public/{agent}/start HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {PK}"
            f"\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n".encode() + body)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(rest or b"{}")


class Load:
    def __init__(self, args: argparse.Namespace, ws: int, api: int) -> None:
        self.args = args
        self.ws = ws
        self.api = api
        self.t = Totals()
        self.phase_end = 0.0

    async def start_traffic(self, stop: trio.Event) -> None:
        while not stop.is_set():
            await self.token()
            await trio.sleep(0.25)

    async def token(self) -> str | None:
        try:
            with trio.fail_after(10):
                status, body = await http_start(self.api, "tok")
        except (OSError, trio.TooSlowError, ValueError) as exc:
            self.t.start_errors.append(repr(exc))
            return None
        self.t.starts += 1
        if status != 200:
            self.t.start_errors.append(f"{status} {body}")
            return None
        return str(body["token"])

    async def slot(self, delay: float) -> None:
        await trio.sleep(delay)
        while trio.current_time() < self.phase_end - 1:
            await self.session()

    async def session(self) -> None:
        t = self.t
        path = "/ws/generic/open.local"
        if random.random() < 0.33:
            token = await self.token()
            if token is None:
                await trio.sleep(1)
                return
            path = f"/ws/generic/tok.local/{token}"
        try:
            with trio.fail_after(15):
                stream = await trio.open_tcp_stream("127.0.0.1", self.ws)
                await stream.send_all(
                    f"GET {path} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n"
                    "connection: Upgrade\r\nsec-websocket-version: 13\r\n"
                    "sec-websocket-key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n\r\n".encode())
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        raise OSError("closed during the upgrade")
                    head += chunk
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            t.connect_errors.append(repr(exc))
            await trio.sleep(1)
            return
        head, _, rest = head.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101 "):
            t.connect_errors.append(head.split(b"\r\n")[0].decode(errors="replace"))
            await stream.aclose()
            await trio.sleep(1)
            return
        t.sessions += 1
        t.active += 1
        t.peak = max(t.peak, t.active)
        try:
            await self.relay(stream, rest)
        finally:
            t.active -= 1

    async def relay(self, stream: trio.SocketStream, rest: bytes) -> None:
        t = self.t
        now = trio.current_time()
        duration = min(random.uniform(5, 60), max(1.0, self.phase_end - now))
        clean = random.random() < 0.7
        scanner = FrameScanner(masked=False, max_message_size=1 << 20)
        state = {"sent": 0, "next": 0, "closed": False}
        buf = bytearray()
        lock = trio.Lock()
        all_back = trio.Event()
        stop_sending = trio.Event()

        async def send(data: bytes) -> None:
            async with lock:
                await stream.send_all(data)

        def take(data: bytes | memoryview) -> None:
            for piece in scanner.feed(memoryview(data)):
                if isinstance(piece, ControlFrame):
                    if piece.opcode == 9:
                        pongs.append(piece.payload)
                    elif piece.opcode == 8:
                        state["closed"] = True
                elif isinstance(piece, Violation):
                    t.corrupt += 1
                    state["closed"] = True
                else:
                    buf.extend(piece)
            while len(buf) >= FRAME:
                frame = bytes(buf[:FRAME])
                del buf[:FRAME]
                if frame[:2] != b"\x82\x40":
                    t.corrupt += 1
                    continue
                seq = struct.unpack("!Q", frame[2:10])[0]
                if seq != state["next"]:
                    t.reordered += 1
                state["next"] = seq + 1
                t.echoed += 1
            if stop_sending.is_set() and state["next"] >= state["sent"]:
                all_back.set()

        pongs: list[bytes] = []

        async def receiver() -> None:
            take(rest)
            while not state["closed"]:
                try:
                    chunk = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not chunk:
                    state["closed"] = True
                    return
                take(chunk)
                while pongs:
                    await send(encode_frame(10, pongs.pop(0), mask=True))
            all_back.set()

        async def sender() -> None:
            interval = 1 / self.args.rate
            end = trio.current_time() + duration
            nxt = trio.current_time()
            while trio.current_time() < end and not state["closed"]:
                await send(encode_frame(2, struct.pack("!Q", state["sent"]) + PAD, mask=True))
                state["sent"] += 1
                t.sent += 1
                nxt += interval
                await trio.sleep_until(max(nxt, trio.current_time()))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiver)
                await sender()
                stop_sending.set()
                if clean:
                    if state["next"] >= state["sent"]:
                        all_back.set()
                    with trio.move_on_after(15):
                        await all_back.wait()
                    t.lost += state["sent"] - state["next"]
                    t.clean += 1
                    await send(encode_frame(8, struct.pack("!H", 1000), mask=True))
                    with trio.move_on_after(10):
                        while not state["closed"]:  # noqa: ASYNC110 - set by receiver
                            await trio.sleep(0.05)
                else:
                    t.dropped += 1
                    if random.random() < 0.5:  # a reset rather than a FIN
                        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                 struct.pack("ii", 1, 0))
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            if clean:
                t.lost += state["sent"] - state["next"]
        finally:
            await stream.aclose()

    async def phase(self, seconds: float) -> None:
        self.phase_end = trio.current_time() + seconds
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.start_traffic, stop)
            async with trio.open_nursery() as slots:
                for i in range(self.args.sessions):
                    slots.start_soon(self.slot, i * 5.0 / self.args.sessions)
            stop.set()


class Gateway:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def stats(self) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"stats\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    async def idle(self) -> dict[str, int]:
        """Wait until no connection is left, then settle; the stats."""
        with trio.fail_after(60):
            while (await trio.to_thread.run_sync(self.stats))["connections"]:  # noqa: ASYNC110
                await trio.sleep(0.5)
        await trio.sleep(3)
        return await trio.to_thread.run_sync(self.stats)


def within(before: int, after: int) -> bool:
    return after <= before * (1 + TOLERANCE) + (1 if before < 20 else 0)


async def run(args: argparse.Namespace, gw: Gateway, ws: int, api: int) -> int:
    total = args.minutes * 60
    warm = max(15.0, total * 0.1)
    load = Load(args, ws, api)
    await load.phase(warm)
    base = await gw.idle()
    print(f"soak: warm {warm:.0f} s done, baseline {base}", flush=True)
    main_s = max(1.0, total - warm)
    await load.phase(main_s)
    final = await gw.idle()
    t = load.t
    load1 = os.getloadavg()[0]
    fails = []
    if t.lost or t.reordered or t.corrupt:
        fails.append(f"lost {t.lost}, reordered {t.reordered}, corrupt {t.corrupt}")
    if t.start_errors:
        fails.append(f"/start errors: {t.start_errors[:3]}")
    if t.connect_errors:
        fails.append(f"{len(t.connect_errors)} failed connects: {t.connect_errors[:3]}")
    for key in ("fds", "tasks", "rss"):
        if not within(base[key], final[key]):
            fails.append(f"{key} {base[key]} -> {final[key]} (over 5 %)")
    for line in fails:
        print("soak: FAIL", line, flush=True)
    rate = t.sent / (warm + main_s)  # over the load phases
    print(f"soak: {'ok' if not fails else 'FAILED'} minutes={args.minutes:g} "
          f"sessions={t.sessions} (peak {t.peak} at once, {t.clean} closed, {t.dropped} "
          f"dropped) messages={t.sent} echoed={t.echoed} ({rate:.0f}/s) lost={t.lost} "
          f"reordered={t.reordered} starts={t.starts} fds {base['fds']}->{final['fds']} "
          f"tasks {base['tasks']}->{final['tasks']} rss {base['rss'] / 2**20:.1f}->"
          f"{final['rss'] / 2**20:.1f} MiB ({(final['rss'] / base['rss'] - 1) * 100:+.1f} %) "
          f"load {load1:.1f}", flush=True)
    return 1 if fails else 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="scripts/soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--sessions", type=int, default=300)
    ap.add_argument("--rate", type=float, default=50.0, help="messages/s per session")
    args = ap.parse_args()
    if args.minutes <= 0 or args.sessions <= 0 or args.rate <= 0:
        ap.error("--minutes, --sessions and --rate must be positive")
    tmp = Path(tempfile.mkdtemp(prefix="relay-soak-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        port_file = tmp / "bot.port"
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "echo_bot.py"), "--port-file",
             str(port_file)], stdout=subprocess.DEVNULL))
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline:
                print("soak: the echo bot did not start", file=sys.stderr)
                return 2
            time.sleep(0.05)
        bot = int(port_file.read_text())
        ws, api = free_port(), free_port()
        config = tmp / "relay.toml"
        config.write_text(
            f'[server]\nws_bind = ["127.0.0.1:{ws}"]\napi_bind = ["127.0.0.1:{api}"]\n'
            f'public_keys = ["{PK}"]\n'
            f'[agents.open]\nbot = "ws://127.0.0.1:{bot}/"\nmax_clients = 100000\n'
            f'[agents.tok]\nbot = "ws://127.0.0.1:{bot}/"\nmax_clients = 100000\n'
            'websocket_auth = "token"\n')
        env = dict(os.environ, RELAY_SECRET="k1:" + os.urandom(32).hex())
        err = open(tmp / "gateway.err", "wb")  # noqa: SIM115 - kept open for the child
        gw_proc = subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "soak_gateway.py"), str(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
        procs.append(gw_proc)
        assert gw_proc.stdout is not None
        if gw_proc.stdout.readline().strip() != b"ready":
            print("soak: the gateway did not start; see", tmp / "gateway.err", file=sys.stderr)
            return 2
        code = trio.run(run, args, Gateway(gw_proc), ws, api)
        gw_proc.send_signal(signal.SIGTERM)
        if gw_proc.wait(timeout=30) != 0:
            print(f"soak: FAIL the gateway exited {gw_proc.returncode}; see "
                  f"{tmp / 'gateway.err'}", flush=True)
            code = 1
        return code
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()  # by PID
                proc.wait()


if __name__ == "__main__":
    sys.exit(main())
