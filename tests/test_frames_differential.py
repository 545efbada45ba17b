"""relay.frames against wsproto: on every byte stream, where wsproto accepts the frames,
the scanner finds the same frame boundaries, opcodes, lengths and payloads, counts the
same messages, and refuses what wsproto refuses, with the same close code.

wsproto (the reference here: trio-websocket's protocol engine) reads the stream through
its own `FrameProtocol`; it is given an extension that claims the three RSV bits, since
relay passes RSV bits through for extensions negotiated end to end (the scanner never
refuses them). Where wsproto stops accepting, the comparison stops too, except for the
verdicts, which must agree. Differences that are decisions, checked as such:

- a text frame whose payload is not UTF-8 is wsproto's 1007; relay never decodes a data
  payload (it is the bot's business), so beyond such a frame nothing is compared;
- close code 1014 (Bad Gateway, in the IANA registry since 2012) is refused by wsproto,
  whose table predates it; relay sends and accepts it (the close-code table);
- wsproto refuses some headers after their first 2 bytes (reserved opcode, a long control
  frame, the mask bit) where the scanner waits for the whole header (at most 14 bytes): on
  a stream cut short inside such a header the scanner has not decided yet.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_frames_chunking import raw_frame
from wsproto.extensions import Extension
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed, RsvBits

from relay.frames import (
    MAX_FRAME_PAYLOAD,
    MAX_HEADER_SIZE,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ControlFrame,
    FrameScanner,
    Violation,
)


class _AnyRsv(Extension):
    """Claims RSV1-3 on every frame and leaves payloads alone."""

    name = "relay-test-any-rsv"

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:
        return False

    def frame_inbound_header(self, proto: Any, opcode: Any, rsv: Any, payload_length: int
                             ) -> RsvBits:
        return RsvBits(True, True, True)

    def frame_inbound_payload_data(self, proto: Any, data: bytes) -> bytes:
        return data

    def frame_inbound_complete(self, proto: Any, fin: bool) -> None:
        return None


def _header_len(n: int, masked: bool) -> int:
    """A valid (minimal) header's length for payload length ``n``."""
    return 2 + (0 if n < 126 else 2 if n <= 0xFFFF else 8) + (4 if masked else 0)


class Reference:
    """wsproto's reading of a whole stream: each accepted frame and where it ends."""

    def __init__(self, stream: bytes, masked: bool) -> None:
        # wsproto's client=True reads a server's (unmasked) frames, and vice versa
        proto = FrameProtocol(client=not masked, extensions=[_AnyRsv()])
        proto.receive_bytes(stream)
        # Each header wsproto accepted, in order: a text frame's decoded payload may hold
        # fewer bytes than the frame (a UTF-8 sequence split across frames).
        decoder = proto._frame_decoder
        lengths: list[int] = []
        parse_header = decoder.parse_header

        def spy() -> bool:
            done = parse_header()
            if done:
                assert decoder.header is not None  # parsed: the header is set
                lengths.append(decoder.header.payload_len)
            return bool(done)

        # The test deliberately replaces the decoder's method with the spy above.
        decoder.parse_header = spy  # type: ignore[method-assign]
        self.frames: list[tuple[int, int, bool, bytes, int]] = []  # op, len, fin, payload, end
        self.failed: int | None = None  # wsproto's close code, when it refused a frame
        self.after_close = False
        offset = 0
        parts: list[bytes] = []
        try:
            for frame in proto.received_frames():
                op = int(frame.opcode)
                if frame.opcode is Opcode.CLOSE:
                    assert isinstance(frame.payload, tuple)  # a close's payload: (code, reason)
                    code, reason = frame.payload
                    payload = b"" if code == 1005 else int(code).to_bytes(2, "big") + \
                        reason.encode()
                elif isinstance(frame.payload, str):
                    payload = frame.payload.encode()
                else:
                    assert isinstance(frame.payload, bytes | bytearray)  # a data or ping/pong frame
                    payload = bytes(frame.payload)
                if not frame.frame_finished:  # the stream ends inside this data frame
                    parts.append(payload)
                    continue
                payload = b"".join([*parts, payload])
                parts = []
                n = lengths[len(self.frames)]
                if op in (1, 2):  # compare the raw payload: the frame as it was sent
                    hl = _header_len(n, masked)
                    payload = _unmasked(stream[offset + hl:offset + hl + n],
                                        stream[offset + hl - 4:offset + hl] if masked else None)
                assert len(payload) == n
                end = offset + _header_len(n, masked) + n
                fin = bool(stream[offset] & 0x80)
                wire_op = stream[offset] & 0x0F  # wsproto reports a message's first opcode
                self.frames.append((wire_op if op in (1, 2) else op, len(payload), fin,
                                    payload, end))
                offset = end
                if frame.opcode is Opcode.CLOSE:
                    self.after_close = True  # wsproto reads nothing after a close
        except ParseFailed as exc:
            self.failed = int(exc.code)
        header = decoder.header
        self.tail_in_data_frame = (
            self.failed is None and header is not None and not header.opcode.iscontrol())
        self.missing = (header.payload_len - decoder.payload_consumed
                        if header is not None and self.tail_in_data_frame
                        else 0)  # payload bytes still to come


def _unmasked(payload: bytes, key: bytes | None) -> bytes:
    if key is None:
        return payload
    return bytes(a ^ b for a, b in zip(payload, key * (len(payload) // 4 + 1), strict=False))


def _close_payload(rest: bytes, masked: bool) -> bytes | None:
    """The unmasked payload of a whole, 7-bit-length close frame at the start of ``rest``."""
    if len(rest) < 2 or rest[0] & 0x0F != OP_CLOSE or (rest[1] & 0x80) != (0x80 if masked else 0):
        return None
    n = rest[1] & 0x7F
    hl = 6 if masked else 2
    if n < 2 or n > 125 or len(rest) < hl + n:
        return None
    payload = rest[hl:hl + n]
    if masked:
        key = rest[2:6] * (n // 4 + 1)
        payload = bytes(a ^ b for a, b in zip(payload, key, strict=False))
    return payload


def _pieces(scanner: FrameScanner, chunk: bytes) -> list[Any]:
    out: list[Any] = []
    for piece in scanner.feed(memoryview(chunk)):
        if isinstance(piece, ControlFrame | Violation):
            out.append(piece)
        elif out and isinstance(out[-1], bytes):
            out[-1] += bytes(piece)
        else:
            out.append(bytes(piece))
    return out


def check_against_wsproto(stream: bytes, masked: bool) -> str:
    """Compare the two readings of ``stream``; returns how the comparison ended."""
    ref = Reference(stream, masked)
    scanner = FrameScanner(masked=masked, max_message_size=MAX_FRAME_PAYLOAD)
    start = 0
    messages = 0
    for op, _length, fin, payload, end in ref.frames:
        # Fed exactly up to wsproto's boundary, the scanner returns exactly this frame
        # and sits between frames.
        got = _pieces(scanner, stream[start:end])
        if op & 0x08:
            assert got == [ControlFrame(op, stream[start:end], payload)], (start, end)
        else:
            assert got == ([stream[start:end]] if end > start else []), (start, end)
            messages += fin
        assert not scanner.mid_frame
        assert scanner.messages == messages
        if op == OP_CLOSE and len(payload) >= 2 and payload[:2] == (1014).to_bytes(2, "big"):
            return "1014"  # wsproto stops at its own refusal below; relay accepts 1014
        start = end
    if ref.after_close:
        return "close"
    rest = stream[start:]
    got = _pieces(scanner, rest)
    if ref.failed is None:
        if ref.tail_in_data_frame:  # the stream ends inside a data frame's payload
            if got and isinstance(got[0], Violation):
                # The scanner refuses on the header (a continuation with no message, a
                # new message inside one); wsproto once the payload is there.
                if ref.missing > MAX_PADDING:  # a 64-bit length: too long to pad and ask
                    assert got[0].close_code in (1002, 1009), got[0]
                    return "refused early"
                whole = Reference(stream + b"\0" * ref.missing, masked)
                assert whole.failed == got[0].close_code, (got, whole.failed)
                return "refused early"
            assert got == [rest] and scanner.mid_frame
            return "tail"
        assert got == []  # a partial header or control frame is held back, not returned
        return "whole" if not rest else "held"
    if ref.failed == 1007 and (stream[start] & 0x0F) in (OP_TEXT, OP_CONT):
        return "utf-8"  # wsproto's text decoding; relay does not decode data payloads
    close = _close_payload(rest, masked)
    whole_close = stream[start] & 0xF0 == 0x80  # FIN set, no RSV bits: not refused for those
    if (ref.failed == 1002 and whole_close and close is not None
            and close[:2] == (1014).to_bytes(2, "big")):
        # wsproto refuses code 1014; the scanner accepts it and checks only the reason
        try:
            close[2:].decode()
        except UnicodeDecodeError:
            assert got[:1] == [Violation(1007, "close reason is not valid UTF-8")]
        else:
            assert isinstance(got[0], ControlFrame) and got[0].payload == close
        return "1014"
    if not got and len(rest) < MAX_HEADER_SIZE:
        return "undecided"  # wsproto decided on a header the scanner has not seen whole
    assert got and isinstance(got[0], Violation), (got[:1], ref.failed)
    assert got[0].close_code == ref.failed, (got[0], ref.failed)
    return "refused"


MAX_PADDING = 1 << 20  # bytes of payload the check may add to let wsproto see a frame whole


# ---------------------------------------------------------------------------- strategies

_CLOSE_CODES = [1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1011, 1012, 1013, 1014,
                1015, 1016, 2999, 3000, 4999, 5000, 999, 0, 65535]


@st.composite
def _payload(draw: st.DrawFn, opcode: int) -> bytes:
    if opcode == OP_CLOSE:
        return draw(st.one_of(
            st.builds(lambda c, r: c.to_bytes(2, "big") + r, st.sampled_from(_CLOSE_CODES),
                      st.one_of(st.text(max_size=30).map(str.encode), st.binary(max_size=8))),
            st.binary(max_size=3),
            st.binary(min_size=124, max_size=130)))
    if opcode in (OP_PING, OP_PONG):
        return draw(st.one_of(st.binary(max_size=20), st.binary(min_size=124, max_size=128)))
    text = st.text(max_size=60).map(str.encode)  # valid UTF-8, for text frames
    return draw(st.one_of(
        text, text, text,
        st.binary(max_size=200),
        st.sampled_from([0, 125, 126, 127, 65535, 65536]).map(lambda n: b"a" * n)))


@st.composite
def streams(draw: st.DrawFn, masked: bool) -> bytes:
    """Plausible frames with the odd wrong bit, or random bytes; maybe cut short."""
    if draw(st.integers(0, 7)) == 0:
        return draw(st.binary(max_size=100))
    out = b""
    in_message = False
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.integers(0, 15)) == 0:  # now and then anything, in any order
            opcode = draw(st.integers(0, 15))
        elif draw(st.integers(0, 3)) == 0:
            opcode = draw(st.sampled_from([OP_PING, OP_PONG, OP_PING, OP_PONG, OP_CLOSE]))
        else:
            opcode = OP_CONT if in_message else draw(st.sampled_from([OP_TEXT, OP_BINARY]))
        fin = draw(st.integers(0, 7)) > 0 or (opcode < 3 and draw(st.booleans()))
        if opcode < 3:
            in_message = not fin
        right_mask = draw(st.integers(0, 31)) > 0
        key = draw(st.binary(min_size=4, max_size=4)) if masked == right_mask else None
        out += raw_frame(
            opcode, draw(_payload(opcode)), key=key, fin=fin,
            rsv=draw(st.sampled_from([0, 0, 0, 4, 7])),
            form=draw(st.sampled_from(["minimal"] * 15 + ["16", "64"])))
    return out[: len(out) - draw(st.sampled_from([0, 0, 0, 1, 2, 5, 13]))]


@settings(max_examples=250, deadline=None)
@given(masked=st.booleans(), data=st.data())
def test_scanner_agrees_with_wsproto(masked: bool, data: st.DataObject) -> None:
    check_against_wsproto(data.draw(streams(masked), label="stream"), masked)


# ---------------------------------------------------------------------------- fixed cases


def test_each_ending_of_the_comparison_is_reachable() -> None:
    """The property above is not vacuous: every way it can end happens on real streams."""
    k = b"\x01\x02\x03\x04"
    text = raw_frame(OP_TEXT, b"hi", key=k)
    cases = {
        "whole": text + raw_frame(OP_BINARY, b"x" * 300, key=k, fin=False)
        + raw_frame(OP_CONT, b"y", key=k) + raw_frame(OP_PING, b"p", key=k),
        "tail": text + raw_frame(OP_BINARY, b"x" * 300, key=k)[:-5],
        "held": text + raw_frame(OP_PING, b"p" * 10, key=k)[:-1],
        "close": raw_frame(OP_CLOSE, b"\x03\xe8bye", key=k) + text,
        "utf-8": raw_frame(OP_TEXT, b"\xff\xfe", key=k),
        "1014": raw_frame(OP_CLOSE, (1014).to_bytes(2, "big") + b"bad gateway", key=k),
        "refused": text + raw_frame(OP_BINARY, b"z", key=None),
        "refused early": text + raw_frame(OP_CONT, b"abc", key=k)[:-3],
        "undecided": text + bytes([0x83, 0xFE, 0x00]),  # reserved opcode, header cut short
    }
    for expected, stream in cases.items():
        assert check_against_wsproto(stream, masked=True) == expected, expected
    # found by scripts/fuzz: a UTF-8 sequence split across two frames of a text message
    split = raw_frame(OP_TEXT, "é".encode()[:1], key=k, fin=False) + raw_frame(
        OP_CONT, "é".encode()[1:], key=k)
    assert check_against_wsproto(split, masked=True) == "whole"


def test_refusals_match_wsproto_code_for_code() -> None:
    k = b"\x09\x09\x09\x09"
    for frame, code in [
        (raw_frame(OP_CONT, b"a", key=k), 1002),  # continuation with no message
        (raw_frame(OP_PING, b"a", key=k, fin=False), 1002),  # fragmented control
        (raw_frame(OP_PONG, b"a" * 126, key=k), 1002),  # control over 125 bytes
        (raw_frame(3, b"a", key=k), 1002),  # reserved opcode
        (raw_frame(OP_BINARY, b"a" * 5, key=k, form="16"), 1002),  # not minimal
        (raw_frame(OP_CLOSE, b"\x03", key=k), 1002),  # 1-byte close payload
        (raw_frame(OP_CLOSE, (1005).to_bytes(2, "big"), key=k), 1002),  # local-only code
        (raw_frame(OP_CLOSE, b"\x03\xe8\xff", key=k), 1007),  # close reason not UTF-8
    ]:
        assert check_against_wsproto(frame, masked=True) == "refused"
        assert Reference(frame, masked=True).failed == code


@pytest.mark.parametrize("stream", [
    b"\x08\x02\x03\xf6",  # a close (1014) without FIN: refused as fragmented, by both
    b"\x08\x03\x03\xf6\x80",  # the same with a reason that is not UTF-8
])
def test_a_fragmented_1014_close_is_refused_as_fragmented_by_both(stream: bytes) -> None:
    assert check_against_wsproto(stream, masked=False) == "refused"


def test_a_refusal_on_a_64_bit_length_header_is_checked_without_padding_it() -> None:
    # scripts/fuzz found it: a continuation with no message, announcing 2**56 bytes; the
    # check used to pad the stream to that length to ask wsproto (MemoryError)
    stream = b"\x00\xff\x01\xf64.1\x81\x00\x00\x81\x81\x0e\x00"
    assert check_against_wsproto(stream, masked=True) == "refused early"
