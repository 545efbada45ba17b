"""Byte channels to a peer: the fast raw-socket path and the general trio-stream path.

A relay direction needs exactly three things from a connection: read some bytes into a
buffer it reuses, write bytes (noticing when the peer stops accepting them), and close.
`Conn` is that interface.

`SocketConn` is the hot path for plaintext TCP. It waits with
`trio.lowlevel.wait_readable` on a non-blocking socket and then `recv_into`s a reused
buffer; writes go straight to `send()` and only wait for writability when the kernel's
send buffer is full. Measured on this machine, that is what lets one core relay several
hundred calls: `SocketStream.receive_some`/`send_all` add an epoll_ctl and a scheduling
step per message (see docs/performance.md).

`StreamConn` wraps any `trio.abc.Stream`: TLS (`trio.SSLStream`) and in-memory streams in
unit tests. Slower, and fine for them.

Errors: a peer that resets or disappears reads as end-of-stream (0) and makes writes raise
`ConnectionLost`; a peer that accepts nothing for `stall_timeout` seconds makes a write
raise `Stalled`. Nothing else escapes from here.
"""

from __future__ import annotations

import math
import socket
from typing import Protocol

import trio

from .errors import RelayError


class ConnectionLost(RelayError):
    """The peer is gone: a write failed (reset, broken pipe, closed)."""


class Stalled(RelayError):
    """The peer accepted no bytes for the whole stall timeout.

    `unsent` is what was left of the write, when known exactly (raw sockets).
    """

    def __init__(self, message: str, unsent: bytes | None = None) -> None:
        super().__init__(message)
        self.unsent = unsent


class Conn(Protocol):
    """A bidirectional byte channel to one peer."""

    async def receive_into(self, buf: bytearray) -> int:
        """Read at most len(buf) bytes into buf; 0 means the peer is gone."""
        ...

    async def send_all(self, data: bytes | memoryview, stall_timeout: float = math.inf) -> None:
        """Write all of data; raise ConnectionLost or Stalled."""
        ...

    def would_block(self) -> bool:
        """True while a write is waiting for the peer (the output is not free)."""
        ...

    def shutdown_write(self) -> None:
        """Send FIN (no more writes) where the transport allows; reads go on."""
        ...

    async def aclose(self) -> None:
        """Close at once; never raises, never blocks for long."""
        ...

    def peer(self) -> str:
        """The peer's address as text (for X-Forwarded-For and logs)."""
        ...


_wait_readable = trio.lowlevel.wait_readable  # bound once: the hot path calls it per read


def configure_socket(sock: socket.socket) -> None:
    """Non-blocking, and Nagle off: a 320-byte audio frame must leave now, not in 40 ms."""
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def peer_address(sock: socket.socket) -> str:
    """The peer's address as text (for X-Forwarded-For and logs)."""
    try:
        addr = sock.getpeername()
    except OSError:
        return "unknown"
    if isinstance(addr, tuple) and len(addr) >= 2:
        return str(addr[0])
    return str(addr)


class SocketConn:
    """A plaintext TCP connection on a non-blocking stdlib socket."""

    __slots__ = ("_blocked", "_closed", "_fd", "_peer", "sock")

    def __init__(self, sock: socket.socket) -> None:
        configure_socket(sock)
        self.sock = sock
        self._fd = sock.fileno()  # trio's wait_* take an int without a fileno() call
        self._blocked = False
        self._closed = False
        self._peer = peer_address(sock)

    def peer(self) -> str:
        return self._peer

    async def receive_into(self, buf: bytearray) -> int:
        sock = self.sock
        fd = self._fd
        while True:
            await _wait_readable(fd)
            try:
                return sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return 0

    async def send_all(self, data: bytes | memoryview, stall_timeout: float = math.inf) -> None:
        sock = self.sock
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise ConnectionLost(str(exc)) from exc
        if sent == len(data):
            return
        # Copy what is left before waiting: `data` may view the read buffer that every
        # relay direction shares (pump.read_buffer), which is reused while we wait.
        await self._send_rest(memoryview(bytes(memoryview(data)[sent:])), stall_timeout)

    async def _send_rest(self, view: memoryview, stall_timeout: float) -> None:
        # The slow path: the kernel buffer is full, so the peer is slower than its writer.
        # Waiting here is the backpressure; the deadline is the stall timeout, which
        # restarts whenever the peer takes some bytes.
        self._blocked = True
        try:
            while view:
                with trio.move_on_after(stall_timeout) as scope:
                    await trio.lowlevel.wait_writable(self._fd)
                if scope.cancelled_caught:
                    raise Stalled(f"peer accepted nothing for {stall_timeout} s", bytes(view))
                try:
                    sent = self.sock.send(view)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    raise ConnectionLost(str(exc)) from exc
                view = view[sent:]
        finally:
            self._blocked = False

    def would_block(self) -> bool:
        return self._blocked

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self._fd)
        self.sock.close()


async def close_shielded(conn: Conn) -> None:
    """Close `conn` even inside a cancelled scope. A raw socket closes at once, without
    the shielded cancel scope (and the checkpoint) that a stream's aclose needs."""
    if type(conn) is SocketConn:
        conn.close_now()
        return
    with trio.CancelScope(shield=True):
        await conn.aclose()


class StreamConn:
    """Any trio Stream (TLS, memory streams) behind the Conn interface."""

    __slots__ = ("_blocked", "_peer", "stream")

    def __init__(self, stream: trio.abc.Stream, peer: str = "unknown") -> None:
        self.stream = stream
        self._blocked = False
        self._peer = peer

    def peer(self) -> str:
        return self._peer

    async def receive_into(self, buf: bytearray) -> int:
        try:
            data = await self.stream.receive_some(len(buf))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return 0
        n = len(data)
        buf[:n] = data
        return n

    async def send_all(self, data: bytes | memoryview, stall_timeout: float = math.inf) -> None:
        if type(data) is memoryview:
            data = bytes(data)  # it may view the shared read buffer, reused while we wait
        self._blocked = True
        try:
            with trio.move_on_after(stall_timeout) as scope:
                await self.stream.send_all(data)
            if scope.cancelled_caught:
                # A partial TLS record may have been written: the stream is unusable now.
                raise Stalled(f"peer accepted nothing for {stall_timeout} s")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(str(exc)) from exc
        finally:
            self._blocked = False

    def would_block(self) -> bool:
        return self._blocked

    def shutdown_write(self) -> None:
        return None  # TLS has no half-close we could use without blocking; just close

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
