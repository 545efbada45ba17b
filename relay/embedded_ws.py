"""Message-level helpers of the embedding path (``embedded.py``) over trio-websocket.

How a leg's close maps to the session's outcome (``closing.py``), message sizes as the
limit counts them, closing a leg within a bound, and the gateway's keepalive pings.
"""

from __future__ import annotations

from collections.abc import Callable

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection
from wsproto.frame_protocol import CloseReason as WireCloseReason

from . import closing
from .closing import CloseCode, Outcome
from .config import Limits

__all__ = ["close_outcome", "close_ws", "keepalive", "message_size", "too_big"]

# trio-websocket's own text when it closes a leg for a message over max_message_size.
_TOO_BIG = "Exceeded maximum message size"


def close_outcome(reason: CloseReason, *, client: bool) -> tuple[Outcome, CloseCode | None]:
    """How a leg's close ends the session, and the close to pass on to the other end."""
    code, text = int(reason.code), reason.reason or ""
    if code == WireCloseReason.ABNORMAL_CLOSURE:
        return (closing.CLIENT_GONE if client else closing.BOT_GONE), None
    if code == WireCloseReason.MESSAGE_TOO_BIG and text.startswith(_TOO_BIG):
        # trio-websocket closed the leg itself for a message over its max_message_size.
        return (closing.client_violation(1009, text) if client
                else closing.bot_violation(1009, text)), None
    return (closing.CLIENT_CLOSED if client else closing.BOT_CLOSED), (code, text)


def message_size(message: str | bytes) -> int:
    return len(message.encode()) if isinstance(message, str) else len(message)


def too_big(message: str | bytes, limit: int) -> bool:
    n = len(message)
    if isinstance(message, str) and n <= limit < 4 * n:
        n = len(message.encode())
    return n > limit


async def close_ws(ws: WebSocketConnection, close: CloseCode | None, within: float) -> None:
    """Send `close` (an empty close for 1005) and await the answer, for `within` seconds."""
    if ws.closed is not None:
        return
    code, text = close if close is not None else closing.GOING_AWAY
    with trio.move_on_after(within, shield=True):
        if code == WireCloseReason.NO_STATUS_RCVD:
            # wsproto sends an empty close only for this very enum member.
            await ws.aclose(WireCloseReason.NO_STATUS_RCVD, None)
        else:
            await ws.aclose(code, closing.close_reason_text(text) or None)


async def keepalive(ws: WebSocketConnection, limits: Limits,
                    gone: Callable[[], None]) -> None:
    """The gateway's own pings; a peer that does not answer in ping_timeout is gone."""
    count = 0
    while True:
        await trio.sleep(limits.ping_interval)
        count += 1
        with trio.move_on_after(limits.ping_timeout) as scope:
            try:
                await ws.ping(b"relay-keepalive-%d" % count)
            except ConnectionClosed:
                return
        if scope.cancelled_caught:
            gone()
            return
