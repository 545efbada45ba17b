"""[sans-IO] Limits that protect the box: a token bucket per /start public key, and
counters of connections and upgrade handshakes per client IP.

Nothing here reads a clock or a socket: callers pass ``now`` (seconds, any monotonic
origin) and the peer's address. Memory is bounded by what is being limited: one bucket
per configured public key (only keys that passed the 401 check reach the limiter), one
counter entry per IP that has something open right now (an entry is dropped when it
reaches zero).

    bucket = TokenBucket(rate=20, burst=50)
    wait = bucket.take(now)        # 0.0: allowed; else seconds until one token is back
    bucket_expiry(20, 50)          # seconds after its last change a bucket may be forgotten

On the Redis store the buckets live in Redis (``relay.fleet_rate``, one Lua script that
is this ``take`` transcribed), so /start's limit holds for the whole fleet.

    gate = ConnectionGate(max_connections_per_ip=..., max_handshakes=...,
                          max_handshakes_per_ip=...)
    refusal = gate.open(ip)        # None, or the reason this connection is refused
    gate.handshake_done(ip)        # its upgrade request has been read (or refused)
    gate.close(ip)                 # the connection is gone
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs

__all__ = [
    "ConnectionGate",
    "REFUSAL_DETAILS",
    "REFUSAL_REASONS",
    "StartRateLimiter",
    "TokenBucket",
    "bucket_expiry",
    "check_bucket",
    "retry_after",
]

#: Why ``ConnectionGate.open`` refused a connection (also the /metrics label values).
TOO_MANY_FROM_IP = "too_many_connections_per_ip"
TOO_MANY_HANDSHAKES = "too_many_handshakes"
TOO_MANY_HANDSHAKES_FROM_IP = "too_many_handshakes_per_ip"
REFUSAL_REASONS = (TOO_MANY_FROM_IP, TOO_MANY_HANDSHAKES, TOO_MANY_HANDSHAKES_FROM_IP)

#: The ``detail`` of the 503 each reason gets (the envelope's code is the reason).
REFUSAL_DETAILS = {
    TOO_MANY_FROM_IP: "Too many connections from your address are open; close some first "
                      "(server.max_connections_per_ip).",
    TOO_MANY_HANDSHAKES: "Too many upgrade requests are being received at once; try again "
                         "shortly (server.max_handshakes).",
    TOO_MANY_HANDSHAKES_FROM_IP: "Too many upgrade requests from your address are still "
                                 "incomplete; try again shortly "
                                 "(server.max_handshakes_per_ip).",
}


#: Seconds a bucket is kept beyond the time it takes to refill from empty (clock skew
#: between instances, rounding): a bucket forgotten only once it is full again answers as
#: a fresh one would.
BUCKET_EXPIRY_MARGIN = 1.0


def check_bucket(rate: float, burst: float) -> None:
    """ValueError unless ``rate`` is positive and finite and ``burst`` finite and >= 1."""
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive finite number, got {rate!r}")
    if not (burst >= 1 and math.isfinite(burst)):
        raise ValueError(f"burst must be a finite number >= 1, got {burst!r}")


def bucket_expiry(rate: float, burst: float) -> float:
    """Seconds after its last change a bucket may be forgotten: by then it is full again
    (from empty: ``burst / rate``), so a forgotten bucket and a kept one answer alike."""
    check_bucket(rate, burst)
    return burst / rate + BUCKET_EXPIRY_MARGIN


@attrs.define
class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` per second; one per request."""

    rate: float
    burst: float
    tokens: float = attrs.field(default=math.nan)
    stamp: float | None = None

    def __attrs_post_init__(self) -> None:
        check_bucket(self.rate, self.burst)
        if math.isnan(self.tokens):
            self.tokens = float(self.burst)

    def take(self, now: float) -> float:
        """Take one token: 0.0 when allowed, else the seconds until one is available.

        ``now`` earlier than the last call's (a clock stepped back, or on Redis a peer
        instance whose clock is ahead) refills nothing and keeps the later stamp: time
        never runs backwards into extra tokens, so skew never grants more than ``burst``.
        """
        if self.stamp is not None and now > self.stamp:
            self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        if self.stamp is None or now > self.stamp:
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


def retry_after(wait: float) -> int:
    """A ``Retry-After`` value (whole seconds, at least 1) after which ``wait`` has passed."""
    return max(1, math.ceil(wait - 1e-9))


class StartRateLimiter:
    """One token bucket per public key (a configured, bounded set)."""

    def __init__(self, keys: Iterable[str], *, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets = {key: TokenBucket(rate, burst) for key in keys}

    def take(self, key: str, now: float) -> float:
        """0.0 when ``key`` may call /start now, else the seconds to wait."""
        bucket = self._buckets.get(key)
        if bucket is None:  # not a configured key: the 401 check answers it
            return 0.0
        return bucket.take(now)


@attrs.define
class ConnectionGate:
    """Open connections per IP, and upgrade handshakes in flight (overall and per IP).

    A handshake is the part of a connection the client controls before the gateway
    decides: from accept until its upgrade request head has been read (at most
    ``handshake_timeout``). A client holding idle sockets therefore takes handshake
    slots of its own IP first, and never all of the gateway's connections.
    """

    max_connections_per_ip: int
    max_handshakes: int
    max_handshakes_per_ip: int
    connections: dict[str, int] = attrs.field(factory=dict)
    handshakes: dict[str, int] = attrs.field(factory=dict)
    handshakes_total: int = 0

    def open(self, ip: str) -> str | None:
        """Count a new connection from ``ip``; the reason it must be refused, or None.

        A refused connection is counted as an open connection (until ``close``), not as a
        handshake: it is answered at once without reading its request.
        """
        count = self.connections.get(ip, 0) + 1
        self.connections[ip] = count
        if count > self.max_connections_per_ip:
            return TOO_MANY_FROM_IP
        if self.handshakes_total >= self.max_handshakes:
            return TOO_MANY_HANDSHAKES
        if self.handshakes.get(ip, 0) >= self.max_handshakes_per_ip:
            return TOO_MANY_HANDSHAKES_FROM_IP
        self.handshakes[ip] = self.handshakes.get(ip, 0) + 1
        self.handshakes_total += 1
        return None

    def open_upgraded(self, ip: str) -> str | None:
        """Count a connection from ``ip`` whose upgrade another server has already read
        (``Gateway.handle``): only ``max_connections_per_ip`` applies. Closed with
        ``close`` like any other, refused or not."""
        count = self.connections.get(ip, 0) + 1
        self.connections[ip] = count
        return TOO_MANY_FROM_IP if count > self.max_connections_per_ip else None

    def handshake_done(self, ip: str) -> None:
        """The upgrade request of an admitted connection from ``ip`` has been read."""
        count = self.handshakes.get(ip, 0)
        if count <= 0:
            raise ValueError(f"no handshake in flight from {ip!r}")
        if count == 1:
            del self.handshakes[ip]
        else:
            self.handshakes[ip] = count - 1
        self.handshakes_total -= 1

    def close(self, ip: str) -> None:
        """A connection from ``ip`` (admitted or refused) is gone."""
        count = self.connections.get(ip, 0)
        if count <= 0:
            raise ValueError(f"no connection open from {ip!r}")
        if count == 1:
            del self.connections[ip]
        else:
            self.connections[ip] = count - 1
