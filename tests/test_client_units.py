"""relay.client's sans-IO pieces and its input checks: the backoff schedule, the close
watcher (any split of the bytes into reads), /start answers (hostile ones included), and
the clear errors bad arguments get. No sockets except the hostile /start servers and the
TLS test, on loopback port 0."""

from __future__ import annotations

import itertools
import math
import random
import ssl
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from support import make_config, running

import relay.client
from relay.client import Reconnect, StartError
from relay.client.closewatch import MAX_RESPONSE_HEAD, CloseWatcher
from relay.client.start import MAX_START_ANSWER, _parse, post_start, start_request
from relay.frames import OP_PING, OP_TEXT, encode_close, encode_frame

HEAD_101 = (b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
            b"connection: Upgrade\r\nsec-websocket-accept: x\r\n\r\n")

# --------------------------------------------------------------------------------------
# The reconnection policy
# --------------------------------------------------------------------------------------


def test_delays_grow_by_factor_up_to_max_delay_without_jitter() -> None:
    policy = Reconnect(first_delay=0.5, factor=2, max_delay=5, jitter=0)
    assert [policy.delay(n, 0.99) for n in range(1, 7)] == [0.5, 1, 2, 4, 5, 5]


def test_jitter_only_shortens_a_delay_by_at_most_its_fraction() -> None:
    policy = Reconnect(first_delay=1, factor=3, max_delay=100, jitter=0.25)
    rng = random.Random(7)
    for attempt in range(1, 8):
        base = min(100, 3 ** (attempt - 1))
        for _ in range(50):
            assert base * 0.75 <= policy.delay(attempt, rng.random()) <= base
    assert policy.delay(2, 0.0) == 3 and policy.delay(2, 1.0) == 2.25


def test_a_huge_attempt_number_neither_overflows_nor_loops_long() -> None:
    assert Reconnect(factor=10, max_delay=30, jitter=0).delay(10**9, 0.5) == 30
    assert Reconnect(factor=1, first_delay=2, jitter=0).delay(10**9, 0.5) == 2
    assert Reconnect(first_delay=0, jitter=0).delay(10**9, 0.5) == 0


def test_default_policy_reconnects_on_the_abnormal_closes_only() -> None:
    policy = Reconnect()
    assert {c for c in range(1000, 5000) if policy.reconnects_on(c)} == {1001, 1006, 1011, 1014}


@pytest.mark.parametrize(("field", "value", "message"), [
    ("attempts", -1, "attempts must be an integer >= 0"),
    ("attempts", 2.5, "attempts must be an integer >= 0"),
    ("attempts", True, "attempts must be an integer >= 0"),
    ("first_delay", -1, "first_delay must be a finite number >= 0"),
    ("max_delay", math.inf, "max_delay must be a finite number >= 0"),
    ("first_delay", math.nan, "first_delay must be a finite number >= 0"),
    ("factor", 0.5, "factor must be a finite number >= 1"),
    ("jitter", 1.5, "jitter must be between 0 and 1"),
    ("give_up_after", 0, "give_up_after must be a finite number > 0"),
    ("max_reconnects", -2, "max_reconnects must be an integer >= 0"),
    ("codes", {999}, "codes must hold close codes 1000-4999"),
])
def test_bad_policy_values_are_refused_naming_the_field(field: str, value: Any,
                                                        message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Reconnect(**{field: value})


def test_attempt_numbers_are_one_based() -> None:
    with pytest.raises(ValueError, match="1-based"):
        Reconnect().delay(0, 0.5)


# --------------------------------------------------------------------------------------
# The close watcher
# --------------------------------------------------------------------------------------


def _feed_split(stream: bytes, cuts: list[int]) -> CloseWatcher:
    watcher = CloseWatcher()
    edges = [0, *sorted(cuts), len(stream)]
    for a, b in itertools.pairwise(edges):
        watcher.feed(stream[a:b])
    return watcher


def test_1014_is_read_off_the_wire_however_the_bytes_are_split() -> None:
    stream = (HEAD_101 + encode_frame(OP_TEXT, b"hello" * 40, mask=False)
              + encode_frame(OP_PING, b"p", mask=False)
              + encode_close(1014, "bad gateway", mask=False) + b"trailing junk")
    for cut in range(len(stream) + 1):
        assert _feed_split(stream, [cut]).close == (1014, "bad gateway")
    rng = random.Random(1)
    for _ in range(200):
        cuts = rng.sample(range(len(stream)), 6)
        assert _feed_split(stream, cuts).close == (1014, "bad gateway")
    assert _feed_split(stream, list(range(len(stream)))).close == (1014, "bad gateway")


def test_an_empty_close_frame_reads_as_1005_and_only_the_first_close_counts() -> None:
    stream = HEAD_101 + encode_frame(8, b"", mask=False) + encode_close(1014, mask=False)
    assert _feed_split(stream, []).close == (1005, "")


def test_a_refused_upgrade_is_not_read_as_frames() -> None:
    refusal = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 12\r\n\r\n"
    assert _feed_split(refusal + encode_close(1014, mask=False), []).close is None


@pytest.mark.parametrize("bad", [
    encode_close(1014, mask=True),  # a server must not mask: the watcher stops
    b"\x88\x02\x03\xed",  # close code 1005 on the wire is invalid
    b"\x8f\x00",  # reserved opcode
])
def test_what_the_scanner_refuses_is_left_to_trio_websocket(bad: bytes) -> None:
    assert _feed_split(HEAD_101 + bad + encode_close(1014, mask=False), []).close is None


def test_an_endless_response_head_stops_the_watcher_at_its_bound() -> None:
    watcher = CloseWatcher()
    watcher.feed(b"HTTP/1.1 101 x\r\n" + b"x" * MAX_RESPONSE_HEAD)
    watcher.feed(b"\r\n\r\n" + encode_close(1014, mask=False))
    assert watcher.close is None


# --------------------------------------------------------------------------------------
# /start answers
# --------------------------------------------------------------------------------------


def test_a_good_answer_is_parsed() -> None:
    answer = _parse(200, b'{"token":"a.B-c_~9","wsUrl":"ws://h/ws/generic/x.y",'
                         b'"sessionId":"s1"}', tls=False)
    assert (answer.token, answer.ws_url, answer.session_id) == (
        "a.B-c_~9", "ws://h/ws/generic/x.y", "s1")


@pytest.mark.parametrize(("status", "body", "tls", "code"), [
    (200, b"not json", False, "bad_answer"),
    (200, b'{"token":"t"}', False, "bad_answer"),
    (200, b'{"wsUrl":"http://h/x","token":"t"}', False, "bad_answer"),
    (200, b'{"wsUrl":"ws://h/x","token":"t"}', True, "bad_answer"),  # https -> ws: downgrade
    (200, b'{"wsUrl":"ws:///x","token":"t"}', False, "bad_answer"),  # no host
    (200, b'{"wsUrl":"ws://h:99999/x","token":"t"}', False, "bad_answer"),  # no such port
    (200, b'{"wsUrl":"wss://h/x","token":"t\\r\\nx: y"}', False, "bad_answer"),
    (200, b'{"wsUrl":"wss://h/x","token":"a/../b"}', False, "bad_answer"),
    (200, b'{"wsUrl":"wss://h/x","token":7}', False, "bad_answer"),
    (502, b"<html>proxy error</html>", False, "http_502"),
    (429, b'{"error":"x","code":"agent_full","detail":"full"}', False, "agent_full"),
])
def test_bad_or_hostile_answers_are_start_errors(status: int, body: bytes, tls: bool,
                                                 code: str) -> None:
    with pytest.raises(StartError) as refused:
        _parse(status, body, tls)
    assert refused.value.code == code
    assert refused.value.retryable == (status in (429, 502))




async def test_an_endless_start_answer_is_cut_at_its_bound() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
        try:
            for _ in range(MAX_START_ANSWER // 0x4000 + 10):
                await stream.send_all(chunk)
        except trio.BrokenResourceError:
            pass

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), handler, 0)
        port = listener.socket.getsockname()[1]
        with trio.fail_after(10), pytest.raises(StartError) as refused:
            await post_start(f"http://127.0.0.1:{port}/v1/public/a/start", "pk",
                             start_request("pk", None), ssl_context=None)
        assert refused.value.code == "answer_too_large"
        nursery.cancel_scope.cancel()


async def test_a_garbage_http_answer_is_a_start_error() -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"SSH-2.0-OpenSSH\r\n\r\n")

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), handler, 0)
        port = listener.socket.getsockname()[1]
        with trio.fail_after(10), pytest.raises(StartError) as refused:
            await post_start(f"http://127.0.0.1:{port}/start", "pk", start_request("pk", None),
                             ssl_context=None)
        assert refused.value.code == "bad_answer" and refused.value.retryable
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"start_url": "ftp://h/start"}, "not a http:// or https:// URL"),
    ({"start_url": "/v1/public/a/start"}, "not a http:// or https:// URL"),
    ({"start_url": "http://h:port/start"}, "not a http:// or https:// URL"),
    ({"token_in": "cookie"}, "token_in must be one of"),
    ({"public_key": "pk\r\nx-evil: 1"}, "public_key must be visible ASCII"),
    ({"public_key": ""}, "public_key must be visible ASCII"),
    ({"body": {"x": float("nan")}}, "body is not JSON"),
    ({"body": {"x": object()}}, "body is not JSON"),
    ({"connect_timeout": 0}, "connect_timeout must be a finite number > 0"),
    ({"close_timeout": math.nan}, "close_timeout must be a finite number > 0"),
    ({"max_message_size": 0}, "max_message_size must be an integer >= 1"),
])
async def test_bad_connect_arguments_fail_before_any_io(kwargs: dict[str, Any],
                                                        message: str) -> None:
    args = {"start_url": "http://127.0.0.1:1/v1/public/a/start", "public_key": "pk", **kwargs}
    with pytest.raises(ValueError, match=message):
        async with relay.client.connect(**args):
            pass


# --------------------------------------------------------------------------------------
# TLS: https /start and wss data plane, certificates from trustme
# --------------------------------------------------------------------------------------


async def test_https_start_and_wss_connect_with_a_trusted_ca(tmp_path: Path) -> None:
    import socket

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    key_path.write_bytes(cert.private_key_pem.bytes())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        ws_port = s.getsockname()[1]
    config = make_config(websocket_auth="token", bot_protocol="pipecat-cloud", server={
        "ws_bind": [f"127.0.0.1:{ws_port}"], "certfile": str(cert_path),
        "keyfile": str(key_path), "public_url": f"wss://127.0.0.1:{ws_port}",
        "public_keys": ["pk_tls"]})
    trust = ssl.create_default_context()
    ca.configure_trust(trust)
    async with running(config) as gw:
        url = f"https://127.0.0.1:{gw.api_port}/v1/public/a/start"
        with trio.fail_after(10):
            async with relay.client.connect(url, "pk_tls", ssl_context=trust) as session:
                await session.send("over tls")
                assert await session.receive() == "over tls"
            # Without the CA the system trust refuses the certificate: a clear StartError.
            with pytest.raises(StartError) as refused:
                async with relay.client.connect(url, "pk_tls"):
                    pass
            assert refused.value.code == "tls_failed"
            assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
