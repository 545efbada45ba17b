"""The operator API: admin keys, listing, ending and draining sessions, on both data planes.

A real gateway on loopback port 0 (own listener, and `Gateway.handle` mounted in a
trio-websocket server), real upstream echo bots, HTTP over real TCP with h11.
"""

from __future__ import annotations

import json
import time
from typing import Any

import attrs
import pytest
import trio
from support import bot_server, http, make_config, open_client, raw_upgrade_status, running
from test_embedded import closed_code, embedded, refused
from test_embedded import open_websocket_url as embedded_client
from trio_websocket import ConnectionClosed

from relay import closing
from relay.admin import LocalOperations
from relay.admin_api import LIVE_PAGE_CSP
from relay.config import Config
from relay.registry import Registry

ADMIN = "adm_test_key_1"
OTHER_ADMIN = "adm_test_key_2"
AUTH = [("authorization", f"Bearer {ADMIN}")]


def admin_config(bot: str = "python:relay.echo:echo_bot", **agent_keys: Any) -> Config:
    return make_config(bot, server={"admin_keys": [ADMIN, OTHER_ADMIN]}, **agent_keys)


async def api(port: int, method: str, target: str,
              headers: list[tuple[str, str]] | None = None) -> tuple[int, dict[str, str], bytes]:
    with trio.fail_after(30):
        return await http("127.0.0.1", port, method, target,
                          AUTH if headers is None else headers)


async def sessions(port: int) -> list[dict[str, object]]:
    status, headers, body = await api(port, "GET", "/v1/admin/sessions")
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    listed: list[dict[str, object]] = json.loads(body)["sessions"]
    return listed


async def _start(port: int, agent: str) -> tuple[int, dict[str, str], dict[str, object]]:
    with trio.fail_after(30):
        status, headers, body = await http(
            "127.0.0.1", port, "POST", f"/v1/public/{agent}/start",
            [("authorization", "Bearer pk_dev_123"), ("content-type", "application/json")],
            b'{"transport": "websocket"}')
    return status, headers, json.loads(body)


# -- keys ----------------------------------------------------------------------------------


ADMIN_ROUTES = [
    ("GET", "/v1/admin/sessions"),
    ("DELETE", "/v1/admin/sessions/some-id"),
    ("GET", "/v1/admin/agents"),
    ("POST", "/v1/admin/agents/a/drain"),
    ("DELETE", "/v1/admin/agents/a/drain"),
]


async def test_without_admin_keys_every_operator_path_is_404() -> None:
    async with running(make_config()) as gw:
        for method, target in [*ADMIN_ROUTES, ("GET", "/"), ("GET", "/live.js"),
                               ("GET", "/live.css")]:
            status, _, body = await api(gw.api_port, method, target)
            assert status == 404, (method, target)
            assert json.loads(body)["code"] == "not_found"
        # and nothing was drained by the POST
        assert not gw.gateway.operations.is_draining("a")


@pytest.mark.parametrize("authorization", [
    None,  # no header
    "Bearer",  # the scheme with no key
    "Bearer adm_test_key_",  # a prefix of a real key
    f"Bearer {ADMIN}x",  # a real key plus a byte
    "Bearer pk_dev_123",  # a public key is not an admin key
    f"Basic {ADMIN}",  # another scheme
    ADMIN,  # no scheme
])
async def test_a_request_without_a_known_admin_key_gets_401_and_changes_nothing(
        authorization: str | None) -> None:
    headers = [] if authorization is None else [("authorization", authorization)]
    async with running(admin_config()) as gw:
        for method, target in ADMIN_ROUTES:
            status, response_headers, body = await api(gw.api_port, method, target, headers)
            assert status == 401, (method, target)
            assert json.loads(body)["code"] == "unauthorized"
            assert response_headers["www-authenticate"] == "Bearer"
        assert not gw.gateway.operations.is_draining("a")


async def test_every_configured_admin_key_is_accepted_and_the_scheme_is_case_blind() -> None:
    async with running(admin_config()) as gw:
        for value in (f"Bearer {ADMIN}", f"bearer {OTHER_ADMIN}", f"BEARER  {ADMIN}"):
            status, _, body = await api(gw.api_port, "GET", "/v1/admin/sessions",
                                        [("authorization", value)])
            assert (status, json.loads(body)) == (200, {"sessions": []}), value


async def test_admin_keys_must_be_visible_ascii() -> None:
    from relay.config import build_config
    from relay.errors import ConfigError

    with pytest.raises(ConfigError, match=r"server\.admin_keys\[1\]: must be a non-empty"):
        build_config(server={"admin_keys": ["ok", "has space"]},
                     agents={"a": {"bot": "python:relay.echo:echo_bot"}})
    with pytest.raises(ConfigError, match=r"server\.admin_keys\[0\]"):
        build_config(server={"admin_keys": [""]},
                     agents={"a": {"bot": "python:relay.echo:echo_bot"}})


async def test_wrong_methods_get_405_with_allow() -> None:
    async with running(admin_config()) as gw:
        for method, target, allow in [("POST", "/v1/admin/sessions", "GET"),
                                      ("GET", "/v1/admin/sessions/x", "DELETE"),
                                      ("GET", "/v1/admin/agents/a/drain", "POST, DELETE"),
                                      ("POST", "/", "GET, HEAD")]:
            status, headers, _ = await api(gw.api_port, method, target)
            assert (status, headers["allow"]) == (405, allow), target
        status, _, _ = await api(gw.api_port, "GET", "/v1/admin/nothing")
        assert status == 404


# -- listing and ending ------------------------------------------------------------------------


async def test_sessions_lists_a_live_session_with_its_traffic_then_not_once_it_ended() -> None:
    ended = trio.Event()
    async with bot_server() as bot, running(make_config(
            bot.url, server={"admin_keys": [ADMIN]}), wall_clock=time.time,
            on_client_disconnected=lambda info: ended.set()) as gw:
        before = time.time()
        async with open_client(gw.url()) as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            await ws.send_message(b"\x00\x01\x02")
            assert await ws.get_message() == b"\x00\x01\x02"
            listed = await sessions(gw.api_port)
            assert len(listed) == 1
            s = listed[0]
            assert s["agent"] == "a" and s["organization"] == "local"
            assert s["client_addr"] == "127.0.0.1"
            connected_at = s["connected_at"]
            assert isinstance(connected_at, (int, float)), connected_at  # a JSON number
            assert before - 1 <= float(connected_at) <= time.time()
            ops = gw.gateway.operations
            assert isinstance(ops, LocalOperations)  # the memory store's (has .instance)
            assert s["instance"] == ops.instance
            assert s["messages"] == {"client_to_bot": 2, "bot_to_client": 2}
            assert s["bytes"] == {"client_to_bot": 8, "bot_to_client": 8}  # payload bytes
            # /metrics (the page's counters) is brought up to date on each scrape
            metrics = (await api(gw.api_port, "GET", "/metrics", []))[2].decode()
            assert 'relay_messages_relayed_total{direction="client_to_bot"} 2.0' in metrics
            assert 'relay_bytes_relayed_total{direction="bot_to_client"} 8.0' in metrics
            # the id the bot was told (X-Relay-Session-Id) is the one the operator sees
            assert (b"x-relay-session-id", str(s["id"]).encode()) in [
                (bytes(k).lower(), bytes(v)) for k, v in bot.requests[0].headers]
        with trio.fail_after(30):
            await ended.wait()
        assert await sessions(gw.api_port) == []


async def test_delete_ends_the_session_with_4002_on_both_legs_and_counts_it() -> None:
    async with bot_server() as bot, running(make_config(
            bot.url, server={"admin_keys": [ADMIN]})) as gw:
        async with open_client(gw.url()) as ws:
            await ws.send_message("x")
            assert await ws.get_message() == "x"
            (s,) = await sessions(gw.api_port)
            status, _, body = await api(gw.api_port, "DELETE", f"/v1/admin/sessions/{s['id']}")
            assert (status, body) == (204, b"")
            with trio.fail_after(30), pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason is not None
            assert (closed.value.reason.code, closed.value.reason.reason) == (
                4002, "ended by operator")
        with trio.fail_after(30):
            await bot.closed.wait()
        assert bot.close_codes == [4002]
        metrics = (await api(gw.api_port, "GET", "/metrics"))[2].decode()
        assert 'relay_sessions_ended_total{agent="a",reason="operator"} 1.0' in metrics
        # gone: a second DELETE is 404
        status, _, body = await api(gw.api_port, "DELETE", f"/v1/admin/sessions/{s['id']}")
        assert status == 404 and json.loads(body)["code"] == "session_not_found"


async def test_delete_of_an_unknown_id_is_404_and_ends_nothing() -> None:
    async with running(admin_config()) as gw, open_client(gw.url()) as ws:
        await ws.send_message("x")
        assert await ws.get_message() == "x"
        for target in ("/v1/admin/sessions/nope", "/v1/admin/sessions/%00",
                       "/v1/admin/sessions/" + "a" * 2000):
            status, _, _ = await api(gw.api_port, "DELETE", target)
            assert status == 404, target
        await ws.send_message("still here")
        assert await ws.get_message() == "still here"
        assert len(await sessions(gw.api_port)) == 1


async def test_an_in_process_bot_session_is_ended_with_4002_too() -> None:
    async with running(admin_config()) as gw, open_client(gw.url()) as ws:
        await ws.send_message("x")
        assert await ws.get_message() == "x"
        (s,) = await sessions(gw.api_port)
        assert (await api(gw.api_port, "DELETE", f"/v1/admin/sessions/{s['id']}"))[0] == 204
        with trio.fail_after(30), pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason is not None
        assert closed.value.reason.code == 4002


async def test_operator_end_outcome_is_4002_both_ways() -> None:
    assert closing.session_outcome("operator", False, None) == closing.Outcome(
        "operator", (4002, "ended by operator"), (4002, "ended by operator"))
    # it wins over what the relay recorded in the meantime, like replacement does
    assert closing.session_outcome("operator", True, closing.CLIENT_CLOSED).reason == "operator"


# -- draining ----------------------------------------------------------------------------------


async def test_drain_refuses_new_start_and_upgrades_with_503_while_live_sessions_go_on(
) -> None:
    async with running(make_config(server={"admin_keys": [ADMIN]})) as gw:
        async with open_client(gw.url()) as ws:
            status, _, body = await api(gw.api_port, "POST", "/v1/admin/agents/a/drain")
            assert (status, body) == (204, b"")
            status, headers, answer = await _start(gw.api_port, "a")
            assert status == 503 and answer["code"] == "draining"
            assert headers["retry-after"] == "5"
            assert await raw_upgrade_status(gw.ws_port, "/ws/generic/a.local") == 503
            await ws.send_message("live")
            assert await ws.get_message() == "live"
            status, _, body = await api(gw.api_port, "GET", "/v1/admin/agents")
            assert json.loads(body) == {"agents": [{"name": "a", "draining": True,
                                                    "sessions": 1}]}
            assert (await api(gw.api_port, "DELETE", "/v1/admin/agents/a/drain"))[0] == 204
            assert (await _start(gw.api_port, "a"))[0] == 200
        async with open_client(gw.url()) as ws2:
            await ws2.send_message("back")
            assert await ws2.get_message() == "back"


async def test_a_drain_refusal_does_not_burn_the_token() -> None:
    async with running(make_config(server={"admin_keys": [ADMIN]},
                                   websocket_auth="token")) as gw:
        status, _, answer = await _start(gw.api_port, "a")
        assert status == 200
        url = f"{answer['wsUrl']}/{answer['token']}".replace(
            "ws://127.0.0.1:8700", gw.ws_base)
        assert (await api(gw.api_port, "POST", "/v1/admin/agents/a/drain"))[0] == 204
        target = url.removeprefix(gw.ws_base)
        assert await raw_upgrade_status(gw.ws_port, target) == 503
        assert (await api(gw.api_port, "DELETE", "/v1/admin/agents/a/drain"))[0] == 204
        async with open_client(url) as ws:
            await ws.send_message("token still good")
            assert await ws.get_message() == "token still good"


async def test_drain_of_an_unknown_agent_is_404_and_drains_nothing() -> None:
    async with running(admin_config()) as gw:
        for method in ("POST", "DELETE"):
            status, _, body = await api(gw.api_port, method, "/v1/admin/agents/zz/drain")
            assert status == 404 and json.loads(body)["code"] == "agent_not_found"
        assert gw.gateway.operations.draining() == frozenset()


# -- Gateway.handle (the embedding path) ------------------------------------------------------


async def test_the_embedding_path_honours_drain_and_operator_end() -> None:
    config = make_config(server={"admin_keys": [ADMIN]})
    async with embedded(config) as app:
        url = f"ws://127.0.0.1:{app.port}/ws/generic/a.local"
        ops = app.gateway.operations
        await ops.set_draining("a", True)
        rejection = await refused(url)
        assert rejection.status_code == 503
        assert json.loads(rejection.body or b"{}")["code"] == "draining"
        await ops.set_draining("a", False)
        async with embedded_client(url) as ws:
            await ws.send_message("x")
            assert await ws.get_message() == "x"
            (s,) = await ops.sessions()
            assert s.agent == "a"
            assert await ops.end_session(s.id)
            assert await closed_code(ws) == (4002, "ended by operator")
        assert ("disconnected", "operator") in app.events


async def test_local_operations_lists_only_accepted_sessions() -> None:
    ops = LocalOperations(Registry(), time.time, instance="here")
    assert await ops.sessions() == []
    assert not await ops.end_session("x")
    await ops.set_draining("a", True)
    await ops.set_draining("a", True)
    assert ops.draining() == frozenset({"a"})
    await ops.set_draining("a", False)
    await ops.set_draining("a", False)  # ending a drain that is not on is fine
    assert not ops.is_draining("a")


# -- the page's files --------------------------------------------------------------------------


async def test_the_live_page_is_served_with_a_strict_csp_and_no_inline_script() -> None:
    async with running(admin_config()) as gw:
        status, headers, html = await api(gw.api_port, "GET", "/", [])
        assert status == 200
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert headers["content-security-policy"] == LIVE_PAGE_CSP
        assert "default-src 'none'" in LIVE_PAGE_CSP and "unsafe" not in LIVE_PAGE_CSP
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        page = html.decode()
        assert '<script src="/live.js"></script>' in page
        assert page.count("<script") == 1 and " on" not in page.replace(" only", "")
        assert "http://" not in page and "https://" not in page  # nothing from elsewhere
        status, headers, script = await api(gw.api_port, "GET", "/live.js", [])
        assert status == 200 and headers["content-type"].startswith("text/javascript")
        for sink in (b"innerHTML", b"outerHTML", b"insertAdjacentHTML", b"document.write",
                     b"eval(", b"new Function"):
            assert sink not in script, sink
        status, headers, _ = await api(gw.api_port, "GET", "/live.css", [])
        assert status == 200 and headers["content-type"].startswith("text/css")
        status, headers, body = await api(gw.api_port, "HEAD", "/", [])
        assert (status, body) == (200, b"")


# -- exposure ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("keys", "index"), [(["short"], 0), (["a" * 32, "b" * 31], 1)])
def test_beyond_loopback_a_short_admin_key_is_refused_naming_it(keys: list[str],
                                                                index: int) -> None:
    from relay.config import build_config
    from relay.errors import ConfigError
    from relay.exposure import check_exposure

    config = build_config(
        server={"ws_bind": ["0.0.0.0:8700"], "public_keys": ["pk_own"], "admin_keys": keys},
        agents={"a": {"bot": "python:relay.echo:echo_bot"}})
    with pytest.raises(ConfigError) as info:
        check_exposure(config, {})
    assert info.value.key == f"server.admin_keys[{index}]"
    assert keys[index] not in str(info.value)  # the key itself is never printed
    strong = attrs.evolve(config, server=attrs.evolve(config.server,
                                                      admin_keys=("k" * 32,)))
    assert check_exposure(strong, {}) == []
    loopback = build_config(server={"admin_keys": ["short"]},
                            agents={"a": {"bot": "python:relay.echo:echo_bot"}})
    assert all("admin" not in w for w in check_exposure(loopback, {}))


# -- provider endpoints ----------------------------------------------------------------------


async def test_a_provider_endpoint_routed_by_its_url_gets_503_draining_before_the_101() -> None:
    from test_provider_e2e import Refusal, provider

    async with bot_server() as bot, running(make_config(
            bot.url, agent="bot", server={"admin_keys": [ADMIN]})) as gw:
        await gw.gateway.operations.set_draining("bot", True)
        async with provider(gw.ws_port, "/ws/twilio/bot.local") as p:
            assert isinstance(p, Refusal)
            assert (p.status, p.body["code"]) == (503, "draining")
    assert bot.requests == []


async def test_twilio_routed_by_its_start_to_a_draining_agent_is_1013_token_kept() -> None:
    from test_provider_e2e import Provider, frame, provider, token, twilio_opening

    async with bot_server() as bot, running(make_config(
            bot.url, agent="bot", websocket_auth="token",
            server={"admin_keys": [ADMIN]})) as gw:
        opening = twilio_opening(_pipecatCloudServiceHost="bot.local", token=token())
        await gw.gateway.operations.set_draining("bot", True)
        async with provider(gw.ws_port, "/ws/twilio") as p:
            assert isinstance(p, Provider)
            await p.send(b"".join(frame(m) for m in opening))
            assert await p.closed() == (1013, "try again later: draining")
        assert bot.requests == []
        await gw.gateway.operations.set_draining("bot", False)
        async with provider(gw.ws_port, "/ws/twilio") as p:  # the token was not used up
            assert isinstance(p, Provider)
            await p.send(b"".join(frame(m) for m in opening))
            assert [await p.message() for _ in range(2)] == opening
    assert len(bot.requests) == 1


async def test_a_clients_headers_never_reach_the_listing() -> None:
    """What a client sends (X-Forwarded-For, User-Agent, Origin) is not what the operator
    sees: the address is the socket's peer, and no listed field carries client text."""
    hostile = "<img src=x onerror=alert(1)>\n"
    async with running(admin_config()) as gw, open_client(
            gw.url(), extra_headers=[("X-Forwarded-For", "<b>10.0.0.1</b>"),
                                     ("User-Agent", hostile.strip())]) as ws:
        await ws.send_message("x")
        assert await ws.get_message() == "x"
        (s,) = await sessions(gw.api_port)
        assert s["client_addr"] == "127.0.0.1"
        status, _, body = await api(gw.api_port, "GET", "/v1/admin/sessions")
        assert status == 200 and b"<" not in body and b"10.0.0.1" not in body
