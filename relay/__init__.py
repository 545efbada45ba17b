"""relay: a self-hosted WebSocket gateway for real-time voice and media bots, on Trio."""

from __future__ import annotations

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
