"""One relay direction: read a peer's bytes, walk its frame headers, write them on.

`pump()` is the hot path. Per read it does: wait until the source socket is readable,
`recv_into` a reused buffer, let the sans-IO `FrameScanner` cut the chunk into data bytes
and whole control frames, and write the data bytes at once. Data payloads are never
decoded, unmasked or copied beyond the read buffer; a masked client frame is a valid frame
for the bot and an unmasked bot frame is a valid frame for the client.

`Outbound` is the writing side of one peer. Two writers share it: the pump that forwards
the other peer's frames, and the gateway's own frames (keepalive pings, closes). The
gateway inserts a frame only at a frame boundary: never while the pump has written part of
a frame, and never while another write is waiting for the peer.

Memory: the relay directions of a process (of a trio run) share one read buffer
(`read_buffer()`): a pump writes what it read before it reads again, and a write that
would wait copies its unsent remainder first (wire.py), so a session holds no buffer of
its own unless a peer is slow. Pieces of a chunk that need more than one write are copied
before the first one (the slow path: control frames mixed in, a gateway frame waiting).

Backpressure: each direction holds at most one read chunk (`CHUNK` bytes). While the
destination does not accept bytes, the pump does not read from the source, so TCP flow
control slows the writer. A destination that accepts nothing for `stall_timeout` seconds
ends the pump (`Stalled`).
"""

from __future__ import annotations

import enum
import math

import attrs
import trio

from .frames import OP_CLOSE, OP_PONG, ControlFrame, FrameScanner, Piece, Violation
from .wire import Conn, ConnectionLost, Stalled

CHUNK = 16384  # bytes per read: bounds memory per direction; 20 ms of 8 kHz audio is 320 B

_READ_BUFFER: trio.lowlevel.RunVar[bytearray] = trio.lowlevel.RunVar("relay_read_buffer")


def read_buffer() -> bytearray:
    """The read buffer shared by every relay direction of this trio run (one per thread).

    Valid only until the caller's next checkpoint: use what was read before awaiting."""
    try:
        return _READ_BUFFER.get()
    except LookupError:
        buf = bytearray(CHUNK)
        _READ_BUFFER.set(buf)
        return buf


class Outbound:
    """The sending side of one peer, shared by a pump and the gateway's own frames."""

    __slots__ = ("_free", "_inserting", "backlog", "closed", "conn", "mask", "mid_frame",
                 "stall_timeout")

    def __init__(self, conn: Conn, *, mask: bool, stall_timeout: float = math.inf) -> None:
        self.conn = conn
        self.mask = mask  # frames the gateway originates towards this peer must be masked
        self.stall_timeout = stall_timeout
        self.mid_frame = False  # the bytes written so far end inside a frame
        self.closed = False  # a close frame has been written to this peer
        self.backlog: bytes | None = None  # unsent bytes up to a frame boundary (stalled)
        self._inserting = False
        self._free: trio.Event | None = None

    async def flush_backlog(self) -> None:
        """Finish what a stall left half-written; the peer is then at a frame boundary."""
        backlog, self.backlog = self.backlog, None
        if backlog is not None:
            await self.conn.send_all(backlog, self.stall_timeout)
            self.mid_frame = False

    def at_boundary(self) -> bool:
        return not (self.mid_frame or self._inserting or self.conn.would_block())

    def notify(self) -> None:
        """Wake whoever waits for a boundary (called by the pump; cheap when nobody waits)."""
        ev = self._free
        if ev is not None and not self.mid_frame:
            self._free = None
            ev.set()

    async def forward(self, data: bytes | memoryview) -> None:
        """Write pass-through bytes (the pump's path)."""
        while self._inserting:
            if self._free is None:
                self._free = trio.Event()
            await self._free.wait()
        await self.conn.send_all(data, self.stall_timeout)

    async def insert(self, frame: bytes) -> None:
        """Write one whole frame of the gateway's own, waiting for a frame boundary.

        Callers bound the wait (a pump stuck mid-frame never reaches a boundary).
        """
        while not self.at_boundary():
            if self._free is None:
                self._free = trio.Event()
            await self._free.wait()
        self._inserting = True
        try:
            await self.conn.send_all(frame, self.stall_timeout)
        finally:
            self._inserting = False
            ev, self._free = self._free, None
            if ev is not None:
                ev.set()


class Ending(enum.Enum):
    GONE = "gone"  # the source vanished (EOF, reset) without a close frame
    CLOSED = "closed"  # the source's close frame was forwarded
    VIOLATION = "violation"  # the source broke the protocol or a limit
    DST_GONE = "dst_gone"  # the destination vanished while we wrote to it
    DST_STALLED = "dst_stalled"  # the destination accepted nothing for stall_timeout


@attrs.define
class End:
    kind: Ending
    close: ControlFrame | None = None
    violation: Violation | None = None


class Liveness:
    """Keepalive bookkeeping for one peer: the ping payload we await, and its answer."""

    __slots__ = ("answered", "outstanding")

    def __init__(self) -> None:
        self.outstanding: bytes | None = None
        self.answered: trio.Event | None = None  # only while a ping is out (idle: nothing)

    def expect(self, payload: bytes) -> trio.Event:
        self.outstanding = payload
        self.answered = trio.Event()
        return self.answered

    def done(self) -> None:
        """The ping was answered or given up on: drop the event."""
        self.answered = None

    def pong(self, payload: bytes) -> bool:
        """True when this pong answers our own ping (it is then not passed on)."""
        if self.outstanding is not None and payload == self.outstanding:
            self.outstanding = None
            if self.answered is not None:
                self.answered.set()
            return True
        return False


async def pump(
    src: Conn,
    scanner: FrameScanner,
    dst: Outbound,
    *,
    liveness: Liveness | None = None,
    initial: bytes = b"",
) -> End:
    """Relay src → dst until the source closes, vanishes or misbehaves, or dst fails."""
    buf = read_buffer()
    view = memoryview(buf)
    pending = initial
    pieces: list[Piece] = []
    index = 0
    send_all = dst.conn.send_all
    stall = dst.stall_timeout
    try:
        while True:
            if pending:
                pieces = scanner.feed(memoryview(pending))
                pending = b""
            else:
                n = await src.receive_into(buf)
                if n == 0:
                    return End(Ending.GONE)
                pieces = scanner.feed(view[:n])
            # Until this chunk is written, the peer's frame state is unknown: no gateway
            # frame may be inserted (a cancelled or failed write leaves it unknown).
            dst.mid_frame = True
            if len(pieces) == 1 and type(pieces[0]) is memoryview and not dst._inserting:
                # The common case: whole data frames (or a run of payload) and nothing else.
                await send_all(pieces[0], stall)
                dst.mid_frame = scanner.mid_frame
                if dst._free is not None:
                    dst.notify()
                continue
            # More than one write, any of which may wait: own the bytes first (the shared
            # read buffer is reused while this task waits).
            pieces = [bytes(p) if type(p) is memoryview else p for p in pieces]
            for index, piece in enumerate(pieces):  # noqa: B007 - index read on Stalled
                if type(piece) is memoryview or type(piece) is bytes:
                    await dst.forward(piece)
                elif type(piece) is ControlFrame:
                    if piece.opcode == OP_PONG and liveness is not None and liveness.pong(
                        piece.payload
                    ):
                        continue
                    await dst.forward(piece.raw)
                    if piece.opcode == OP_CLOSE:
                        dst.mid_frame = False
                        dst.closed = True
                        return End(Ending.CLOSED, close=piece)
                else:
                    assert isinstance(piece, Violation)
                    dst.mid_frame = scanner.mid_frame
                    return End(Ending.VIOLATION, violation=piece)
            dst.mid_frame = scanner.mid_frame
            if dst._free is not None:
                dst.notify()
    except ConnectionLost:
        return End(Ending.DST_GONE)
    except Stalled as exc:
        _keep_backlog(dst, exc, pieces[index + 1 :], ends_at_boundary=not scanner.mid_frame)
        return End(Ending.DST_STALLED)


def _keep_backlog(dst: Outbound, exc: Stalled, rest: list[Piece], *,
                  ends_at_boundary: bool) -> None:
    """Keep what a stalled peer did not take, so teardown can finish the frame and close.

    Only when the unsent bytes are known exactly (raw sockets) and run to a frame boundary;
    otherwise the peer's stream stays marked mid-frame and gets no gateway close.
    """
    if exc.unsent is None:
        return
    parts = [exc.unsent]
    for piece in rest:
        if type(piece) is ControlFrame:
            parts.append(piece.raw)
        elif type(piece) is memoryview or type(piece) is bytes:
            parts.append(bytes(piece))
        else:
            break
    else:
        if ends_at_boundary:
            dst.backlog = b"".join(parts)
