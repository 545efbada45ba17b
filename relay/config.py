"""[sans-IO] relay's configuration: TOML loading and validation into frozen values.

Three modules: the values and their defaults are `config_schema`, the checks of single
values and the key-naming table walker are `config_checks`, and this one parses whole
tables (and re-exports the values, so `from relay.config import Config` is the one import).

This module owns every rule about what a valid configuration is (SPEC §2, §8). Nothing here
opens a socket or imports trio: ``parse_config`` turns a TOML-like dict into a ``Config`` or
raises ``ConfigError("problem", key="agents.my-agent.session_timeout", file="relay.toml")``,
whose text is ``relay.toml: agents.my-agent.session_timeout: must be ...``. Whether a bind
address can actually be opened, a TLS file read or a ``python:`` bot imported is checked by
the server when it starts, still before it serves anything.

Entry points:

    load_config(path)        read and validate a TOML file (missing / unreadable / bad TOML
                             files are ConfigErrors naming the file)
    parse_config(data)       validate an already-parsed TOML-like mapping
    build_config(agents=...) the same, for configs built in code (source "<code>")
    default_config()         the embedded default: one auth-none agent "echo" on the
                             built-in echo bot, memory store, default binds
    parse_bind("host:port")  one listen address; IPv6 as "[::1]:8700"

The values (``Config``, ``ServerConfig``, ``StoreConfig``, ``AgentConfig``, ``Limits``,
``Bind``) are frozen. Constructing them directly is allowed and is *not* validated: code
that builds configs from untrusted input should go through ``build_config``.

Keys beyond SPEC §2, our additions:

    [server] handshake_timeout = 10      seconds a client gets to send its whole HTTP upgrade
                                         request; a slow or silent client is dropped after it
                                         so it cannot hold a connection slot for free.
    [server] max_connections = 10000     open client connections (all agents together) before
                                         new ones are answered 503; bounds memory and file
                                         descriptors whatever the per-agent limits are.
    [server] cors_origins = []           SPEC §3: origins allowed to call /start from a
                                         browser; "*" or "https://host[:port]" (no path).
    [server] start_body_timeout = 10     seconds a /start request gets to send its whole body
                                         (counted from its headers); 408 after it, so a slow
                                         client cannot pin a body buffer.
    [server] max_start_body_reads = 64   /start bodies read at once (each at most 1 MiB);
                                         one more is answered 503 "busy" at once, so slow
                                         bodies use at most this many MiB.
    [server] admin_keys = []             Bearer keys of the operator API and live page
                                         (``relay.admin_api``); empty = those paths are 404.
    [server] start_rate = 20             /start requests per second per public key (a token
    [server] start_burst = 50            bucket of start_burst); over it 429 with Retry-After.
    [server] max_connections_per_ip = 1000   open client connections from one IP address;
                                         one more is answered 503 at once.
    [server] max_handshakes = 1000       connections whose upgrade request is still being
    [server] max_handshakes_per_ip = 256 read (at most handshake_timeout each), overall and
                                         from one IP; one more is answered 503 at once, so
                                         idle sockets cannot take every connection slot.

Choices where the SPEC is silent:

- Per-agent limits (``max_message_size``, the timeouts) set under ``[server]`` become the
  defaults every agent inherits; a key set in ``[agents.X]`` overrides it for that agent.
- Timeouts are seconds, int or float; zero, negative, NaN and infinity are errors, except
  ``session_timeout = inf``, which means "no session timeout" and so lets one agent opt out
  of a ``session_timeout`` default set under ``[server]`` (TOML has no null).
- ``public_url`` is stored without trailing slashes; a path is allowed (a gateway behind a
  reverse proxy at ``wss://example.com/relay``), a query or fragment is not.
- The same non-zero ``host:port`` listed twice (in ``ws_bind`` and ``api_bind`` together)
  is an error here, since it could never bind.
- ``certfile`` / ``keyfile`` paths are used as written (relative to the working directory).
- ``store.url`` is only checked when ``store.backend = "redis"``.
- Only the first problem found is reported, in document order.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

from relay.errors import ConfigError

__all__ = [
    "ECHO_BOT",
    "LIMIT_KEYS",
    "AgentConfig",
    "Bind",
    "Config",
    "Limits",
    "ServerConfig",
    "StoreConfig",
    "build_config",
    "default_config",
    "load_config",
    "parse_bind",
    "parse_config",
    "with_workers",
]

from relay.config_checks import (
    _bot_problem,
    _origin_problem,
    _show,
    _Table,
    _url_problem,
    parse_bind,
)
from relay.config_schema import (
    BOT_PROTOCOLS,
    DEFAULT_API_BIND,
    DEFAULT_LIMITS,
    DEFAULT_WS_BIND,
    ECHO_BOT,
    LIMIT_KEYS,
    NAME_RE,
    STORE_BACKENDS,
    WEBSOCKET_AUTH_MODES,
    WHEN_FULL_MODES,
    AgentConfig,
    Bind,
    Config,
    Limits,
    ServerConfig,
    StoreConfig,
)

# --------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------


def default_config() -> Config:
    """SPEC §2's embedded default: ``ws://127.0.0.1:8700/ws/generic/echo.local`` echoes."""
    return Config(
        server=ServerConfig(),
        store=StoreConfig(),
        agents={"echo": AgentConfig(name="echo", bot=ECHO_BOT, websocket_auth="none")},
        source="<embedded default>",
    )


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a TOML config file. Every failure is a ``ConfigError``."""
    file = os.fspath(path)
    try:
        with open(file, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("config file not found", file=file) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a config file", file=file) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror or exc}", file=file) from None
    except UnicodeDecodeError:
        raise ConfigError("invalid TOML: not UTF-8 text", file=file) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", file=file) from None
    return parse_config(data, source=file)


def build_config(
    *,
    server: Mapping[str, Any] | None = None,
    store: Mapping[str, Any] | None = None,
    agents: Mapping[str, Mapping[str, Any]] | None = None,
    source: str = "<code>",
) -> Config:
    """Build a validated config in code, with the same keys as the TOML file.

    For example ``build_config(agents={"echo": {"bot": "python:relay.echo:echo_bot"}})``.
    """
    data: dict[str, Any] = {}
    if server is not None:
        data["server"] = server
    if store is not None:
        data["store"] = store
    if agents is not None:
        data["agents"] = agents
    return parse_config(data, source=source)


def parse_config(data: Mapping[str, Any], *, source: str = "<config>") -> Config:
    """Validate a TOML-like mapping (as ``tomllib`` returns) into a ``Config``."""
    root = _Table(data, "", source)
    root.reject_unknown(("server", "store", "agents"))
    server = _parse_server(root.table("server"))
    store = _parse_store(root.table("store"))
    agents = _parse_agents(root, server.defaults)
    return with_workers(Config(server=server, store=store, agents=agents, source=source),
                        server.workers)


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------

_SERVER_KEYS = (
    "ws_bind",
    "api_bind",
    "certfile",
    "keyfile",
    "public_url",
    "organization",
    "public_keys",
    "secret_env",
    "cors_origins",
    "handshake_timeout",
    "max_connections",
    "start_body_timeout",
    "workers",
    "max_start_body_reads",
    "admin_keys",
    "start_rate",
    "start_burst",
    "max_connections_per_ip",
    "max_handshakes",
    "max_handshakes_per_ip",
    *LIMIT_KEYS,
)
_STORE_KEYS = ("backend", "url", "key_prefix", "lease_ttl")
_AGENT_KEYS = ("bot", "websocket_auth", "max_clients", "when_full", "bot_protocol", *LIMIT_KEYS)

_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PUBLIC_KEY_RE = re.compile(r"[!-~]+")  # visible ASCII: it travels in a Bearer header


def _parse_server(t: _Table) -> ServerConfig:
    t.reject_unknown(_SERVER_KEYS)
    ws_bind = t.binds("ws_bind", (DEFAULT_WS_BIND,))
    api_bind = t.binds("api_bind", (DEFAULT_API_BIND,))
    seen: dict[Bind, str] = {}
    for name, binds in (("ws_bind", ws_bind), ("api_bind", api_bind)):
        for i, bind in enumerate(binds):
            here = f"{t.key(name)}[{i}]"
            if bind.port != 0 and bind in seen:
                raise ConfigError(
                    f"{bind} is already listed as {seen[bind]}", key=here, file=t.file
                )
            seen[bind] = here

    certfile = t.string("certfile", "")
    keyfile = t.string("keyfile", "")
    if certfile and not keyfile:
        t.fail("keyfile", f"is required when {t.key('certfile')} is set (TLS needs both)")
    if keyfile and not certfile:
        t.fail("certfile", f"is required when {t.key('keyfile')} is set (TLS needs both)")

    public_url = t.string("public_url", "ws://127.0.0.1:8700")
    problem = _url_problem(public_url, ("ws", "wss"), allow_query=False)
    if problem:
        t.fail("public_url", problem)

    organization = t.name("organization", "local")

    public_keys = t.strings("public_keys", ("pk_dev_123",))
    for i, key in enumerate(public_keys):
        if not _PUBLIC_KEY_RE.fullmatch(key):
            t.fail_at(
                f"{t.key('public_keys')}[{i}]",
                "must be a non-empty string of visible ASCII characters (no spaces)",
            )

    admin_keys = t.strings("admin_keys", ())
    for i, key in enumerate(admin_keys):
        if not _PUBLIC_KEY_RE.fullmatch(key):
            t.fail_at(
                f"{t.key('admin_keys')}[{i}]",
                "must be a non-empty string of visible ASCII characters (no spaces)",
            )

    secret_env = t.string("secret_env", "RELAY_SECRET")
    if not _ENV_NAME_RE.fullmatch(secret_env):
        t.fail("secret_env", f"{_show(secret_env)} is not an environment variable name")

    cors_origins = t.strings("cors_origins", ())
    for i, origin in enumerate(cors_origins):
        problem = _origin_problem(origin)
        if problem:
            t.fail_at(f"{t.key('cors_origins')}[{i}]", problem)

    return ServerConfig(
        ws_bind=ws_bind,
        api_bind=api_bind,
        certfile=certfile,
        keyfile=keyfile,
        public_url=public_url.rstrip("/"),
        organization=organization,
        public_keys=public_keys,
        secret_env=secret_env,
        cors_origins=cors_origins,
        handshake_timeout=t.seconds("handshake_timeout", 10.0),
        max_connections=t.positive_int("max_connections", 10000),
        start_body_timeout=t.seconds("start_body_timeout", 10.0),
        workers=t.positive_int("workers", 1),
        max_start_body_reads=t.positive_int("max_start_body_reads", 64),
        admin_keys=admin_keys,
        start_rate=t.rate("start_rate", 20.0),
        start_burst=t.positive_int("start_burst", 50),
        max_connections_per_ip=t.positive_int("max_connections_per_ip", 1000),
        max_handshakes=t.positive_int("max_handshakes", 1000),
        max_handshakes_per_ip=t.positive_int("max_handshakes_per_ip", 256),
        defaults=attrs.evolve(DEFAULT_LIMITS, **_limit_overrides(t)),
    )


def _parse_store(t: _Table) -> StoreConfig:
    # The [store] table's rules; the Redis URL's own rules are in _redis_url_problem.
    t.reject_unknown(_STORE_KEYS)
    backend = t.choice("backend", STORE_BACKENDS, "memory")
    url = t.string("url", "redis://127.0.0.1:6379/0")
    if backend == "redis":
        problem = _redis_url_problem(url)
        if problem:
            t.fail("url", problem)
    key_prefix = t.string("key_prefix", "relay:")
    if not _KEY_PREFIX_RE.fullmatch(key_prefix):
        t.fail("key_prefix", "must be 1 to 64 visible ASCII characters (no spaces), "
                             f"got {_show(key_prefix)}")
    lease_ttl = t.seconds("lease_ttl", 15.0)
    if lease_ttl < MIN_LEASE_TTL:
        t.fail("lease_ttl", f"must be at least {MIN_LEASE_TTL:g} seconds (leases are renewed "
                            f"every third of it), got {lease_ttl!r}")
    return StoreConfig(backend=backend, url=url, key_prefix=key_prefix, lease_ttl=lease_ttl)


def _redact_password(url: str) -> str:
    """``url`` with any password replaced by ``***``: error messages end up in logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.partition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}"


def with_workers(config: Config, workers: int) -> Config:
    """``config`` with ``server.workers`` set (``relay serve --workers N``), validated.

    Several worker processes must share one store: with the memory store each would
    accept a token the others already used.
    """
    if workers < 1:
        raise ConfigError(f"must be a positive integer, got {workers}", key="server.workers",
                          file=config.source)
    if workers > 1 and config.store.backend != "redis":
        raise ConfigError(
            f'{workers} workers need [store] backend = "redis" (with the memory store each '
            "process would accept a token another one already used)",
            key="server.workers", file=config.source)
    if workers == config.server.workers:
        return config
    return attrs.evolve(config, server=attrs.evolve(config.server, workers=workers))


_KEY_PREFIX_RE = re.compile(r"[!-~]{1,64}")
MIN_LEASE_TTL = 3.0


def _redis_url_problem(url: str) -> str | None:
    """Why ``url`` is not a usable ``redis://`` / ``rediss://`` URL, or None."""
    shown = _show(_redact_password(url))
    if not url.startswith(("redis://", "rediss://")):
        return f'must start with redis:// or rediss:// when backend is "redis", got {shown}'
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"is not a valid Redis URL ({exc}), got {shown}"
    if not parts.hostname:
        return f"must name a host, as in redis://127.0.0.1:6379/0, got {shown}"
    if port == 0:
        return f"port must be 1 to 65535, got {shown}"
    if parts.query or parts.fragment:
        return f"must not have a query or fragment, got {shown}"
    db = parts.path.strip("/")
    if db and not (db.isdigit() and db.isascii()):
        return f"the database must be a number, as in redis://host:6379/0, got {shown}"
    return None


def _parse_agents(root: _Table, defaults: Limits) -> dict[str, AgentConfig]:
    agents_table = root.table("agents")
    if not agents_table.data:
        root.fail("agents", "no agents configured: add at least one [agents.NAME] table with a bot")
    agents: dict[str, AgentConfig] = {}
    for name in agents_table.data:
        if not NAME_RE.fullmatch(name):
            agents_table.fail(name, "agent names must be 1 to 64 characters from A-Z a-z 0-9 _ -")
        agents[name] = _parse_agent(agents_table.table(name), name, defaults)
    return agents


def _parse_agent(t: _Table, name: str, defaults: Limits) -> AgentConfig:
    t.reject_unknown(_AGENT_KEYS)
    if not t.has("bot"):
        t.fail("bot", "is required: a ws:// or wss:// URL, or python:package.module:function")
    bot = t.string("bot", "")
    problem = _bot_problem(bot)
    if problem:
        t.fail("bot", problem)
    return AgentConfig(
        name=name,
        bot=bot,
        websocket_auth=t.choice("websocket_auth", WEBSOCKET_AUTH_MODES, "none"),
        max_clients=t.positive_int("max_clients", 1),
        when_full=t.choice("when_full", WHEN_FULL_MODES, "replace"),
        bot_protocol=t.choice("bot_protocol", BOT_PROTOCOLS, "pipecat-cloud"),
        limits=attrs.evolve(defaults, **_limit_overrides(t)),
    )


def _limit_overrides(t: _Table) -> dict[str, Any]:
    """The Limits keys present in ``t``, validated; absent keys are left to the defaults."""
    out: dict[str, Any] = {}
    for key in LIMIT_KEYS:
        if not t.has(key):
            continue
        if key == "max_message_size":
            out[key] = t.positive_int(key, 0)
        elif key == "session_timeout":
            out[key] = t.seconds_or_none(key)
        else:
            out[key] = t.seconds(key, 0.0)
    return out
