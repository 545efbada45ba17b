"""relay.handshake, sans-IO: the upgrade decision as plain values in, plain values out.

No sockets and no trio here: every function under test takes bytes/str and returns a
`Route`, `Upgrade`, `BotTarget`, `BotAccepted`, headers, or a `Reject` (status, code,
detail). The end-to-end twins of these cases (the same requests over a real socket) live
in test_handshake_e2e.py.
"""

from __future__ import annotations

import ast
import base64
import json
from pathlib import Path

import pytest
from wsproto.utilities import generate_accept_token

from relay.handshake import (
    Admit,
    BotAccepted,
    BotTarget,
    Reject,
    Route,
    Upgrade,
    accept_headers,
    bot_request_headers,
    bot_request_target,
    check_bot_response,
    check_origin,
    check_route,
    check_upgrade,
    decide,
    param_names,
    parse_bot_url,
    render_error,
    route,
    split_service_host,
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's sample key (16 bytes in base64)


def upgrade_headers(**override: bytes | None) -> list[tuple[bytes, bytes]]:
    """A valid client upgrade's headers; override one by name (None drops it)."""
    base: dict[str, bytes | None] = {
        "host": b"gw.example",
        "upgrade": b"websocket",
        "connection": b"Upgrade",
        "sec-websocket-version": b"13",
        "sec-websocket-key": KEY,
    }
    base.update({k.replace("_", "-"): v for k, v in override.items()})
    return [(k.encode(), v) for k, v in base.items() if v is not None]


def assert_reject(result: object, status: int, code: str | None = None) -> Reject:
    assert isinstance(result, Reject), result
    assert result.status == status, result
    if code is not None:
        assert result.code == code, result
    envelope = json.loads(result.body())
    assert set(envelope) == {"error", "code", "detail"}
    assert envelope["code"] == result.code
    assert envelope["detail"] == result.detail and result.detail
    assert isinstance(envelope["error"], str) and envelope["error"]
    return result


# --------------------------------------------------------------------------------------
# route(): the three URL forms
# --------------------------------------------------------------------------------------


def test_route_path_form_names_agent_and_org() -> None:
    assert route(b"/ws/generic/my-agent.my_org") == Route(
        agent="my-agent", org="my_org", path_token=None, query_pairs=(), bot_query=""
    )


def test_route_path_token_form_takes_last_segment_as_token() -> None:
    r = route(b"/ws/generic/a.local/abc.DEF_-~")
    assert isinstance(r, Route)
    assert (r.agent, r.org, r.path_token) == ("a", "local", "abc.DEF_-~")


def test_route_empty_path_token_is_present_not_absent() -> None:
    # SPEC §8: a source is present when its name is there, even empty; it is then refused.
    r = route(b"/ws/generic/a.local/")
    assert isinstance(r, Route)
    assert r.path_token == ""


def test_route_service_host_query_form() -> None:
    r = route(b"/ws/generic?serviceHost=a.local&token=t0k")
    assert isinstance(r, Route)
    assert (r.agent, r.org, r.path_token) == ("a", "local", None)
    assert ("token", "t0k") in r.query_pairs


def test_route_service_host_query_form_with_trailing_slash() -> None:
    r = route(b"/ws/generic/?serviceHost=a.local")
    assert isinstance(r, Route)
    assert (r.agent, r.org) == ("a", "local")


def test_route_service_host_query_form_without_service_host_is_404() -> None:
    assert_reject(route(b"/ws/generic"), 404)
    assert_reject(route(b"/ws/generic?token=x"), 404)


def test_route_first_service_host_wins() -> None:
    r = route(b"/ws/generic?serviceHost=a.local&serviceHost=b.local")
    assert isinstance(r, Route)
    assert r.agent == "a"


@pytest.mark.parametrize(
    "target",
    [
        b"/",
        b"/ws",
        b"/ws/",
        b"/ws/genericx/a.local",
        b"/ws/generic/a.local/token/extra",
        b"/other/a.local",
        b"/WS/GENERIC/a.local",
    ],
)
def test_route_unknown_path_is_404(target: bytes) -> None:
    assert_reject(route(target), 404)


# --------------------------------------------------------------------------------------
# {agent}.{org}: split at its only dot; names are [A-Za-z0-9_-]{1,64}
# --------------------------------------------------------------------------------------


def test_split_service_host_at_its_only_dot() -> None:
    assert split_service_host("agent.org") == ("agent", "org")
    assert split_service_host("A-z_0.9-_Z") == ("A-z_0", "9-_Z")


@pytest.mark.parametrize(
    "host",
    [
        "a.b.c",  # two dots
        "a..b",
        "nodot",
        ".org",  # empty agent
        "agent.",  # empty org
        ".",
        "",
        "a" * 65 + ".org",  # agent of 65 characters
        "agent." + "o" * 65,  # org of 65 characters
        "ag ent.org",
        "agent.or/g",
        "agént.org",  # unicode
        "agent.örg",
        "a+b.org",
        "a%41.org",
    ],
)
def test_split_service_host_refuses_bad_names(host: str) -> None:
    assert split_service_host(host) is None


def test_names_of_exactly_64_characters_are_allowed() -> None:
    assert split_service_host("a" * 64 + "." + "o" * 64) == ("a" * 64, "o" * 64)


@pytest.mark.parametrize(
    "target",
    [
        b"/ws/generic/a.b.c",
        b"/ws/generic/nodot",
        b"/ws/generic/.local",
        b"/ws/generic/a.",
        b"/ws/generic/" + b"a" * 65 + b".local",
        b"/ws/generic/a.b.c/token",
        b"/ws/generic/%C3%A9.local",  # unicode agent, percent-encoded as a client must
        b"/ws/generic/a.%C3%B6rg",
        b"/ws/generic?serviceHost=a.b.c",
        b"/ws/generic?serviceHost=" + b"a" * 65 + b".local",
        b"/ws/generic?serviceHost=%C3%A9.local",
        b"/ws/generic?serviceHost=",
        b"/ws/generic?serviceHost=.",
    ],
)
def test_route_bad_service_host_is_404(target: bytes) -> None:
    assert_reject(route(target), 404, "unknown_service_host")


def test_route_raw_non_ascii_target_is_400_not_a_crash() -> None:
    # Raw non-ASCII bytes are not a valid HTTP request target (RFC 9112 §3.2): 400.
    assert_reject(route("/ws/generic/é.local".encode()), 400)


def test_route_64_character_names_route() -> None:
    r = route(b"/ws/generic/" + b"a" * 64 + b"." + b"o" * 64)
    assert isinstance(r, Route)
    assert (len(r.agent), len(r.org)) == (64, 64)


# --------------------------------------------------------------------------------------
# The query: token and serviceHost are the gateway's; the rest goes to the bot as sent
# --------------------------------------------------------------------------------------


def test_bot_query_drops_token_and_service_host_only() -> None:
    r = route(b"/ws/generic?serviceHost=a.local&lang=en&token=abc&x=1")
    assert isinstance(r, Route)
    assert r.bot_query == "lang=en&x=1"


def test_bot_query_keeps_other_params_byte_for_byte() -> None:
    raw = "a=%20b+c&empty=&flag&dup=1&dup=2&pct=%2F%3F%26&q=x=y&Token=kept&ServiceHost=kept"
    r = route(f"/ws/generic/a.local?token=t&{raw}&serviceHost=a.local".encode())
    assert isinstance(r, Route)
    assert r.bot_query == raw


def test_bot_query_drops_empty_token_too() -> None:
    r = route(b"/ws/generic/a.local?token=&keep=1&token")
    assert isinstance(r, Route)
    assert r.bot_query == "keep=1"
    assert ("token", "") in r.query_pairs


def test_bot_query_empty_when_only_gateway_keys() -> None:
    r = route(b"/ws/generic?serviceHost=a.local&token=abc")
    assert isinstance(r, Route)
    assert r.bot_query == ""


def test_query_pairs_are_decoded_for_token_lookup() -> None:
    r = route(b"/ws/generic/a.local?token=a%2Eb&x=%20y+z")
    assert isinstance(r, Route)
    assert r.query_pairs == (("token", "a.b"), ("x", " y z"))


def test_bot_request_target_appends_client_query_to_bot_path() -> None:
    plain = parse_bot_url("ws://h:9000/bot")
    with_query = parse_bot_url("ws://h:9000/bot?fixed=1")
    assert bot_request_target(plain, "") == "/bot"
    assert bot_request_target(plain, "a=1&b=%20") == "/bot?a=1&b=%20"
    assert bot_request_target(with_query, "a=1") == "/bot?fixed=1&a=1"
    assert bot_request_target(with_query, "a=1", "body=eyJ9") == "/bot?fixed=1&a=1&body=eyJ9"
    assert bot_request_target(plain, "", "body=x") == "/bot?body=x"


# --------------------------------------------------------------------------------------
# The query, rev 2: `body` and the bot URL's own parameters speak for the gateway and the
# operator; a client's copy of them never reaches the bot, however it is spelled
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", [
    "body=evil",
    "body",                 # no value
    "body=",                # empty value
    "bod%79=evil",          # percent-encoded letter
    "%62%6F%64%79=evil",    # all encoded
    "bo%2564y=evil",        # encoded twice (a bot that decodes twice reads `body`)
    "body+=evil",           # `+` is a space: `body ` to a parser that strips
    "+body=evil",
    "%20body%20=evil",
    "Body=evil",            # frameworks that compare names case-insensitively
    "BODY=evil",
    "x=1;body=evil",        # `;` separates parameters for older parsers
    "body;x=1",
])
def test_bot_query_drops_every_spelling_of_body(spelling: str) -> None:
    r = route(f"/ws/generic/a.local?keep=1&{spelling}&also=2".encode())
    assert isinstance(r, Route)
    assert r.bot_query == "keep=1&also=2"
    # the client's parameter is still visible to the gateway's own lookups (token etc.)
    assert len(r.query_pairs) == 3


@pytest.mark.parametrize("kept", ["bodyx=1", "nobody=1", "x=body", "b=1", "bod=1", "x=bo%64y"])
def test_bot_query_keeps_names_that_only_look_like_body(kept: str) -> None:
    r = route(f"/ws/generic/a.local?{kept}".encode())
    assert isinstance(r, Route)
    assert r.bot_query == kept


@pytest.mark.parametrize("target", [
    b"/ws/generic/a.local?x=1#body=evil",
    b"/ws/generic/a.local#frag",
    b"/ws/generic?serviceHost=a.local#",
    b"/ws/generic/a.local/tok#en",
])
def test_fragment_in_request_target_is_400(target: bytes) -> None:
    r = route(target)
    assert isinstance(r, Reject)
    assert (r.status, r.code) == (400, "bad_target")
    assert "#" in r.detail
    assert set(json.loads(r.body())) == {"error", "code", "detail"}


def test_encoded_hash_is_not_a_fragment_and_passes_as_sent() -> None:
    r = route(b"/ws/generic/a.local?x=%23y")
    assert isinstance(r, Route)
    assert r.bot_query == "x=%23y"


def test_bot_request_target_drops_client_params_the_bot_url_sets() -> None:
    bot = parse_bot_url("ws://h:9000/bot?mode=prod&lang=en&flag")
    client = "mode=debug&m%6Fde=debug&MODE=x&lang=fr&flag=1&other=1&modes=1"
    assert bot_request_target(bot, client) == "/bot?mode=prod&lang=en&flag&other=1&modes=1"
    # the gateway's own body comes after, once
    assert (bot_request_target(bot, client, "body=eyJ9")
            == "/bot?mode=prod&lang=en&flag&other=1&modes=1&body=eyJ9")


def test_bot_request_target_without_bot_query_keeps_client_params() -> None:
    bot = parse_bot_url("ws://h:9000/bot")
    assert bot_request_target(bot, "mode=debug&x=1") == "/bot?mode=debug&x=1"


def test_param_names_is_bounded_on_deeply_encoded_names() -> None:
    # Each round of decoding peels one layer; a name encoded 50 times costs 8 rounds.
    name = "body"
    for _ in range(50):
        name = name.replace("%", "%25") if "%" in name else "%62ody"
    names = param_names(name + "=1")
    assert len(names) <= 8 * 3 * 2


# --------------------------------------------------------------------------------------
# check_route(): SPEC §5 step 1
# --------------------------------------------------------------------------------------

AGENTS = {"a": object(), "b": object()}


def test_check_route_accepts_known_agent_of_our_org() -> None:
    r = route(b"/ws/generic/a.local")
    assert isinstance(r, Route)
    assert check_route(r, organization="local", agents=AGENTS) is None


def test_check_route_other_org_is_404() -> None:
    r = route(b"/ws/generic/a.elsewhere")
    assert isinstance(r, Route)
    assert_reject(check_route(r, organization="local", agents=AGENTS), 404)


def test_check_route_unknown_agent_is_404() -> None:
    r = route(b"/ws/generic/zzz.local")
    assert isinstance(r, Route)
    assert_reject(check_route(r, organization="local", agents=AGENTS), 404)


def test_check_route_org_match_is_case_sensitive() -> None:
    r = route(b"/ws/generic/a.LOCAL")
    assert isinstance(r, Route)
    assert_reject(check_route(r, organization="local", agents=AGENTS), 404)


# --------------------------------------------------------------------------------------
# check_upgrade(): RFC 6455 §4.2.1
# --------------------------------------------------------------------------------------


def test_check_upgrade_accepts_a_valid_request() -> None:
    headers = [
        *upgrade_headers(),
        (b"origin", b"https://app.example"),
        (b"user-agent", b"pytest/1"),
        (b"authorization", b"Bearer secret"),
        (b"sec-websocket-protocol", b"chat, superchat"),
        (b"sec-websocket-protocol", b"other"),
        (b"sec-websocket-extensions", b"permessage-deflate; client_max_window_bits"),
    ]
    u = check_upgrade(b"GET", b"1.1", headers)
    assert u == Upgrade(
        key=KEY,
        subprotocols=(b"chat, superchat", b"other"),
        extensions=(b"permessage-deflate; client_max_window_bits",),
        origin=b"https://app.example",
        user_agent=b"pytest/1",
        authorization=b"Bearer secret",
    )


def test_check_upgrade_header_tokens_are_case_insensitive_lists() -> None:
    headers = upgrade_headers(upgrade=b"WebSocket", connection=b"keep-alive, UPGRADE")
    assert isinstance(check_upgrade(b"GET", b"1.1", headers), Upgrade)


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"HEAD", b"OPTIONS", b"get"])
def test_check_upgrade_non_get_is_405_with_allow(method: bytes) -> None:
    rej = assert_reject(check_upgrade(method, b"1.1", upgrade_headers()), 405)
    assert (b"allow", b"GET") in rej.headers


@pytest.mark.parametrize("version", [b"1.0", b"0.9", b"2"])
def test_check_upgrade_http_version_other_than_1_1_is_400(version: bytes) -> None:
    assert_reject(check_upgrade(b"GET", version, upgrade_headers()), 400)


@pytest.mark.parametrize("value", [None, b"h2c", b"websockets", b""])
def test_check_upgrade_without_upgrade_websocket_is_426(value: bytes | None) -> None:
    rej = assert_reject(check_upgrade(b"GET", b"1.1", upgrade_headers(upgrade=value)), 426)
    assert (b"upgrade", b"websocket") in rej.headers


@pytest.mark.parametrize("value", [None, b"keep-alive", b"close", b""])
def test_check_upgrade_without_connection_upgrade_is_400(value: bytes | None) -> None:
    assert_reject(check_upgrade(b"GET", b"1.1", upgrade_headers(connection=value)), 400)


@pytest.mark.parametrize("value", [None, b"8", b"12", b"14", b"13, 8", b""])
def test_check_upgrade_wrong_websocket_version_is_426_naming_13(value: bytes | None) -> None:
    headers = upgrade_headers(sec_websocket_version=value)
    rej = assert_reject(check_upgrade(b"GET", b"1.1", headers), 426, "bad_websocket_version")
    assert (b"sec-websocket-version", b"13") in rej.headers


def test_check_upgrade_two_version_headers_is_426() -> None:
    headers = [*upgrade_headers(), (b"sec-websocket-version", b"8")]
    assert_reject(check_upgrade(b"GET", b"1.1", headers), 426)


@pytest.mark.parametrize(
    "key",
    [
        None,
        b"",
        b"not base64!!",
        b"dGhlIHNhbXBsZSBub25jZQ",  # padding missing
        base64.b64encode(b"x" * 15),  # 15 bytes
        base64.b64encode(b"x" * 17),  # 17 bytes
        base64.b64encode(b"x" * 32),
    ],
)
def test_check_upgrade_bad_key_is_400(key: bytes | None) -> None:
    headers = upgrade_headers(sec_websocket_key=key)
    assert_reject(check_upgrade(b"GET", b"1.1", headers), 400, "bad_websocket_key")


def test_check_upgrade_two_keys_is_400() -> None:
    headers = [*upgrade_headers(), (b"sec-websocket-key", base64.b64encode(b"y" * 16))]
    assert_reject(check_upgrade(b"GET", b"1.1", headers), 400, "bad_websocket_key")


@pytest.mark.parametrize(
    "extra",
    [
        [(b"content-length", b"5")],
        [(b"content-length", b"1")],
        [(b"transfer-encoding", b"chunked")],
    ],
)
def test_check_upgrade_with_request_body_is_400(extra: list[tuple[bytes, bytes]]) -> None:
    headers = upgrade_headers() + extra
    assert_reject(check_upgrade(b"GET", b"1.1", headers), 400, "unexpected_body")


def test_check_upgrade_content_length_zero_is_no_body() -> None:
    headers = [*upgrade_headers(), (b"content-length", b"0")]
    assert isinstance(check_upgrade(b"GET", b"1.1", headers), Upgrade)


# --------------------------------------------------------------------------------------
# The 101 to the client
# --------------------------------------------------------------------------------------


def test_accept_headers_answer_the_key() -> None:
    headers = accept_headers(KEY, None, ())
    assert (b"sec-websocket-accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=") in headers
    assert (b"upgrade", b"websocket") in headers
    assert (b"connection", b"Upgrade") in headers
    assert not [k for k, _ in headers if k in (b"sec-websocket-protocol",
                                                 b"sec-websocket-extensions")]


def test_accept_headers_carry_the_bots_choices() -> None:
    headers = accept_headers(KEY, b"chat", (b"permessage-deflate", b"x-other"))
    assert (b"sec-websocket-protocol", b"chat") in headers
    assert [v for k, v in headers if k == b"sec-websocket-extensions"] == [
        b"permessage-deflate", b"x-other"]


# --------------------------------------------------------------------------------------
# parse_bot_url()
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://127.0.0.1:9000/ws", BotTarget(False, "127.0.0.1", 9000, "/ws")),
        ("ws://bot.example/ws", BotTarget(False, "bot.example", 80, "/ws")),
        ("wss://bot.example/ws", BotTarget(True, "bot.example", 443, "/ws")),
        ("wss://bot.example:8443/a/b/c", BotTarget(True, "bot.example", 8443, "/a/b/c")),
        ("ws://bot.example", BotTarget(False, "bot.example", 80, "/")),
        ("ws://bot.example:81", BotTarget(False, "bot.example", 81, "/")),
        ("ws://[::1]:9000/ws", BotTarget(False, "::1", 9000, "/ws")),
        ("wss://[2001:db8::1]/x", BotTarget(True, "2001:db8::1", 443, "/x")),
        ("ws://h:9000/ws?x=1&y=2", BotTarget(False, "h", 9000, "/ws?x=1&y=2")),
        ("ws://h?x=1", BotTarget(False, "h", 80, "/?x=1")),
        ("ws://h:1/", BotTarget(False, "h", 1, "/")),
        ("ws://h:65535/", BotTarget(False, "h", 65535, "/")),
    ],
)
def test_parse_bot_url(url: str, expected: BotTarget) -> None:
    assert parse_bot_url(url) == expected


@pytest.mark.parametrize(
    ("url", "host_header"),
    [
        ("ws://h/ws", "h"),
        ("ws://h:80/ws", "h"),
        ("ws://h:81/ws", "h:81"),
        ("wss://h:443/ws", "h"),
        ("wss://h:80/ws", "h:80"),
        ("ws://[::1]:9000/", "[::1]:9000"),
        ("wss://[::1]/", "[::1]"),
    ],
)
def test_bot_host_header_omits_default_port_and_brackets_ipv6(url: str,
                                                               host_header: str) -> None:
    assert parse_bot_url(url).host_header == host_header


@pytest.mark.parametrize(
    "url",
    ["http://h/ws", "https://h/ws", "h:9000", "ws:/h", "ws://", "ws://:9000/x", "ws://h:0/",
     "ws://h:65536/", "ws://h:port/", "python:relay.echo:echo_bot"],
)
def test_parse_bot_url_refuses_what_is_not_a_ws_url(url: str) -> None:
    with pytest.raises(ValueError):
        parse_bot_url(url)


# --------------------------------------------------------------------------------------
# Our request to the bot (SPEC §5)
# --------------------------------------------------------------------------------------


def _bot_headers(**client: bytes) -> list[tuple[bytes, bytes]]:
    headers = upgrade_headers() + [(k.replace("_", "-").encode(), v) for k, v in client.items()]
    upgrade = check_upgrade(b"GET", b"1.1", headers)
    assert isinstance(upgrade, Upgrade)
    return bot_request_headers(
        parse_bot_url("ws://[::1]:9000/bot"), b"Ym90LWtleS0xNi1ieXRlcw==", upgrade,
        session_id="sess-1", agent="a", organization="local", client_addr="10.0.0.7",
        extra=[(b"x-daily-session-id", b"sess-1")],
    )


def test_bot_request_headers_never_carry_the_clients_authorization() -> None:
    headers = _bot_headers(authorization=b"Bearer tok.en", cookie=b"c=1")
    names = [k.lower() for k, _ in headers]
    assert b"authorization" not in names
    assert all(b"tok.en" not in v for _, v in headers)


def test_bot_request_headers_carry_relay_headers_and_client_identity() -> None:
    headers = _bot_headers(origin=b"https://app.example", user_agent=b"ua/1",
                           sec_websocket_protocol=b"chat, v2",
                           sec_websocket_extensions=b"permessage-deflate")
    d = dict(headers)
    assert d[b"host"] == b"[::1]:9000"
    assert d[b"x-relay-session-id"] == b"sess-1"
    assert d[b"x-relay-agent"] == b"a"
    assert d[b"x-relay-organization"] == b"local"
    assert d[b"x-forwarded-for"] == b"10.0.0.7"
    assert d[b"origin"] == b"https://app.example"
    assert d[b"user-agent"] == b"ua/1"
    assert d[b"sec-websocket-protocol"] == b"chat, v2"
    assert d[b"sec-websocket-extensions"] == b"permessage-deflate"
    assert d[b"x-daily-session-id"] == b"sess-1"
    # Our own key and version, not the client's.
    assert d[b"sec-websocket-key"] == b"Ym90LWtleS0xNi1ieXRlcw=="
    assert d[b"sec-websocket-version"] == b"13"
    assert [k for k, _ in headers].count(b"sec-websocket-key") == 1


def test_bot_request_headers_omit_absent_origin_and_user_agent() -> None:
    names = {k for k, _ in _bot_headers()}
    assert b"origin" not in names and b"user-agent" not in names
    assert b"sec-websocket-protocol" not in names


# --------------------------------------------------------------------------------------
# The bot's 101 (RFC 6455 §4.1)
# --------------------------------------------------------------------------------------

BOT_KEY = b"Ym90LWtleS0xNi1ieXRlcw=="


def _bot_101(**override: bytes | None) -> list[tuple[bytes, bytes]]:
    base: dict[str, bytes | None] = {
        "upgrade": b"websocket",
        "connection": b"Upgrade",
        "sec-websocket-accept": generate_accept_token(BOT_KEY),
    }
    base.update({k.replace("_", "-"): v for k, v in override.items()})
    return [(k.encode(), v) for k, v in base.items() if v is not None]


def test_check_bot_response_accepts_a_valid_101_with_its_choices() -> None:
    headers = _bot_101(sec_websocket_protocol=b"chat",
                       sec_websocket_extensions=b"permessage-deflate")
    assert check_bot_response(BOT_KEY, 101, headers) == BotAccepted(
        subprotocol=b"chat", extensions=(b"permessage-deflate",))


def test_check_bot_response_plain_101() -> None:
    assert check_bot_response(BOT_KEY, 101, _bot_101()) == BotAccepted(None, ())


@pytest.mark.parametrize("status", [200, 301, 400, 403, 404, 426, 500, 503])
def test_check_bot_response_non_101_is_unusable(status: int) -> None:
    problem = check_bot_response(BOT_KEY, status, _bot_101())
    assert isinstance(problem, str) and str(status) in problem


@pytest.mark.parametrize(
    "accept",
    [None, b"", generate_accept_token(b"c29tZS1vdGhlci1rZXktMTY="),
     b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="],
)
def test_check_bot_response_wrong_accept_token_is_unusable(accept: bytes | None) -> None:
    problem = check_bot_response(BOT_KEY, 101, _bot_101(sec_websocket_accept=accept))
    assert isinstance(problem, str)


def test_check_bot_response_two_accept_headers_is_unusable() -> None:
    headers = [*_bot_101(), (b"sec-websocket-accept", generate_accept_token(BOT_KEY))]
    assert isinstance(check_bot_response(BOT_KEY, 101, headers), str)


def test_check_bot_response_without_upgrade_is_unusable() -> None:
    assert isinstance(check_bot_response(BOT_KEY, 101, _bot_101(upgrade=None)), str)


# --------------------------------------------------------------------------------------
# The error envelope
# --------------------------------------------------------------------------------------


def test_render_error_is_the_json_envelope() -> None:
    assert json.loads(render_error(404, "unknown_service_host", "No such agent.")) == {
        "error": "Not Found", "code": "unknown_service_host", "detail": "No such agent."}


def test_handshake_module_is_sans_io() -> None:
    """Only pure-Python imports: no trio, no sockets, no I/O library."""
    import relay.handshake as mod

    tree = ast.parse(Path(mod.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module.split(".")[0])
    assert not imported & {"trio", "socket", "ssl", "trio_websocket", "h11", "hypercorn",
                           "asyncio", "selectors"}, imported


def _upgrade_with_origin(origin: bytes | None) -> Upgrade:
    return Upgrade(key=b"dGhlIHNhbXBsZSBub25jZQ==", subprotocols=(), extensions=(),
                   origin=origin, user_agent=None, authorization=None)


@pytest.mark.parametrize(
    ("origin", "allowed", "refused"),
    [
        (b"https://evil.example", ("https://app.example",), True),
        (b"https://app.example", ("https://app.example",), False),
        (b"HTTPS://APP.EXAMPLE", ("https://app.example/",), False),
        (b"https://evil.example", ("*",), False),
        (None, ("https://app.example",), False),  # not a browser: no Origin to check
        (b"https://evil.example", (), False),  # nothing configured: nothing checked
    ],
)
def test_check_origin(origin: bytes | None, allowed: tuple[str, ...], refused: bool) -> None:
    result = check_origin(_upgrade_with_origin(origin), allowed)
    if refused:
        assert result is not None and result.status == 403
        assert result.code == "origin_not_allowed"
    else:
        assert result is None


def _decide(target: bytes, headers: list[tuple[bytes, bytes]], *,
            shutting_down: bool = False, over_capacity: bool = False) -> Admit | Reject:
    return decide(b"GET", b"1.1", target, headers, organization="local",
                  agents={"a": object()}, cors_origins=("https://app.example",),
                  shutting_down=shutting_down, over_capacity=over_capacity)


def _refused(target: bytes, headers: list[tuple[bytes, bytes]], **kw: bool) -> Reject:
    result = _decide(target, headers, **kw)
    assert isinstance(result, Reject), result
    return result


def test_decide_checks_in_spec_order() -> None:
    good = upgrade_headers()
    # shutting down and capacity come before anything about the request
    assert _refused(b"/nowhere", [], shutting_down=True).code == "shutting_down"
    assert _refused(b"/nowhere", [], over_capacity=True).code == "too_many_connections"
    # an unknown service host is 404 even when the upgrade headers are bad too
    assert _refused(b"/ws/generic/zz.local", []).status == 404
    # then the upgrade headers, then the Origin
    assert _refused(b"/ws/generic/a.local", []).status == 426
    bad_origin = [*good, (b"origin", b"https://evil.example")]
    assert _refused(b"/ws/generic/a.local", bad_origin).code == "origin_not_allowed"
    admitted = _decide(b"/ws/generic/a.local?x=1&token=t", good)
    assert isinstance(admitted, Admit)
    assert admitted.route.agent == "a" and admitted.route.bot_query == "x=1"
