"""[trio] Serving the control plane: hypercorn on the `api_bind` addresses.

`serve_control(app, config)` binds every `api_bind` address itself first, so an address
that cannot be opened raises `BindError` (naming it) and unreadable TLS files raise
`ConfigError` before anything serves; then it hands the sockets to hypercorn's trio worker
and reports what it bound through `task_status.started([(host, port), ...])` (port 0
works). Cancelling the surrounding scope stops it; so does `shutdown_trigger`.

Slow clients: hypercorn's `read_timeout` (seconds one socket read may wait) is set just
above `[server] start_body_timeout`, so a silent connection is dropped even where the app
has no say (between requests, in the middle of headers), while a stalled /start body still
gets the app's 408 first.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from relay import control_errors
from relay.config import Config
from relay.control import ASGIApp
from relay.errors import BindError, ConfigError
from relay.workers import is_worker

__all__ = ["serve_control"]

logger = logging.getLogger("relay.control")

READ_TIMEOUT_MARGIN = 2  # seconds hypercorn's read_timeout exceeds start_body_timeout


def _listen_sockets(config: Config, backlog: int) -> list[socket.socket]:
    """Bind every ``api_bind`` address now, so a bad one fails before anything serves."""
    sockets: list[socket.socket] = []
    try:
        for bind in config.server.api_bind:
            family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if is_worker():  # one of several processes sharing this bind (relay.supervisor)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock.bind((bind.host, bind.port))
                sock.listen(backlog)
            except OSError as error:
                raise BindError(str(bind), error.strerror or str(error)) from None
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _hypercorn_config(config: Config) -> HypercornConfig:
    control_errors.install()  # hypercorn's own 400/431/500 answers get the JSON envelope
    hc = control_errors.RelayHypercornConfig()
    hc.h11_max_incomplete_size = control_errors.MAX_HEAD
    hc.bind = [str(bind) for bind in config.server.api_bind]
    hc.accesslog = None  # quiet by default; /metrics counts /start answers
    hc.errorlog = logging.getLogger("relay.control.hypercorn")  # follows the app's logging
    hc.include_server_header = False
    hc.graceful_timeout = config.server.defaults.close_timeout
    hc.read_timeout = math.ceil(config.server.start_body_timeout) + READ_TIMEOUT_MARGIN
    if config.tls:
        hc.certfile = config.server.certfile
        hc.keyfile = config.server.keyfile
        try:
            hc.create_ssl_context()
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(
                f"cannot load TLS certificate/key: {error}",
                key="server.certfile",
                file=config.source,
            ) from None
    return hc


async def serve_control(
    app: ASGIApp,
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with hypercorn on ``config.server.api_bind`` until cancelled.

    Reports ``[(host, port), ...]`` as actually bound (port 0 becomes the chosen port)
    once hypercorn accepts connections. TLS when certfile and keyfile are set. Raises
    ``BindError`` / ``ConfigError`` before serving anything if an address cannot be bound
    or the TLS files cannot be loaded. Cancelling the surrounding scope stops it at once;
    ``shutdown_trigger`` returning starts a graceful stop (in-flight requests get
    ``close_timeout`` seconds).
    """
    hc = _hypercorn_config(config)
    sockets = _listen_sockets(config, hc.backlog)
    try:
        bound = [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in sockets]
        hc_sockets = Sockets(
            secure_sockets=sockets if config.tls else [],
            insecure_sockets=[] if config.tls else sockets,
            quic_sockets=[],
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(
                    worker_serve,
                    wrap_app(cast(Any, app), hc.wsgi_max_body_size, "asgi"),
                    hc,
                    sockets=hc_sockets,
                    shutdown_trigger=shutdown_trigger,
                )
            )
            logger.info(
                "control plane listening on %s",
                ", ".join(
                    f"{'https' if config.tls else 'http'}://{h if ':' not in h else f'[{h}]'}:{p}"
                    for h, p in bound
                ),
            )
            task_status.started(bound)
    finally:
        for sock in sockets:
            sock.close()
