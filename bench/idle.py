#!/usr/bin/env python3
"""RSS per idle session and session set-ups per second, for a running target.

Reads the target's resident memory (VmRSS, children included) with no session open,
opens N WebSocket sessions (real HTTP/1.1 upgrades, at most --inflight handshakes at a
time, each answered 101 before the next starts on that slot), waits until the RSS
settles, reads it again and prints one JSON line:

  {"label": ..., "sessions": N, "rss0_kib": ..., "rss1_kib": ...,
   "kib_per_session": (rss1 - rss0) / N, "setups_per_s": N / time to open all,
   "cpu_us_per_setup": the target's CPU (utime+stime, 10 ms ticks) while opening / N}

Then it closes every session (close 1000) and exits. Loopback only.

With --bot-port P it is also the upstream echo bot on 127.0.0.1:P, in its own epoll
loop (echo_bot.EchoServer), so the harness core holds one process, not two.

Usage: idle.py --url ws://127.0.0.1:PORT/path --pid PID[,PID] [--sessions 1000]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import select
import socket
import struct
import sys
import time
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from echo_bot import EchoServer, listen
from loadgen import expand_children, read_cpu_ticks, read_rss_kib


def serve_for(ep: select.epoll, bot: EchoServer | None, seconds: float) -> None:
    """Wait `seconds`, answering the bot's connections meanwhile (if we are the bot)."""
    if bot is None:
        time.sleep(seconds)
        return
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        for fd, ev in ep.poll(left):
            bot.handle(fd, ev)


def settle(pids: list[int], ep: select.epoll, bot: EchoServer | None, limit: float = 5.0) -> int:
    """RSS once two reads 0.3 s apart agree within 64 KiB (or after `limit` seconds)."""
    last = read_rss_kib(expand_children(pids))
    end = time.monotonic() + limit
    while time.monotonic() < end:
        serve_for(ep, bot, 0.3)
        now = read_rss_kib(expand_children(pids))
        if abs(now - last) <= 64:
            return now
        last = now
    return last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--pid", required=True, help="target PID(s), comma-separated")
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--inflight", type=int, default=32, help="concurrent handshakes")
    ap.add_argument("--timeout", type=float, default=60.0, help="for all set-ups, s")
    ap.add_argument("--label", default="")
    ap.add_argument("--bot-port", type=int, default=0, help="also be the echo bot on this port")
    args = ap.parse_args()
    u = urlsplit(args.url)
    if u.scheme != "ws" or u.hostname not in ("127.0.0.1", "localhost"):
        ap.error("only ws:// loopback URLs")
    addr = (u.hostname, u.port or 80)
    path = (u.path or "/") + (("?" + u.query) if u.query else "")
    pids = [int(p) for p in args.pid.split(",") if p.strip()]

    ep = select.epoll()
    bot = EchoServer(ep, listen("127.0.0.1", args.bot_port)) if args.bot_port else None
    rss0 = settle(pids, ep, bot)
    key = base64.b64encode(os.urandom(16))
    request = (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + f"{addr[0]}:{addr[1]}".encode()
               + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key
               + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    open_socks: list[socket.socket] = []
    waiting: dict[int, tuple[socket.socket, bytearray]] = {}
    started = failed = 0
    targets = expand_children(pids)
    ticks0 = read_cpu_ticks(targets)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    deadline = t0 + args.timeout
    while (len(open_socks) + failed < args.sessions) and time.monotonic() < deadline:
        while started < args.sessions and len(waiting) < args.inflight:
            s = socket.create_connection(addr)
            s.sendall(request)
            s.setblocking(False)
            ep.register(s.fileno(), select.EPOLLIN)
            waiting[s.fileno()] = (s, bytearray())
            started += 1
        for fd, ev in ep.poll(0.5):
            if fd not in waiting:
                if bot is not None:
                    bot.handle(fd, ev)
                continue
            s, head = waiting[fd]
            try:
                chunk = s.recv(4096)
            except BlockingIOError:
                continue
            head += chunk
            if b"\r\n\r\n" in head or not chunk:
                ep.unregister(fd)
                del waiting[fd]
                if head.startswith(b"HTTP/1.1 101"):
                    open_socks.append(s)
                else:
                    failed += 1
                    s.close()
    elapsed = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    own_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    setup_cpu_s = (read_cpu_ticks(targets) - ticks0) / os.sysconf("SC_CLK_TCK")
    rss1 = settle(pids, ep, bot)
    n = len(open_socks)
    print(json.dumps({
        "label": args.label, "sessions": n, "failed": failed + len(waiting),
        "rss0_kib": rss0, "rss1_kib": rss1,
        "kib_per_session": round((rss1 - rss0) / n, 1) if n else None,
        "setups_per_s": round(n / elapsed, 1) if elapsed > 0 else None,
        "cpu_us_per_setup": round(setup_cpu_s / n * 1e6) if n else None,
                # This harness (and the bot, with --bot-port) near 100 %: the rate is ours.
                "harness_cpu_pct": round(100 * own_s / elapsed, 1) if elapsed > 0 else None,
    }), flush=True)
    close = struct.pack("!BB", 0x88, 0x82) + b"\0\0\0\0" + struct.pack("!H", 1000)
    for s in open_socks:
        try:
            s.send(close)
        except OSError:
            pass
    serve_for(ep, bot, 0.5)
    for s in open_socks:
        s.close()
    if bot is not None:
        serve_for(ep, bot, 0.2)
        bot.close()
    return 0 if n == args.sessions else 1


if __name__ == "__main__":
    raise SystemExit(main())
