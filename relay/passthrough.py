"""The relay phase for an upstream bot: two pumps, keepalive, and a bounded teardown.

One nursery per session holds the client→bot pump, the bot→client pump and, while a
keepalive ping is out, its short task. Between pings a session holds no task of its own for
keepalive: the process's one `KeepaliveTimer` (keepalive.py) starts each ping when due.
The first event that ends the session records its `Outcome` and cancels the nursery, with
one exception: a peer's own close frame is relayed and the other direction keeps running
for at most `close_timeout`, so the other peer's answering close travels back through the
same pump.

Teardown (`close()`) runs shielded and bounded by `close_timeout`: each side still open
gets the gateway's close frame when the outcome names one (only at a frame boundary), then
the gateway waits for that side's answering close, then every socket is closed. A side that
sent its own close and got no answer from the other end gets the answer from the gateway
(its own code echoed), so no client is left reporting 1006.
"""

from __future__ import annotations

import functools
import logging
import math

import trio

from . import closing
from .closing import CloseCode, Outcome
from .config import Limits
from .frames import (
    OP_CLOSE,
    OP_PING,
    ControlFrame,
    FrameScanner,
    Violation,
    encode_close,
    encode_frame,
    parse_close,
)
from .keepalive import KeepaliveTimer, Ticket, keepalive_timer
from .pump import End, Ending, Liveness, Outbound, pump, read_buffer
from .wire import Conn, ConnectionLost, Stalled, close_shielded

log = logging.getLogger(__name__)


class Side:
    """One peer of the relay: its connection, our writer to it, our reader of it."""

    __slots__ = ("close_from", "conn", "gone", "initial", "liveness", "name", "out", "pings",
                 "scanner", "ticket")

    def __init__(self, name: str, conn: Conn, *, is_client: bool, limits: Limits,
                 initial: bytes) -> None:
        self.name = name
        self.conn = conn
        stall = limits.stall_timeout
        # The client masks what it sends us; we mask what we send the bot (we are its client).
        self.out = Outbound(conn, mask=not is_client, stall_timeout=stall)
        self.scanner = FrameScanner(masked=is_client, max_message_size=limits.max_message_size)
        self.liveness = Liveness()
        self.initial = initial
        self.gone = False  # vanished: no more bytes either way
        self.close_from: ControlFrame | None = None  # the close frame this peer sent
        self.pings = 0  # keepalive pings sent to this peer
        self.ticket: Ticket | None = None  # its next keepalive ping, when scheduled


class Passthrough:
    """Relays frames between a client and an upstream bot until either leaves."""

    __slots__ = ("_nursery", "_pumps_done", "_timer", "bot", "client", "limits", "outcome")

    def __init__(self, client: Conn, bot: Conn, limits: Limits, *,
                 client_initial: bytes = b"", bot_initial: bytes = b"") -> None:
        self.limits = limits
        self.client = Side("client", client, is_client=True, limits=limits,
                           initial=client_initial)
        self.bot = Side("bot", bot, is_client=False, limits=limits, initial=bot_initial)
        self.outcome: Outcome | None = None
        self._nursery: trio.Nursery | None = None
        self._pumps_done = 0
        self._timer: KeepaliveTimer | None = None

    def relayed(self) -> tuple[int, int, int, int]:
        """Messages and payload bytes relayed so far: client→bot, then bot→client.

        Read from the frame scanners, which count as they walk headers; the metrics add
        them in batches (connection.py), never per message."""
        c, b = self.client.scanner, self.bot.scanner
        return (c.messages, c.data_bytes - c.header_bytes,
                b.messages, b.data_bytes - b.header_bytes)

    def end(self, outcome: Outcome) -> None:
        """Record why the session ends (first reason wins) and stop the relay."""
        if self.outcome is None:
            self.outcome = outcome
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def send_first(self, frame: bytes) -> None:
        """A frame of the gateway's own to the bot before any client frame (held body)."""
        await self.bot.out.insert(frame)

    async def run(self) -> None:
        """Relay until the session ends; the caller's cancel scopes end it from outside."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._direction, self.client, self.bot)
                nursery.start_soon(self._direction, self.bot, self.client)
                if self.limits.ping_interval and math.isfinite(self.limits.ping_interval):
                    self._timer = keepalive_timer()
                    self._schedule_ping(self.client)
                    self._schedule_ping(self.bot)
        finally:
            self._timer = None
            for side in (self.client, self.bot):
                if side.ticket is not None:
                    side.ticket.cancel()
                    side.ticket = None

    async def _direction(self, src: Side, dst: Side) -> None:
        end: End = await pump(src.conn, src.scanner, dst.out, liveness=src.liveness,
                              initial=src.initial)
        src.initial = b""
        self._pumps_done += 1
        from_client = src is self.client
        if end.kind is Ending.CLOSED:
            src.close_from = end.close
            if self.outcome is None:
                self.outcome = closing.CLIENT_CLOSED if from_client else closing.BOT_CLOSED
            assert self._nursery is not None
            if dst.close_from is not None or self._pumps_done == 2:
                self._nursery.cancel_scope.cancel()
            else:
                # Let the other peer's answering close come back through the other pump.
                self._nursery.cancel_scope.deadline = min(
                    self._nursery.cancel_scope.deadline,
                    trio.current_time() + self.limits.close_timeout,
                )
            return
        if end.kind is Ending.GONE:
            src.gone = True
            outcome = closing.CLIENT_GONE if from_client else closing.BOT_GONE
        elif end.kind is Ending.VIOLATION:
            v = end.violation
            assert isinstance(v, Violation)
            outcome = (closing.client_violation if from_client else closing.bot_violation)(
                v.close_code, closing.close_reason_text(v.reason))
        elif end.kind is Ending.DST_GONE:
            dst.gone = True
            outcome = closing.BOT_GONE if from_client else closing.CLIENT_GONE
        else:  # DST_STALLED: the destination stopped reading
            outcome = closing.BOT_STALLED if from_client else closing.CLIENT_STALLED
        self.end(outcome)

    def _schedule_ping(self, side: Side) -> None:
        """The next keepalive ping to `side`, `ping_interval` from now."""
        if self._timer is not None:
            side.ticket = self._timer.schedule(trio.current_time() + self.limits.ping_interval,
                                               functools.partial(self._ping_due, side))

    def _ping_due(self, side: Side) -> None:
        """Called by the keepalive timer: ping `side` from a task in this session's nursery."""
        side.ticket = None
        if self._nursery is not None and self._timer is not None:
            self._nursery.start_soon(self._keepalive, side)

    async def _keepalive(self, side: Side) -> None:
        """One keepalive ping and its answer; then the next one is scheduled."""
        side.pings += 1
        payload = b"relay-keepalive-%d" % side.pings
        answered = side.liveness.expect(payload)
        with trio.move_on_after(self.limits.ping_timeout) as scope:
            await side.out.insert(encode_frame(OP_PING, payload, mask=side.out.mask))
            await answered.wait()
        side.liveness.done()
        if scope.cancelled_caught:
            log.info("%s did not answer a keepalive ping within %s s",
                     side.name, self.limits.ping_timeout)
            side.gone = True
            self.end(closing.CLIENT_GONE if side is self.client else closing.BOT_GONE)
            return
        self._schedule_ping(side)

    # -- teardown -------------------------------------------------------------------------

    def _gateway_close(self, side: Side, outcome: Outcome) -> CloseCode | None:
        code = outcome.to_client if side is self.client else outcome.to_bot
        if code is None and side.close_from is not None:
            # This side closed and the other end never answered: answer for it.
            echo_code, echo_reason = parse_close(side.close_from.payload)
            return (echo_code, echo_reason) if echo_code is not None else (0, "")
        return code

    async def close(self, outcome: Outcome) -> None:
        """Send the gateway's closes, await the answers, close both sockets. Bounded."""
        try:
            busy = [side for side in (self.client, self.bot) if _has_closing_to_do(side)]
            if busy:  # often neither: both closes already went through the pumps
                with trio.move_on_after(self.limits.close_timeout, shield=True):
                    if len(busy) == 1:
                        await self._close_side(busy[0], outcome)
                    else:
                        async with trio.open_nursery() as nursery:
                            for side in busy:
                                nursery.start_soon(self._close_side, side, outcome)
        finally:
            await close_shielded(self.client.conn)
            await close_shielded(self.bot.conn)

    async def _close_side(self, side: Side, outcome: Outcome) -> None:
        if not _has_closing_to_do(side):
            return
        if not side.out.closed:
            code = self._gateway_close(side, outcome)
            if code is not None and side.out.backlog is not None:
                try:
                    await side.out.flush_backlog()
                except (ConnectionLost, Stalled):
                    return
            if code is not None and side.out.at_boundary():
                frame = (encode_close(code[0], code[1], mask=side.out.mask) if code[0]
                         else encode_frame(OP_CLOSE, b"", mask=side.out.mask))
                try:
                    await side.out.insert(frame)
                except (ConnectionLost, Stalled):
                    return
                side.out.closed = True
        if side.out.closed and side.close_from is None:
            await self._await_close(side)

    async def _await_close(self, side: Side) -> None:
        """Read and drop what the peer still sends, until its close frame or EOF."""
        buf = read_buffer()  # shared: each chunk is scanned before the next read
        view = memoryview(buf)
        pending, side.initial = side.initial, b""
        scanner = side.scanner
        if scanner.failed:
            tail = scanner.resume_after_violation()
            if tail is None:  # the stream cannot be walked any more: read until EOF
                while await side.conn.receive_into(buf):
                    pass
                return
            pending = tail + pending
        while True:
            if pending:
                data = memoryview(pending)
                pending = b""
            else:
                n = await side.conn.receive_into(buf)
                if n == 0:
                    return
                data = view[:n]
            for piece in scanner.feed(data):
                if isinstance(piece, Violation):
                    return
                if isinstance(piece, ControlFrame) and piece.opcode == OP_CLOSE:
                    side.close_from = piece
                    return


def _has_closing_to_do(side: Side) -> bool:
    """A close frame still to send to this peer, or its answering close still to await."""
    return not side.gone and (not side.out.closed or side.close_from is None)
