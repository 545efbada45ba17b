"""relay.frames: the scanner's verdict never depends on how the stream was split into reads.

Random streams (hand-built frames with any opcode, bits, mask and length form, or plain
random bytes) are fed whole and at random split points, on the client side (masked) and
the bot side (unmasked); both walks, resumed after each violation as the gateway does,
must give the same frames, data bytes and violations.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterable

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from support import bot_server, make_config, running
from test_relay_e2e import WAIT, connect, record_close

from relay.frames import (
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

LIMIT = 1 << 20

Item = bytes | ControlFrame | Violation | str


def raw_frame(
    opcode: int,
    payload: bytes,
    *,
    key: bytes | None,
    fin: bool = True,
    rsv: int = 0,
    form: str = "minimal",
) -> bytes:
    """One frame with any bits; ``form`` is "minimal", "16" or "64" (the length encoding)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mbit = 0x80 if key is not None else 0
    if form == "minimal":
        form = "7" if n < 126 else "16" if n <= 0xFFFF else "64"
    if form == "7":
        head = bytes((b0, mbit | n))
    elif form == "16" and n <= 0xFFFF:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    if key is None:
        return head + payload
    stream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return head + key + masked


def chunked(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = [0, *sorted(min(max(c, 0), len(stream)) for c in cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(points)]


def walk(scanner: FrameScanner, chunks: Iterable[bytes]) -> tuple[list[Item], tuple[int, ...]]:
    """Everything the scanner makes of ``chunks``, resuming after each violation.

    Data pieces are copied out and merged into one ``bytes`` per run; each chunk goes
    through one reused buffer that is scribbled over after every feed, so a scanner that
    kept a view of an earlier read is caught. Ends with "unwalkable" when the stream cannot
    be walked past a violation. Also returns the scanner's counters at the end.
    """
    pending = list(chunks)
    items: list[Item] = []
    buf = bytearray(max((len(c) for c in pending), default=0) + 16)
    while pending:
        chunk = pending.pop(0)
        if len(chunk) > len(buf):
            buf = bytearray(len(chunk))
        buf[: len(chunk)] = chunk
        pieces = scanner.feed(memoryview(buf)[: len(chunk)])
        for piece in pieces:
            if isinstance(piece, ControlFrame | Violation):
                items.append(piece)
            else:
                data = bytes(piece)
                assert data, "no empty data pieces"
                if items and isinstance(items[-1], bytes):
                    items[-1] += data
                else:
                    items.append(data)
        buf[:] = os.urandom(len(buf))
        if pieces and isinstance(pieces[-1], Violation):
            tail = scanner.resume_after_violation()
            if tail is None:
                items.append("unwalkable")
                break
            pending.insert(0, tail)
    return items, (scanner.messages, scanner.data_bytes, scanner.mid_frame, scanner.failed)


# ---------------------------------------------------------------------------- strategies

opcodes = st.one_of(
    st.sampled_from([OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG]),
    st.integers(0, 15),
)
close_payloads = st.one_of(
    st.builds(
        lambda code, reason: code.to_bytes(2, "big") + reason,
        st.sampled_from([1000, 1001, 1005, 1011, 3000, 4999, 35070, 5000]),
        st.one_of(st.text(max_size=40).map(str.encode), st.binary(max_size=10)),
    ),
    st.binary(max_size=130),
)
data_payloads = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda n, b: bytes([b]) * n, st.sampled_from([125, 126, 65535, 65536]), st.integers(0, 255)
    ),
)


@st.composite
def streams(draw: st.DrawFn, masked: bool) -> bytes:
    """A random stream: mostly plausible frames with the odd wrong bit, or random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    out = b""
    for _ in range(draw(st.integers(1, 8))):
        opcode = draw(opcodes)
        payload = draw(close_payloads if opcode == OP_CLOSE else data_payloads)
        right_mask = draw(st.integers(0, 9)) > 0
        key = draw(st.binary(min_size=4, max_size=4)) if masked == right_mask else None
        out += raw_frame(
            opcode,
            payload,
            key=key,
            fin=draw(st.integers(0, 3)) > 0,
            rsv=draw(st.sampled_from([0, 0, 0, 1, 7])),
            form=draw(st.sampled_from(["minimal"] * 6 + ["16", "64"])),
        )
    return out[: len(out) - draw(st.sampled_from([0, 0, 0, 1, 3, 9]))]  # maybe cut short


@settings(max_examples=400, deadline=None)
@given(
    masked=st.booleans(),
    limit=st.sampled_from([0, 100, 300, 70_000, LIMIT]),
    data=st.data(),
)
def test_any_chunking_gives_the_same_frames_pieces_and_violations(
    masked: bool, limit: int, data: st.DataObject
) -> None:
    stream = data.draw(streams(masked), label="stream")
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
    whole = walk(FrameScanner(masked=masked, max_message_size=limit), [stream])
    split = walk(FrameScanner(masked=masked, max_message_size=limit), chunked(stream, cuts))
    assert split == whole


@st.composite
def frame_lists(draw: st.DrawFn, masked: bool) -> list[bytes]:
    """Frames of every kind (mostly well-formed data frames, the relay's common case)."""
    frames = []
    for _ in range(draw(st.integers(1, 6))):
        opcode = draw(st.sampled_from([OP_TEXT, OP_BINARY] * 4 + [OP_CONT, OP_PING, OP_CLOSE, 3]))
        payload = draw(close_payloads if opcode == OP_CLOSE else data_payloads)
        right_mask = draw(st.integers(0, 9)) > 0
        frames.append(raw_frame(
            opcode, payload,
            key=draw(st.binary(min_size=4, max_size=4)) if masked == right_mask else None,
            fin=draw(st.integers(0, 5)) > 0, rsv=draw(st.sampled_from([0, 0, 0, 1, 4])),
            form=draw(st.sampled_from(["minimal"] * 6 + ["16", "64"]))))
    return frames


@settings(max_examples=300, deadline=None)
@given(masked=st.booleans(), limit=st.sampled_from([0, 100, 300, 70_000, LIMIT]),
       data=st.data())
def test_a_chunk_of_exactly_one_frame_is_scanned_like_any_other_split(
    masked: bool, limit: int, data: st.DataObject
) -> None:
    """A chunk of exactly one frame is the relay's commonest read: pieces, violations and
    every counter (header bytes too) must be what one chunk of the whole stream gives."""
    frames = data.draw(frame_lists(masked), label="frames")
    stream = b"".join(frames)
    cuts = list(itertools.accumulate(len(f) for f in frames))[:-1]
    a = FrameScanner(masked=masked, max_message_size=limit)
    b = FrameScanner(masked=masked, max_message_size=limit)
    whole = walk(a, [stream])
    per_frame = walk(b, chunked(stream, cuts))
    assert per_frame == whole
    assert (b.header_bytes, b.data_bytes, b.messages) == (a.header_bytes, a.data_bytes,
                                                          a.messages)


@pytest.mark.parametrize("masked", [True, False])
def test_every_split_of_a_stream_byte_by_byte_matches_the_whole(masked: bool) -> None:
    """One fixed stream with every kind of frame and violation, fed a byte at a time."""
    key = b"\x01\x02\x03\x04" if masked else None
    wrong = None if masked else b"\x05\x06\x07\x08"
    stream = b"".join(
        [
            raw_frame(OP_TEXT, b"hello", key=key, fin=False),
            raw_frame(OP_PING, b"p" * 10, key=key),
            raw_frame(OP_CONT, b"x" * 200, key=key),
            raw_frame(OP_CLOSE, b"\x03\xe8bye", key=key),
            raw_frame(OP_PONG, b"pong", key=key, form="16"),  # violation: not minimal
            raw_frame(OP_BINARY, b"y" * 70_000, key=key),
            raw_frame(OP_BINARY, b"z" * 10, key=wrong),  # violation: wrong masking
            raw_frame(OP_BINARY, b"w" * 300, key=key, form="64"),  # violation: not minimal
            raw_frame(OP_CLOSE, b"\x88\xfe", key=key),  # violation: close code 35070
            raw_frame(OP_BINARY, b"v" * 5, key=key),
        ]
    )
    whole = walk(FrameScanner(masked=masked, max_message_size=LIMIT), [stream])
    violations = [i for i in whole[0] if isinstance(i, Violation)]
    assert [v.close_code for v in violations] == [1002, 1002, 1002, 1002]
    assert "invalid close code 35070" in violations[3].reason
    step = 1 if len(stream) < 1000 else 7
    assert (
        walk(
            FrameScanner(masked=masked, max_message_size=LIMIT),
            chunked(stream, range(0, len(stream), step)),
        )
        == whole
    )
    for cut in range(0, 40):
        assert (
            walk(FrameScanner(masked=masked, max_message_size=LIMIT), chunked(stream, [cut]))
            == whole
        )


# ---------------------------------------------------------------------------- the cases


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("cut", [0, 1, 2, 3, 4, 5, 6, 8])
def test_close_in_the_16_bit_length_form_gets_one_verdict_at_any_split(
    masked: bool, cut: int
) -> None:
    """The review's case: whole it was accepted, split at bytes 1-3 it was "code 35070"."""
    key = b"\x11\x22\x33\x44" if masked else None
    close = raw_frame(OP_CLOSE, b"\x03\xe8done", key=key, form="16")
    items, _ = walk(FrameScanner(masked=masked, max_message_size=LIMIT), chunked(close, [cut]))
    # the skipped payload comes back as data (as it came), for the caller to drop
    assert items == [
        Violation(1002, "payload length 6 in the 16-bit form (not minimal)"),
        close[-6:],
    ]


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("cut", [1, 2, 3, 5, 9])
def test_split_pong_payload_never_includes_header_bytes(masked: bool, cut: int) -> None:
    key = b"\x00\x00\x00\x00" if masked else None
    stream = raw_frame(OP_PONG, b"abc", key=key) + raw_frame(OP_PONG, b"abc", key=key, form="16")
    items, _ = walk(FrameScanner(masked=masked, max_message_size=LIMIT), chunked(stream, [cut]))
    assert isinstance(items[0], ControlFrame) and items[0].payload == b"abc"
    assert items[1] == Violation(1002, "payload length 3 in the 16-bit form (not minimal)")


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize(
    ("opcode", "size", "form", "bits"),
    [
        (OP_BINARY, 0, "16", 16),
        (OP_TEXT, 125, "16", 16),
        (OP_BINARY, 0, "64", 64),
        (OP_BINARY, 126, "64", 64),
        (OP_CONT, 65535, "64", 64),
        (OP_PING, 5, "16", 16),
        (OP_CLOSE, 2, "64", 64),
    ],
)
def test_non_minimal_length_is_1002(
    masked: bool, opcode: int, size: int, form: str, bits: int
) -> None:
    key = b"\x09\x08\x07\x06" if masked else None
    prefix = raw_frame(OP_TEXT, b"a", key=key, fin=False) if opcode == OP_CONT else b""
    payload = b"\x03\xe8" if opcode == OP_CLOSE else b"q" * size
    stream = prefix + raw_frame(opcode, payload, key=key, form=form)
    scanner = FrameScanner(masked=masked, max_message_size=LIMIT)
    pieces = scanner.feed(memoryview(stream))
    assert pieces[-1] == Violation(
        1002, f"payload length {len(payload)} in the {bits}-bit form (not minimal)"
    )
    data = [p for p in pieces[:-1] if isinstance(p, memoryview | bytes)]
    assert len(data) == len(pieces) - 1  # before the violation: only the prefix's data
    assert sum(len(p) for p in data) == len(prefix)
    assert scanner.failed


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize(("size", "form"), [(126, "16"), (65535, "16"), (65536, "64")])
def test_minimal_extended_lengths_pass(masked: bool, size: int, form: str) -> None:
    key = b"\x09\x08\x07\x06" if masked else None
    stream = raw_frame(OP_BINARY, b"q" * size, key=key, form=form)
    items, counters = walk(
        FrameScanner(masked=masked, max_message_size=LIMIT), chunked(stream, [1, 3, 5])
    )
    assert items == [stream]
    assert counters == (1, len(stream), False, False)


# ---------------------------------------------------------------------------- through the gateway


@pytest.mark.parametrize("split", [None, 1, 2, 3, 5])
async def test_a_split_close_in_the_16_bit_form_gets_one_verdict_through_the_gateway(
    split: int | None,
) -> None:
    """The review's reproduction, black-box: whole or split at bytes 1-3, the client gets
    1002 for the non-minimal length (before, split gave "invalid close code 35070")."""
    close = raw_frame(OP_CLOSE, b"\x03\xe8done", key=b"\x01\x02\x03\x04", form="16")
    closes: list[tuple[int, str]] = []
    async with bot_server(record_close(closes)) as bot, running(make_config(bot.url)) as gw:
        with trio.fail_after(WAIT):
            client = await connect(gw.ws_port)
            try:
                await client.send_message("before")
                assert await client.message() == "before"
                if split is None:
                    await client.stream.send_all(close)
                else:
                    await client.stream.send_all(close[:split])
                    await trio.testing.wait_all_tasks_blocked(0.01)  # the gateway read it
                    await client.stream.send_all(close[split:])
                code, reason = await client.close_code()
                await bot.closed.wait()
            finally:
                await trio.aclose_forcefully(client.stream)
    assert (code, reason) == (1002, "payload length 6 in the 16-bit form (not minimal)")
    assert closes == [(1001, closes[0][1])]  # the bot is told the client went away
    assert bot.received == ["before"]
