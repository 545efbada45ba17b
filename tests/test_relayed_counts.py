"""relay_messages_relayed_total and relay_bytes_relayed_total: every path counts, and bytes
are payload bytes (what the help text says), not frame headers or masking keys.

Paths: relay's own listener with an upstream bot (frame scanner counts), with an in-process
bot (the same scanner on the client's bytes; the bot's sends counted as sent), and
`Gateway.handle()` (message level). Messages are sized across the frame-header boundaries
(125/126 and 65535/65536 payload bytes), so a header counted as payload would show.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from support import KEYS, bot_server, make_config, open_client, running
from trio_websocket import serve_websocket

from relay.frames import OP_BINARY, OP_CONT, OP_PING, OP_TEXT, FrameScanner, encode_frame
from relay.gateway import Gateway
from relay.inprocess import _payload_size
from relay.metrics import Metrics

MESSAGES: list[str | bytes] = ["hello", b"", b"x" * 125, "é" * 63, b"y" * 126, b"z" * 65535,
                               b"w" * 65536, "ü" * 40000]
PAYLOAD = sum(len(m.encode() if isinstance(m, str) else m) for m in MESSAGES)


def relayed(metrics: Metrics) -> dict[tuple[str, str], float]:
    data, _ = metrics.render()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(data.decode()):
        for s in family.samples:
            if s.name in ("relay_messages_relayed_total", "relay_bytes_relayed_total"):
                out[(s.name.split("_")[1], s.labels["direction"])] = s.value
    return out


EXPECTED = {("messages", "client_to_bot"): len(MESSAGES),
            ("messages", "bot_to_client"): len(MESSAGES),
            ("bytes", "client_to_bot"): PAYLOAD,
            ("bytes", "bot_to_client"): PAYLOAD}


async def wait_until(done: Callable[[], bool]) -> None:
    with trio.fail_after(60):
        while not done():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def echo_all(url: str) -> None:
    async with open_client(url, max_message_size=1 << 20) as ws:
        for message in MESSAGES:
            await ws.send_message(message)
            assert await ws.get_message() == message


@pytest.mark.parametrize("bot", ["in-process", "upstream"])
async def test_listener_counts_payload_both_ways(
        bot: str, autojump_clock: trio.testing.MockClock) -> None:
    async with bot_server() as upstream:
        url = "python:relay.echo:echo_bot" if bot == "in-process" else upstream.url
        async with running(make_config(url)) as gw:
            await echo_all(gw.url())
            await wait_until(lambda: gw.gateway.session_count() == 0)
            assert relayed(gw.gateway.metrics) == EXPECTED


async def test_five_echoes_on_the_default_echo_agent_count_five_each_way(
        autojump_clock: trio.testing.MockClock) -> None:
    """The issue's case: the embedded default's in-process `echo` agent."""
    async with running(make_config(agent="echo")) as gw:
        async with open_client(gw.url("echo")) as ws:
            for _ in range(5):
                await ws.send_message("hello")
                assert await ws.get_message() == "hello"
            # Counted in batches while the session runs too, not only at its end.
            await trio.sleep(6)
            assert relayed(gw.gateway.metrics)[("messages", "client_to_bot")] == 5
        await wait_until(lambda: gw.gateway.session_count() == 0)
        assert relayed(gw.gateway.metrics) == {
            ("messages", "client_to_bot"): 5, ("messages", "bot_to_client"): 5,
            ("bytes", "client_to_bot"): 25, ("bytes", "bot_to_client"): 25}


async def test_embedded_in_process_bot_is_counted(
        autojump_clock: trio.testing.MockClock) -> None:
    gateway = Gateway(make_config(), keys=KEYS, wall_clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, gateway.handle, "127.0.0.1", 0, None)
        await echo_all(f"ws://127.0.0.1:{server.port}/ws/generic/a.local")
        await wait_until(lambda: gateway.rt.open_connections == 0
                         and gateway.session_count() == 0)
        nursery.cancel_scope.cancel()
    assert relayed(gateway.metrics) == EXPECTED


# -- the scanner's header accounting, whatever the split into reads ----------------------

frames = st.lists(st.tuples(st.sampled_from(["whole", "fragmented", "ping"]),
                            st.sampled_from([0, 1, 125, 126, 300, 65535, 65536])),
                  min_size=1, max_size=6)


@given(frames=frames, masked=st.booleans(), cuts=st.lists(st.integers(1, 70000), max_size=8))
def test_scanner_payload_is_data_bytes_minus_headers_under_any_chunking(
        frames: list[tuple[str, int]], masked: bool, cuts: list[int]) -> None:
    stream = b""
    payload = 0
    for kind, size in frames:
        if kind == "ping":
            stream += encode_frame(OP_PING, b"p" * min(size, 125), mask=masked)
        elif kind == "whole":
            stream += encode_frame(OP_BINARY, b"b" * size, mask=masked)
            payload += size
        else:
            half = size // 2
            stream += encode_frame(OP_TEXT, b"t" * half, mask=masked, fin=False)
            stream += encode_frame(OP_CONT, b"t" * (size - half), mask=masked)
            payload += size
    scanner = FrameScanner(masked=masked, max_message_size=1 << 20)
    pos = 0
    for cut in sorted(set(cuts)):
        if pos < cut < len(stream):
            scanner.feed(memoryview(stream[pos:cut]))
            pos = cut
    scanner.feed(memoryview(stream[pos:]))
    assert scanner.messages == sum(1 for kind, _ in frames if kind != "ping")
    assert scanner.data_bytes - scanner.header_bytes == payload


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_payload_size_of_a_server_frame(size: int) -> None:
    assert _payload_size(len(encode_frame(OP_BINARY, b"x" * size, mask=False))) == size
