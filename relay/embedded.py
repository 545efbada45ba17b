"""SPEC §6 embedding: serve one `trio_websocket.WebSocketRequest` from the app's own server.

    async def app() -> None:
        gateway = relay.Gateway(config)
        await trio_websocket.serve_websocket(gateway.handle, "0.0.0.0", 8080, None)

This is the slower, message-level path. trio-websocket has already parsed the client's
upgrade; every message is decoded by trio-websocket on one leg and encoded again on the
other. Relay's own listener (`Gateway.serve`, see connection.py and passthrough.py) is the
fast path: it passes frames through as bytes. What differs here, by construction:

- fragmented messages arrive whole (text stays text, binary stays binary, bytes unchanged);
- pings are answered by each leg itself, not passed through; the gateway still sends its
  own keepalive pings (`ping_interval`, `ping_timeout`) to both ends;
- extensions (permessage-deflate) are not forwarded: each leg negotiates its own (none);
- message sizes are measured by trio-websocket as `len()` (characters for text) on the
  bot leg; the client leg's app-level limit (`serve_websocket(max_message_size=)`) applies
  before ours.

The contract is connection.py's, with the same pieces: `handshake.route`/`check_route`
(404), `auth.authenticate` (403; reserves the token), `registry.admit` (replace, or
accept-and-close 1013 after `auth.release`), `auth.consume`, then the bot: an upstream
bot dialled with trio-websocket (502/504; its subprotocol is what the client's accept
carries; the `relay.session` first frame precedes any client message), or an in-process
bot run with `inprocess.Session` over an adapter leg.
Close codes come from `closing.py` (SPEC §5's table); a peer's own close is passed on with
its code and reason (an empty close stays empty).

This module is the connection's life (checks, admission, open, run, finish); the
pieces it uses live beside it: `embedded_dial.py` (the upstream bot's leg, dialled with
trio-websocket), `embedded_legs.py` (the running session: upstream relay or in-process
bot adapter) and `embedded_ws.py` (message sizes, close mapping, closing, keepalive).
"""

from __future__ import annotations

import logging
import math

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    Endpoint,
    WebSocketConnection,
    WebSocketRequest,
)

from . import closing
from .admin import draining_reject
from .auth import Grant, authenticate, consume, release
from .closing import CloseCode, Outcome
from .config import AgentConfig
from .connection import REFUSE_TIMEOUT
from .embedded_dial import dial, leaf
from .embedded_legs import InprocessAdapter, Leg, UpstreamRelay
from .embedded_ws import close_ws
from .errors import BotDialError
from .handshake import Reject, Route, Upgrade, decide
from .limits import REFUSAL_DETAILS
from .registry import CancellableMember
from .runtime import Runtime, SessionInfo
from .session_log import SessionRecord, log_session

log = logging.getLogger(__name__)

_JSON = (b"content-type", b"application/json")


async def handle_request(rt: Runtime, request: WebSocketRequest) -> None:
    """Serve one client upgrade from an embedding app's `serve_websocket`."""
    member = EmbeddedConnection(rt, request)
    await member.serve()


class EmbeddedConnection(CancellableMember):
    """One client of the embedding path; a registry member like `ClientConnection`."""

    def __init__(self, rt: Runtime, request: WebSocketRequest) -> None:
        super().__init__()
        self.rt = rt
        self.request = request
        self.info: SessionInfo | None = None
        self._agent: str | None = None
        self._leg: Leg | None = None
        self._responded = False
        remote = request.remote
        self.peer = str(remote.address) if isinstance(remote, Endpoint) else str(remote)

    async def serve(self) -> None:
        self.rt.open_connections += 1
        # Counted with relay's own listener's connections from the same address.
        limited = self.rt.gate.open_upgraded(self.peer)
        try:
            if limited is not None:
                self.rt.metrics.connection_refused(limited)
                await self._reject(Reject(503, limited, REFUSAL_DETAILS[limited]))
            else:
                await self._serve()
        except Exception:
            log.exception("embedded connection from %s failed", self.peer)
        finally:
            self.rt.gate.close(self.peer)
            self.rt.open_connections -= 1
            if self._agent is not None:
                self.rt.registry.release(self, self._agent)
            self.done.set()

    # -- before the upgrade ----------------------------------------------------------------

    async def _reject(self, reject: Reject) -> None:
        """A plain HTTP refusal with the JSON envelope (no 101, no close frame)."""
        if self._responded:
            return
        self._responded = True
        with trio.move_on_after(REFUSE_TIMEOUT, shield=True):
            try:
                await self.request.reject(reject.status,
                                          extra_headers=[_JSON, *reject.headers],
                                          body=reject.body())
            except ConnectionClosed:
                pass

    async def _accept(self, subprotocol: str | None) -> WebSocketConnection | None:
        self._responded = True
        try:
            return await self.request.accept(subprotocol=subprotocol)
        except ConnectionClosed:
            return None

    async def _accept_and_close(self, code: CloseCode) -> None:
        """Accept the upgrade and close at once with `code`, so a browser can read why."""
        ws = await self._accept(None)
        if ws is not None:
            await close_ws(ws, code, REFUSE_TIMEOUT)

    async def _checks(self) -> tuple[AgentConfig, Route, Upgrade, Grant] | None:
        """SPEC §5 steps 1-3 and the token's use; None once the client has been answered."""
        rt = self.rt
        server = rt.config.server
        headers = list(self.request.headers)
        decision = decide(
            b"GET", b"1.1", self.request.path.encode("utf-8", "surrogateescape"), headers,
            organization=server.organization, agents=rt.config.agents,
            cors_origins=server.cors_origins, shutting_down=rt.shutting_down,
            over_capacity=rt.open_connections > server.max_connections)
        if isinstance(decision, Reject):
            await self._reject(decision)
            return None
        r, upgrade = decision.route, decision.upgrade
        if rt.operations.is_draining(r.agent):  # before the token: it stays usable
            await self._reject(draining_reject(r.agent))
            return None
        # wsproto keeps the offered subprotocols out of the headers; extensions stay per leg.
        upgrade = attrs.evolve(upgrade, extensions=(), subprotocols=tuple(
            p.encode() for p in self.request.proposed_subprotocols))
        agent = rt.config.agents[r.agent]
        grant = await authenticate(rt, agent, r, headers)
        if isinstance(grant, Reject):
            await self._reject(grant)
            return None
        if not await rt.registry.admit(self, agent):
            await release(rt, grant)
            await self._accept_and_close(closing.TRY_AGAIN_LATER)
            return None
        self._agent = agent.name
        consumed = await consume(rt, agent, grant)
        if isinstance(consumed, Reject):
            await self._reject(consumed)
            return None
        return agent, r, upgrade, consumed

    # -- the session -----------------------------------------------------------------------

    async def _serve(self) -> None:
        leg: Leg | None = None
        dial_error: BotDialError | None = None
        try:
            # The bot leg's reader task lives in this nursery, outside `scope`, so the
            # teardown below can still close the bot after a replacement or shutdown.
            async with trio.open_nursery() as bot_nursery:
                timed_out = False
                finished = False
                try:
                    with self.scope:
                        checked = await self._checks()
                        if checked is None:
                            return
                        leg = await self._open(bot_nursery, *checked)
                        if leg is None:
                            return
                        timed_out = await self._run(leg)
                    if leg is not None:
                        finished = True
                        await self._finish(leg, timed_out)
                finally:
                    if leg is not None and not finished:
                        # Cancelled from outside (the embedding app stopped its server):
                        # a shutdown, so both ends still get 1001 and the events fire.
                        with trio.CancelScope(shield=True):
                            await self._finish(leg, False)
        except* ConnectionRejected as group:
            exc = leaf(group)
            status = exc.status_code if isinstance(exc, ConnectionRejected) else None
            dial_error = BotDialError(502, f"the bot answered HTTP {status} instead of 101")
        except* BotDialError as group:
            exc = leaf(group)
            assert isinstance(exc, BotDialError)
            dial_error = exc
        if dial_error is not None:
            if self._agent is not None:
                self.rt.dial_failures.report(self._agent, self.rt.config.agents[self._agent].bot,
                                             dial_error, self.peer)
            await self._reject(Reject(dial_error.status, "bad_gateway"
                                      if dial_error.status == 502 else "gateway_timeout",
                                      dial_error.detail))
        elif leg is None and self.scope.cancelled_caught:
            await self._reject(Reject(503, self.cancel_reason or "cancelled",
                                      "The gateway ended this request before it was "
                                      f"accepted ({self.cancel_reason})."))

    async def _open(self, bot_nursery: trio.Nursery, agent: AgentConfig, r: Route,
                    upgrade: Upgrade, grant: Grant) -> Leg | None:
        rt = self.rt
        info = SessionInfo(id=grant.session_id, agent=agent.name,
                           organization=rt.config.server.organization, client_addr=self.peer)
        if agent.bot.startswith("python:"):
            ws = await self._accept(None)
            if ws is None:
                return None
            return InprocessAdapter(ws, rt.bots[agent.name], agent, info, dict(
                id=info.id, agent=agent.name, organization=info.organization,
                body=grant.body_value, client_addr=self.peer, query=r.bot_query))
        started = trio.current_time()
        bot = await dial(bot_nursery, rt, agent, r, upgrade, grant, self.peer)
        rt.metrics.bot_dial(agent.name, trio.current_time() - started)
        client: WebSocketConnection | None = None
        try:
            first = grant.first_frame(agent)
            if first is not None:
                with trio.fail_after(agent.limits.stall_timeout):
                    await bot.ws.send_message(first.decode())
            client = await self._accept(bot.ws.subprotocol)
        except (ConnectionClosed, trio.TooSlowError):
            pass
        finally:
            if client is None:  # the client left, or we were cancelled: no session
                await bot.close(closing.GOING_AWAY, agent.limits.close_timeout)
        if client is None:
            return None
        return UpstreamRelay(client, bot, agent, info)

    async def _run(self, leg: Leg) -> bool:
        """From the accepted upgrade to the session's end; True when it timed out."""
        self.info = leg.info
        self._leg = leg
        leg.info.connected_at = trio.current_time()
        self.rt.registry.connected(self, leg.agent.name)
        await self.rt.events.fire("on_client_connected", leg.info)
        self.rt.metrics.session_started(leg.agent.name)
        timeout = leg.agent.limits.session_timeout
        with trio.move_on_after(timeout if timeout is not None else math.inf) as tscope:
            await leg.run()
        return tscope.cancelled_caught

    async def _finish(self, leg: Leg, timed_out: bool) -> None:
        outcome = closing.session_outcome(self.cancel_reason, timed_out, leg.outcome)
        leg.info.end_reason = outcome.reason
        if outcome is closing.TIMEOUT:
            with trio.CancelScope(shield=True):
                await self.rt.events.fire("on_session_timeout", leg.info)
        await leg.close(outcome)
        self._log_end(leg, outcome)
        leg.flush_counts(self.rt)
        self.rt.metrics.session_ended(leg.agent.name, outcome.reason)
        with trio.CancelScope(shield=True):
            await self.rt.events.fire("on_client_disconnected", leg.info)


    def _log_end(self, leg: Leg, outcome: Outcome) -> None:
        code, reason = leg.ending_close(outcome)
        c2b_m, c2b_b, b2c_m, b2c_b = leg.traffic()
        started = leg.info.connected_at
        info = leg.info
        log_session(SessionRecord(
            id=info.id, agent=info.agent, organization=info.organization,
            client_addr=info.client_addr,
            duration=trio.current_time() - (started if started is not None
                                            else trio.current_time()),
            messages_client_to_bot=c2b_m, bytes_client_to_bot=c2b_b,
            messages_bot_to_client=b2c_m, bytes_bot_to_client=b2c_b,
            end_reason=outcome.reason, code=code, reason=reason))

    def traffic(self) -> tuple[int, int, int, int]:
        """Messages and payload bytes relayed so far: client→bot, then bot→client."""
        return self._leg.traffic() if self._leg is not None else (0, 0, 0, 0)
