"""WebSocket frame boundaries for the relay hot path, without decoding data (sans-IO).

This module owns the gateway's view of the WebSocket byte stream (RFC 6455 §5). The gateway
relays frames between a client and an upstream bot as they came: fragment boundaries, RSV
bits, masking keys and payload bytes are forwarded untouched (SPEC §5, §8), so nothing here
unmasks, inflates or UTF-8-checks a data payload. What it does do:

* walk the frame headers (§5.2) to know where each frame begins and ends, its opcode and
  length, and hand back the original bytes of data frames as they arrive, coalesced into as
  few pieces as possible (one ``memoryview`` slice per run of consecutive data frames);
* collect whole control frames (§5.5: close, ping, pong, at most 125 payload bytes) so the
  I/O layer can act on them (answer or drop keepalive pongs, forward a close exactly as it
  came, learn the close code);
* enforce what a relay must refuse before forwarding a single byte of a bad frame: masking
  direction (§5.1, §5.3), reserved opcodes (§5.2), fragmented or oversized control frames
  (§5.4, §5.5), fragmentation order (§5.4), the 64-bit length's top bit and non-minimal
  length encodings (§5.2: "the minimal number of bytes MUST be used"), the
  ``max_message_size`` limit (status 1009, §7.4.1) and close frame payloads (§5.5.1, §7.4).

The verdict never depends on how the stream was split into reads: any chunking yields the
same frames, the same data bytes (concatenated) and the same violation as one whole chunk.

RSV bits are never a violation: extensions negotiated end to end (permessage-deflate,
RFC 7692) set them, and the gateway is not a party to that negotiation.

It also encodes the few frames the gateway writes itself (its own pings and closes).
No I/O and no trio here: the scanner is fed bytes and returns pieces.
"""

from __future__ import annotations

import os
import struct
from typing import Final, TypeAlias

import attrs

__all__ = [
    "MAX_CONTROL_PAYLOAD",
    "MAX_HEADER_SIZE",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "ControlFrame",
    "FrameScanner",
    "Piece",
    "Violation",
    "encode_close",
    "encode_frame",
    "parse_close",
    "valid_close_code",
]

# Opcodes, RFC 6455 §5.2 (§11.8 registry).
OP_CONT: Final = 0
OP_TEXT: Final = 1
OP_BINARY: Final = 2
OP_CLOSE: Final = 8
OP_PING: Final = 9
OP_PONG: Final = 10

#: Largest control frame payload, in bytes (§5.5).
MAX_CONTROL_PAYLOAD: Final = 125
#: Largest close reason, in bytes of UTF-8: the control payload minus the 2-byte code (§5.5.1).
MAX_CLOSE_REASON: Final = MAX_CONTROL_PAYLOAD - 2
#: Largest frame header, in bytes: 2 fixed + 8 extended length + 4 masking key (§5.2).
MAX_HEADER_SIZE: Final = 14
#: Largest payload length a frame may declare, in bytes: the 64-bit length's top bit is 0 (§5.2).
MAX_FRAME_PAYLOAD: Final = (1 << 63) - 1
#: Masking key size, in bytes (§5.3).
MASK_KEY_SIZE: Final = 4

# Close status codes the scanner reports (§7.4.1).
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_INVALID_DATA: Final = 1007
CLOSE_MESSAGE_TOO_BIG: Final = 1009

# Header bit fields (§5.2).
_FIN: Final = 0x80
_OPCODE: Final = 0x0F
_CONTROL: Final = 0x08  # opcodes 8-15 are control frames
_MASK: Final = 0x80
_LEN7: Final = 0x7F
_LEN16: Final = 126  # 7-bit length value meaning "16-bit length follows"
_LEN64: Final = 127  # 7-bit length value meaning "64-bit length follows"

_OPCODES: Final = frozenset((OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))
_U16: Final = struct.Struct("!BBH")
_U64: Final = struct.Struct("!BBQ")


@attrs.frozen(slots=True)
class ControlFrame:
    """A whole close, ping or pong frame."""

    opcode: int  # OP_CLOSE / OP_PING / OP_PONG
    raw: bytes  # the whole frame exactly as it came (header + possibly masked payload)
    payload: bytes  # the unmasked payload


@attrs.frozen(slots=True)
class Violation:
    """The peer broke the protocol; the session closes with ``close_code``."""

    close_code: int  # 1002 protocol error, 1009 message too big, 1007 bad close reason utf-8
    reason: str  # short human sentence


Piece: TypeAlias = memoryview | bytes | ControlFrame | Violation


def _unmask(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the repeated 4-byte ``key`` (§5.3), as one big-int operation."""
    n = len(payload)
    if not n:
        return b""
    stream = (key * (n // MASK_KEY_SIZE + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def _parse_header(buf: memoryview | bytes, pos: int, end: int) -> tuple[int, int, int, int] | None:
    """Parse the header at ``buf[pos:end]``: ``(byte0, byte1, payload_len, header_len)``.

    ``None`` while the header is incomplete.
    """
    avail = end - pos
    if avail < 2:
        return None
    b0 = buf[pos]
    b1 = buf[pos + 1]
    ln = b1 & _LEN7
    hl = 2
    if ln == _LEN16:
        if avail < 4:
            return None
        ln = buf[pos + 2] << 8 | buf[pos + 3]
        hl = 4
    elif ln == _LEN64:
        if avail < 10:
            return None
        ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
        hl = 10
    if b1 & _MASK:
        hl += MASK_KEY_SIZE
    if avail < hl:
        return None
    return b0, b1, ln, hl


class FrameScanner:
    """Find frame boundaries in one direction of a WebSocket stream (see module docstring).

    ``masked=True``: the peer is a client, its frames must be masked; ``False``: the peer is a
    server (the bot), its frames must not be masked (§5.1).
    """

    __slots__ = (
        "_ctrl",
        "_ctrl_hl",
        "_ctrl_need",
        "_failed",
        "_hdr",
        "_in_message",
        "_mask_bit",
        "_masked",
        "_max",
        "_msg_size",
        "_remaining",
        "_resume",
        "data_bytes",
        "header_bytes",
        "messages",
    )

    def __init__(self, *, masked: bool, max_message_size: int) -> None:
        if max_message_size < 0:
            raise ValueError("max_message_size must be >= 0")
        self._masked = masked
        self._mask_bit = _MASK if masked else 0
        self._max = min(max_message_size, MAX_FRAME_PAYLOAD)
        self._hdr = bytearray()  # held-back partial header (not yet returned)
        self._ctrl = bytearray()  # control frame being collected (header + payload so far)
        self._ctrl_need = 0  # total size of that control frame; 0 when none
        self._ctrl_hl = 0  # header length of that control frame
        self._remaining = 0  # payload bytes of the current data frame not yet seen
        self._in_message = False  # a fragmented data message is in progress
        self._msg_size = 0  # payload bytes of the fragmented message so far
        self._failed = False
        # after a violation: (payload bytes to skip, in_message afterwards, bytes to feed next)
        self._resume: tuple[int, bool, bytes] | None = None
        #: complete data messages seen (counted when the final frame's header is accepted)
        self.messages = 0
        #: bytes of data-frame pieces returned so far (headers + payload)
        self.data_bytes = 0
        #: of those, the bytes of data-frame headers (with masking keys): the payload
        #: relayed is data_bytes - header_bytes
        self.header_bytes = 0

    @property
    def failed(self) -> bool:
        """True after a Violation: feed() refuses until resume_after_violation()."""
        return self._failed

    def resume_after_violation(self) -> bytes | None:
        """After a Violation, skip the offending frame and read on, with no message limit.

        The gateway still needs the peer's answer to its close, so the stream must stay
        walkable: the offending frame's payload is then returned as ordinary data pieces
        (for the caller to drop). Returns the bytes of the violating chunk that followed
        the offending frame's header (or the whole offending control frame), to be fed
        first; None when the stream cannot be walked any more (a 64-bit length with its
        top bit set).
        """
        if self._resume is None:
            return None
        length, in_message, tail = self._resume
        self._resume = None
        self._failed = False
        self._max = MAX_FRAME_PAYLOAD
        self._remaining = length
        self._in_message = in_message
        self._msg_size = 0
        return tail

    def _resume_at(self, b0: int, ln: int, tail: bytes) -> None:
        if ln <= MAX_FRAME_PAYLOAD:
            after = self._in_message if b0 & _CONTROL else not (b0 & _FIN)
            self._resume = (ln, after, tail)

    @property
    def mid_frame(self) -> bool:
        """True when the data pieces returned so far end inside a data frame."""
        return self._remaining > 0

    def _accept(self, b0: int, b1: int, ln: int) -> Violation | None:
        """Check a complete header against §5; update message state if accepted."""
        if (b1 & _MASK) != self._mask_bit:
            if self._masked:
                return Violation(CLOSE_PROTOCOL_ERROR, "client frame is not masked")
            return Violation(CLOSE_PROTOCOL_ERROR, "server frame is masked")
        op = b0 & _OPCODE
        if op not in _OPCODES:
            return Violation(CLOSE_PROTOCOL_ERROR, f"reserved opcode {op}")
        form = b1 & _LEN7
        if (form == _LEN16 and ln < _LEN16) or (form == _LEN64 and ln <= 0xFFFF):
            bits = 16 if form == _LEN16 else 64
            return Violation(
                CLOSE_PROTOCOL_ERROR, f"payload length {ln} in the {bits}-bit form (not minimal)"
            )
        fin = b0 & _FIN
        if op & _CONTROL:
            if not fin:
                return Violation(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
            if ln > MAX_CONTROL_PAYLOAD:
                return Violation(
                    CLOSE_PROTOCOL_ERROR,
                    f"control frame payload exceeds {MAX_CONTROL_PAYLOAD} bytes",
                )
            return None
        if op == OP_CONT:
            if not self._in_message:
                return Violation(CLOSE_PROTOCOL_ERROR, "continuation frame with no message")
            total = self._msg_size + ln
        else:
            if self._in_message:
                return Violation(CLOSE_PROTOCOL_ERROR, "new data frame inside a fragmented message")
            total = ln
        if ln > MAX_FRAME_PAYLOAD:
            return Violation(CLOSE_PROTOCOL_ERROR, "64-bit payload length has its top bit set")
        if total > self._max:
            return Violation(
                CLOSE_MESSAGE_TOO_BIG,
                f"message exceeds max_message_size ({self._max} bytes)",
            )
        if fin:
            self._in_message = False
            self._msg_size = 0
            self.messages += 1
        else:
            self._in_message = True
            self._msg_size = total
        return None

    def _control(self, raw: bytes, hl: int) -> ControlFrame | Violation:
        """Build a complete control frame; check a close frame's payload (§5.5.1, §7.4)."""
        op = raw[0] & _OPCODE
        payload = raw[hl:]
        if self._masked:
            payload = _unmask(payload, raw[hl - MASK_KEY_SIZE : hl])
        if op == OP_CLOSE and payload:
            if len(payload) == 1:
                return Violation(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
            code = payload[0] << 8 | payload[1]
            if not valid_close_code(code):
                return Violation(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
            try:
                payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                return Violation(CLOSE_INVALID_DATA, "close reason is not valid UTF-8")
        return ControlFrame(op, raw, payload)

    def _fail(self, out: list[Piece], violation: Violation) -> list[Piece]:
        self._failed = True
        out.append(violation)
        return out

    def feed(self, data: memoryview) -> list[Piece]:
        """Consume one chunk of the stream; return its pieces in stream order.

        Data-frame bytes come back as ``memoryview`` slices of ``data`` (valid only while the
        caller's buffer is) or ``bytes`` for a header held back from an earlier chunk; control
        frames as one :class:`ControlFrame` once whole; a :class:`Violation` is always last and
        no byte of the offending frame is returned. After a Violation, feed() raises.
        """
        if self._failed:
            raise RuntimeError("FrameScanner.feed() after a protocol violation")
        if not isinstance(data, memoryview):
            data = memoryview(data)
        out: list[Piece] = []
        n = len(data)
        pos = 0

        # 1. A header split across chunks: complete it from the front of this chunk.
        if self._hdr:
            held = bytes(self._hdr)
            buf = held + bytes(data[: MAX_HEADER_SIZE - len(held)])
            head = _parse_header(buf, 0, len(buf))
            if head is None:  # still incomplete: all of data went into buf
                self._hdr += data
                return out
            b0, b1, ln, hl = head
            self._hdr.clear()
            violation = self._accept(b0, b1, ln)
            if violation is not None:
                self._resume_at(b0, ln, bytes(data[hl - len(held) :]))
                return self._fail(out, violation)
            pos = hl - len(held)
            if b0 & _CONTROL:
                self._ctrl = bytearray(buf[:hl])
                self._ctrl_need = hl + ln
                self._ctrl_hl = hl
            else:
                out.append(buf[:hl])
                self.data_bytes += hl
                self.header_bytes += hl
                self._remaining = ln

        # 2. Finish a data frame's payload, or a control frame, left open by earlier chunks.
        run = pos  # data[run:pos] are accepted data-frame bytes not yet appended to out
        if self._remaining:
            take = min(self._remaining, n - pos)
            pos += take
            self._remaining -= take
            if self._remaining:
                if take:
                    out.append(data[run:pos])
                    self.data_bytes += take
                return out
        elif self._ctrl_need:
            take = min(self._ctrl_need - len(self._ctrl), n - pos)
            self._ctrl += data[pos : pos + take]
            pos += take
            if len(self._ctrl) < self._ctrl_need:
                return out
            raw = bytes(self._ctrl)
            self._ctrl = bytearray()
            self._ctrl_need = 0
            frame = self._control(raw, self._ctrl_hl)
            if isinstance(frame, Violation):
                self._resume = (0, self._in_message, bytes(data[pos:]))
                return self._fail(out, frame)
            out.append(frame)
            run = pos

        # 3. Whole headers in this chunk. The common case (an unfragmented text/binary frame
        # within limits) is checked inline; everything else goes through _accept. Bit masks
        # are literals here (a global lookup per use costs more than the rest of the check):
        # 0x80 FIN / MASK bit, 0x0F opcode, 0x7F 7-bit length, 126/127 extended length (§5.2).
        mask_bit = self._mask_bit
        limit = self._max
        in_message = self._in_message
        fast = 0  # messages accepted inline, added to self.messages on the way out
        hdrs = 0  # data-frame header bytes accepted, added to self.header_bytes likewise
        try:
            while True:
                avail = n - pos
                if avail < 2:
                    break
                b0 = data[pos]
                b1 = data[pos + 1]
                op = b0 & 0x0F
                ln = b1 & 0x7F
                # A length in a longer form than it needs (§5.2) sets op to -1, which no
                # check below accepts: _accept then refuses the frame, so op is not used again.
                if ln < 126:
                    hl = 2
                elif ln == 126:
                    if avail < 4:
                        break
                    ln = data[pos + 2] << 8 | data[pos + 3]
                    hl = 4
                    if ln < 126:
                        op = -1
                else:
                    if avail < 10:
                        break
                    ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                    hl = 10
                    if ln <= 0xFFFF:
                        op = -1
                if b1 & 0x80:
                    hl += 4
                if avail < hl:
                    break
                if (
                    0 < op < 3  # OP_TEXT or OP_BINARY
                    and b0 & 0x80
                    and b1 & 0x80 == mask_bit
                    and ln <= limit
                    and not in_message
                ):
                    fast += 1
                else:
                    violation = self._accept(b0, b1, ln)
                    if violation is not None or op < 0:
                        assert violation is not None  # _accept refuses every op = -1 frame
                        if run < pos:
                            out.append(data[run:pos])
                            self.data_bytes += pos - run
                        self._resume_at(b0, ln, bytes(data[pos + hl :]))
                        return self._fail(out, violation)
                    in_message = self._in_message
                end = pos + hl + ln
                if op & 0x08:  # control frame
                    if run < pos:
                        out.append(data[run:pos])
                        self.data_bytes += pos - run
                    if end > n:  # collect the rest from later chunks
                        self._ctrl = bytearray(data[pos:])
                        self._ctrl_need = hl + ln
                        self._ctrl_hl = hl
                        return out
                    frame = self._control(bytes(data[pos:end]), hl)
                    if isinstance(frame, Violation):
                        self._resume = (0, self._in_message, bytes(data[end:]))
                        return self._fail(out, frame)
                    out.append(frame)
                    pos = run = end
                elif end > n:  # payload continues in later chunks
                    hdrs += hl
                    self._remaining = end - n
                    pos = n
                    break
                else:
                    hdrs += hl
                    pos = end
        finally:
            self.messages += fast
            self.header_bytes += hdrs

        if run < pos:
            out.append(data[run:pos])
            self.data_bytes += pos - run
        if pos < n:  # a partial header: hold it, never return half of one
            self._hdr += data[pos:]
        return out


def encode_frame(opcode: int, payload: bytes, *, mask: bool, fin: bool = True) -> bytes:
    """One frame (§5.2); ``mask=True`` masks it with a fresh ``os.urandom(4)`` key (§5.3)."""
    if opcode not in _OPCODES:
        raise ValueError(f"reserved opcode {opcode}")
    n = len(payload)
    if opcode & _CONTROL and (n > MAX_CONTROL_PAYLOAD or not fin):
        raise ValueError("control frames are unfragmented with at most 125 payload bytes")
    b0 = (_FIN if fin else 0) | opcode
    mbit = _MASK if mask else 0
    if n < _LEN16:
        head = bytes((b0, mbit | n))
    elif n <= 0xFFFF:
        head = _U16.pack(b0, mbit | _LEN16, n)
    else:
        head = _U64.pack(b0, mbit | _LEN64, n)
    if not mask:
        return head + bytes(payload)
    key = os.urandom(MASK_KEY_SIZE)
    return head + key + _unmask(bytes(payload), key)


def encode_close(code: int, reason: str = "", *, mask: bool) -> bytes:
    """A close frame (§5.5.1); a reason longer than 123 UTF-8 bytes is cut at a character."""
    if not valid_close_code(code):
        raise ValueError(f"invalid close code {code}")
    raw_reason = reason.encode("utf-8")
    if len(raw_reason) > MAX_CLOSE_REASON:
        raw_reason = raw_reason[:MAX_CLOSE_REASON].decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + raw_reason, mask=mask)


def parse_close(payload: bytes) -> tuple[int | None, str]:
    """An unmasked close payload as ``(code, reason)``; ``(None, "")`` when empty.

    Raises ValueError on a 1-byte payload or a reason that is not UTF-8 (the scanner has
    already refused those from a peer).
    """
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ValueError("close frame with a 1-byte payload")
    return payload[0] << 8 | payload[1], payload[2:].decode("utf-8")


def valid_close_code(code: int) -> bool:
    """Whether ``code`` may appear in a close frame (§7.4.1, §7.4.2, IANA registry)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999
