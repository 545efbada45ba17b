"""What a gateway needs from its environment before it binds anything, checked in one place.

`prepare(config, environ)` runs every start-up check that needs more than the config file:
the store backend is one this version runs, the key ring in the variable ``secret_env``
names parses, every ``python:module:function`` bot imports and is callable, and the TLS
certificate and key load. `relay.Gateway` uses what it returns; `relay check-config` runs
the same function and discards it, so a config that `check-config` calls ok is one that
`relay serve` starts with (binding the addresses is the one thing left to `serve`).

Each problem is a `ConfigError` naming the file and the key.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

import attrs

from .config import Config
from .errors import ConfigError
from .inprocess import BotFunction, load_bot
from .tokens import KeyRing, keyring_from_env

__all__ = ["Prepared", "prepare"]

#: Store backends this version runs.
RUNNABLE_BACKENDS = ("memory", "redis")


@attrs.frozen
class Prepared:
    """What the checks produced: the gateway starts from these."""

    keys: KeyRing
    warnings: tuple[str, ...]  # to log (serve) or print (check-config)
    bots: dict[str, BotFunction]
    client_ssl: ssl.SSLContext | None


def prepare(config: Config, environ: Mapping[str, str], *,
            keys: KeyRing | None = None) -> Prepared:
    """Run the start-up checks; ConfigError names the first problem."""
    if config.store.backend not in RUNNABLE_BACKENDS:
        raise ConfigError(f"backend {config.store.backend!r} is not available in this "
                          "version of relay; use \"memory\"", key="store.backend",
                          file=config.source)
    warnings: list[str] = []
    if keys is None:
        keys, warning = keyring_from_env(environ, config.server.secret_env,
                                         backend=config.store.backend)
        if warning:
            warnings.append(warning)
    return Prepared(keys=keys, warnings=tuple(warnings), bots=load_bots(config),
                    client_ssl=server_ssl(config))


def load_bots(config: Config) -> dict[str, BotFunction]:
    """Import every in-process bot once; ConfigError names the agent's ``bot`` key."""
    bots: dict[str, BotFunction] = {}
    for name, agent in config.agents.items():
        if agent.bot.startswith("python:"):
            try:
                bots[name] = load_bot(agent.bot)
            except ConfigError as exc:
                raise ConfigError(exc.problem, key=f"agents.{name}.bot",
                                  file=config.source) from None
    return bots


def server_ssl(config: Config) -> ssl.SSLContext | None:
    """The TLS context both planes serve with, or None without certfile/keyfile."""
    if not config.tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(config.server.certfile, config.server.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate/key: {exc}", key="server.certfile",
                          file=config.source) from exc
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
