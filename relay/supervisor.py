"""[trio] `relay serve` with ``workers = N > 1``: N worker processes sharing both binds.

The supervisor binds nothing it serves. It reserves every address (a bound socket with
``SO_REUSEPORT`` that never listens: ``:0`` gets its port, a busy address fails here,
before any worker starts, exit 2), then runs N ``relay serve`` workers that bind the same
addresses with ``SO_REUSEPORT`` (see ``relay.workers``), so the kernel spreads connections
over them. It:

- restarts a worker that dies, after a backoff (0.5 s doubling to 10 s; back to 0.5 s
  once a worker has run 30 s), and logs it; a worker that exits 2 (a config or bind
  problem, which a restart cannot fix) stops the whole with exit 2;
- passes SIGTERM / SIGINT on to every worker and exits 0 within ``close_timeout`` + 1 s
  (a worker still running then is killed);
- gives each worker a pipe on stdin: if the supervisor dies, even by kill -9, the workers
  see EOF and shut down as on SIGTERM;
- sets ``PROMETHEUS_MULTIPROC_DIR`` to a fresh directory (removed at exit) so ``/metrics``
  on any worker reports all of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator

import trio

from .config import Bind, Config
from .gateway import bind_socket
from .workers import WORKER_ENV, worker_env_value

__all__ = ["run_supervisor"]

log = logging.getLogger(__name__)

BACKOFF_START = 0.5  # seconds before restarting a worker that died
BACKOFF_MAX = 10.0
STABLE_AFTER = 30.0  # seconds a worker must run for the backoff to start over
EXIT_MARGIN = 0.8  # seconds beyond close_timeout the workers get before they are killed
EXIT_CONFIG = 2


def reserve(bind: Bind) -> socket.socket:
    """Bind ``bind`` with SO_REUSEPORT without listening: the port is ours, nobody else's."""
    return bind_socket(bind, reuseport=True)


def _concrete(bind: Bind, sock: socket.socket) -> Bind:
    return Bind(host=bind.host, port=int(sock.getsockname()[1]))


class Supervisor:
    def __init__(self, config: Config, argv: list[str]) -> None:
        self.config = config
        self.argv = argv  # the worker's command line
        self.workers = config.server.workers
        self.stopping = False
        self.status = 0
        self.processes: dict[int, trio.Process] = {}
        self._stop = trio.Event()
        self.metrics_dir = ""
        self.env: dict[str, str] = {}

    @property
    def exit_bound(self) -> float:
        return max([a.limits.close_timeout for a in self.config.agents.values()]
                   + [self.config.server.defaults.close_timeout]) + EXIT_MARGIN

    async def run(self, env: dict[str, str]) -> int:
        self.env = env
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, signals)
                for slot in range(self.workers):
                    nursery.start_soon(self._keep, slot)
                await self._stop.wait()
                await self._stop_all()
                nursery.cancel_scope.cancel()
        return self.status

    async def _signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            log.info("received %s: stopping %d workers", signal.Signals(signum).name,
                     self.workers)
            self._stop.set()
            return

    async def _keep(self, slot: int) -> None:
        """Run worker ``slot``; restart it with backoff whenever it dies."""
        delay = BACKOFF_START
        while not self.stopping:
            started = trio.current_time()
            process = await trio.lowlevel.open_process(
                self.argv, env=self.env, stdin=subprocess.PIPE)
            self.processes[slot] = process
            log.info("worker %d started (pid %d)", slot, process.pid)
            status = await process.wait()
            if self.stopping:
                return
            _mark_dead(process.pid, self.metrics_dir)
            if status == EXIT_CONFIG:
                log.error("worker %d (pid %d) exited with status 2 (a config or bind "
                          "problem): stopping", slot, process.pid)
                self.status = EXIT_CONFIG
                self._stop.set()
                return
            if trio.current_time() - started > STABLE_AFTER:
                delay = BACKOFF_START
            log.warning("worker %d (pid %d) exited with status %s; restarting in %.1f s",
                        slot, process.pid, status, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _stop_all(self) -> None:
        self.stopping = True
        for process in self.processes.values():
            if process.returncode is None:
                try:
                    process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        with trio.move_on_after(self.exit_bound):
            for process in self.processes.values():
                await process.wait()
        for slot, process in self.processes.items():
            if process.returncode is None:
                log.warning("worker %d (pid %d) did not stop in time: killed", slot,
                            process.pid)
                process.kill()
        with trio.move_on_after(2):
            for process in self.processes.values():
                await process.wait()


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """prometheus-client's documented step for a dead worker: drop its live gauges."""
    from prometheus_client import multiprocess

    try:
        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
    except OSError:
        pass


def run_supervisor(config: Config, config_path: str | None, log_level: str,
                   app_dir: str = ".", log_format: str = "text") -> int:
    """Reserve the binds, run ``config.server.workers`` workers; the exit status."""
    reserved: list[socket.socket] = []
    try:
        ws = [_concrete(b, _keep_open(reserved, reserve(b))) for b in config.server.ws_bind]
        api = [_concrete(b, _keep_open(reserved, reserve(b))) for b in config.server.api_bind]
        metrics_dir = tempfile.mkdtemp(prefix="relay-metrics-")
        try:
            env = {**os.environ, WORKER_ENV: worker_env_value(ws, api),
                   "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
            argv = [sys.executable, "-m", "relay", "serve", "--log-level", log_level,
                    "--app-dir", app_dir, "--log-format", log_format]
            if config_path:
                argv += ["--config", config_path]
            log.info("relay supervisor (pid %d): %d workers on ws %s, api %s", os.getpid(),
                     config.server.workers, [str(b) for b in ws], [str(b) for b in api])
            supervisor = Supervisor(config, argv)
            supervisor.metrics_dir = metrics_dir
            return trio.run(supervisor.run, env)
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    finally:
        for sock in reserved:
            sock.close()


def _keep_open(reserved: list[socket.socket], sock: socket.socket) -> socket.socket:
    reserved.append(sock)
    return sock
