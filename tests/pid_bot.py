"""An in-process bot for worker tests: says which process serves the session, then echoes."""

from __future__ import annotations

import os

from relay.inprocess import ClientDisconnected, Session


async def pid_bot(session: Session) -> None:
    try:
        await session.send(f"pid:{os.getpid()}")
        while True:
            await session.send(await session.receive())
    except ClientDisconnected:
        return
