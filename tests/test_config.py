"""relay.config: every validation rule names the file, the dotted key and the problem.

The config module is sans-IO: these tests never open a socket. Bad configs are written to a
temporary TOML file and loaded, so each message is checked exactly as `relay serve` prints it.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from relay.config import (
    AgentConfig,
    Bind,
    Config,
    Limits,
    ServerConfig,
    StoreConfig,
    build_config,
    default_config,
    load_config,
    parse_bind,
    parse_config,
)
from relay.errors import ConfigError

AGENT = '[agents.a]\nbot = "ws://127.0.0.1:9000/ws"\n'


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.file == str(path)
    assert str(err).startswith(f"{path}: ")
    return err


# --------------------------------------------------------------------------------------
# Every rule: (toml text, dotted key, fragment of the problem)
# --------------------------------------------------------------------------------------

BAD_CONFIGS: list[tuple[str, str, str, str]] = [
    # id, toml, key, problem fragment
    # unknown keys, everywhere
    ("unknown-top", AGENT + "[extra]\nx = 1\n", "extra", "unknown key"),
    ("unknown-server", "[server]\nbogus = 1\n" + AGENT, "server.bogus", "unknown key"),
    (
        "unknown-server-typo",
        "[server]\nsesion_timeout = 1\n" + AGENT,
        "server.sesion_timeout",
        "did you mean 'session_timeout'",
    ),
    ("unknown-store", '[store]\nhost = "x"\n' + AGENT, "store.host", "unknown key"),
    ("unknown-agent", AGENT + "colour = 1\n", "agents.a.colour", "unknown key"),
    # tables of the wrong type
    ("server-not-table", 'server = "x"\n' + AGENT, "server", "must be a table"),
    ("agents-not-table", 'agents = ["a"]\n', "agents", "must be a table"),
    ("agent-not-table", '[agents]\na = "ws://x"\n', "agents.a", "must be a table"),
    # agents
    ("no-agents", "[server]\n", "agents", "no agents configured"),
    ("empty-agents", "[agents]\n", "agents", "no agents configured"),
    ("agent-without-bot", "[agents.a]\nmax_clients = 2\n", "agents.a.bot", "is required"),
    ("bot-http", '[agents.a]\nbot = "http://x/ws"\n', "agents.a.bot", "ws:// or wss://"),
    ("bot-empty", '[agents.a]\nbot = ""\n', "agents.a.bot", "ws:// or wss://"),
    ("bot-not-string", "[agents.a]\nbot = 9000\n", "agents.a.bot", "must be a string"),
    ("bot-no-host", '[agents.a]\nbot = "ws:///ws"\n', "agents.a.bot", "has no host"),
    ("bot-bad-port", '[agents.a]\nbot = "ws://h:99999/"\n', "agents.a.bot", "not a valid URL"),
    ("bot-credentials", '[agents.a]\nbot = "ws://u:pw@h:9000/"\n', "agents.a.bot",
     '"ws://***@h:9000/" must not carry credentials'),
    (
        "bot-python-no-function",
        '[agents.a]\nbot = "python:pkg.mod"\n',
        "agents.a.bot",
        "python:package.module:function",
    ),
    (
        "bot-python-bad-module",
        '[agents.a]\nbot = "python:pkg..mod:f"\n',
        "agents.a.bot",
        "python:package.module:function",
    ),
    (
        "bot-python-bad-function",
        '[agents.a]\nbot = "python:pkg.mod:not-a-name"\n',
        "agents.a.bot",
        "python:package.module:function",
    ),
    ("agent-name-space", '[agents."a b"]\nbot = "ws://x"\n', 'agents."a b"', "agent names"),
    ("agent-name-dot", '[agents."a.b"]\nbot = "ws://x"\n', 'agents."a.b"', "agent names"),
    ("agent-name-long", f'[agents.{"a" * 65}]\nbot = "ws://x"\n', "agents." + "a" * 65, "1 to 64"),
    ("websocket-auth", AGENT + 'websocket_auth = "jwt"\n', "agents.a.websocket_auth", '"token"'),
    ("when-full", AGENT + 'when_full = "queue"\n', "agents.a.when_full", '"reject"'),
    ("bot-protocol", AGENT + 'bot_protocol = "daily"\n', "agents.a.bot_protocol", "pipecat"),
    ("max-clients-zero", AGENT + "max_clients = 0\n", "agents.a.max_clients", "positive integer"),
    ("max-clients-neg", AGENT + "max_clients = -1\n", "agents.a.max_clients", "positive integer"),
    ("max-clients-float", AGENT + "max_clients = 1.5\n", "agents.a.max_clients", "(float)"),
    ("max-clients-bool", AGENT + "max_clients = true\n", "agents.a.max_clients", "(boolean)"),
    (
        "max-message-size-zero",
        AGENT + "max_message_size = 0\n",
        "agents.a.max_message_size",
        "positive integer",
    ),
    (
        "max-message-size-string",
        AGENT + 'max_message_size = "1MB"\n',
        "agents.a.max_message_size",
        "(string)",
    ),
    # timeouts: zero, negative, wrong type, not finite
    ("session-zero", AGENT + "session_timeout = 0\n", "agents.a.session_timeout", "positive"),
    ("session-neg", AGENT + "session_timeout = -5\n", "agents.a.session_timeout", "positive"),
    ("session-nan", AGENT + "session_timeout = nan\n", "agents.a.session_timeout", "nan"),
    ("session-bool", AGENT + "session_timeout = true\n", "agents.a.session_timeout", "(boolean)"),
    ("session-str", AGENT + 'session_timeout = "5m"\n', "agents.a.session_timeout", "(string)"),
    ("ping-zero", AGENT + "ping_interval = 0.0\n", "agents.a.ping_interval", "positive"),
    ("ping-timeout-neg", AGENT + "ping_timeout = -0.5\n", "agents.a.ping_timeout", "positive"),
    ("close-inf", AGENT + "close_timeout = inf\n", "agents.a.close_timeout", "finite"),
    ("stall-zero", AGENT + "stall_timeout = 0\n", "agents.a.stall_timeout", "positive"),
    (
        "bot-connect-neg",
        AGENT + "bot_connect_timeout = -1\n",
        "agents.a.bot_connect_timeout",
        "positive",
    ),
    # the same limit keys as [server] defaults
    (
        "server-session-zero",
        "[server]\nsession_timeout = 0\n" + AGENT,
        "server.session_timeout",
        "positive",
    ),
    (
        "server-stall-bool",
        "[server]\nstall_timeout = false\n" + AGENT,
        "server.stall_timeout",
        "(boolean)",
    ),
    (
        "server-max-message-float",
        "[server]\nmax_message_size = 1e6\n" + AGENT,
        "server.max_message_size",
        "positive integer",
    ),
    (
        "handshake-zero",
        "[server]\nhandshake_timeout = 0\n" + AGENT,
        "server.handshake_timeout",
        "positive",
    ),
    (
        "max-connections-zero",
        "[server]\nmax_connections = 0\n" + AGENT,
        "server.max_connections",
        "positive",
    ),
    (
        "start-body-timeout-zero",
        "[server]\nstart_body_timeout = 0\n" + AGENT,
        "server.start_body_timeout",
        "positive",
    ),
    (
        "start-body-timeout-inf",
        "[server]\nstart_body_timeout = inf\n" + AGENT,
        "server.start_body_timeout",
        "finite",
    ),
    (
        "max-start-body-reads-zero",
        "[server]\nmax_start_body_reads = 0\n" + AGENT,
        "server.max_start_body_reads",
        "positive",
    ),
    (
        "max-start-body-reads-float",
        "[server]\nmax_start_body_reads = 1.5\n" + AGENT,
        "server.max_start_body_reads",
        "positive integer",
    ),
    # [server]
    ("org-bad", '[server]\norganization = "my org"\n' + AGENT, "server.organization", "1 to 64"),
    ("org-dot", '[server]\norganization = "a.b"\n' + AGENT, "server.organization", "1 to 64"),
    ("org-empty", '[server]\norganization = ""\n' + AGENT, "server.organization", "1 to 64"),
    ("org-int", "[server]\norganization = 7\n" + AGENT, "server.organization", "(integer)"),
    (
        "public-url-http",
        '[server]\npublic_url = "http://x"\n' + AGENT,
        "server.public_url",
        "ws:// or wss://",
    ),
    (
        "public-url-query",
        '[server]\npublic_url = "ws://x/?a=1"\n' + AGENT,
        "server.public_url",
        "query",
    ),
    (
        "public-url-no-host",
        '[server]\npublic_url = "wss://"\n' + AGENT,
        "server.public_url",
        "no host",
    ),
    ("ws-bind-string", '[server]\nws_bind = "127.0.0.1:1"\n' + AGENT, "server.ws_bind", "array"),
    ("ws-bind-empty", "[server]\nws_bind = []\n" + AGENT, "server.ws_bind", "at least one"),
    (
        "ws-bind-no-port",
        '[server]\nws_bind = ["localhost"]\n' + AGENT,
        "server.ws_bind[0]",
        "no port",
    ),
    (
        "ws-bind-port-big",
        '[server]\nws_bind = ["h:65536"]\n' + AGENT,
        "server.ws_bind[0]",
        "0 to 65535",
    ),
    ("ws-bind-int", "[server]\nws_bind = [8700]\n" + AGENT, "server.ws_bind[0]", "(integer)"),
    (
        "api-bind-second",
        '[server]\napi_bind = ["127.0.0.1:1", "::1:2"]\n' + AGENT,
        "server.api_bind[1]",
        "brackets",
    ),
    (
        "bind-duplicate",
        '[server]\nws_bind = ["127.0.0.1:9"]\napi_bind = ["127.0.0.1:9"]\n' + AGENT,
        "server.api_bind[0]",
        "already listed as server.ws_bind[0]",
    ),
    ("certfile-alone", '[server]\ncertfile = "c.pem"\n' + AGENT, "server.keyfile", "is required"),
    ("keyfile-alone", '[server]\nkeyfile = "k.pem"\n' + AGENT, "server.certfile", "is required"),
    ("public-keys-string", '[server]\npublic_keys = "pk"\n' + AGENT, "server.public_keys", "array"),
    (
        "public-keys-empty-key",
        '[server]\npublic_keys = ["a", ""]\n' + AGENT,
        "server.public_keys[1]",
        "non-empty",
    ),
    (
        "public-keys-space",
        '[server]\npublic_keys = ["a b"]\n' + AGENT,
        "server.public_keys[0]",
        "no spaces",
    ),
    (
        "secret-env-bad",
        '[server]\nsecret_env = "MY-SECRET"\n' + AGENT,
        "server.secret_env",
        "environment",
    ),
    (
        "cors-path",
        '[server]\ncors_origins = ["https://app.example.com/"]\n' + AGENT,
        "server.cors_origins[0]",
        'use "https://app.example.com"',
    ),
    (
        "cors-scheme",
        '[server]\ncors_origins = ["ftp://x"]\n' + AGENT,
        "server.cors_origins[0]",
        "origin",
    ),
    # [store]
    (
        "store-backend",
        '[store]\nbackend = "postgres"\n' + AGENT,
        "store.backend",
        '"memory", "redis"',
    ),
    (
        "store-redis-url",
        '[store]\nbackend = "redis"\nurl = "http://127.0.0.1:6379"\n' + AGENT,
        "store.url",
        "redis:// or rediss://",
    ),
    ("store-url-int", "[store]\nurl = 6379\n" + AGENT, "store.url", "(integer)"),
]


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [pytest.param(text, key, problem, id=id_) for id_, text, key, problem in BAD_CONFIGS],
)
def test_bad_config_names_file_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    err = load_error(tmp_path, text)
    assert err.key == key
    assert problem in err.problem
    assert str(err) == f"{tmp_path / 'relay.toml'}: {key}: {err.problem}"


def test_unknown_key_is_reported_in_document_order(tmp_path: Path) -> None:
    err = load_error(tmp_path, "[server]\nfirst = 1\nsecond = 2\n" + AGENT)
    assert err.key == "server.first"


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)
    assert str(info.value) == f"{path}: config file not found"


def test_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: ")


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    err = load_error(tmp_path, "[server\nws_bind = \n")
    assert "invalid TOML" in err.problem


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_bytes(b'[agents.a]\nbot = "ws://\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_load_records_the_source(tmp_path: Path) -> None:
    path = write(tmp_path, AGENT)
    assert load_config(path).source == str(path)
    assert load_config(str(path)).source == str(path)


def test_parse_config_names_its_source() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"agents": {}}, source="inline.toml")
    assert str(info.value).startswith("inline.toml: agents: ")
    with pytest.raises(ConfigError) as info:
        parse_config({})
    assert info.value.file == "<config>"


# --------------------------------------------------------------------------------------
# A full file, the SPEC §2 example
# --------------------------------------------------------------------------------------

SPEC_EXAMPLE = """
[server]
ws_bind = ["127.0.0.1:8700"]
api_bind = ["127.0.0.1:8701"]
certfile = ""
keyfile = ""
public_url = "ws://127.0.0.1:8700"
organization = "local"
public_keys = ["pk_dev_123"]
secret_env = "RELAY_SECRET"

[store]
backend = "memory"
url = "redis://127.0.0.1:6379/0"

[agents.my-agent]
bot = "ws://127.0.0.1:9000/ws"
websocket_auth = "token"
session_timeout = 300
max_clients = 1
when_full = "replace"
bot_protocol = "relay"
"""


def test_spec_example_parses(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SPEC_EXAMPLE))
    assert config.server == ServerConfig()
    assert config.store == StoreConfig()
    assert not config.tls
    assert list(config.agents) == ["my-agent"]
    agent = config.agents["my-agent"]
    assert agent == AgentConfig(
        name="my-agent",
        bot="ws://127.0.0.1:9000/ws",
        websocket_auth="token",
        max_clients=1,
        when_full="replace",
        bot_protocol="relay",
        limits=Limits(session_timeout=300.0),
    )


def test_every_key_set(tmp_path: Path) -> None:
    text = """
[server]
ws_bind = ["0.0.0.0:80", "[::]:80"]
api_bind = ["127.0.0.1:0", "127.0.0.1:0"]
certfile = "cert.pem"
keyfile = "key.pem"
public_url = "wss://relay.example.com/gw/"
organization = "acme_01"
public_keys = ["pk_live_a", "pk_live_b"]
secret_env = "ACME_RELAY_SECRET"
cors_origins = ["https://app.example.com", "http://localhost:3000"]
handshake_timeout = 2.5
max_connections = 50
start_body_timeout = 3.5
max_start_body_reads = 7

[store]
backend = "redis"
url = "rediss://cache:6380/1"

[agents.phone]
bot = "python:acme.bots.phone:run"
max_clients = 5
when_full = "reject"
bot_protocol = "pipecat-cloud"
websocket_auth = "token"
"""
    config = load_config(write(tmp_path, text))
    s = config.server
    assert s.ws_bind == (Bind("0.0.0.0", 80), Bind("::", 80))
    assert s.api_bind == (Bind("127.0.0.1", 0), Bind("127.0.0.1", 0))  # port 0 may repeat
    assert config.tls
    assert s.public_url == "wss://relay.example.com/gw"
    assert s.organization == "acme_01"
    assert s.public_keys == ("pk_live_a", "pk_live_b")
    assert s.secret_env == "ACME_RELAY_SECRET"
    assert s.cors_origins == ("https://app.example.com", "http://localhost:3000")
    assert s.handshake_timeout == 2.5
    assert s.max_connections == 50
    assert (s.start_body_timeout, s.max_start_body_reads) == (3.5, 7)
    assert config.store == StoreConfig(backend="redis", url="rediss://cache:6380/1")
    phone = config.agents["phone"]
    assert (phone.max_clients, phone.when_full, phone.bot_protocol) == (
        5,
        "reject",
        "pipecat-cloud",
    )


def test_cors_wildcard_allowed() -> None:
    config = build_config(
        server={"cors_origins": ["*"]}, agents={"a": {"bot": "ws://127.0.0.1:9000"}}
    )
    assert config.server.cors_origins == ("*",)


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("ws://127.0.0.1:8700/", "ws://127.0.0.1:8700"),
        ("wss://relay.example.com///", "wss://relay.example.com"),
        ("wss://example.com/relay/", "wss://example.com/relay"),
        ("ws://[::1]:8700", "ws://[::1]:8700"),
    ],
)
def test_public_url_stored_without_trailing_slash(given: str, stored: str) -> None:
    config = build_config(server={"public_url": given}, agents={"a": {"bot": "ws://x"}})
    assert config.server.public_url == stored


@pytest.mark.parametrize(
    "bot",
    [
        "ws://127.0.0.1:9000/ws",
        "wss://bots.example.com/agent?model=fast",
        "ws://[::1]:9000",
        "python:relay.echo:echo_bot",
        "python:mybot:main",
    ],
)
def test_valid_bots(bot: str) -> None:
    assert build_config(agents={"a": {"bot": bot}}).agents["a"].bot == bot


def test_redis_url_not_checked_for_memory_store() -> None:
    config = build_config(store={"url": "unused"}, agents={"a": {"bot": "ws://x"}})
    assert config.store == StoreConfig(backend="memory", url="unused")


# --------------------------------------------------------------------------------------
# Per-agent limits and their [server] defaults
# --------------------------------------------------------------------------------------


def test_limit_defaults_match_spec() -> None:
    limits = build_config(agents={"a": {"bot": "ws://x"}}).agents["a"].limits
    assert limits == Limits(
        max_message_size=1048576,
        bot_connect_timeout=10,
        ping_interval=20,
        ping_timeout=20,
        close_timeout=2,
        stall_timeout=10,
        session_timeout=None,
    )


def test_server_defaults_are_inherited_and_overridden(tmp_path: Path) -> None:
    text = """
[server]
max_message_size = 65536
bot_connect_timeout = 3
ping_interval = 5
ping_timeout = 6
close_timeout = 1
stall_timeout = 7
session_timeout = 300

[agents.inherits]
bot = "ws://x"

[agents.overrides]
bot = "ws://x"
max_message_size = 1024
session_timeout = 60
stall_timeout = 0.5

[agents.no-timeout]
bot = "ws://x"
session_timeout = inf
"""
    config = load_config(write(tmp_path, text))
    server_defaults = Limits(
        max_message_size=65536,
        bot_connect_timeout=3.0,
        ping_interval=5.0,
        ping_timeout=6.0,
        close_timeout=1.0,
        stall_timeout=7.0,
        session_timeout=300.0,
    )
    assert config.server.defaults == server_defaults
    assert config.agents["inherits"].limits == server_defaults
    assert config.agents["overrides"].limits == attrs.evolve(
        server_defaults, max_message_size=1024, session_timeout=60.0, stall_timeout=0.5
    )
    assert config.agents["no-timeout"].limits.session_timeout is None
    assert config.agents["no-timeout"].limits.stall_timeout == 7.0


@pytest.mark.parametrize(
    "key",
    [
        "bot_connect_timeout",
        "ping_interval",
        "ping_timeout",
        "close_timeout",
        "stall_timeout",
        "session_timeout",
    ],
)
@pytest.mark.parametrize("value", [0.25, 1e-3, 2.5, 3])
def test_fractional_timeouts(key: str, value: float) -> None:
    config = build_config(
        server={key: value, "handshake_timeout": value}, agents={"a": {"bot": "ws://x", key: value}}
    )
    got = getattr(config.agents["a"].limits, key)
    assert got == value
    assert isinstance(got, float)
    assert config.server.handshake_timeout == value


def test_limits_in_server_table_are_not_agent_keys() -> None:
    # The agent-only keys are not accepted as [server] defaults.
    with pytest.raises(ConfigError) as info:
        build_config(server={"max_clients": 2}, agents={"a": {"bot": "ws://x"}})
    assert info.value.key == "server.max_clients"


# --------------------------------------------------------------------------------------
# The embedded default
# --------------------------------------------------------------------------------------


def test_default_config_is_spec_embedded_default() -> None:
    config = default_config()
    assert config.source == "<embedded default>"
    assert config.server.ws_bind == (Bind("127.0.0.1", 8700),)
    assert config.server.api_bind == (Bind("127.0.0.1", 8701),)
    assert config.server.public_url == "ws://127.0.0.1:8700"
    assert config.server.organization == "local"
    assert config.store.backend == "memory"
    assert not config.tls
    assert list(config.agents) == ["echo"]
    echo = config.agents["echo"]
    assert echo.name == "echo"
    assert echo.websocket_auth == "none"
    assert echo.bot == "python:relay.echo:echo_bot"
    assert echo.limits == Limits()


def test_default_config_equals_minimal_file(tmp_path: Path) -> None:
    text = '[agents.echo]\nbot = "python:relay.echo:echo_bot"\n'
    loaded = load_config(write(tmp_path, text))
    assert attrs.evolve(loaded, source="<embedded default>") == default_config()


def test_config_is_frozen() -> None:
    config = default_config()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.source = "x"  # type: ignore[misc]  # frozen: assigning is the point
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.server.defaults.session_timeout = 1.0  # type: ignore[misc]  # frozen, as above


def test_code_built_config_copies_its_agents() -> None:
    agents = {"a": AgentConfig(name="a", bot="ws://x")}
    config = Config(server=ServerConfig(), store=StoreConfig(), agents=agents)
    agents.clear()
    assert list(config.agents) == ["a"]
    assert ServerConfig(public_keys=["k"]).public_keys == ("k",)


def test_tls_needs_both_files() -> None:
    assert not Config(server=ServerConfig(certfile="c")).tls
    assert Config(server=ServerConfig(certfile="c", keyfile="k")).tls


# --------------------------------------------------------------------------------------
# Binds
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bind", "shown"),
    [
        ("127.0.0.1:8700", Bind("127.0.0.1", 8700), "127.0.0.1:8700"),
        ("0.0.0.0:0", Bind("0.0.0.0", 0), "0.0.0.0:0"),
        ("localhost:65535", Bind("localhost", 65535), "localhost:65535"),
        ("gw-1.internal.example:80", Bind("gw-1.internal.example", 80), "gw-1.internal.example:80"),
        ("[::1]:8700", Bind("::1", 8700), "[::1]:8700"),
        ("[::]:443", Bind("::", 443), "[::]:443"),
        ("[fe80::1%eth0]:9", Bind("fe80::1%eth0", 9), "[fe80::1%eth0]:9"),
        ("[2001:db8::5]:1", Bind("2001:db8::5", 1), "[2001:db8::5]:1"),
    ],
)
def test_parse_bind(text: str, bind: Bind, shown: str) -> None:
    assert parse_bind(text) == bind
    assert str(bind) == shown
    assert parse_bind(str(bind)) == bind


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("8700", "no port"),
        ("localhost", "no port"),
        (":8700", "no host"),
        ("127.0.0.1:", "0 to 65535"),
        ("127.0.0.1:65536", "0 to 65535"),
        ("127.0.0.1:-1", "0 to 65535"),
        ("127.0.0.1:+80", "0 to 65535"),
        ("127.0.0.1:http", "0 to 65535"),
        ("127.0.0.1:\uff18\uff10", "0 to 65535"),  # fullwidth digits are not a port
        ("::1:8700", "brackets"),
        ("[::1]8700", "[ipv6]:port"),
        ("[::1]", "[ipv6]:port"),
        ("[127.0.0.1]:80", "not an IPv6 address"),
        ("[nothost]:80", "not an IPv6 address"),
        ("bad host:80", "not a host name"),
        ("-x:80", "not a host name"),
        ("", "no port"),
    ],
)
def test_parse_bind_rejects(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_bind(text)
    assert problem in info.value.problem


def test_parse_bind_rejects_non_string() -> None:
    with pytest.raises(ConfigError, match="must be a string"):
        parse_bind(8700)  # type: ignore[arg-type]  # a wrong type on purpose


def test_inf_stays_a_config_error_for_other_timeouts() -> None:
    with pytest.raises(ConfigError, match="finite"):
        build_config(server={"handshake_timeout": math.inf}, agents={"a": {"bot": "ws://x"}})


# --------------------------------------------------------------------------------------
# Sans-IO
# --------------------------------------------------------------------------------------


def test_config_module_does_not_import_trio() -> None:
    code = "import sys, relay.config; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
