"""A telephony provider's connection (`/ws/{provider}`), from its upgrade to the relay.

A provider sends its opening messages (`connected`, `start`) only once it has its 101, so
on these endpoints the order differs from the generic endpoint's, in this way:

1. before the 101, what the URL says is decided with the generic endpoint's refusals:
   routing (404) and, when the URL routes, the token (403, nothing burned; a valid one
   is reserved, and given back if the connection ends before admission);
2. the 101, carrying no subprotocol and no extension: the bot is not dialled yet, so
   nothing can be negotiated end to end (and providers offer none);
3. the opening messages, read whole (`providers.OpeningReader`), bounded in size and by
   `handshake_timeout`; what is not that provider's protocol gets close 1008 with a
   reason, and no bot is dialled;
4. a route from Twilio's `start` (`customParameters._pipecatCloudServiceHost`, token
   in `customParameters.token`), refused with 1008 when unroutable, unknown or its token
   is refused (the reason names the token refusal's code);
5. admission (replace, or 1013 when full and rejecting), the token consumed, the bot
   dialled; a failed dial closes the provider with 1014 ("bot unreachable" or "bot
   timeout"): it has its 101 already, so there is no 502/504 to send;
6. the bot gets every byte the provider sent so far, unchanged (the opening messages
   first, after the `relay.session` frame when the agent opts into bot_protocol
   "relay"), then the relay runs as on the generic endpoint.

Admission comes after the opening messages on purpose: a connection that never proves
to be a provider's stream never replaces a live session. A shutdown while the opening
messages are read closes the provider with 1001, as every session.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs
import trio

from . import closing
from .admin import draining_reject
from .auth import Grant, authenticate, consume, release
from .closing import CloseCode
from .config import AgentConfig
from .errors import BotDialError
from .frames import OP_CLOSE, ControlFrame, FrameScanner, Violation, encode_close, encode_frame
from .handshake import Reject, Route, Upgrade, check_route
from .inprocess import InprocessLeg
from .providers import ClientClosed, Opening, OpeningReader, Refused, resolve_route
from .runtime import SessionInfo

if TYPE_CHECKING:
    from .connection import ClientConnection, Leg

log = logging.getLogger(__name__)

POLICY: int = 1008  # RFC 6455 §7.4.1 "policy violation": not this provider's stream
LINGER_BYTES = 1 << 20  # bytes read and dropped after refusing a stream we cannot walk
BOT_UNREACHABLE: CloseCode = (1014, "bot unreachable")
BOT_TIMEOUT: CloseCode = (1014, "bot timeout")


@attrs.define
class _Reservation:
    """The token reserved for this connection, and whether admission has begun."""

    grant: Grant | None = None
    admitting: bool = False


async def open_provider(cc: ClientConnection, r: Route, upgrade: Upgrade,
                        headers: list[tuple[bytes, bytes]], early: bytes
                        ) -> tuple[Leg, SessionInfo, AgentConfig] | None:
    """Steps 1-6 of the module docstring; None when the connection ends before a session."""
    held = _Reservation()
    try:
        return await _open(cc, r, upgrade, headers, early, held)
    finally:
        # Refused (or gone, or cancelled) before admission: nobody was replaced for this
        # token, so its reservation is given back and it stays usable (auth.release).
        # Once admission has begun, auth.py's rule holds: the reservation ends with it.
        if held.grant is not None and not held.admitting:
            await release(cc.rt, held.grant)


async def _open(cc: ClientConnection, r: Route, upgrade: Upgrade,
                headers: list[tuple[bytes, bytes]], early: bytes, held: _Reservation
                ) -> tuple[Leg, SessionInfo, AgentConfig] | None:
    rt = cc.rt
    server = rt.config.server
    agent: AgentConfig | None = None
    if not r.deferred:  # 1. the URL routes: its token is checked before the 101
        agent = rt.config.agents[r.agent]
        if rt.operations.is_draining(agent.name):  # the operator's drain: 503, token kept
            await cc._refuse(draining_reject(agent.name))
            return None
        checked = await authenticate(rt, agent, r, headers)
        if isinstance(checked, Reject):
            await cc._refuse(checked)
            return None
        held.grant = checked
    # 2. the 101: the provider speaks only after it
    if not await cc._accept(None, (), upgrade.key):
        return None
    # 3. the opening messages
    reader = OpeningReader(r.provider or "")
    try:
        verdict = await _read_opening(cc, reader, early)
    except trio.Cancelled:  # the gateway is shutting down: 1001, as to every session
        with trio.CancelScope(shield=True):
            await _close_opening(cc, reader, closing.GOING_AWAY)
        raise
    if verdict is None:  # the client left
        return None
    if not isinstance(verdict, Opening):
        await _close_opening(cc, reader, verdict)
        return None
    # 4. where it goes, once the start has said
    resolved = resolve_route(r, verdict)
    if isinstance(resolved, Refused):
        await _close_opening(cc, reader, resolved)
        return None
    if r.deferred:
        unknown = check_route(resolved, organization=server.organization,
                              agents=rt.config.agents)
        if unknown is not None:
            await _close_opening(cc, reader, Refused(
                f"no agent {resolved.agent!r} in organization {resolved.org!r} here"))
            return None
        agent = rt.config.agents[resolved.agent]
        if rt.operations.is_draining(agent.name):  # after the 101: 1013, token kept
            await _close_opening(cc, reader, _token_close(draining_reject(agent.name)))
            return None
        checked = await authenticate(rt, agent, resolved, headers)
        if isinstance(checked, Reject):
            await _close_opening(cc, reader, _token_close(checked))
            return None
        held.grant = checked
    grant = held.grant
    assert agent is not None and grant is not None
    # 5. admission, the token, the bot
    held.admitting = True
    if not await rt.registry.admit(cc, agent):
        await release(rt, grant)  # nobody was replaced: the token stays usable
        await _close_opening(cc, reader, closing.TRY_AGAIN_LATER)
        return None
    cc._agent = agent.name
    consumed = await consume(rt, agent, grant)
    if isinstance(consumed, Reject):
        await _close_opening(cc, reader, _token_close(consumed))
        return None
    info = SessionInfo(id=consumed.session_id, agent=agent.name,
                       organization=server.organization, client_addr=cc.conn.peer())
    replay = verdict.raw  # 6. every byte the provider sent (`early` included), unchanged
    if agent.bot.startswith("python:"):
        leg: Leg = InprocessLeg(
            cc.conn, rt.bots[agent.name], agent.limits, initial=replay,
            session_kwargs=dict(id=info.id, agent=agent.name,
                                organization=server.organization, body=consumed.body_value,
                                client_addr=info.client_addr, query=resolved.bot_query))
        return leg, info, agent
    bot_upgrade = attrs.evolve(upgrade, subprotocols=(), extensions=())
    try:
        passthrough = await cc._dial(agent, resolved, bot_upgrade, consumed, replay,
                                     client_accepted=True)
    except BotDialError as exc:
        rt.dial_failures.report(agent.name, agent.bot, exc, info.client_addr)  # counted, logged
        await _close_opening(cc, reader, BOT_UNREACHABLE if exc.status == 502 else BOT_TIMEOUT)
        return None
    return passthrough, info, agent


def _token_close(reject: Reject) -> Refused | CloseCode:
    """The close for a token refused after the 101: 1008 naming the refusal's code, or
    1013 when the store could not answer (503 on the generic endpoint): try again."""
    if reject.status == 503:
        return (1013, f"try again later: {reject.code}")
    return Refused(f"token refused: {reject.code}")


async def _read_opening(cc: ClientConnection, reader: OpeningReader, early: bytes
                        ) -> Opening | Refused | ClientClosed | None:
    """The reader's verdict, a refusal when too slow, or None when the client left."""
    timeout = cc.rt.config.server.handshake_timeout
    verdict = reader.feed(early) if early else None
    buf = bytearray(4096)
    with trio.move_on_after(timeout):
        while verdict is None:
            n = await cc.conn.receive_into(buf)
            if n == 0:
                return None
            verdict = reader.feed(bytes(buf[:n]))
        return verdict
    return Refused(f"{reader.provider} opening messages not received within {timeout} s")


async def _close_opening(cc: ClientConnection, reader: OpeningReader,
                         why: Refused | ClientClosed | CloseCode) -> None:
    """Close the provider's connection before any bot: our close, its answer, then TCP."""
    if isinstance(why, ClientClosed):
        # Answer the client's close with its own code (RFC 6455 §5.5.1), then TCP.
        frame = encode_frame(OP_CLOSE, why.payload, mask=False)
        answered = True
    else:
        code, reason = (POLICY, why.reason) if isinstance(why, Refused) else why
        if isinstance(why, Refused):
            log.info("provider connection from %s refused: %s", cc.conn.peer(), why.reason)
        frame = encode_close(code, closing.close_reason_text(reason), mask=False)
        answered = False
    with trio.move_on_after(cc.rt.config.server.defaults.close_timeout, shield=True):
        try:
            await cc.conn.send_all(frame)
        except Exception:
            return
        if answered:
            return
        # Wait for the client's answering close, then close TCP first (RFC 6455 §7.1.1).
        pending = reader.unparsed
        buf = bytearray(4096)
        if pending is None:
            # The stream cannot be walked to the client's close: stop writing, then read
            # and drop (bounded) until the client closes, so our close frame is not lost
            # to a reset (a lingering close, as for a refused upgrade).
            cc.conn.shutdown_write()
            read = 0
            while read < LINGER_BYTES and (n := await cc.conn.receive_into(buf)):
                read += n
            return
        scanner = FrameScanner(masked=True, max_message_size=1 << 62)
        data = pending
        while True:
            for piece in scanner.feed(memoryview(data)):
                if isinstance(piece, Violation) or (
                    isinstance(piece, ControlFrame) and piece.opcode == OP_CLOSE
                ):
                    return
            n = await cc.conn.receive_into(buf)
            if n == 0:
                return
            data = bytes(buf[:n])
