#!/usr/bin/env python3
"""WebSocket load generator for `scripts/bench`: many sessions, paced binary echo traffic.

One process, raw non-blocking sockets on epoll, no WebSocket library per message:
every session gets one random masking key, the 304 filler bytes of its frames are
masked once up front, and per message only the 16-byte prefix
(session id u32, sequence u32, send time u64 ns, little endian) is masked and
glued in front. Echoed frames are walked in place: the prefix gives the RTT and
the sequence (loss / reorder detection), the filler is compared for corruption.

Phases: ramp (at most --ramp-rate new sessions/s, --ramp-inflight handshakes at
a time), warmup, measure (--duration s), drain (wait for the outstanding echoes),
close (close frame 1000, wait for the reply). Every session sends one message per
1/--rate s; the N sessions are phase-shifted evenly over that period.

With --bot-port P it is also the upstream echo bot: it listens on 127.0.0.1:P and
serves the target's connections to the bot in the same epoll loop (echo_bot.EchoServer),
so the harness core runs one process instead of two that time-share it.

During the measure window it samples utime+stime of the processes given with
--cpu-pid NAME=PID[,PID...] (children included) from /proc/<pid>/stat.

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import base64
import errno
import hashlib
import json
import os
import resource
import select
import socket
import struct
import sys
import time
from array import array
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from echo_bot import EchoServer, listen

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PREFIX = struct.Struct("<IIQ")  # session id, sequence, send time (monotonic ns)
EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERRS = select.EPOLLERR | select.EPOLLHUP
CLK_TCK = os.sysconf("SC_CLK_TCK")
mono = time.monotonic_ns

CONNECTING, HANDSHAKE, OPEN, CLOSING, DONE, FAILED = range(6)


class Session:
    __slots__ = (
        "accept",
        "close_seen",
        "expect",
        "fd",
        "filler",
        "hdr",
        "m16",
        "rbuf",
        "received",
        "reorder",
        "sent",
        "seq",
        "sid",
        "sock",
        "state",
        "t_start",
        "wbuf",
    )

    def __init__(self, sid: int, size: int, filler_plain: bytes) -> None:
        self.sid = sid
        self.sock: socket.socket | None = None
        self.fd = -1
        self.state = CONNECTING
        mask = os.urandom(4)
        n = size
        if n < 126:
            self.hdr = bytes((0x82, 0x80 | n)) + mask
        elif n < 65536:
            self.hdr = bytes((0x82, 0xFE, n >> 8, n & 0xFF)) + mask
        else:
            self.hdr = bytes((0x82, 0xFF)) + n.to_bytes(8, "big") + mask
        rep = mask * ((n + 3) // 4)
        self.m16 = int.from_bytes(rep[:16], "little")
        # Filler starts at payload offset 16, a multiple of 4, so the mask phase is 0.
        tail = filler_plain
        self.filler = (
            (int.from_bytes(tail, "little") ^ int.from_bytes(rep[16:n], "little")).to_bytes(
                len(tail), "little"
            )
            if tail
            else b""
        )
        self.rbuf = b""
        self.wbuf = b""
        self.seq = 0
        self.expect = 0
        self.sent = 0
        self.received = 0
        self.reorder = 0
        self.close_seen = False
        self.accept = b""
        self.t_start = 0


def read_cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        except (OSError, IndexError, ValueError):
            pass
    return total


def read_rss_kib(pids: list[int]) -> int:
    """Resident memory (VmRSS) of the processes, summed, in KiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            pass
    return total


def read_core_times() -> dict[str, tuple[int, int]]:
    """Per CPU line of /proc/stat: (busy ticks, total ticks); busy excludes idle + iowait."""
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu"):
                    break
                name, *vals = line.split()
                v = [int(x) for x in vals[:8]]
                total = sum(v)
                out["all" if name == "cpu" else name] = (total - v[3] - v[4], total)
    except OSError:
        pass
    return out


def expand_children(pids: list[int]) -> list[int]:
    out: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(int(x) for x in f.read().split())
        except OSError:
            pass
    return out


def pct(sorted_vals: array, q: float) -> float | None:
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i] / 1e6  # ns -> ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="ws://127.0.0.1:PORT/path")
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--rate", type=float, default=50.0, help="messages/s per session")
    ap.add_argument("--size", type=int, default=320, help="binary message size (>= 16)")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=10.0, help="measure window, s")
    ap.add_argument("--drain", type=float, default=3.0, help="max wait for echoes after sending")
    ap.add_argument("--ramp-rate", type=float, default=250.0, help="new sessions per second")
    ap.add_argument("--ramp-inflight", type=int, default=32, help="concurrent handshakes")
    ap.add_argument("--connect-timeout", type=float, default=10.0)
    ap.add_argument("--p50-limit", type=float, default=5.0, help="keeps-up RTT p50 bound, ms")
    ap.add_argument("--cpu-pid", action="append", default=[], metavar="NAME=PID[,PID]")
    ap.add_argument(
        "--tick-us",
        type=float,
        default=0.0,
        help="0: event driven; >0: wake at most every T us and batch (cheaper, RTT +<=T)",
    )
    ap.add_argument("--label", default="")
    ap.add_argument(
        "--bot-port",
        type=int,
        default=0,
        help="also be the upstream echo bot on 127.0.0.1:PORT (same process, same loop)",
    )
    args = ap.parse_args()
    if args.size < 16:
        ap.error("--size must be >= 16")

    u = urlsplit(args.url)
    if u.scheme != "ws":
        ap.error("only ws:// URLs")
    host = u.hostname or "127.0.0.1"
    port = u.port or 80
    path = (u.path or "/") + (("?" + u.query) if u.query else "")
    hostport = f"{host}:{port}".encode()
    addr = (host, port)

    cpu_targets: dict[str, list[int]] = {}
    for spec in args.cpu_pid:
        name, _, pids = spec.partition("=")
        cpu_targets[name] = [int(p) for p in pids.split(",") if p.strip()]

    N = args.sessions
    size = args.size
    filler_plain = bytes((i * 7 + 3) & 0xFF for i in range(size - 16))
    sessions = [Session(i, size, filler_plain) for i in range(N)]
    fd2s: dict[int, Session] = {}
    ep = select.epoll()
    bot = EchoServer(ep, listen("127.0.0.1", args.bot_port)) if args.bot_port else None
    errors: dict[str, int] = {}

    def note_error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    def fail(s: Session, kind: str) -> None:
        note_error(kind)
        kill(s, FAILED)

    def kill(s: Session, state: int) -> None:
        if s.sock is not None:
            try:
                ep.unregister(s.fd)
            except (OSError, ValueError):
                pass
            fd2s.pop(s.fd, None)
            s.sock.close()
            s.sock = None
        s.state = state

    # ---------------------------------------------------------------- ramp
    def start_connect(s: Session) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sock = sock
        s.fd = sock.fileno()
        s.t_start = mono()
        fd2s[s.fd] = s
        rc = sock.connect_ex(addr)
        if rc not in (0, errno.EINPROGRESS):
            fail(s, f"connect:{errno.errorcode.get(rc, rc)}")
            return
        ep.register(s.fd, EPOLLOUT | EPOLLIN)

    def on_connected(s: Session) -> None:
        err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            fail(s, f"connect:{errno.errorcode.get(err, err)}")
            return
        key = base64.b64encode(os.urandom(16))
        s.accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        req = (
            b"GET "
            + path.encode()
            + b" HTTP/1.1\r\nHost: "
            + hostport
            + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
            + key
            + b"\r\nSec-WebSocket-Version: 13\r\nUser-Agent: relay-bench-loadgen\r\n\r\n"
        )
        try:
            s.sock.send(req)  # small: fits the empty send buffer
        except OSError as e:
            fail(s, f"send:{errno.errorcode.get(e.errno, e.errno)}")
            return
        s.state = HANDSHAKE
        ep.modify(s.fd, EPOLLIN)

    def on_handshake_data(s: Session) -> None:
        try:
            data = s.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            fail(s, f"recv:{errno.errorcode.get(e.errno, e.errno)}")
            return
        if not data:
            fail(s, "eof-during-handshake")
            return
        s.rbuf += data
        end = s.rbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(s.rbuf) > 65536:
                fail(s, "handshake-too-long")
            return
        head = s.rbuf[:end].split(b"\r\n")
        rest = s.rbuf[end + 4 :]
        status = head[0].split(b" ", 2)
        if len(status) < 2 or status[1] != b"101":
            fail(s, "http-" + (status[1].decode(errors="replace") if len(status) > 1 else "?"))
            return
        ok = False
        for line in head[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-accept" and value.strip() == s.accept:
                ok = True
        if not ok:
            fail(s, "bad-accept")
            return
        s.rbuf = rest
        s.state = OPEN

    t_ramp0 = mono()
    ramp_interval = 1e9 / args.ramp_rate if args.ramp_rate > 0 else 0
    next_idx = 0
    connect_deadline_ns = int(args.connect_timeout * 1e9)
    while True:
        now = mono()
        inflight = 0
        pending_left = False
        for s in sessions[:next_idx]:
            if s.state in (CONNECTING, HANDSHAKE):
                if now - s.t_start > connect_deadline_ns:
                    fail(s, "handshake-timeout")
                else:
                    inflight += 1
        allowed = N if not ramp_interval else int((now - t_ramp0) / ramp_interval) + 1
        while next_idx < min(N, allowed) and inflight < args.ramp_inflight:
            start_connect(sessions[next_idx])
            next_idx += 1
            inflight += 1
        pending_left = next_idx < N or inflight > 0
        if not pending_left:
            break
        for fd, ev in ep.poll(0.005):
            s = fd2s.get(fd)
            if s is None:
                if bot is not None:
                    bot.handle(fd, ev)
                continue
            if s.state == CONNECTING:
                if ev & (EPOLLOUT | EPOLLERRS):
                    on_connected(s)
            elif s.state == HANDSHAKE:
                on_handshake_data(s)
            elif s.state == OPEN:
                # No traffic yet; a readable socket now means EOF or an unexpected frame.
                try:
                    data = s.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    fail(s, "closed-before-traffic")
                else:
                    s.rbuf += data
    t_ramp = (mono() - t_ramp0) / 1e9

    live = [s for s in sessions if s.state == OPEN]
    for s in live:
        ep.modify(s.fd, EPOLLIN)
    n_live = len(live)

    # ------------------------------------------------------- pace / measure
    rtts = array("q")
    stats = {
        "sent": 0,
        "recv": 0,
        "sent_win": 0,
        "recv_win": 0,  # echoes that arrived inside the window (any send time)
        "corrupt": 0,
        "backlogged_sends": 0,
        "pongs": 0,
        "closed_during_run": 0,
    }
    big_lags = 0
    max_lag_ns = 0
    cpu0: dict[str, int] = {}
    cpu1: dict[str, int] = {}
    rss1: dict[str, int] = {}
    pid_sets: dict[str, list[int]] = {}
    ru0 = ru1 = None
    t_ws = t_we = 0
    win_t0 = win_t1 = 0
    polls_win = [0, 0]
    core0: dict[str, tuple[int, int]] = {}
    core1: dict[str, tuple[int, int]] = {}

    filler_plain_mv = filler_plain

    def on_read(s: Session, now: int) -> None:
        try:
            data = s.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if s.state == OPEN:
                stats["closed_during_run"] += 1
                note_error("closed-during-run")
            kill(s, DONE if s.close_seen else FAILED)
            return
        if s.rbuf:
            data = s.rbuf + data
            s.rbuf = b""
        L = len(data)
        pos = 0
        unpack = PREFIX.unpack_from
        while L - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            n = b1 & 0x7F
            h = pos + 2
            if n == 126:
                if L - h < 2:
                    break
                n = (data[h] << 8) | data[h + 1]
                h += 2
            elif n == 127:
                if L - h < 8:
                    break
                n = int.from_bytes(data[h : h + 8], "big")
                h += 8
            if b1 & 0x80:
                h += 4  # a masked server frame is a protocol error; skip the key
                note_error("masked-server-frame")
            end = h + n
            if end > L:
                break
            op = b0 & 0x0F
            if op == 2 and n >= 16:
                sid, seq, ts = unpack(data, h)
                if sid != s.sid or data[h + 16 : end] != filler_plain_mv:
                    stats["corrupt"] += 1
                else:
                    s.received += 1
                    stats["recv"] += 1
                    if seq >= s.expect:  # a jump is loss unless the gap arrives later
                        s.expect = seq + 1
                    else:
                        s.reorder += 1
                    if t_ws <= ts < t_we:
                        rtts.append(now - ts)
                    if t_ws <= now < t_we:
                        stats["recv_win"] += 1
            elif op == 8:
                s.close_seen = True
            elif op == 10:
                stats["pongs"] += 1
            elif op == 9:
                # Answer pings (e.g. from an intermediary) with a masked pong.
                payload = data[h:end]
                send(s, bytes((0x8A, 0x80 | len(payload))) + b"\0\0\0\0" + payload)
            else:
                stats["corrupt"] += 1
            pos = end
        if pos < L:
            s.rbuf = data[pos:]
        if s.close_seen and s.state == CLOSING:
            kill(s, DONE)

    def send(s: Session, frame: bytes) -> bool:
        if s.wbuf:
            s.wbuf += frame
            stats["backlogged_sends"] += 1
            return True
        try:
            k = s.sock.send(frame)
        except BlockingIOError:
            k = 0
        except OSError:
            kill(s, FAILED)
            note_error("send-failed")
            return False
        if k < len(frame):
            s.wbuf = frame[k:]
            ep.modify(s.fd, EPOLLIN | EPOLLOUT)
        return True

    def on_write(s: Session) -> None:
        try:
            k = s.sock.send(s.wbuf)
        except BlockingIOError:
            return
        except OSError:
            kill(s, FAILED)
            note_error("send-failed")
            return
        s.wbuf = s.wbuf[k:]
        if not s.wbuf:
            ep.modify(s.fd, EPOLLIN)

    polls = [0, 0]  # epoll_wait calls, events returned (measure window only, see below)

    def pump(timeout: float) -> None:
        try:
            events = ep.poll(timeout)
        except InterruptedError:
            return
        polls[0] += 1
        if not events:
            return
        polls[1] += len(events)
        now = mono()
        for fd, ev in events:
            s = fd2s.get(fd)
            if s is None:
                if bot is not None:
                    bot.handle(fd, ev)
                continue
            if ev & EPOLLOUT and s.wbuf:
                on_write(s)
                if s.sock is None:
                    continue
            if ev & (EPOLLIN | EPOLLERRS):
                on_read(s, now)

    if n_live:
        period_ns = 1e9 / args.rate
        slot_ns = period_ns / n_live
        t0 = mono() + 1_000_000
        t_ws = t0 + int(args.warmup * 1e9)
        t_we = t_ws + int(args.duration * 1e9)
        end_slot = int((t_we - t0) / slot_ns)
        k = 0
        in_window = False
        tick_ns = int(args.tick_us * 1000)
        next_tick = 0
        sleep = time.sleep
        pack = PREFIX.pack
        while k < end_slot:
            now = mono()
            if not in_window and now >= t_ws:
                in_window = True
                pid_sets = {n: expand_children(p) for n, p in cpu_targets.items()}
                cpu0 = {n: read_cpu_ticks(p) for n, p in pid_sets.items()}
                ru0 = resource.getrusage(resource.RUSAGE_SELF)
                core0 = read_core_times()
                polls[0] = polls[1] = 0
                win_t0 = mono()
            due = int((now - t0) / slot_ns) + 1
            if due > end_slot:
                due = end_slot
            if due > k:
                stop = min(due, k + n_live)  # never burst more than one period at once
                for j in range(k, stop):
                    s = live[j % n_live]
                    if s.state != OPEN:
                        continue
                    ts = mono()
                    lag = ts - (t0 + j * slot_ns)
                    if t_ws <= ts < t_we:
                        if lag > max_lag_ns:
                            max_lag_ns = lag
                        if lag > period_ns:
                            big_lags += 1
                    seq = s.seq
                    s.seq = seq + 1
                    frame = (
                        s.hdr
                        + (int.from_bytes(pack(s.sid, seq, ts), "little") ^ s.m16).to_bytes(
                            16, "little"
                        )
                        + s.filler
                    )
                    if send(s, frame):
                        s.sent += 1
                        stats["sent"] += 1
                        if t_ws <= ts < t_we:
                            stats["sent_win"] += 1
                k = stop
                if k < due:
                    pump(0)
                    continue
            wait = (t0 + k * slot_ns - mono()) / 1e9
            if tick_ns:
                now = mono()
                if next_tick > now:
                    sleep((next_tick - now) / 1e9)
                    next_tick += tick_ns
                else:
                    next_tick = now + tick_ns
                pump(0)
            else:
                pump(wait if wait > 0 else 0)
        win_t1 = mono()
        if in_window:
            cpu1 = {n: read_cpu_ticks(p) for n, p in pid_sets.items()}
            rss1 = {n: read_rss_kib(p) for n, p in pid_sets.items()}
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            core1 = read_core_times()
            polls_win = list(polls)

        # ---------------------------------------------------------- drain
        t_drain0 = mono()
        drain_ns = int(args.drain * 1e9)
        while stats["recv"] + stats["corrupt"] < stats["sent"] and mono() - t_drain0 < drain_ns:
            pump(0.01)
            if not fd2s:
                break
        t_drain = (mono() - t_drain0) / 1e9

        # ---------------------------------------------------------- close
        close_frame = bytes((0x88, 0x82)) + b"\0\0\0\0" + (1000).to_bytes(2, "big")
        for s in live:
            if s.state == OPEN:
                s.state = CLOSING
                send(s, close_frame)
        t_c0 = mono()
        while fd2s and mono() - t_c0 < 2e9:
            pump(0.02)
    else:
        t_drain = 0.0
    for s in sessions:
        if s.sock is not None:
            kill(s, DONE if s.state in (OPEN, CLOSING, DONE) else FAILED)
    if bot is not None:
        bot.close()
    ep.close()

    # --------------------------------------------------------------- report
    window_s = (win_t1 - win_t0) / 1e9 if win_t1 else 0.0
    rtts_sorted = array("q", sorted(rtts))
    p50 = pct(rtts_sorted, 0.50)
    p99 = pct(rtts_sorted, 0.99)
    lost = stats["sent"] - stats["recv"]
    reorder = sum(s.reorder for s in sessions)
    msgs_both = stats["sent_win"] + stats["recv_win"]
    expected_win = n_live * args.rate * args.duration
    cpu = {}
    for name in cpu_targets:
        ticks = cpu1.get(name, 0) - cpu0.get(name, 0)
        secs = ticks / CLK_TCK
        cpu[name] = {
            "pids": pid_sets.get(name, []),
            "cpu_s": round(secs, 3),
            "cpu_pct": round(100 * secs / window_s, 1) if window_s else None,
            "us_per_msg": round(secs * 1e6 / msgs_both, 2) if msgs_both else None,
            "rss_kib": rss1.get(name),  # resident memory at the end of the window
        }
    self_cpu = None
    self_detail = {}
    if ru0 is not None and ru1 is not None:
        secs = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        self_cpu = round(100 * secs / window_s, 1) if window_s else None
        if window_s:
            self_detail = {
                "user_pct": round(100 * (ru1.ru_utime - ru0.ru_utime) / window_s, 1),
                "sys_pct": round(100 * (ru1.ru_stime - ru0.ru_stime) / window_s, 1),
                "ctx_switches_per_s": round(
                    ((ru1.ru_nvcsw - ru0.ru_nvcsw) + (ru1.ru_nivcsw - ru0.ru_nivcsw)) / window_s
                ),
                "polls_per_s": round(polls_win[0] / window_s),
                "events_per_poll": round(polls_win[1] / polls_win[0], 2) if polls_win[0] else 0,
            }
    cores = {}
    for name, (b1, t1) in core1.items():
        b0, t0_ = core0.get(name, (b1, t1))
        if t1 > t0_ and name != "all":
            cores[name] = round(100 * (b1 - b0) / (t1 - t0_), 1)
    failed = sum(1 for s in sessions if s.state == FAILED)
    generator_kept_schedule = bool(
        n_live and stats["sent_win"] >= 0.99 * expected_win and big_lags <= 0.001 * expected_win
    )
    keeps_up = bool(
        n_live == N
        and failed == 0
        and lost == 0
        and stats["corrupt"] == 0
        and reorder == 0
        and p50 is not None
        and p50 < args.p50_limit
        and generator_kept_schedule
    )
    why = []
    if n_live < N:
        why.append(f"{N - n_live} sessions failed to open")
    if failed and n_live == N:
        why.append(f"{failed} sessions failed")
    if lost:
        why.append(f"{lost} lost")
    if stats["corrupt"]:
        why.append(f"{stats['corrupt']} corrupt")
    if reorder:
        why.append(f"{reorder} reordered")
    if p50 is not None and p50 >= args.p50_limit:
        why.append(f"p50 {p50:.2f} ms >= {args.p50_limit} ms")
    if n_live and not generator_kept_schedule:
        why.append("load generator fell behind schedule")
    result = {
        "label": args.label,
        "url": args.url,
        "bot_in_loadgen": bot is not None,
        "sessions": N,
        "sessions_open": n_live,
        "sessions_failed": failed,
        "rate_per_session": args.rate,
        "size": size,
        "ramp_s": round(t_ramp, 2),
        "window_s": round(window_s, 3),
        "drain_s": round(t_drain, 3),
        "sent": stats["sent"],
        "received": stats["recv"],
        "lost": lost,
        "reordered": reorder,
        "corrupt": stats["corrupt"],
        "sent_in_window": stats["sent_win"],
        "received_in_window": stats["recv_win"],
        "msgs_per_s": round(stats["sent_win"] / window_s, 1) if window_s else 0.0,
        "target_msgs_per_s": n_live * args.rate,
        "rtt_samples": len(rtts),
        "rtt_p50_ms": round(p50, 3) if p50 is not None else None,
        "rtt_p90_ms": round(pct(rtts_sorted, 0.90), 3) if rtts else None,
        "rtt_p99_ms": round(p99, 3) if p99 is not None else None,
        "rtt_max_ms": round(rtts_sorted[-1] / 1e6, 3) if rtts else None,
        "send_lag_max_ms": round(max_lag_ns / 1e6, 3),
        "sends_late_over_period": big_lags,
        "backlogged_sends": stats["backlogged_sends"],
        "loadgen_cpu_pct": self_cpu,
        "loadgen": self_detail,
        "cpu": cpu,
        "core_busy_pct": cores,
        "errors": errors,
        "generator_kept_schedule": generator_kept_schedule,
        "keeps_up": keeps_up,
        "why_not": "; ".join(why),
    }
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
