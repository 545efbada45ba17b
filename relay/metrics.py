"""Prometheus metrics of one gateway (SPEC §3 ``GET /metrics``).

``Metrics`` owns its own ``CollectorRegistry``: two gateways in one process (tests, an
embedding app) never share or collide on counters, and nothing lands in the global
registry. Callers report events through the methods below; labels are bounded sets
(configured agents, fixed reasons, HTTP statuses), never client-supplied strings.

Exposed names (all prefixed ``relay_``)::

    sessions_active{agent}                 gauge
    sessions_started_total{agent}          counter
    sessions_ended_total{agent,reason}     counter
    messages_relayed_total{direction}      counter   direction: client_to_bot | bot_to_client
    bytes_relayed_total{direction}         counter   payload bytes of data messages as on the
                                                     wire (no frame headers or masking keys;
                                                     compressed size under permessage-deflate)

Relayed messages and bytes are counted on every path: upstream and in-process bots on
relay's own listener, and sessions served through ``Gateway.handle()``.
    token_refusals_total{reason}           counter   relay.tokens reasons, plus "replayed"
    start_requests_total{status}           counter   /start answers by HTTP status
    bot_dial_seconds{agent}                histogram time to open the bot leg (successful dials)
    bot_dial_failures_total{agent,reason}  counter   dials that failed: unreachable | tls |
                                                     rejected | timeout (the client got 502/504)
    store_full_total{bound}                counter   refusals (503 store_full) at a store bound:
                                                     sessions | body_bytes | markers
    start_rate_limited_total               counter   /start answered 429 rate_limited
    connections_refused_total{reason}      counter   data-plane connections answered 503 at
                                                     once: too_many_connections(_per_ip),
                                                     too_many_handshakes(_per_ip)
    handshakes_in_flight                   gauge     upgrade requests being read now
    store_up                               gauge     1 while the store answers (Redis), else 0
    store_down_total                       counter   times the store stopped answering
"""

from __future__ import annotations

import os
from typing import Any, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .errors import DIAL_FAILURE_REASONS
from .limits import REFUSAL_REASONS

__all__ = ["CONNECTION_REFUSALS", "DIRECTIONS", "Metrics"]

DIRECTIONS: Final = ("client_to_bot", "bot_to_client")
CONNECTION_REFUSALS: Final = ("too_many_connections", *REFUSAL_REASONS)

# Bot dial time: a local bot answers in milliseconds; bot_connect_timeout defaults to 10 s.
_DIAL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """The metrics of one gateway, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._active = Gauge(
            "relay_sessions_active", "Sessions relaying now", ["agent"], registry=r,
            multiprocess_mode="livesum",
        )
        self._started = Counter(
            "relay_sessions_started",
            "Sessions whose client upgrade was accepted",
            ["agent"],
            registry=r,
        )
        self._ended = Counter(
            "relay_sessions_ended", "Sessions ended, by reason", ["agent", "reason"], registry=r
        )
        self._messages = Counter(
            "relay_messages_relayed",
            "Messages relayed, by direction",
            ["direction"],
            registry=r,
        )
        self._bytes = Counter(
            "relay_bytes_relayed",
            "Payload bytes of relayed data messages (no frame headers or masks), by direction",
            ["direction"],
            registry=r,
        )
        self._refusals = Counter(
            "relay_token_refusals",
            "Upgrades refused for their token, by reason",
            ["reason"],
            registry=r,
        )
        self._starts = Counter(
            "relay_start_requests", "/start answers, by HTTP status", ["status"], registry=r
        )
        self._dial = Histogram(
            "relay_bot_dial_seconds",
            "Time to open the bot leg",
            ["agent"],
            buckets=_DIAL_BUCKETS,
            registry=r,
        )
        self._dial_failures = Counter(
            "relay_bot_dial_failures",
            "Bot dials that failed (the client got 502 or 504), by reason",
            ["agent", "reason"],
            registry=r,
        )
        self._store_full = Counter(
            "relay_store_full",
            "Requests refused with 503 store_full, by the store bound reached",
            ["bound"],
            registry=r,
        )
        self._rate_limited = Counter(
            "relay_start_rate_limited",
            "/start requests refused (429) for their public key's rate",
            registry=r,
        )
        self._conn_refused = Counter(
            "relay_connections_refused",
            "Data-plane connections refused (503) at a connection or handshake limit",
            ["reason"],
            registry=r,
        )
        self.handshakes_in_flight = Gauge(
            "relay_handshakes_in_flight", "Upgrade requests being read now", registry=r,
            multiprocess_mode="livesum",  # workers: the sum over live workers
        )
        for reason in CONNECTION_REFUSALS:
            self._conn_refused.labels(reason)
        self._store_up = Gauge(
            "relay_store_up", "1 while the session store answers, 0 while it does not",
            registry=r, multiprocess_mode="livemin",
        )
        self._store_up.set(1)
        self._store_down = Counter(
            "relay_store_down", "Times the session store stopped answering", registry=r
        )
        for direction in DIRECTIONS:  # present at 0 from the first scrape
            self._messages.labels(direction)
            self._bytes.labels(direction)

    def _child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, looked up once: the label sets are bounded (configured
        agents, fixed reasons) and prometheus_client's labels() locks and builds a tuple."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def session_started(self, agent: str) -> None:
        self._child(self._started, agent).inc()
        self._child(self._active, agent).inc()

    def session_ended(self, agent: str, reason: str) -> None:
        self._child(self._ended, agent, reason).inc()
        self._child(self._active, agent).dec()

    def relayed(self, direction: str, messages: int, nbytes: int) -> None:
        """Count one batch of relayed messages (called per batch, not per message)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
        if messages:
            self._child(self._messages, direction).inc(messages)
        if nbytes:
            self._child(self._bytes, direction).inc(nbytes)

    def token_refused(self, reason: str) -> None:
        self._child(self._refusals, reason).inc()

    def start_request(self, status: int) -> None:
        self._child(self._starts, str(status)).inc()

    def bot_dial(self, agent: str, seconds: float) -> None:
        self._child(self._dial, agent).observe(seconds)

    def bot_dial_failed(self, agent: str, reason: str) -> None:
        if reason not in DIAL_FAILURE_REASONS:
            raise ValueError(f"reason must be one of {DIAL_FAILURE_REASONS}, not {reason!r}")
        self._child(self._dial_failures, agent, reason).inc()

    def store_full(self, bound: str) -> None:
        self._child(self._store_full, bound).inc()

    def start_rate_limited(self) -> None:
        self._rate_limited.inc()

    def connection_refused(self, reason: str) -> None:
        if reason not in CONNECTION_REFUSALS:
            raise ValueError(f"reason must be one of {CONNECTION_REFUSALS}, not {reason!r}")
        self._child(self._conn_refused, reason).inc()

    def store_state(self, up: bool) -> None:
        self._store_up.set(1 if up else 0)
        if not up:
            self._store_down.inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for ``GET /metrics``.

        Under ``relay serve --workers N`` (``PROMETHEUS_MULTIPROC_DIR`` set by the
        supervisor) this is every worker's counts together, read by prometheus-client's
        ``MultiProcessCollector`` from the files all workers write.
        """
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            whole = CollectorRegistry()
            multiprocess.MultiProcessCollector(whole)  # type: ignore[no-untyped-call]
            return generate_latest(whole), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
