#!/usr/bin/env python3
"""Fast upstream WebSocket echo bot for `scripts/bench`.

One process, raw non-blocking sockets on a level-triggered epoll. It parses the
HTTP/1.1 upgrade itself (any path is accepted), then walks the frames in each
read and echoes every (masked) client frame back as an unmasked server frame
with the same FIN/RSV/opcode bits, so fragments, text and binary all round-trip.
Ping -> pong, close -> close echoed then the socket is closed. No extensions
or subprotocols are negotiated.

Usage: echo_bot.py [--host 127.0.0.1] [--port 0] [--port-file PATH]
"""

from __future__ import annotations

import argparse
import base64
import errno
import hashlib
import os
import select
import signal
import socket
import sys

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RECV_SIZE = 256 * 1024
MAX_HEADER = 16 * 1024

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERRS = select.EPOLLERR | select.EPOLLHUP


class Conn:
    __slots__ = ("closing", "fd", "out", "pending", "sock", "ws")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.ws = False  # upgrade done
        self.pending = b""  # unparsed bytes (partial header / partial frame)
        self.out = b""  # unsent bytes (only when the kernel buffer was full)
        self.closing = False  # close frame echoed: shut down once `out` is flushed


def server_header(b0: int, n: int) -> bytes:
    if n < 126:
        return bytes((b0, n))
    if n < 65536:
        return bytes((b0, 126, n >> 8, n & 0xFF))
    return bytes((b0, 127)) + n.to_bytes(8, "big")


class EchoServer:
    """The bot's side of a listening socket, driven by someone else's epoll loop.

    `echo_bot.py` runs it alone; `loadgen.py --bot-port` runs it inside the load
    generator's own loop, so the harness core holds one process, not two that
    time-share it (see bench/README.md).
    """

    def __init__(self, ep: select.epoll, lsock: socket.socket) -> None:
        self.ep = ep
        self.lsock = lsock
        self.lfd = lsock.fileno()
        self.conns: dict[int, Conn] = {}
        self.rbuf = bytearray(RECV_SIZE)  # one receive buffer shared by all connections
        self.rview = memoryview(self.rbuf)
        ep.register(self.lfd, EPOLLIN)

    def close(self) -> None:
        for c in list(self.conns.values()):
            c.sock.close()
        self.conns.clear()
        try:
            self.ep.unregister(self.lfd)
        except (OSError, ValueError):
            pass
        self.lsock.close()

    def drop(self, c: Conn) -> None:
        self.conns.pop(c.fd, None)
        try:
            self.ep.unregister(c.fd)
        except (OSError, ValueError):
            pass
        c.sock.close()

    def write(self, c: Conn, data: bytes) -> None:
        if c.out:
            c.out += data
            return
        try:
            sent = c.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.drop(c)
            return
        if sent < len(data):
            c.out = data[sent:]
            self.ep.modify(c.fd, EPOLLIN | EPOLLOUT)
        elif c.closing:
            self.drop(c)

    def flush(self, c: Conn) -> None:
        try:
            sent = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError:
            self.drop(c)
            return
        c.out = c.out[sent:]
        if not c.out:
            if c.closing:
                self.drop(c)
                return
            self.ep.modify(c.fd, EPOLLIN)

    def handshake(self, c: Conn, data: bytes) -> bytes | None:
        """Consume the upgrade request; returns the bytes after it, or None if incomplete."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HEADER:
                c.sock.send(b"HTTP/1.1 431 Too Large\r\nContent-Length: 0\r\n\r\n")
                self.drop(c)
            return None
        key = None
        for line in data[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        if not key:
            c.sock.send(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.drop(c)
            return None
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        self.write(
            c,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n",
        )
        c.ws = True
        return data[end + 4 :]

    def frames(self, c: Conn, data: bytes | memoryview) -> None:
        """Echo every complete frame in `data`; keep the partial tail in c.pending."""
        L = len(data)
        pos = 0
        out = []
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
            masked = b1 & 0x80
            if masked:
                if L - h < 4:
                    break
                mask = bytes(data[h : h + 4])
                h += 4
            end = h + n
            if end > L:
                break
            if n:
                if masked:
                    payload = (
                        int.from_bytes(data[h:end], "little")
                        ^ int.from_bytes((mask * ((n + 3) >> 2))[:n], "little")
                    ).to_bytes(n, "little")
                else:
                    payload = bytes(data[h:end])
            else:
                payload = b""
            op = b0 & 0x0F
            if op == 9:  # ping -> pong
                out.append(server_header(0x8A, n))
                out.append(payload)
            elif op == 10:  # pong: ignore
                pass
            elif op == 8:  # close: echo it, then hang up
                out.append(server_header(0x88, n))
                out.append(payload)
                c.closing = True
                pos = end
                break
            else:
                out.append(server_header(b0, n))
                out.append(payload)
            pos = end
        c.pending = bytes(data[pos:]) if pos < L and not c.closing else b""
        if out:
            self.write(c, b"".join(out))
        elif c.closing and not c.out:
            self.drop(c)

    def accept_all(self) -> None:
        while True:
            try:
                s, _ = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE etc.: try again on the next event
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    print(f"echo_bot: accept: {e}", file=sys.stderr, flush=True)
                return
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = Conn(s)
            self.conns[c.fd] = c
            self.ep.register(c.fd, EPOLLIN)

    def handle(self, fd: int, ev: int) -> bool:
        """Serve one epoll event; False if `fd` is not one of ours."""
        if fd == self.lfd:
            self.accept_all()
            return True
        c = self.conns.get(fd)
        if c is None:
            return False
        if ev & EPOLLOUT:
            self.flush(c)
            if c.fd not in self.conns:
                return True
        if ev & (EPOLLIN | EPOLLERRS):
            try:
                n = c.sock.recv_into(self.rbuf)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self.drop(c)
                return True
            if n == 0:
                self.drop(c)
                return True
            if c.closing:
                return True  # ignore anything after the close frame
            if c.pending:
                data: bytes | memoryview = c.pending + self.rview[:n]
            else:
                data = self.rview[:n]
            if not c.ws:
                rest = self.handshake(c, bytes(data))
                if rest is None:
                    if c.fd in self.conns and not c.ws:
                        c.pending = bytes(data)
                    return True
                c.pending = b""
                data = rest
                if not data:
                    return True
            self.frames(c, data)
        return True


def listen(host: str, port: int) -> socket.socket:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    return lsock


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", help="write the bound port here once listening")
    args = ap.parse_args()

    lsock = listen(args.host, args.port)
    port = lsock.getsockname()[1]
    ep = select.epoll()
    server = EchoServer(ep, lsock)

    running = True

    def stop(_signo: int, _frame: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, args.port_file)
    print(f"echo_bot listening on {args.host}:{port} pid {os.getpid()}", flush=True)

    try:
        while running:
            try:
                events = ep.poll(1.0)
            except InterruptedError:
                continue
            for fd, ev in events:
                server.handle(fd, ev)
    finally:
        server.close()
        ep.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
