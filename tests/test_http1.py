"""The hand-written HTTP/1.1 heads of a set-up (relay/http1.py): safe to write, strict to read."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.http1 import (
    MalformedHead,
    encode_101,
    encode_request,
    head_end,
    parse_response_head,
)

OK_101 = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
          b"Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


def test_a_101_parses_with_lowercased_names_and_trimmed_values() -> None:
    head = OK_101.replace(b"Upgrade: websocket", b"Upgrade:   websocket \t")
    assert parse_response_head(head) == (101, [
        (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")])


def test_head_end_finds_the_blank_line_and_leaves_early_frames_after_it() -> None:
    data = OK_101 + b"\x81\x02hi"
    end = head_end(data)
    assert data[end:] == b"\x81\x02hi"
    assert head_end(OK_101[:-2]) == -1  # not whole yet: read more


def test_bare_lf_line_ends_are_read_like_h11_reads_them() -> None:
    head = OK_101.replace(b"\r\n", b"\n")
    assert head_end(head) == len(head)
    assert parse_response_head(head)[1][0] == (b"upgrade", b"websocket")


@pytest.mark.parametrize("head, why", [
    (b"HTTP/1.0 101 Switching Protocols\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 1011 x\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 10 x\r\n\r\n", "bad status line"),
    (b"ICY 200 OK\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 101 ok\x00\r\n\r\n", "bad status line"),
    (b"HTTP/1.1 101 x\r\nUpgrade : websocket\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 101 x\r\nUpgrade websocket\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 101 x\r\nUpgrade: websocket\r\n  folded\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 101 x\r\n: empty-name\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 101 x\r\nX-A: a\x00b\r\n\r\n", "bad value"),
    (b"HTTP/1.1 101 x\r\nX-A: a\rb\r\n\r\n", "bad value"),
    (b"HTTP/1.1 101 x\r\nX-A: a\x7fb\r\n\r\n", "bad value"),
    (b"HTTP/1.1 101 x\r\n", "does not end"),
    (b"HTTP/1.1 101 x\r\n\r\nmore", "does not end"),
])
def test_malformed_heads_are_refused_with_the_reason(head: bytes, why: str) -> None:
    with pytest.raises(MalformedHead, match=why):
        parse_response_head(head)


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 101 x\r\nUpgrade : websocket\r\n\r\n",
    b"HTTP/1.1 101 x\r\nUpgrade: websocket\r\n  folded\r\n\r\n",
    b"HTTP/1.1 101 x\r\nX-A: a\x00b\r\n\r\n",
    b"HTTP/1.1 1011 x\r\n\r\n",
])
def test_what_is_refused_here_h11_refuses_too(head: bytes) -> None:
    h = h11.Connection(h11.CLIENT)
    h.send(h11.Request(method="GET", target="/", headers=[(b"host", b"x")]))
    h.send(h11.EndOfMessage())
    h.receive_data(head)
    with pytest.raises(h11.RemoteProtocolError):
        h.next_event()


@pytest.mark.parametrize("target", [
    "/ws?a=1\r\nX-Injected: 1", "/ws?a=\nb", "/w s", "/ws?\x00", "/é", "ws", "",
    "/ws\tx", "/ws?a=\x7f",
])
def test_a_request_target_that_could_split_the_request_is_not_sent(target: str) -> None:
    with pytest.raises(ValueError, match="request target not sendable"):
        encode_request(target, [(b"host", b"bot")])


@pytest.mark.parametrize("name, value", [
    (b"x-a", b"1\r\nX-Injected: 1"), (b"x-a", b"1\n2"), (b"x-a", b"1\x002"),
    (b"x a", b"1"), (b"x-a:", b"1"), (b"", b"1"), (b"x-a", b" leading"),
    (b"x-a", b"trailing "),
])
def test_a_header_that_could_split_the_message_is_not_sent(name: bytes, value: bytes) -> None:
    with pytest.raises(ValueError, match="header not sendable"):
        encode_request("/ws", [(b"host", b"bot"), (name, value)])
    with pytest.raises(ValueError, match="header not sendable"):
        encode_101([(name, value)])


def test_the_request_is_what_h11_reads_back() -> None:
    headers = [(b"host", b"127.0.0.1:9000"), (b"upgrade", b"websocket"), (b"x-empty", b""),
               (b"user-agent", b"a b\tc")]
    data = encode_request("/ws?x=1&y=%20", headers)
    h = h11.Connection(h11.SERVER)
    h.receive_data(data)
    event = h.next_event()
    assert isinstance(event, h11.Request)
    assert event.target == b"/ws?x=1&y=%20"
    assert list(event.headers) == headers


_names = st.from_regex(rb"\A[a-z0-9!#$%&'*+.^_`|~-]{1,20}\Z")
_values = st.from_regex(rb"\A([\x21-\x7e\x80-\xff]([ \t\x21-\x7e\x80-\xff]{0,30}"
                        rb"[\x21-\x7e\x80-\xff])?)?\Z")


@given(st.lists(st.tuples(_names, _values), max_size=8))
def test_any_sendable_101_parses_back_to_the_same_headers(headers: list[tuple[bytes, bytes]]
                                                        ) -> None:
    data = encode_101(headers)
    assert head_end(data) == len(data)
    assert parse_response_head(data) == (101, headers)
