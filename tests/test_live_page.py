"""The live page in a real headless Chromium (Debian ``chromium``, driven by Playwright).

A real gateway on loopback port 0 with real clients and bots; the browser opens ``GET /``
on its control plane, is given the admin key, and must show the sessions the test's
clients opened, end one (that client receives 4002) and drain an agent (an upgrade is
then refused with 503). ``scripts/test`` installs chromium and Playwright; this test never
skips: without a browser it fails.

Playwright's sync API runs in one worker thread (`trio.to_thread.run_sync`); what the
trio side must do meanwhile (read a client's close, try an upgrade) is called back with
`trio.from_thread.run`. Every browser wait is a bounded wait for a condition on the page.

``RELAY_UPDATE_SCREENSHOT=1`` also writes the screenshot to docs/live-page.png.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import trio
from support import bot_server, http, open_client, raw_upgrade_status, running
from test_embedded import closed_code
from trio_websocket import WebSocketConnection

from relay.config import build_config

CHROMIUM = "/usr/bin/chromium"
ADMIN = "adm_live_page_key"
WAIT_MS = 30_000  # bound of every wait in the browser (a loaded 2-core machine)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "live-page.png"


async def talk(ws: WebSocketConnection, n: int) -> None:
    for i in range(n):
        await ws.send_message(f"message {i}")
        assert await ws.get_message() == f"message {i}"


async def test_the_live_page_lists_ends_and_drains_in_a_real_browser(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    async with bot_server() as bot:
        config = build_config(
            server={"ws_bind": ["127.0.0.1:0"], "api_bind": ["127.0.0.1:0"],
                    "admin_keys": [ADMIN], "ping_interval": 1000, "ping_timeout": 1000},
            agents={"support": {"bot": bot.url},
                    "sales": {"bot": bot.url, "max_clients": 4}})
        async with running(config, wall_clock=time.time) as gw, \
                open_client(gw.url("support")) as first, \
                open_client(gw.url("sales")) as second, \
                open_client(gw.url("sales")) as third:
            await talk(first, 3)
            await talk(second, 5)
            await talk(third, 1)
            listed = json.loads((await http(
                "127.0.0.1", gw.api_port, "GET", "/v1/admin/sessions",
                [("authorization", f"Bearer {ADMIN}")]))[2])["sessions"]
            ids = {s["agent"]: s["id"] for s in listed}  # one "support", a "sales"
            assert len(listed) == 3
            page_url = f"http://127.0.0.1:{gw.api_port}/"
            results: dict[str, Any] = {}

            def browse() -> None:
                assert os.path.exists(CHROMIUM), "scripts/test installs Debian chromium"
                with sync_playwright() as p:
                    context = p.chromium.launch_persistent_context(
                        str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
                        args=FLAGS, viewport={"width": 1200, "height": 640})
                    try:
                        drive(context.pages[0] if context.pages else context.new_page())
                    finally:
                        context.close()

            def drive(page: Any) -> None:
                problems: list[str] = []
                page.on("console", lambda m: problems.append(m.text)
                        if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.set_default_timeout(WAIT_MS)
                page.goto(page_url)
                assert page.locator("#live").is_hidden()  # nothing before the key
                page.fill("#key", ADMIN)
                page.click("#login button[type=submit]")
                row = page.locator(f'#sessions tr[data-session-id="{ids["support"]}"]')
                row.wait_for()
                assert page.locator("#login").is_hidden()
                page.locator("#sessions tbody tr").nth(2).wait_for()
                page.locator("#counters dd").first.wait_for()  # counters, from /metrics
                counters = dict(zip(page.locator("#counters dt").all_inner_texts(),
                                    page.locator("#counters dd").all_inner_texts(),
                                    strict=True))
                assert counters["sessions active"] == "3"
                assert counters["messages client→bot"] == "9"  # 3 + 5 + 1
                assert page.evaluate("sessionStorage.getItem('relay.adminKey')") == ADMIN
                cells = row.locator("td").all_inner_texts()
                assert cells[1:3] == ["support", "127.0.0.1"]
                assert cells[5:7] == ["3", "3"]  # messages each way, from the gateway
                page.screenshot(path=str(tmp_path / "live-page.png"))
                if os.environ.get("RELAY_UPDATE_SCREENSHOT") == "1":
                    page.screenshot(path=str(DOCS_SCREENSHOT))
                # end the "support" session from the page: its client gets 4002
                row.locator("button.end").click()
                results["closed"] = trio.from_thread.run(closed_code, first)
                row.wait_for(state="detached")
                # drain "sales" from the page: a new upgrade is refused, live ones go on
                agent = page.locator('#agents tr[data-agent="sales"]')
                agent.locator("button.drain").click()
                agent.locator("td.draining").wait_for()
                results["drained"] = trio.from_thread.run(
                    raw_upgrade_status, gw.ws_port, "/ws/generic/sales.local")
                results["live"] = trio.from_thread.run(talk, second, 1) is None
                agent.locator("button.drain").click()  # end the drain
                agent.locator("td.draining").wait_for(state="detached")
                results["undrained"] = gw.gateway.operations.is_draining("sales")
                results["problems"] = problems

            await trio.to_thread.run_sync(browse)
            assert results["closed"] == (4002, "ended by operator")
            assert results["drained"] == 503
            assert results["live"] is True
            assert results["undrained"] is False
            assert results["problems"] == []  # no CSP violation, no script error
            assert (tmp_path / "live-page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            async with open_client(gw.url("sales")) as again:  # the drain is over
                await talk(again, 1)
