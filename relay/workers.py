"""[sans-IO] What a worker process of `relay serve --workers N` learns from its supervisor.

The supervisor resolves every bind to a concrete port (``:0`` becomes the port it got),
holds each port reserved, and starts the workers with ``RELAY_WORKER_BINDS`` set to those
binds (JSON). A worker then binds the same addresses with ``SO_REUSEPORT``, so the kernel
spreads connections over all workers. ``PROMETHEUS_MULTIPROC_DIR`` is set too: each
worker's ``/metrics`` reports the sum of all workers (prometheus-client multiprocess mode).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import attrs

from .config import Bind, Config, parse_bind

__all__ = ["WORKER_ENV", "apply_worker_binds", "is_worker", "worker_env_value"]

WORKER_ENV = "RELAY_WORKER_BINDS"


def is_worker(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a worker under a supervisor (binds with SO_REUSEPORT)."""
    return WORKER_ENV in (os.environ if environ is None else environ)


def worker_env_value(ws: list[Bind], api: list[Bind]) -> str:
    return json.dumps({"ws": [str(b) for b in ws], "api": [str(b) for b in api]})


def apply_worker_binds(config: Config, environ: Mapping[str, str] | None = None) -> Config:
    """``config`` with the supervisor's concrete binds, when this process is a worker."""
    env = os.environ if environ is None else environ
    raw = env.get(WORKER_ENV)
    if raw is None:
        return config
    binds = json.loads(raw)
    server = attrs.evolve(config.server, workers=1,
                          ws_bind=tuple(parse_bind(b) for b in binds["ws"]),
                          api_bind=tuple(parse_bind(b) for b in binds["api"]))
    return attrs.evolve(config, server=server)
