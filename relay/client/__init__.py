"""relay.client: a trio client for relay, with /start, one-time tokens and reconnection.

    async with relay.client.connect(start_url, public_key, body={...}) as session:
        await session.send("hello")
        print(await session.receive())

The pieces, one concept per module: ``session`` (connect, Session: the connection task and
what send/receive do during a reconnect), ``policy`` (when and how often to reconnect,
sans-IO), ``start`` (the /start call over h11), ``closewatch`` (the server's close code
read off the wire, so 1014 is reported as 1014), ``errors`` (exceptions and events).
"""

from __future__ import annotations

from relay.client.errors import (
    AttemptFailed,
    ClientError,
    ConnectError,
    ConnectionLost,
    Event,
    Reconnected,
    ReconnectFailed,
    SessionClosed,
    StartError,
)
from relay.client.policy import ABNORMAL_CLOSES, Reconnect
from relay.client.session import Session, TokenIn, connect

__all__ = [
    "ABNORMAL_CLOSES",
    "AttemptFailed",
    "ClientError",
    "ConnectError",
    "ConnectionLost",
    "Event",
    "Reconnect",
    "ReconnectFailed",
    "Reconnected",
    "Session",
    "SessionClosed",
    "StartError",
    "TokenIn",
    "connect",
]
