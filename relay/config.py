"""[sans-IO] relay's configuration: frozen attrs values, TOML loading, and validation.

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

import difflib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn
from urllib.parse import urlsplit

import attrs

from relay.errors import ConfigError

__all__ = [
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

#: Agent and organization names: they form the ``{agent}.{org}`` service host (SPEC §8).
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

WEBSOCKET_AUTH_MODES = ("none", "token")
WHEN_FULL_MODES = ("replace", "reject")
BOT_PROTOCOLS = ("relay", "pipecat-cloud")
STORE_BACKENDS = ("memory", "redis")

#: The built-in echo bot the embedded default serves.
ECHO_BOT = "python:relay.echo:echo_bot"


# --------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------


@attrs.frozen
class Limits:
    """Per-agent tunables; defaults may be set once under ``[server]``."""

    max_message_size: int = 1048576  # bytes of payload per message (fragments summed)
    bot_connect_timeout: float = 10.0  # seconds to open the bot leg before 504
    ping_interval: float = 20.0  # seconds between the gateway's own keepalive pings
    ping_timeout: float = 20.0  # seconds a peer has to answer one before it counts as gone
    close_timeout: float = 2.0  # seconds: a half-closed peer must not hold a session
    stall_timeout: float = 10.0  # seconds a peer may accept nothing before 1008
    session_timeout: float | None = None  # seconds from accept; None = no timeout


#: The names of Limits' fields: the keys allowed both under [server] and [agents.X].
LIMIT_KEYS: tuple[str, ...] = tuple(a.name for a in attrs.fields(Limits))


@attrs.frozen
class Bind:
    """One listen address. ``host`` holds an IPv6 address without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _bind_tuple(value: Iterable[Bind]) -> tuple[Bind, ...]:
    return tuple(value)


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


DEFAULT_WS_BIND = Bind("127.0.0.1", 8700)
DEFAULT_API_BIND = Bind("127.0.0.1", 8701)
DEFAULT_LIMITS = Limits()


@attrs.frozen
class AgentConfig:
    """One ``[agents.NAME]`` table, with the server-wide limit defaults already applied."""

    name: str
    bot: str  # "ws://host:port/path", "wss://...", or "python:package.module:function"
    websocket_auth: str = "none"  # "none" | "token"
    max_clients: int = 1
    when_full: str = "replace"  # "replace" | "reject"
    bot_protocol: str = "pipecat-cloud"  # "pipecat-cloud" | "relay" (opt-in)
    limits: Limits = DEFAULT_LIMITS


@attrs.frozen
class ServerConfig:
    """The ``[server]`` table."""

    ws_bind: tuple[Bind, ...] = attrs.field(default=(DEFAULT_WS_BIND,), converter=_bind_tuple)
    api_bind: tuple[Bind, ...] = attrs.field(default=(DEFAULT_API_BIND,), converter=_bind_tuple)
    certfile: str = ""
    keyfile: str = ""
    public_url: str = "ws://127.0.0.1:8700"  # stored without trailing slash
    organization: str = "local"
    public_keys: tuple[str, ...] = attrs.field(default=("pk_dev_123",), converter=_str_tuple)
    secret_env: str = "RELAY_SECRET"
    cors_origins: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    handshake_timeout: float = 10.0  # seconds for a client's whole upgrade request
    max_connections: int = 10000  # open client connections before new ones get 503
    start_body_timeout: float = 10.0  # seconds for a /start request's whole body (then 408)
    workers: int = 1  # processes sharing both binds (SO_REUSEPORT); > 1 needs redis
    max_start_body_reads: int = 64  # /start bodies read at once; one more gets 503
    admin_keys: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)  # operator API
    start_rate: float = 20.0  # /start requests per second per public key (then 429)
    start_burst: int = 50  # /start requests one key may make at once
    max_connections_per_ip: int = 1000  # open client connections from one IP (then 503)
    max_handshakes: int = 1000  # upgrade requests being read at once (then 503)
    max_handshakes_per_ip: int = 256  # the same, from one IP
    defaults: Limits = DEFAULT_LIMITS  # per-agent limits set under [server]


@attrs.frozen
class StoreConfig:
    """The ``[store]`` table: where tokens, held bodies and live sessions are kept."""

    backend: str = "memory"  # "memory" | "redis"
    url: str = "redis://127.0.0.1:6379/0"  # used when backend = "redis"
    key_prefix: str = "relay:"  # every Redis key the gateway writes starts with it
    lease_ttl: float = 15.0  # seconds a vanished instance's sessions still count


def _agents_dict(value: Mapping[str, AgentConfig]) -> dict[str, AgentConfig]:
    return dict(value)


@attrs.frozen
class Config:
    """A whole, validated configuration."""

    server: ServerConfig = attrs.field(factory=ServerConfig)
    store: StoreConfig = attrs.field(factory=StoreConfig)
    agents: Mapping[str, AgentConfig] = attrs.field(factory=dict, converter=_agents_dict)
    source: str = "<embedded default>"  # the file the config came from

    @property
    def tls(self) -> bool:
        """Both planes use TLS when certfile and keyfile are set."""
        return bool(self.server.certfile and self.server.keyfile)


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


def parse_bind(text: str) -> Bind:
    """Parse ``"host:port"`` or ``"[ipv6]:port"`` (port 0..65535; 0 picks a free port)."""
    if not isinstance(text, str):
        raise ConfigError(f'must be a string like "127.0.0.1:8700", got {_show(text)}')
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f'{_show(text)} is not "[ipv6]:port"')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{_show(text)}: {_show(host)} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f'{_show(text)} has no port: write "host:port"')
        if ":" in host:
            raise ConfigError(f'{_show(text)}: write an IPv6 address in brackets, "[::1]:8700"')
        if not host:
            raise ConfigError(
                f'{_show(text)} has no host: use "0.0.0.0:port" or "[::]:port" for all interfaces'
            )
        if not _HOSTNAME_RE.fullmatch(host):
            raise ConfigError(f"{_show(text)}: {_show(host)} is not a host name or IPv4 address")
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or int(port_text) > 65535:
        raise ConfigError(f"{_show(text)}: port must be a number from 0 to 65535")
    return Bind(host, int(port_text))


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?")


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


# --------------------------------------------------------------------------------------
# Value checks
# --------------------------------------------------------------------------------------


def _bot_problem(bot: str) -> str | None:
    if bot.startswith("python:"):
        module, sep, function = bot[len("python:") :].rpartition(":")
        parts = module.split(".")
        if not sep or not all(p.isidentifier() for p in parts) or not function.isidentifier():
            return f"{_show(bot)} is not python:package.module:function"
        return None
    if bot.startswith(("ws://", "wss://")):
        return _url_problem(bot, ("ws", "wss"), allow_query=True)
    return f"must be a ws:// or wss:// URL or python:package.module:function, got {_show(bot)}"


def _url_problem(url: str, schemes: tuple[str, ...], *, allow_query: bool) -> str | None:
    wanted = " or ".join(f"{s}://" for s in schemes)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"{_show(url)} is not a valid URL: {exc}"
    if parts.scheme not in schemes or not url.startswith(f"{parts.scheme}://"):
        return f"must start with {wanted}, got {_show(url)}"
    if not parts.hostname:
        return f"{_show(url)} has no host"
    if "@" in parts.netloc:
        redacted = url.replace(parts.netloc, "***@" + parts.netloc.rpartition("@")[2], 1)
        return (f"{_show(redacted)} must not carry credentials (user:password@host): relay "
                "does not send them; keep the bot reachable only from the gateway's network")
    if parts.fragment or (parts.query and not allow_query):
        return f"{_show(url)} must not have a query or fragment"
    return None


def _origin_problem(origin: str) -> str | None:
    if origin == "*":
        return None
    problem = _url_problem(origin, ("http", "https"), allow_query=False)
    if problem:
        return f'must be "*" or an origin like "https://app.example.com": {problem}'
    parts = urlsplit(origin)
    if parts.path or parts.username or parts.password:
        bare = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return f"{_show(origin)} is not an origin (scheme://host[:port] only): use {_show(bare)}"
    return None


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "table"
    return type(value).__name__


def _show(value: object) -> str:
    """A value as the user wrote it in TOML, shortened."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, Mapping):
        text = "a table"
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _got(value: object) -> str:
    return f"got {_show(value)} ({_type_name(value)})"


def _quote(name: str) -> str:
    """A key as it would be written in a dotted TOML key."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name, ensure_ascii=False)


_ABSENT: Any = object()


class _Table:
    """One TOML table being read: typed getters that raise with the dotted key path."""

    def __init__(self, data: Any, path: str, file: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"must be a table, {_got(data)}", key=path, file=file)
        self.data: Mapping[str, Any] = data
        self.path = path
        self.file = file

    def key(self, name: str) -> str:
        return f"{self.path}.{_quote(name)}" if self.path else _quote(name)

    def fail(self, name: str, problem: str) -> NoReturn:
        raise ConfigError(problem, key=self.key(name), file=self.file)

    def fail_at(self, key: str, problem: str) -> NoReturn:
        raise ConfigError(problem, key=key, file=self.file)

    def has(self, name: str) -> bool:
        return name in self.data

    def reject_unknown(self, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        for name in self.data:
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(name, f"unknown key{hint}")

    def table(self, name: str) -> _Table:
        return _Table(self.data.get(name, {}), self.key(name), self.file)

    def _get(self, name: str, default: Any) -> Any:
        return self.data.get(name, default)

    def string(self, name: str, default: str) -> str:
        value = self._get(name, default)
        if not isinstance(value, str):
            self.fail(name, f"must be a string, {_got(value)}")
        return value

    def name(self, name: str, default: str) -> str:
        value = self.string(name, default)
        if not NAME_RE.fullmatch(value):
            self.fail(name, f"must be 1 to 64 characters from A-Z a-z 0-9 _ -, got {_show(value)}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.string(name, default)
        if value not in choices:
            options = ", ".join(json.dumps(c) for c in choices)
            self.fail(name, f"must be one of {options}, got {_show(value)}")
        return value

    def positive_int(self, name: str, default: int) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"must be a positive integer, {_got(value)}")
        if value <= 0:
            self.fail(name, f"must be a positive integer, got {value}")
        return value

    def _number(self, name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(name, f"must be a number of seconds, {_got(value)}")
        return float(value)

    def rate(self, name: str, default: float) -> float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(name, f"must be a number per second, {_got(value)}")
        if not math.isfinite(value) or value <= 0:
            self.fail(name, f"must be a positive, finite number per second, got {value!r}")
        return float(value)

    def seconds(self, name: str, default: float) -> float:
        value = self._number(name, self._get(name, default))
        if not math.isfinite(value) or value <= 0:
            self.fail(name, f"must be a positive, finite number of seconds, got {value!r}")
        return value

    def seconds_or_none(self, name: str) -> float | None:
        """Like ``seconds``, but ``inf`` means "no limit" (TOML has no null)."""
        value = self._number(name, self._get(name, _ABSENT))
        if value == math.inf:
            return None
        if math.isnan(value) or value <= 0:
            self.fail(name, f"must be a positive number of seconds (inf = none), got {value!r}")
        return value

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(name, default)
        if not isinstance(value, list | tuple):
            self.fail(name, f"must be an array of strings, {_got(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.fail_at(f"{self.key(name)}[{i}]", f"must be a string, {_got(item)}")
        return tuple(value)

    def binds(self, name: str, default: tuple[Bind, ...]) -> tuple[Bind, ...]:
        if not self.has(name):
            return default
        texts = self.strings(name, ())
        if not texts:
            self.fail(name, 'must list at least one "host:port" address')
        binds: list[Bind] = []
        for i, text in enumerate(texts):
            try:
                binds.append(parse_bind(text))
            except ConfigError as exc:
                self.fail_at(f"{self.key(name)}[{i}]", exc.problem)
        return tuple(binds)
