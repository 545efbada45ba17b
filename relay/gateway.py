"""`relay.Gateway`: both planes of one gateway, embeddable in any trio program.

    gateway = relay.Gateway(config, on_client_connected=..., ...)
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(gateway.serve)   # both planes listen; ready fired
        ...
        await gateway.shutdown()                      # graceful: 1001 to every session

The data plane is our own trio listener (stdlib non-blocking sockets, see wire.py); each
accepted connection runs as a `ClientConnection` in the handler nursery, so one client's
failure never reaches the listener or another client. The control plane is hypercorn
serving `control_app`.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from .admin import LocalOperations, Operations
from .config import Bind, Config
from .connection import ClientConnection
from .control import ControlState, FleetRate, make_control_app
from .control_server import serve_control
from .errors import BindError, ConfigError
from .keepalive import keepalive_timer
from .metrics import Metrics
from .preflight import prepare
from .registry import Registry
from .runtime import Callback, Events, Runtime
from .store import MemoryStore, Store
from .tokens import KeyRing
from .wire import Conn, SocketConn, StreamConn, configure_socket, peer_address
from .workers import is_worker

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024  # pending connections: a burst of calls arriving at once
PURGE_INTERVAL = 30.0  # seconds between sweeps of expired tokens and bodies
METRICS_INTERVAL = 5.0  # seconds between flushes of relayed counts into /metrics
SHUTDOWN_MARGIN = 0.5  # seconds beyond close_timeout for the last sessions to finish


@attrs.frozen
class Ports:
    """What `serve` bound: (host, port) per listener of each plane."""

    ws: list[tuple[str, int]]
    api: list[tuple[str, int]]


def bind_socket(bind: Bind, *, reuseport: bool) -> socket.socket:
    """Bind one TCP socket (not yet listening); BindError names the address when it cannot.

    ``reuseport``: several processes share the address (SO_REUSEPORT, relay.supervisor).
    """
    try:
        infos = socket.getaddrinfo(bind.host, bind.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, socktype, proto, _, addr = infos[0]
        sock = socket.socket(family, socktype, proto)
    except OSError as exc:
        raise BindError(str(bind), exc.strerror or str(exc)) from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise BindError(str(bind), exc.strerror or str(exc)) from exc
    return sock


def bind_listener(bind: Bind) -> socket.socket:
    """Open one listening socket; BindError names the address when it cannot."""
    sock = bind_socket(bind, reuseport=is_worker())  # a worker shares it (relay.supervisor)
    try:
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(str(bind), exc.strerror or str(exc)) from exc
    return sock


def startup_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one startup error inside a nursery's exception group, else the group itself.

    A bind or config problem found while the planes start belongs to the caller as itself
    (the CLI turns it into exit status 2), not wrapped by the nursery it was found in.
    """
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    startup = [e for e in leaves if isinstance(e, BindError | ConfigError)]
    others = [e for e in leaves
              if not isinstance(e, BindError | ConfigError | trio.Cancelled)]
    if startup and not others:
        return startup[0]
    return group


@attrs.frozen
class _StoreParts:
    store: Store
    run: Callable[..., Awaitable[None]] | None = None  # started with the planes (Redis)
    up: Callable[[], bool] | None = None  # cached health, for /health and /start
    registry: Registry | None = None  # fleet-wide admission (Redis), run after the store
    run_registry: Callable[..., Awaitable[None]] | None = None
    flush: Callable[[], Awaitable[None]] | None = None  # give leases back before stopping
    operations: Operations | None = None  # the fleet's operator API (Redis)
    run_operations: Callable[..., Awaitable[None]] | None = None
    fleet_rate: FleetRate | None = None  # /start's buckets for the whole fleet (Redis)
    run_fleet_rate: Callable[..., Awaitable[None]] | None = None


RESTART_GRACE = 1.0  # seconds: see _make_store


def _make_store(config: Config, metrics: Metrics, wall_clock: Callable[[], float]
                ) -> _StoreParts:
    """The ``[store]`` the config names: the process's own, or the fleet's Redis."""
    if config.store.backend == "redis":
        from .fleet import FleetRegistry
        from .fleet_admin import FleetOperations
        from .fleet_rate import FleetStartLimiter
        from .store.redis import RedisStore  # coredis takes ~0.5 s to import: only if used

        redis = RedisStore(config.store.url, key_prefix=config.store.key_prefix,
                           on_state=metrics.store_state, wall_clock=wall_clock)
        fleet = FleetRegistry(redis, lease_ttl=config.store.lease_ttl, agents=config.agents,
                              wall_clock=wall_clock)
        ops = FleetOperations(fleet, LocalOperations(fleet, wall_clock, fleet.name))
        rate = FleetStartLimiter(redis, config.server.public_keys,
                                 rate=config.server.start_rate,
                                 burst=config.server.start_burst)
        return _StoreParts(redis, redis.run, lambda: redis.up, fleet, fleet.run, fleet.flush,
                           ops, ops.run, rate, rate.run)
    # Tokens issued in the last second before this store began are still accepted: a
    # restart (SIGTERM, shutdown, a new process importing) takes longer than that, and
    # an embedding app may mint a token just before it builds its Gateway.
    return _StoreParts(MemoryStore(remembers_since=wall_clock() - RESTART_GRACE))


class Gateway:
    """A relay gateway: data plane, control plane, sessions, events."""

    def __init__(
        self,
        config: Config,
        *,
        on_client_connected: Callback | None = None,
        on_client_disconnected: Callback | None = None,
        on_session_timeout: Callback | None = None,
        on_websocket_ready: Callback | None = None,
        wall_clock: Callable[[], float] = time.time,
        keys: KeyRing | None = None,
        bot_ssl: ssl.SSLContext | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        # Every check that needs more than the config file, shared with check-config.
        prepared = prepare(config, environ if environ is not None else os.environ, keys=keys)
        for warning in prepared.warnings:
            log.warning("%s", warning)
        keys = prepared.keys
        metrics = Metrics()
        self.config = config
        self._store = _make_store(config, metrics, wall_clock)
        self.rt = Runtime(
            config=config,
            events=Events(on_client_connected, on_client_disconnected, on_session_timeout,
                          on_websocket_ready),
            metrics=metrics,
            keys=keys,
            store=self._store.store,
            registry=self._store.registry or Registry(),
            bots=prepared.bots,
            wall_clock=wall_clock,
            client_ssl=prepared.client_ssl,
            bot_ssl=bot_ssl,
        )
        if self._store.operations is not None:  # fleet-wide on Redis
            self.rt.operations = self._store.operations
        self.control_app = make_control_app(ControlState(
            config=config, keyring=keys, store=self.rt.store, metrics=metrics,
            now=wall_clock, is_full=self._is_full_rejecting, operations=self.rt.operations,
            before_metrics=self._flush_counts, store_up=self._store.up,
            fleet_rate=self._store.fleet_rate))
        self.connections: set[ClientConnection] = set()
        self._listeners: list[socket.socket] = []
        self._accept_scopes: list[trio.CancelScope] = []
        self.ports: Ports | None = None
        self._serve_scope: trio.CancelScope | None = None
        self._handlers: trio.Nursery | None = None
        self._idle = trio.Event()
        self._idle.set()

    @property
    def metrics(self) -> Metrics:
        return self.rt.metrics

    @property
    def operations(self) -> Operations:
        """List, end and drain sessions, as the operator API does (admin.py)."""
        return self.rt.operations

    def _is_full_rejecting(self, agent: str) -> bool:
        cfg = self.config.agents.get(agent)
        return (cfg is not None and cfg.when_full == "reject"
                and self.rt.registry.is_full(cfg))

    # -- serving ---------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[Ports] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Run both planes until cancelled or shut down; reports the bound ports."""
        listeners = []
        try:
            for bind in self.config.server.ws_bind:
                listeners.append(bind_listener(bind))
        except BindError:
            for sock in listeners:
                sock.close()
            raise
        self._listeners = listeners
        try:
            with trio.CancelScope() as serve_scope:
                self._serve_scope = serve_scope
                async with trio.open_nursery() as nursery:
                    self._handlers = nursery
                    if self._store.run is not None:
                        await nursery.start(self._store.run)
                    if self._store.run_registry is not None:
                        await nursery.start(self._store.run_registry)
                    if self._store.run_operations is not None:
                        await nursery.start(self._store.run_operations)
                    if self._store.run_fleet_rate is not None:
                        await nursery.start(self._store.run_fleet_rate)
                    api = await nursery.start(serve_control, self.control_app, self.config)
                    keepalive_timer()  # the process's one keepalive timer, up before sessions
                    for sock in listeners:
                        nursery.start_soon(self._accept_loop, sock)
                    nursery.start_soon(self._purge_loop)
                    nursery.start_soon(self._metrics_loop)
                    ws = [(s.getsockname()[0], s.getsockname()[1]) for s in listeners]
                    self.ports = Ports(ws=ws, api=list(api))
                    log.info("relay listening: ws %s, api %s", ws, api)
                    # SPEC §6: when start() returns, on_websocket_ready has fired.
                    await self.rt.events.fire("on_websocket_ready", self)
                    task_status.started(self.ports)
        except BaseExceptionGroup as group:
            raise startup_error(group) from None
        finally:
            for sock in listeners:
                try:
                    trio.lowlevel.notify_closing(sock)
                except RuntimeError:
                    pass
                sock.close()

    async def _accept_loop(self, lsock: socket.socket) -> None:
        scope = trio.CancelScope()
        self._accept_scopes.append(scope)
        if self.rt.shutting_down:
            return
        with scope:
            while True:
                await trio.lowlevel.wait_readable(lsock)
                while True:
                    try:
                        sock, _addr = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                         errno.ENOMEM):
                            log.error("accept failed (%s): pausing 100 ms", exc)
                            await trio.sleep(0.1)
                            break
                        if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                            continue
                        raise
                    conn = self._wrap(sock)
                    assert self._handlers is not None
                    self._handlers.start_soon(self._handle_conn, conn)

    def _wrap(self, sock: socket.socket) -> Conn:
        if self.rt.client_ssl is None:
            return SocketConn(sock)
        configure_socket(sock)
        peer = peer_address(sock)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        tls = trio.SSLStream(stream, self.rt.client_ssl, server_side=True,
                             https_compatible=True)
        return StreamConn(tls, peer=peer)

    async def _handle_conn(self, conn: Conn) -> None:
        cc = ClientConnection(self.rt, conn)
        self.connections.add(cc)
        self.rt.open_connections += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        try:
            await cc.serve()
        finally:
            self.connections.discard(cc)
            self.rt.open_connections -= 1
            if not self.connections:
                self._idle.set()

    async def _purge_loop(self) -> None:
        while True:
            await trio.sleep(PURGE_INTERVAL)
            await self.rt.store.purge(self.rt.wall_clock())

    async def _metrics_loop(self) -> None:
        # Relayed message and byte counts live in each session's frame scanners; they are
        # added to the metrics in batches here and at session end, never per message.
        while True:
            await trio.sleep(METRICS_INTERVAL)
            self._flush_counts()

    def _flush_counts(self) -> None:
        # Also on each /metrics scrape, so a scrape (and the live page) sees current counts.
        for cc in list(self.connections):
            cc.flush_counts()

    async def shutdown(self) -> None:
        """Stop accepting, close every session with 1001, then stop both planes.

        Bounded: sessions get the longest close_timeout of any agent, plus a margin.
        """
        self.rt.shutting_down = True
        for scope in self._accept_scopes:
            scope.cancel()
        for cc in list(self.connections):
            cc.cancel("shutdown")
        embedded = [m for m in self.rt.registry.members() if m not in self.connections]
        for member in embedded:  # sessions mounted with handle() in the app's own server
            member.cancel("shutdown")
        bound = max([a.limits.close_timeout for a in self.config.agents.values()]
                    + [self.config.server.defaults.close_timeout])
        with trio.move_on_after(bound + SHUTDOWN_MARGIN):
            await self._idle.wait()
            for member in embedded:
                await member.done.wait()
        if self._store.flush is not None:
            await self._store.flush()  # bounded: ended sessions' leases go back to Redis
        if self._serve_scope is not None:
            self._serve_scope.cancel()

    def session_count(self, agent: str | None = None) -> int:
        if agent is None:
            return len(self.rt.registry.members())
        return self.rt.registry.count(agent)

    async def handle(self, request: Any) -> None:
        """Serve one trio_websocket.WebSocketRequest from the embedding app's server."""
        from .embedded import handle_request

        await handle_request(self.rt, request)

