"""[sans-IO] What each configuration key is for: the words of docs/reference.md's tables.

The keys, their order and their defaults come from the schema itself (`config.py`: the
attrs classes and the key lists the parser accepts); this module only adds the type and
meaning a reader needs. `scripts/gen-reference` writes the tables into docs/reference.md
and a test fails when the file, this module and the schema disagree.
"""

from __future__ import annotations

SERVER: dict[str, tuple[str, str]] = {  # key: (type, meaning)
    'ws_bind': (
        'list of `"host:port"`',
        'WebSocket data plane listeners; IPv6 as `"[::1]:8700"`; port 0 picks a free port'
    ),
    'api_bind': (
        'list of `"host:port"`',
        'HTTP control plane listeners (/start, /health, /metrics)'
    ),
    'certfile': (
        'path',
        'TLS certificate (PEM); both planes use TLS when `certfile` and `keyfile` are '
        'set. Relative to the working directory'
    ),
    'keyfile': (
        'path',
        'TLS private key (PEM)'
    ),
    'public_url': (
        'URL',
        'base of the `wsUrl` /start returns (`ws://` or `wss://`, a path allowed, no '
        'query); stored without a trailing slash'
    ),
    'organization': (
        'name',
        'the `{org}` in `{agent}.{org}`; upgrades naming another organization get 404'
    ),
    'public_keys': (
        'list of strings',
        'Bearer keys accepted by /start'
    ),
    'secret_env': (
        'string',
        'the environment variable holding the HMAC key ring (see [Tokens](#tokens))'
    ),
    'cors_origins': (
        'list of origins',
        'origins (`"https://host[:port]"`, or `"*"`) allowed to call /start from a '
        'browser; once set, a WebSocket upgrade with any other `Origin` is refused (403 '
        '`origin_not_allowed`)'
    ),
    'handshake_timeout': (
        'seconds',
        'time a client gets to send its whole upgrade request (408 after)'
    ),
    'max_connections': (
        'integer',
        'open client connections, all agents together, before new ones get 503'
    ),
    'start_body_timeout': (
        'seconds',
        'time a /start request gets to send its whole body, from its headers (408 after)'
    ),
    'max_start_body_reads': (
        'integer',
        '/start bodies read at once (each at most 1 MiB); one more is answered 503 `busy`'
    ),
    'admin_keys': (
        'list of strings',
        'Bearer keys of the [operator API](#operator-api-and-live-page) and live page; '
        'empty: those paths are 404. Beyond loopback each must be at least 32 characters'
    ),
    'start_rate': (
        'number per second',
        '/start requests per second per public key (a token bucket); over it 429 '
        '`rate_limited` with `Retry-After`. With the Redis store the bucket is in Redis, '
        'one per key for the whole fleet (every worker and instance); while Redis does '
        'not answer, each process limits with its own'
    ),
    'start_burst': (
        'integer',
        "/start requests one public key may make at once (the bucket's size), fleet-wide "
        'with the Redis store'
    ),
    'max_connections_per_ip': (
        'integer',
        'open client connections from one IP address; one more is answered 503 '
        '`too_many_connections_per_ip`'
    ),
    'max_handshakes': (
        'integer',
        'connections whose upgrade request is still being read (at most '
        '`handshake_timeout` each); one more is answered 503 `too_many_handshakes`'
    ),
    'max_handshakes_per_ip': (
        'integer',
        'the same from one IP address (503 `too_many_handshakes_per_ip`), so idle '
        'sockets of one host never take every slot; a burst of more simultaneous '
        'connects from one address gets 503 for the excess'
    ),
    'workers': (
        'integer',
        'processes sharing both binds (`SO_REUSEPORT`, under a supervisor); `relay serve '
        '--workers N` overrides it. More than 1 needs `[store] backend = "redis"` (else '
        'exit 2 naming `server.workers`). See docs/deploying.md'
    ),
}

STORE: dict[str, tuple[str, str]] = {  # key: (type, meaning)
    'backend': (
        '`"memory"` or `"redis"`',
        'where held bodies, used tokens and (with Redis) live-session leases live. '
        '`"redis"`: every instance and worker on the same Redis behaves as one gateway '
        '(docs/deploying.md)'
    ),
    'url': (
        'URL',
        'the Redis (or Valkey) server: `redis://` or `rediss://` (TLS), optional '
        '`user:password@`, optional `/db` number; checked only when `backend = "redis"`; '
        'a password never appears in messages'
    ),
    'key_prefix': (
        'string',
        '1 to 64 visible ASCII characters; every Redis key relay writes starts with it '
        'and has an expiry'
    ),
    'lease_ttl': (
        'seconds',
        "at least 3: each live session's lease, renewed every third of it; the sessions "
        'of an instance that vanished stop counting toward `max_clients` within it'
    ),
}

AGENT: dict[str, tuple[str, str]] = {  # key: (type, meaning)
    'bot': (
        'URL or `"python:module:function"`',
        'the upstream bot (`ws://` or `wss://`), or an in-process bot: `async def '
        'function(session)` imported from `module`; the working directory (or '
        '`--app-dir`) is on the import path'
    ),
    'websocket_auth': (
        '`"none"` or `"token"`',
        '`"token"`: clients need a token from /start (see [Tokens](#tokens))'
    ),
    'bot_protocol': (
        '`"pipecat-cloud"` or `"relay"`',
        'how the held body reaches the bot: `"pipecat-cloud"` adds `?body=` '
        '(percent-encoded standard base64 of the compact JSON) to the bot URL and the '
        'header `X-Daily-Session-Id`, nothing in the frame stream, bodies up to 4 KiB; '
        '`"relay"` sends a first text frame `{"type": "relay.session", "sessionId", '
        '"agent", "body"}`, bodies up to 1 MiB'
    ),
    'max_clients': (
        'integer ≥ 1',
        'concurrent clients of this agent'
    ),
    'when_full': (
        '`"replace"` or `"reject"`',
        'a new client when `max_clients` are connected: replace the oldest (it gets '
        '4001), or accept and close the new one at once with 1013 (and /start answers '
        '429)'
    ),
    'session_timeout': (
        'seconds, or `inf`',
        "session length, counted from the client's 101; `inf` opts one agent out of a "
        'default set under `[server]`'
    ),
    'max_message_size': (
        'bytes',
        'payload of one message (fragments summed); larger gets 1009'
    ),
    'bot_connect_timeout': (
        'seconds',
        "TCP connect, TLS and the bot's 101 together (504 after)"
    ),
    'ping_interval': (
        'seconds',
        "the gateway's own keepalive pings to each peer"
    ),
    'ping_timeout': (
        'seconds',
        'a keepalive ping unanswered this long means the peer is gone'
    ),
    'close_timeout': (
        'seconds',
        'bound on every closing handshake, and on shutdown'
    ),
    'stall_timeout': (
        'seconds',
        'a peer that accepts nothing this long is closed with 1008'
    ),
}

_SECTIONS = {"server": SERVER, "store": STORE, "agents": AGENT}
_BEGIN = "<!-- generated by scripts/gen-reference from the config schema: {} -->"
_END = "<!-- end of generated table -->"


def schema_keys(section: str) -> tuple[str, ...]:
    """The keys the parser accepts in ``section`` (for `server`, without the per-agent
    limits, which are documented once, under `agents`)."""
    from .config import _AGENT_KEYS, _SERVER_KEYS, _STORE_KEYS, LIMIT_KEYS

    if section == "server":
        return tuple(k for k in _SERVER_KEYS if k not in LIMIT_KEYS)
    return _STORE_KEYS if section == "store" else _AGENT_KEYS


def schema_default(section: str, key: str) -> object:
    """The default the schema gives ``key``; ``attrs.NOTHING`` when it is required."""
    import attrs

    from .config import AgentConfig, Limits, ServerConfig, StoreConfig

    if section == "server":
        return attrs.fields_dict(ServerConfig)[key].default
    if section == "store":
        return attrs.fields_dict(StoreConfig)[key].default
    fields = attrs.fields_dict(AgentConfig)
    return (fields[key] if key in fields else attrs.fields_dict(Limits)[key]).default


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v if isinstance(v, str | int | float) else str(v))
                               for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _default_cell(value: object) -> str:
    import attrs

    if value is attrs.NOTHING:
        return "(required)"
    if value is None:
        return "none"
    return f"`{_toml(value)}`"


def table(section: str) -> str:
    """The markdown table of ``section``: every key the schema accepts, in the order of
    this module, with the schema's default. ValueError when the two disagree."""
    docs = _SECTIONS[section]
    keys = schema_keys(section)
    missing, extra = set(keys) - set(docs), set(docs) - set(keys)
    if missing or extra:
        raise ValueError(f"[{section}]: keys without words here {sorted(missing)}, "
                         f"words for keys the schema lacks {sorted(extra)}")
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, (kind, meaning) in docs.items():
        cell = _default_cell(schema_default(section, key))
        lines.append(f"| `{key}` | {kind} | {cell} | {meaning} |")
    return "\n".join(lines)


def render_reference(text: str) -> str:
    """``text`` (docs/reference.md) with every generated table written anew."""
    for section in _SECTIONS:
        begin = _BEGIN.format(section)
        start = text.index(begin) + len(begin)
        end = text.index(_END, start)
        text = text[:start] + "\n" + table(section) + "\n" + text[end:]
    return text
