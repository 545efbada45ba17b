"""relay: a self-hosted WebSocket gateway for real-time voice and media bots, on Trio.

The public surface is loaded lazily (PEP 562), so `import relay.config` or
`relay.tokens` stays free of trio: the sans-IO modules can be used on their own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import (
        AgentConfig,
        Config,
        Limits,
        ServerConfig,
        StoreConfig,
        build_config,
        default_config,
        load_config,
    )
    from .errors import BindError, BotDialError, ConfigError, RelayError
    from .gateway import Gateway, Ports
    from .inprocess import ClientDisconnected, Session
    from .runtime import SessionInfo

_WHERE = {
    "AgentConfig": "config",
    "Config": "config",
    "Limits": "config",
    "ServerConfig": "config",
    "StoreConfig": "config",
    "build_config": "config",
    "default_config": "config",
    "load_config": "config",
    "BindError": "errors",
    "BotDialError": "errors",
    "ConfigError": "errors",
    "RelayError": "errors",
    "Gateway": "gateway",
    "Ports": "gateway",
    "ClientDisconnected": "inprocess",
    "Session": "inprocess",
    "SessionInfo": "runtime",
}

__all__ = [
    "AgentConfig",
    "BindError",
    "BotDialError",
    "ClientDisconnected",
    "Config",
    "ConfigError",
    "Gateway",
    "Limits",
    "Ports",
    "RelayError",
    "ServerConfig",
    "Session",
    "SessionInfo",
    "StoreConfig",
    "build_config",
    "default_config",
    "load_config",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'relay' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
