"""The built-in echo bot: every message back as it came (text stays text)."""

from __future__ import annotations

from .inprocess import ClientDisconnected, Session


async def echo_bot(session: Session) -> None:
    try:
        while True:
            await session.send(await session.receive())
    except ClientDisconnected:
        return
