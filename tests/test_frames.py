"""relay.frames: frame boundaries found without decoding, checked against wsproto."""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Callable, Iterable, Sequence

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import CloseReason

from relay.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ControlFrame,
    FrameScanner,
    Piece,
    Violation,
    encode_close,
    encode_frame,
    parse_close,
    valid_close_code,
)

LIMIT = 1 << 20  # bytes: max_message_size used where the limit is not under test

# ---------------------------------------------------------------------------- helpers


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    mask: bool,
    fin: bool = True,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    """Hand-build one frame, with any bits (rsv: 0-7 for RSV1..3) and a declared length."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n <= 0xFFFF:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def frame_spans(stream: bytes) -> list[tuple[int, int, int, int]]:
    """(start, payload start, end, opcode) of each frame of a well-formed stream.

    A plain reference walk, independent of the scanner.
    """
    spans = []
    pos = 0
    while pos < len(stream):
        b0, b1 = stream[pos], stream[pos + 1]
        ln, hl = b1 & 0x7F, 2
        if ln == 126:
            (ln,) = struct.unpack_from("!H", stream, pos + 2)
            hl = 4
        elif ln == 127:
            (ln,) = struct.unpack_from("!Q", stream, pos + 2)
            hl = 10
        if b1 & 0x80:
            hl += 4
        spans.append((pos, pos + hl, pos + hl + ln, b0 & 0x0F))
        pos += hl + ln
    return spans


@attrs.define
class Scanned:
    items: list[bytes | ControlFrame | Violation]  # data pieces copied to bytes, merged
    forwarded: bytes  # data pieces and ControlFrame.raw, in order

    @property
    def controls(self) -> list[ControlFrame]:
        return [i for i in self.items if isinstance(i, ControlFrame)]

    @property
    def violation(self) -> Violation | None:
        last = self.items[-1] if self.items else None
        return last if isinstance(last, Violation) else None


def scan(
    scanner: FrameScanner,
    chunks: Iterable[bytes],
    after_feed: Callable[[int, int], None] | None = None,
) -> Scanned:
    """Feed chunks through ONE reused buffer (as the I/O layer does), copying pieces out.

    Reusing the buffer catches a scanner that keeps a view of an earlier chunk.
    ``after_feed(bytes_fed, bytes_forwarded)`` runs after every feed. Stops at a Violation.
    """
    chunks = list(chunks)
    buf = bytearray(max((len(c) for c in chunks), default=0))
    view = memoryview(buf)
    items: list[bytes | ControlFrame | Violation] = []
    forwarded = bytearray()
    fed = 0
    for chunk in chunks:
        buf[: len(chunk)] = chunk
        buf[len(chunk) :] = os.urandom(len(buf) - len(chunk))  # stale bytes are garbage
        pieces: list[Piece] = scanner.feed(view[: len(chunk)])
        fed += len(chunk)
        for i, piece in enumerate(pieces):
            if isinstance(piece, Violation):
                assert i == len(pieces) - 1, "a Violation is always the last item"
                items.append(piece)
            elif isinstance(piece, ControlFrame):
                items.append(piece)
                forwarded += piece.raw
            else:
                assert isinstance(piece, memoryview | bytes)
                assert len(piece) > 0, "no empty data pieces"
                data = bytes(piece)
                forwarded += data
                if items and isinstance(items[-1], bytes):
                    items[-1] += data
                else:
                    items.append(data)
        if after_feed is not None:
            after_feed(fed, len(forwarded))
        if pieces and isinstance(pieces[-1], Violation):
            break
    return Scanned(items, bytes(forwarded))


def chunked(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    """``stream`` cut at the given offsets (duplicates give empty chunks)."""
    points = [0, *sorted(min(max(c, 0), len(stream)) for c in cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(points)]


def scanner_for(side: ConnectionType, limit: int = LIMIT) -> FrameScanner:
    """The scanner for frames SENT by a wsproto connection on ``side``."""
    return FrameScanner(masked=side is ConnectionType.CLIENT, max_message_size=limit)


def opposite(side: ConnectionType) -> ConnectionType:
    return ConnectionType.SERVER if side is ConnectionType.CLIENT else ConnectionType.CLIENT


Normal = tuple[object, ...]
Control = tuple[str, bytes]  # ("ping" or "pong", payload)
Fragment = tuple[str, str | bytes, bool]  # (kind "text"/"binary", data, message_finished)
Script = list[list[Fragment | Control] | Control]  # messages and controls between them


def join_parts(kind: str, parts: Sequence[str | bytes | bytearray]) -> str | bytes:
    """A whole message from its fragments: str for "text", bytes for "binary"."""
    if kind == "text":
        texts = [p for p in parts if isinstance(p, str)]
        assert len(texts) == len(parts), parts
        return "".join(texts)
    blobs = [p for p in parts if isinstance(p, (bytes, bytearray))]
    assert len(blobs) == len(parts), parts
    return b"".join(blobs)


def control_event(name: str, payload: bytes) -> Ping | Pong:
    return Ping(payload) if name == "ping" else Pong(payload)


def data_event(kind: str, data: str | bytes, finished: bool) -> TextMessage | BytesMessage:
    if kind == "text":
        assert isinstance(data, str), data
        return TextMessage(data=data, message_finished=finished)
    assert isinstance(data, bytes), data
    return BytesMessage(data=data, message_finished=finished)


def received(conn: Connection, stream: bytes) -> list[Normal]:
    """What a wsproto peer makes of ``stream``: whole messages, pings, pongs, close."""
    conn.receive_data(stream)
    out: list[Normal] = []
    parts: list[str | bytes | bytearray] = []
    for event in conn.events():
        if isinstance(event, Message):
            parts.append(event.data)
            if event.message_finished:
                kind = "text" if isinstance(event, TextMessage) else "binary"
                out.append((kind, join_parts(kind, parts)))
                parts = []
        elif isinstance(event, Ping):
            out.append(("ping", bytes(event.payload)))
        elif isinstance(event, Pong):
            out.append(("pong", bytes(event.payload)))
        elif isinstance(event, CloseConnection):
            out.append(("close", event.code, event.reason))
        else:  # pragma: no cover - wsproto reports a protocol error this way
            out.append(("other", repr(event)))
    return out


def data_of(piece: Piece) -> bytes:
    """A data piece's bytes; fails if ``piece`` is a ControlFrame or a Violation."""
    assert isinstance(piece, (memoryview, bytes)), piece
    return bytes(piece)


def one(pieces: Sequence[Piece]) -> Piece:
    assert len(pieces) == 1, pieces
    return pieces[0]


def violation_of(scanner: FrameScanner, stream: bytes) -> Violation:
    """Feed ``stream`` in one chunk; it must end in a Violation, and feed() is then closed."""
    result = scan(scanner, [stream])
    assert result.violation is not None, result.items
    with pytest.raises(RuntimeError):
        scanner.feed(memoryview(b"\x82\x00"))
    return result.violation


# ---------------------------------------------------------------------------- differential

# Close codes both sides accept (wsproto refuses 1014 on receipt; relay.frames allows it).
WSPROTO_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013]
WSPROTO_CLOSE_CODES += [3000, 3999, 4000, 4001, 4999]

big_binary = st.builds(
    lambda n, b: bytes([b]) * n,
    st.sampled_from([125, 126, 65535, 65536, 70_000]),
    st.integers(0, 255),
)
binary_fragment = st.one_of(st.binary(max_size=400), st.binary(max_size=4096), big_binary)
text_fragment = st.text(max_size=300)
control = st.tuples(st.sampled_from(["ping", "pong"]), st.binary(max_size=125))


@st.composite
def message(draw: st.DrawFn) -> list[Fragment | Control]:
    """One message as a list of fragments, with optional control frames between them."""
    kind = draw(st.sampled_from(["text", "binary"]))
    frag = text_fragment if kind == "text" else binary_fragment
    n = draw(st.integers(1, 4))
    items: list[Fragment | Control] = []
    for i in range(n):
        items.append((kind, draw(frag), i == n - 1))
        if i < n - 1 and draw(st.booleans()):
            items.append(draw(control))
    return items


close_event = st.one_of(
    st.just(CloseConnection(code=CloseReason.NO_STATUS_RCVD)),  # empty close payload
    st.builds(
        CloseConnection,
        code=st.sampled_from(WSPROTO_CLOSE_CODES),
        reason=st.text(max_size=30),
    ),
)


def to_events(script: Script) -> tuple[list[Event], list[Normal], int]:
    """wsproto events to send, the whole messages/controls expected, and the message count."""
    events: list[Event] = []
    expected: list[Normal] = []
    messages = 0
    for entry in script:
        if isinstance(entry, list):  # a message
            parts: list[str | bytes] = []
            kind = ""
            for item in entry:
                if len(item) == 2:  # a ping or pong between fragments
                    events.append(control_event(*item))
                    expected.append(item)
                    continue
                kind, data, finished = item
                events.append(data_event(kind, data, finished))
                parts.append(data)
            expected.append((kind, join_parts(kind, parts)))
            messages += 1
        else:
            events.append(control_event(*entry))
            expected.append(entry)
    return events, expected, messages


def encode_with_wsproto(side: ConnectionType, events: list[Event], ext: bool = False) -> bytes:
    extensions: list[Extension] = []
    if ext:
        pmd = PerMessageDeflate()
        pmd.finalize("permessage-deflate")
        extensions.append(pmd)
    conn = Connection(side, extensions=extensions)
    return b"".join(conn.send(e) for e in events)


SIDES = [ConnectionType.CLIENT, ConnectionType.SERVER]


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    side=st.sampled_from(SIDES),
    script=st.lists(st.one_of(message(), control), max_size=10),
    close=close_event,
    data=st.data(),
)
def test_relayed_stream_matches_wsproto_for_any_chunking(
    side: ConnectionType,
    script: Script,
    close: CloseConnection,
    data: st.DataObject,
) -> None:
    events, expected, messages = to_events(script)
    events.append(close)
    expected.append(("close", close.code, close.reason if close.code != 1005 else ""))
    stream = encode_with_wsproto(side, events)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=25), label="cuts")
    spans = frame_spans(stream)
    scanner = scanner_for(side)

    def after_feed(fed: int, forwarded: int) -> None:
        # Where the forwarded bytes end: at a boundary, or inside a data frame (mid_frame).
        inside = [s for s in spans if s[0] < forwarded < s[2]]
        assert scanner.mid_frame == bool(inside)
        assert all(op < OP_CLOSE for *_, op in inside), "a control frame is never split"
        # Nothing is held beyond a header or one control frame; payload streams out.
        assert 0 <= fed - forwarded <= 14 + 125
        for _, payload_start, end, op in spans:
            if op < OP_CLOSE and payload_start <= fed <= end:
                assert forwarded == fed, "a data frame's payload is never held back"

    result = scan(scanner, chunked(stream, cuts), after_feed)

    assert result.violation is None
    assert result.forwarded == stream, "bytes pass through unchanged"
    assert scanner.messages == messages
    assert not scanner.mid_frame
    assert scanner.data_bytes == sum(e - s for s, _, e, op in spans if op < OP_CLOSE)
    sent_controls = [
        (OP_PING if kind == "ping" else OP_PONG, payload)
        for kind, payload, *_ in expected
        if kind in ("ping", "pong")
    ]
    got = [(c.opcode, c.payload) for c in result.controls]
    assert got[:-1] == sent_controls
    close_frame = result.controls[-1]
    assert close_frame.opcode == OP_CLOSE
    assert parse_close(close_frame.payload) == (
        (None, "") if close.code == 1005 else (close.code, close.reason)
    )
    # The receiving peer sees the same thing from the relayed bytes as from the originals.
    original = received(Connection(opposite(side)), stream)
    relayed = received(Connection(opposite(side)), result.forwarded)
    assert original == expected
    assert relayed == original


@pytest.mark.parametrize("side", SIDES)
def test_every_split_point_of_a_mixed_stream(side: ConnectionType) -> None:
    events: list[Event] = [
        TextMessage("héllo", message_finished=False),
        Ping(b"p1"),
        TextMessage("", message_finished=False),
        TextMessage("wörld"),
        BytesMessage(b""),
        BytesMessage(bytes(300)),
        Pong(b""),
        CloseConnection(1000, "bye"),
    ]
    stream = encode_with_wsproto(side, events)
    whole = scan(scanner_for(side), [stream])
    for cut in range(len(stream) + 1):
        result = scan(scanner_for(side), chunked(stream, [cut]))
        assert result.items == whole.items
    bytewise = scanner_for(side)
    result = scan(bytewise, [stream[i : i + 1] for i in range(len(stream))])
    assert result.items == whole.items
    assert result.forwarded == stream
    assert bytewise.messages == 3


# ---------------------------------------------------------------------------- pass-through


@pytest.mark.parametrize("side", SIDES)
def test_permessage_deflate_frames_pass_through_with_rsv1(side: ConnectionType) -> None:
    events: list[Event] = [
        TextMessage("compress me " * 50),
        BytesMessage(b"\x00" * 5000, message_finished=False),
        BytesMessage(b"\x01" * 100),
        CloseConnection(1000),
    ]
    stream = encode_with_wsproto(side, events, ext=True)
    assert frame_spans(stream)[0][3] == OP_TEXT
    assert stream[0] & 0x40, "wsproto set RSV1 on the compressed message"
    scanner = scanner_for(side)
    result = scan(scanner, chunked(stream, range(0, len(stream), 7)))
    assert result.violation is None
    assert result.forwarded == stream
    assert scanner.messages == 2
    pmd = PerMessageDeflate()
    assert pmd.accept("permessage-deflate") is not None
    peer = Connection(opposite(side), extensions=[pmd])
    assert received(peer, result.forwarded) == [
        ("text", "compress me " * 50),
        ("binary", b"\x00" * 5000 + b"\x01" * 100),
        ("close", 1000, ""),
    ]


@pytest.mark.parametrize("rsv", range(1, 8))
def test_rsv_bits_are_not_violations(rsv: int) -> None:
    stream = frame(OP_BINARY, b"abc", mask=True, rsv=rsv) + frame(OP_PING, b"x", mask=True, rsv=rsv)
    scanner = FrameScanner(masked=True, max_message_size=LIMIT)
    result = scan(scanner, [stream])
    assert result.violation is None
    assert result.forwarded == stream
    assert result.controls[0].payload == b"x"


def test_zero_length_data_frame_is_a_whole_frame() -> None:
    scanner = FrameScanner(masked=False, max_message_size=0)
    piece = one(scanner.feed(memoryview(b"\x82\x00")))
    assert data_of(piece) == b"\x82\x00"
    assert scanner.messages == 1
    assert not scanner.mid_frame
    assert scanner.data_bytes == 2


def test_whole_data_frames_in_a_chunk_come_back_as_one_memoryview() -> None:
    stream = b"".join(encode_frame(OP_BINARY, os.urandom(320), mask=True) for _ in range(10))
    scanner = FrameScanner(masked=True, max_message_size=LIMIT)
    piece = one(scanner.feed(memoryview(stream)))
    assert isinstance(piece, memoryview)
    assert piece.tobytes() == stream
    assert scanner.messages == 10
    assert scanner.data_bytes == len(stream)
    assert not scanner.mid_frame


def test_control_frame_splits_the_data_run_in_stream_order() -> None:
    a = frame(OP_TEXT, b"a", mask=False, fin=False)
    ping = frame(OP_PING, b"hi", mask=False)
    b = frame(OP_CONT, b"b", mask=False)
    scanner = FrameScanner(masked=False, max_message_size=LIMIT)
    pieces = scanner.feed(memoryview(a + ping + b))
    assert [p if isinstance(p, ControlFrame) else data_of(p) for p in pieces] == [
        a,
        ControlFrame(OP_PING, ping, b"hi"),
        b,
    ]
    assert scanner.messages == 1


def test_large_frame_payload_streams_out_chunk_by_chunk() -> None:
    payload = os.urandom(1 << 20)
    stream = encode_frame(OP_BINARY, payload, mask=True)
    scanner = FrameScanner(masked=True, max_message_size=1 << 20)
    step = 64 * 1024
    out = bytearray()
    for i in range(0, len(stream), step):
        chunk = stream[i : i + step]
        pieces = scanner.feed(memoryview(chunk))
        assert sum(len(data_of(p)) for p in pieces) == len(chunk)
        out += b"".join(data_of(p) for p in pieces)
        assert scanner.mid_frame == (i + step < len(stream))
    assert bytes(out) == stream
    assert scanner.messages == 1


def test_split_header_is_held_then_returned_whole_as_bytes() -> None:
    stream = frame(OP_BINARY, b"x" * 300, mask=True)  # 2 + 2 + 4 header bytes
    scanner = FrameScanner(masked=True, max_message_size=LIMIT)
    for i in range(7):
        assert scanner.feed(memoryview(stream[i : i + 1])) == []
        assert not scanner.mid_frame, "held header bytes were not returned"
        assert scanner.data_bytes == 0
    pieces = scanner.feed(memoryview(stream[7:20]))
    assert [type(p) for p in pieces] == [bytes, memoryview]
    assert pieces[0] == stream[:8]
    assert data_of(pieces[1]) == stream[8:20]
    assert scanner.mid_frame
    assert scanner.messages == 1
    rest = one(scanner.feed(memoryview(stream[20:])))
    assert data_of(rest) == stream[20:]
    assert not scanner.mid_frame


def test_control_frame_is_returned_only_when_whole() -> None:
    ping = frame(OP_PING, b"12345", mask=True)
    scanner = FrameScanner(masked=True, max_message_size=LIMIT)
    assert scanner.feed(memoryview(ping[:4])) == []
    assert scanner.feed(memoryview(ping[4:9])) == []
    assert not scanner.mid_frame
    assert scanner.feed(memoryview(ping[9:])) == [ControlFrame(OP_PING, ping, b"12345")]
    assert scanner.data_bytes == 0


# ---------------------------------------------------------------------------- violations


def test_unmasked_client_frame_is_1002() -> None:
    v = violation_of(
        FrameScanner(masked=True, max_message_size=LIMIT), frame(OP_TEXT, b"hi", mask=False)
    )
    assert v.close_code == 1002


def test_masked_server_frame_is_1002() -> None:
    v = violation_of(
        FrameScanner(masked=False, max_message_size=LIMIT), frame(OP_TEXT, b"hi", mask=True)
    )
    assert v.close_code == 1002


def test_unmasked_client_control_frame_is_1002() -> None:
    v = violation_of(
        FrameScanner(masked=True, max_message_size=LIMIT), frame(OP_PING, b"", mask=False)
    )
    assert v.close_code == 1002


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7])
def test_reserved_data_opcode_is_1002(opcode: int) -> None:
    v = violation_of(
        FrameScanner(masked=True, max_message_size=LIMIT), frame(opcode, b"x", mask=True)
    )
    assert v.close_code == 1002


@pytest.mark.parametrize("opcode", [11, 12, 13, 14, 15])
def test_reserved_control_opcode_is_1002(opcode: int) -> None:
    v = violation_of(
        FrameScanner(masked=False, max_message_size=LIMIT), frame(opcode, b"x", mask=False)
    )
    assert v.close_code == 1002


@pytest.mark.parametrize("opcode", [OP_CLOSE, OP_PING, OP_PONG])
def test_fragmented_control_frame_is_1002(opcode: int) -> None:
    stream = frame(opcode, b"", mask=True, fin=False)
    v = violation_of(FrameScanner(masked=True, max_message_size=LIMIT), stream)
    assert v.close_code == 1002


@pytest.mark.parametrize("opcode", [OP_CLOSE, OP_PING, OP_PONG])
def test_control_frame_with_126_byte_payload_is_1002(opcode: int) -> None:
    stream = frame(opcode, b"\x03\xe8" + b"x" * 124, mask=False)
    v = violation_of(FrameScanner(masked=False, max_message_size=LIMIT), stream)
    assert v.close_code == 1002


def test_control_frame_with_125_byte_payload_passes() -> None:
    stream = frame(OP_PING, b"x" * 125, mask=False)
    result = scan(FrameScanner(masked=False, max_message_size=LIMIT), [stream])
    assert result.items == [ControlFrame(OP_PING, stream, b"x" * 125)]


def test_continuation_without_a_message_is_1002() -> None:
    v = violation_of(
        FrameScanner(masked=True, max_message_size=LIMIT), frame(OP_CONT, b"x", mask=True)
    )
    assert v.close_code == 1002


def test_continuation_after_a_finished_message_is_1002() -> None:
    stream = frame(OP_TEXT, b"a", mask=True) + frame(OP_CONT, b"b", mask=True)
    v = violation_of(FrameScanner(masked=True, max_message_size=LIMIT), stream)
    assert v.close_code == 1002


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_new_data_frame_inside_a_fragmented_message_is_1002(opcode: int) -> None:
    stream = frame(OP_TEXT, b"a", mask=True, fin=False) + frame(opcode, b"b", mask=True)
    v = violation_of(FrameScanner(masked=True, max_message_size=LIMIT), stream)
    assert v.close_code == 1002


def test_64bit_length_with_top_bit_set_is_1002() -> None:
    stream = struct.pack("!BBQ", 0x82, 127, 1 << 63)
    v = violation_of(FrameScanner(masked=False, max_message_size=1 << 70), stream)
    assert v.close_code == 1002


def test_message_over_max_message_size_is_1009() -> None:
    scanner = FrameScanner(masked=True, max_message_size=1000)
    v = violation_of(scanner, frame(OP_BINARY, b"x" * 1001, mask=True))
    assert v.close_code == 1009
    assert "1000" in v.reason


def test_message_of_exactly_max_message_size_passes() -> None:
    stream = frame(OP_BINARY, b"x" * 1000, mask=True) * 3
    scanner = FrameScanner(masked=True, max_message_size=1000)
    assert scan(scanner, [stream]).forwarded == stream
    assert scanner.messages == 3


def test_fragmented_message_of_exactly_max_message_size_passes() -> None:
    stream = (
        frame(OP_TEXT, b"x" * 400, mask=True, fin=False)
        + frame(OP_PING, b"p" * 100, mask=True)  # control payloads do not count
        + frame(OP_CONT, b"", mask=True, fin=False)
        + frame(OP_CONT, b"x" * 600, mask=True)
        + frame(OP_BINARY, b"y" * 1000, mask=True)  # the count restarts per message
    )
    scanner = FrameScanner(masked=True, max_message_size=1000)
    result = scan(scanner, chunked(stream, [3, 500, 1100]))
    assert result.violation is None
    assert result.forwarded == stream
    assert scanner.messages == 2


def test_fragmented_message_one_byte_over_max_message_size_is_1009() -> None:
    first = frame(OP_TEXT, b"x" * 400, mask=True, fin=False)
    stream = first + frame(OP_CONT, b"x" * 601, mask=True)
    scanner = FrameScanner(masked=True, max_message_size=1000)
    result = scan(scanner, [stream])
    assert result.items[:-1] == [first], "bytes before the offending frame are returned"
    assert result.violation == Violation(1009, result.violation.reason if result.violation else "")
    assert scanner.messages == 0


def test_close_with_one_byte_payload_is_1002() -> None:
    v = violation_of(
        FrameScanner(masked=True, max_message_size=LIMIT), frame(OP_CLOSE, b"\x03", mask=True)
    )
    assert v.close_code == 1002


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_close_with_invalid_code_is_1002(code: int) -> None:
    stream = frame(OP_CLOSE, struct.pack("!H", code), mask=False)
    v = violation_of(FrameScanner(masked=False, max_message_size=LIMIT), stream)
    assert v.close_code == 1002


def test_close_with_invalid_utf8_reason_is_1007() -> None:
    stream = frame(OP_CLOSE, b"\x03\xe8ok\xc3", mask=True)
    v = violation_of(FrameScanner(masked=True, max_message_size=LIMIT), stream)
    assert v.close_code == 1007


def test_empty_close_passes_as_it_came() -> None:
    stream = frame(OP_CLOSE, b"", mask=True)
    result = scan(FrameScanner(masked=True, max_message_size=LIMIT), [stream])
    assert result.items == [ControlFrame(OP_CLOSE, stream, b"")]


def test_text_payload_is_not_validated() -> None:
    stream = frame(OP_TEXT, b"\xff\xfe not utf-8", mask=True)
    result = scan(FrameScanner(masked=True, max_message_size=LIMIT), [stream])
    assert result.violation is None
    assert result.forwarded == stream


def test_violation_is_last_and_the_offending_frame_is_not_returned() -> None:
    good = frame(OP_BINARY, b"a", mask=True) + frame(OP_PING, b"", mask=True)
    good += frame(OP_BINARY, b"b", mask=True)
    bad = frame(OP_BINARY, b"c", mask=False)
    scanner = FrameScanner(masked=True, max_message_size=LIMIT)
    pieces = scanner.feed(memoryview(good + bad + frame(OP_BINARY, b"d", mask=True)))
    assert isinstance(pieces[-1], Violation)
    assert pieces[-1].close_code == 1002
    forwarded = b"".join(p.raw if isinstance(p, ControlFrame) else data_of(p) for p in pieces[:-1])
    assert forwarded == good
    assert scanner.messages == 2
    with pytest.raises(RuntimeError):
        scanner.feed(memoryview(b""))


def test_violation_in_a_header_split_across_chunks() -> None:
    bad = frame(OP_BINARY, b"x" * 300, mask=False)  # 4-byte unmasked header from a client
    scanner = FrameScanner(masked=True, max_message_size=LIMIT)
    assert scanner.feed(memoryview(bad[:1])) == []
    assert scanner.feed(memoryview(bad[1:3])) == []
    pieces = scanner.feed(memoryview(bad[3:]))
    assert [type(p) for p in pieces] == [Violation]


def test_violation_in_a_control_frame_split_across_chunks() -> None:
    bad = frame(OP_CLOSE, b"\x03\xe8\xff", mask=True)
    scanner = FrameScanner(masked=True, max_message_size=LIMIT)
    assert scanner.feed(memoryview(bad[:3])) == []
    pieces = scanner.feed(memoryview(bad[3:]))
    assert pieces == [Violation(1007, "close reason is not valid UTF-8")]


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.lists(st.integers(0, 300), min_size=1, max_size=4), min_size=1, max_size=5),
    limit=st.integers(0, 700),
    data=st.data(),
)
def test_max_message_size_is_exact_for_any_fragmentation(
    sizes: list[list[int]], limit: int, data: st.DataObject
) -> None:
    stream = b""
    for fragments in sizes:
        for i, n in enumerate(fragments):
            op = OP_BINARY if i == 0 else OP_CONT
            stream += frame(op, b"z" * n, mask=False, fin=i == len(fragments) - 1)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    scanner = FrameScanner(masked=False, max_message_size=limit)
    result = scan(scanner, chunked(stream, cuts))
    first_over = next((i for i, f in enumerate(sizes) if sum(f) > limit), None)
    if first_over is None:
        assert result.violation is None
        assert result.forwarded == stream
    else:
        assert result.violation is not None
        assert result.violation.close_code == 1009
        assert scanner.messages == first_over


# ---------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 100_000])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_encode_frame_round_trips_through_wsproto(size: int, opcode: int) -> None:
    payload = b"a" * size
    for mask, peer_side in [(True, ConnectionType.SERVER), (False, ConnectionType.CLIENT)]:
        raw = encode_frame(opcode, payload, mask=mask)
        kind = "text" if opcode == OP_TEXT else "binary"
        data: str | bytes = payload.decode() if kind == "text" else payload
        assert received(Connection(peer_side), raw) == [(kind, data)]
        scanner = FrameScanner(masked=mask, max_message_size=LIMIT)
        assert scan(scanner, [raw]).forwarded == raw
        assert scanner.messages == 1


@pytest.mark.parametrize("mask", [True, False])
def test_encode_frame_fragments_and_controls_round_trip(mask: bool) -> None:
    peer = Connection(ConnectionType.SERVER if mask else ConnectionType.CLIENT)
    raw = (
        encode_frame(OP_BINARY, b"ab", mask=mask, fin=False)
        + encode_frame(OP_PING, b"keepalive", mask=mask)
        + encode_frame(OP_CONT, b"cd", mask=mask)
        + encode_frame(OP_PONG, b"", mask=mask)
    )
    assert received(peer, raw) == [("ping", b"keepalive"), ("binary", b"abcd"), ("pong", b"")]


def test_encode_frame_masks_with_a_fresh_key() -> None:
    a = encode_frame(OP_BINARY, b"\x00" * 16, mask=True)
    b = encode_frame(OP_BINARY, b"\x00" * 16, mask=True)
    assert a[1] & 0x80 and a[2:6] != b[2:6]
    assert a[6:] == a[2:6] * 4, "a zero payload masked is the key repeated"


def test_encode_frame_refuses_invalid_frames() -> None:
    with pytest.raises(ValueError):
        encode_frame(3, b"", mask=False)
    with pytest.raises(ValueError):
        encode_frame(OP_PING, b"x" * 126, mask=False)
    with pytest.raises(ValueError):
        encode_frame(OP_CLOSE, b"", mask=False, fin=False)


@pytest.mark.parametrize("code", [1000, 1001, 1008, 1009, 1011, 1013, 4000, 4001])
@pytest.mark.parametrize("mask", [True, False])
def test_encode_close_round_trips_through_wsproto(code: int, mask: bool) -> None:
    peer = Connection(ConnectionType.SERVER if mask else ConnectionType.CLIENT)
    raw = encode_close(code, "bÿe", mask=mask)
    assert received(peer, raw) == [("close", code, "bÿe")]
    result = scan(FrameScanner(masked=mask, max_message_size=0), [raw])
    assert parse_close(result.controls[0].payload) == (code, "bÿe")


def test_encode_close_1014_is_valid_for_us() -> None:
    raw = encode_close(1014, "bad gateway", mask=False)
    result = scan(FrameScanner(masked=False, max_message_size=0), [raw])
    assert parse_close(result.controls[0].payload) == (1014, "bad gateway")


def test_encode_close_cuts_a_long_reason_at_a_character() -> None:
    raw = encode_close(1000, "é" * 100, mask=False)  # 200 bytes of UTF-8
    code, reason = parse_close(raw[2:])
    assert code == 1000
    assert reason == "é" * 61  # 122 bytes: the 62nd character would not fit in 123
    assert len(raw) - 2 <= 125


@pytest.mark.parametrize("code", [999, 1005, 1006, 1015, 5000])
def test_encode_close_refuses_invalid_codes(code: int) -> None:
    with pytest.raises(ValueError):
        encode_close(code, mask=False)


def test_parse_close() -> None:
    assert parse_close(b"") == (None, "")
    assert parse_close(b"\x03\xe8") == (1000, "")
    assert parse_close(b"\x0f\xa0session timeout") == (4000, "session timeout")
    with pytest.raises(ValueError):
        parse_close(b"\x03")
    with pytest.raises(ValueError):
        parse_close(b"\x03\xe8\xff")


def test_valid_close_code() -> None:
    valid = {c for c in range(70_000) if valid_close_code(c)}
    expected = {*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)}
    assert valid == expected


@pytest.mark.parametrize(
    "bad",
    [
        b"\x82\x03abc",  # client frame without the mask bit
        b"\x83\x80\x00\x00\x00\x00",  # reserved opcode 3
        b"\x88\x81\x00\x00\x00\x00x",  # close frame with a 1-byte payload
        b"\x82\x85\x00\x00\x00\x00" + b"hello",  # over max_message_size (4)
    ],
)
def test_after_a_violation_the_stream_can_be_walked_to_the_peers_close(bad: bytes) -> None:
    # The gateway closes a misbehaving peer and then waits for its answering close: the
    # scanner must find that close after the offending frame.
    close = encode_close(1000, "", mask=True)
    scanner = FrameScanner(masked=True, max_message_size=4)
    pieces = scanner.feed(memoryview(bad + close))
    assert isinstance(pieces[-1], Violation)
    assert scanner.failed
    tail = scanner.resume_after_violation()
    assert tail is not None
    found = [p for p in scanner.feed(memoryview(tail)) if isinstance(p, ControlFrame)]
    assert [(f.opcode, f.raw) for f in found] == [(OP_CLOSE, close)]


def test_a_64_bit_length_with_the_top_bit_set_cannot_be_resumed() -> None:
    scanner = FrameScanner(masked=True, max_message_size=4)
    pieces = scanner.feed(memoryview(b"\x82\xff" + b"\x80" + b"\x00" * 7 + b"\x00" * 4))
    assert isinstance(pieces[-1], Violation)
    assert scanner.resume_after_violation() is None
