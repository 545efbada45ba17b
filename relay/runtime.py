"""The state one running gateway shares between its connections.

`Runtime` is built by `Gateway` and handed to every `ClientConnection`: the validated
config, the registry of live sessions, the event callbacks, metrics, token keys and store,
the in-process bots (imported once at start), and the clock used for token expiry (wall
time by default; tests pass trio's clock so a fake clock moves token expiry too).
"""

from __future__ import annotations

import inspect
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from .admin import LocalOperations, Operations
from .config import Config
from .inprocess import BotFunction
from .limits import ConnectionGate
from .metrics import Metrics
from .registry import Registry
from .store import Store
from .tokens import KeyRing
from .upstream import DialFailures

log = logging.getLogger(__name__)

Callback = Callable[..., Awaitable[None] | None]


@attrs.define(eq=False)
class SessionInfo:
    """What the event callbacks see of one session."""

    id: str
    agent: str
    organization: str
    client_addr: str
    connected_at: float | None = None  # trio time the client's upgrade was accepted
    end_reason: str | None = None  # why it ended (see closing.py), once it has


@attrs.define(eq=False)
class Events:
    on_client_connected: Callback | None = None
    on_client_disconnected: Callback | None = None
    on_session_timeout: Callback | None = None
    on_websocket_ready: Callback | None = None

    async def fire(self, name: str, *args: Any) -> None:
        """Run one callback inline; a failing callback is logged, never fatal."""
        callback = getattr(self, name)
        if callback is None:
            return
        try:
            result = callback(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("event callback %s failed", name)


@attrs.define(eq=False)
class Runtime:
    config: Config
    events: Events
    metrics: Metrics
    keys: KeyRing
    store: Store
    bots: dict[str, BotFunction] = attrs.field(factory=dict)
    registry: Registry = attrs.field(factory=Registry)
    wall_clock: Callable[[], float] = time.time
    client_ssl: ssl.SSLContext | None = None  # TLS for the client listener
    bot_ssl: ssl.SSLContext | None = None  # trust for wss:// bots (None: system default)
    open_connections: int = 0
    shutting_down: bool = False
    dial_failures: DialFailures = attrs.field(
        default=attrs.Factory(lambda rt: DialFailures(rt.metrics), takes_self=True))
    # The operator's view and levers (admin.py); a fleet passes its own implementation.
    operations: Operations = attrs.field(default=attrs.Factory(
        lambda self: LocalOperations(self.registry, self.wall_clock), takes_self=True))
    gate: ConnectionGate = attrs.field()

    @gate.default
    def _gate(self) -> ConnectionGate:
        server = self.config.server
        return ConnectionGate(max_connections_per_ip=server.max_connections_per_ip,
                              max_handshakes=server.max_handshakes,
                              max_handshakes_per_ip=server.max_handshakes_per_ip)
