"""[sans-IO] The configuration's values: frozen attrs classes, their defaults, the
names and modes a key may take. Parsing and validation are `relay.config`'s; the words
of each key for docs/reference.md are `relay.config_doc`'s."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import attrs

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

