"""The server's close frame read off the wire, before wsproto can misreport it.

wsproto (under trio-websocket) refuses close codes it does not know as a protocol error:
a 1014 "bad gateway", which relay sends when a bot vanishes, reaches the caller as 1002
"CLOSE with unknown reserved code". ``CloseWatcher`` (sans-IO) reads the same bytes
trio-websocket reads, with relay's own frame scanner (``relay.frames``, the one the gateway
uses, whose verdicts do not depend on how the bytes were split into reads): it skips the
HTTP response head, walks the server's frame headers without copying data payloads, and
keeps the first close frame's code and reason exactly as the server sent them.
``TappedStream`` is the trio stream wrapper that feeds it everything it receives.

The client reports the close it read off the wire when there is one, and trio-websocket's
report otherwise (1006 when the TCP connection dropped without a close frame).
"""

from __future__ import annotations

import trio

from relay.frames import MAX_FRAME_PAYLOAD, OP_CLOSE, ControlFrame, FrameScanner, Violation

__all__ = ["MAX_RESPONSE_HEAD", "NO_STATUS", "CloseWatcher", "TappedStream"]

MAX_RESPONSE_HEAD = 65_536  # bytes: h11 refuses a longer head; we stop watching instead
NO_STATUS = 1005  # an empty close frame is reported as 1005 (RFC 6455 §7.1.5)


class CloseWatcher:
    """Fed the bytes a WebSocket client receives; ``close`` is the server's first close."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._scanner: FrameScanner | None = None
        self._watching = True
        #: (code, reason) of the server's close frame, once one has arrived whole
        self.close: tuple[int, str] | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not self._watching or not data:
            return
        if self._scanner is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_RESPONSE_HEAD:
                    self._stop()
                return
            head, rest = bytes(self._head[:end]), bytes(self._head[end + 4 :])
            self._head = bytearray()
            status_line = head.split(b"\r\n", 1)[0].split(b" ", 2)
            if len(status_line) < 2 or status_line[1] != b"101":
                self._stop()  # a refusal: no frames follow
                return
            self._scanner = FrameScanner(masked=False, max_message_size=MAX_FRAME_PAYLOAD)
            data = rest
            if not data:
                return
        for piece in self._scanner.feed(memoryview(data)):
            if isinstance(piece, Violation):
                self._stop()  # trio-websocket reports this one itself
                return
            if isinstance(piece, ControlFrame) and piece.opcode == OP_CLOSE:
                payload = piece.payload
                if payload:
                    code = payload[0] << 8 | payload[1]
                    self.close = (code, payload[2:].decode("utf-8"))
                else:
                    self.close = (NO_STATUS, "")
                self._stop()  # nothing after a close frame matters
                return

    def _stop(self) -> None:
        self._watching = False
        self._scanner = None
        self._head = bytearray()


class TappedStream(trio.abc.Stream):
    """A stream that shows a ``CloseWatcher`` every byte it receives."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.watcher = CloseWatcher()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.stream.receive_some(max_bytes)
        self.watcher.feed(data)
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()
