"""The few HTTP/1.1 messages the gateway writes and reads itself, sans-IO.

The client's upgrade request is parsed by h11 (it is the hostile input). The messages of
a set-up that the gateway makes itself are simpler and known in shape: our upgrade
request to the bot, the bot's 101, and our 101 to the client. Written and read here, they
cost a few µs instead of h11's ≈ 110 µs per bot dial and ≈ 30 µs per 101 (h11 builds and
validates an event object, every header against its grammar, and a state machine), a
large part of a session set-up (docs/performance.md).

What is written is checked as strictly as h11 checks it: a request target or header that
could split the message (CR, LF, NUL, other control characters) raises ValueError, so no
byte a client controls can smuggle a header or a second request to the bot.
"""

from __future__ import annotations

import re

Headers = list[tuple[bytes, bytes]]

#: RFC 9110 token: a header name.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: A header value: visible ASCII, obs-text, spaces and tabs inside (no CR, LF, NUL, ...).
_VALUE = re.compile(rb"[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*|")
#: A request target in origin form: visible ASCII only.
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_BLANK_LINE = re.compile(rb"\n\r?\n")  # like h11, a bare LF ends a line too
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([0-9]{3})(?: [\t \x21-\x7e\x80-\xff]*)?")


class MalformedHead(ValueError):
    """A response head that is not valid HTTP/1.1."""


def encode_request(target: str, headers: Headers) -> bytes:
    """`GET target HTTP/1.1` and the headers, ready to write; ValueError when unsafe."""
    raw_target = target.encode("ascii", "strict") if target.isascii() else b""
    if not _TARGET.fullmatch(raw_target):
        raise ValueError(f"request target not sendable: {target!r}")
    return b"GET " + raw_target + b" HTTP/1.1\r\n" + _encode_headers(headers)


def encode_101(headers: Headers) -> bytes:
    """Our `101 Switching Protocols` with its headers; ValueError when a header is unsafe."""
    return b"HTTP/1.1 101 Switching Protocols\r\n" + _encode_headers(headers)


def _encode_headers(headers: Headers) -> bytes:
    lines = []
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
            raise ValueError(f"header not sendable: {name!r}: {value!r}")
        lines.append(name + b": " + value + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def head_end(data: bytes | bytearray) -> int:
    """The index just past the blank line ending a message head in `data`; -1 if none yet."""
    m = _BLANK_LINE.search(data)
    return -1 if m is None else m.end()


def parse_response_head(head: bytes) -> tuple[int, Headers]:
    """Status code and headers (names lowercased) of a head that ends in a blank line.

    MalformedHead for anything h11 would refuse: another HTTP version, a bad status line,
    a header without a colon, whitespace before the colon, a folded (obs-fold) line, or
    control characters in a value.
    """
    end = _BLANK_LINE.search(head)
    if end is None or end.end() != len(head):
        raise MalformedHead("the head does not end with an empty line")
    lines = [line.removesuffix(b"\r") for line in head[:end.start()].split(b"\n")]
    m = _STATUS_LINE.fullmatch(lines[0])
    if m is None:
        raise MalformedHead(f"bad status line {lines[0][:80]!r}")
    headers: Headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise MalformedHead(f"bad header line {line[:80]!r}")
        value = value.strip(b" \t")
        if not _VALUE.fullmatch(value):
            raise MalformedHead(f"bad value in header {name[:40]!r}")
        headers.append((name.lower(), value))
    return int(m.group(1)), headers
