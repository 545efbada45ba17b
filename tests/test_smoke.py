from __future__ import annotations

import trio
from support import bot_server, make_config, running
from trio_websocket import open_websocket_url


async def test_echo_inprocess_roundtrip() -> None:
    async with running(make_config()) as gw, open_websocket_url(gw.url()) as ws:
        await ws.send_message("hello")
        assert await ws.get_message() == "hello"
        await ws.send_message(b"\x00\x01")
        assert await ws.get_message() == b"\x00\x01"


async def test_upstream_roundtrip() -> None:
    async with bot_server() as bot, running(make_config(bot.url)) as gw:
        async with open_websocket_url(gw.url()) as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            await ws.send_message(b"\x00" * 100000)
            assert await ws.get_message() == b"\x00" * 100000
        with trio.fail_after(5):
            await bot.closed.wait()
        assert bot.close_codes[-1] == 1000
