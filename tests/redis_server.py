"""A real redis-server for tests: free loopback port, temp dir, no persistence, stopped by PID.

``scripts/test`` installs Debian's ``redis-server`` when it is missing, so no test skips
for want of it; if it is still absent the fixture fails with a message saying how to get it.

    redis_server   (module scope) one server; tests isolate themselves with their own
                   ``key_prefix`` (``fresh_prefix()``)
    RedisServer    start / stop / restart on the same port, for the Redis-down tests
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from ports import free_port

START_BOUND = 20.0  # seconds for redis-server to say it is ready on a loaded machine
PORT_ATTEMPTS = 3  # ports tried at the first start (one taken between pick and bind)
STOP_BOUND = 10.0


def fresh_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}:"


class RedisServer:
    """One redis-server process on 127.0.0.1:``port``; ``stop`` / ``start`` keep the port."""

    def __init__(self, directory: Path, *, persistent: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run scripts/test (as root it installs "
                        "Debian's redis-server) or apt-get install redis-server")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.last_error = ""
        # persistent: AOF, every write fsynced, so even a kill keeps every key; otherwise
        # no persistence at all, and a restart comes back empty
        self.persistence = (["--appendonly", "yes", "--appendfsync", "always"] if persistent
                            else ["--appendonly", "no"])

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on ``port``; the first start moves to another free port if that one was
        taken between `free_port()` and the bind (a restart keeps its port)."""
        for _ in range(PORT_ATTEMPTS):
            if self._start():
                return
            taken, self.port = self.port, free_port()
        pytest.fail(f"redis-server found {PORT_ATTEMPTS} ports taken, the last {taken}:\n"
                    f"{self.last_error}")

    def _start(self) -> bool:
        """True once ready; False when the port was taken (the process has exited)."""
        assert self.process is None
        self.starts += 1
        log = self.directory / f"redis-{self.starts}.log"
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--save", "", *self.persistence,
             "--logfile", str(log), "--daemonize", "no", "--protected-mode", "yes",
             "--maxmemory-policy", "noeviction"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_BOUND
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                text = log.read_text(errors="replace") if log.exists() else ""
                self.process = None
                if "Address already in use" in text and self.starts == 1:
                    self.last_error = text
                    self.starts = 0
                    return False
                pytest.fail(f"redis-server exited at start:\n{text}")
            if log.exists() and "Ready to accept connections" in log.read_text(errors="replace"):
                return True
            time.sleep(0.02)
        self.stop()
        pytest.fail(f"redis-server did not get ready within {START_BOUND} s")

    def stop(self) -> None:
        """Kill the server (by its PID) and wait for it: as abrupt as a crash."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait(timeout=STOP_BOUND)


def started(directory: Path, *, persistent: bool = False) -> Iterator[RedisServer]:
    server = RedisServer(directory, persistent=persistent)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from started(tmp_path_factory.mktemp("redis"))
