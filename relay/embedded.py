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
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Callable
from typing import Any

import attrs
import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    Endpoint,
    WebSocketConnection,
    WebSocketRequest,
    wrap_client_stream,
)
from wsproto.events import BytesMessage, Event, TextMessage
from wsproto.frame_protocol import CloseReason as WireCloseReason

from . import closing
from .admin import draining_reject
from .auth import Grant, authenticate, consume, release
from .closing import CloseCode, Outcome
from .config import AgentConfig, Limits
from .connection import REFUSE_TIMEOUT
from .errors import BotDialError
from .handshake import (
    Reject,
    Route,
    Upgrade,
    bot_request_headers,
    bot_request_target,
    decide,
    parse_bot_url,
)
from .inprocess import BotFunction, BotHost, ClientDisconnected
from .registry import CancellableMember
from .runtime import Runtime, SessionInfo
from .session_log import SessionRecord, log_session
from .upstream import open_tcp_to_bot

log = logging.getLogger(__name__)

# trio-websocket's own text when it closes a leg for a message over max_message_size.
_TOO_BIG = "Exceeded maximum message size"
# Handshake headers trio-websocket (wsproto) writes itself on the bot leg.
_OWN_HEADERS = frozenset({b"host", b"upgrade", b"connection", b"sec-websocket-key",
                          b"sec-websocket-version", b"sec-websocket-protocol",
                          b"sec-websocket-extensions"})
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
        self._leg: _Leg | None = None
        self._responded = False
        remote = request.remote
        self.peer = str(remote.address) if isinstance(remote, Endpoint) else str(remote)

    async def serve(self) -> None:
        self.rt.open_connections += 1
        try:
            await self._serve()
        except Exception:
            log.exception("embedded connection from %s failed", self.peer)
        finally:
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
        leg: _Leg | None = None
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
            exc = _leaf(group)
            status = exc.status_code if isinstance(exc, ConnectionRejected) else None
            dial_error = BotDialError(502, f"the bot answered HTTP {status} instead of 101")
        except* BotDialError as group:
            exc = _leaf(group)
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
                    upgrade: Upgrade, grant: Grant) -> _Leg | None:
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

    async def _run(self, leg: _Leg) -> bool:
        """From the accepted upgrade to the session's end; True when it timed out."""
        self.info = leg.info
        self._leg = leg
        leg.info.connected_at = trio.current_time()
        await self.rt.events.fire("on_client_connected", leg.info)
        self.rt.metrics.session_started(leg.agent.name)
        timeout = leg.agent.limits.session_timeout
        with trio.move_on_after(timeout if timeout is not None else math.inf) as tscope:
            await leg.run()
        return tscope.cancelled_caught

    async def _finish(self, leg: _Leg, timed_out: bool) -> None:
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


    def _log_end(self, leg: _Leg, outcome: Outcome) -> None:
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


# -- the upstream bot leg ------------------------------------------------------------------


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


@attrs.define(eq=False)
class BotLeg:
    """The upstream bot's WebSocket and the stream under it (ours to close at the end)."""

    ws: WebSocketConnection
    stream: trio.abc.Stream

    async def close(self, close: CloseCode | None, within: float) -> None:
        """Close the WebSocket, then the stream: a client-side trio-websocket leaves the
        stream open after a close the bot started, until the bot drops TCP."""
        try:
            await close_ws(self.ws, close, within)
        finally:
            await _discard(self.stream)


async def dial(nursery: trio.Nursery, rt: Runtime, agent: AgentConfig, r: Route,
               upgrade: Upgrade, grant: Grant, peer: str) -> BotLeg:
    """Open the bot leg with trio-websocket; raises BotDialError (502/504).

    The bot's reader task runs in `nursery`. A bot that answers with anything but a 101
    makes that task raise `ConnectionRejected` into `nursery`: the caller maps it to 502.
    """
    target = parse_bot_url(agent.bot)
    extra_query, extra_headers = grant.bot_extras(agent)
    headers = [(k, v) for k, v in bot_request_headers(
        target, upgrade.key, upgrade, session_id=grant.session_id, agent=agent.name,
        organization=rt.config.server.organization, client_addr=peer, extra=extra_headers)
        if k not in _OWN_HEADERS]
    resource = bot_request_target(target, r.bot_query, extra_query)
    timeout = agent.limits.bot_connect_timeout
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
    try:
        with trio.fail_after(timeout):
            stream = await open_tcp_to_bot(target)
            if target.secure:
                stream = trio.SSLStream(stream, rt.bot_ssl or ssl.create_default_context(),
                                        server_hostname=target.host, https_compatible=True)
            ws = await _handshake(nursery, stream, target.host_header, resource,
                                  [p.decode() for p in upgrade.subprotocols], headers,
                                  agent.limits.max_message_size)
            return BotLeg(ws, stream)
    except trio.TooSlowError:
        await _discard(stream)
        raise BotDialError(504, f"the bot did not answer within {timeout} s") from None
    except BaseException:
        await _discard(stream)
        raise


async def _discard(stream: trio.abc.Stream | None) -> None:
    if stream is not None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


async def _handshake(nursery: trio.Nursery, stream: trio.SocketStream
                     | trio.SSLStream[trio.SocketStream], host: str, resource: str,
                     subprotocols: list[str], headers: list[tuple[bytes, bytes]],
                     max_message_size: int) -> WebSocketConnection:
    """trio-websocket's client handshake, failing fast when its reader gives up.

    `wrap_client_stream` waits for the bot's 101 forever when the bot drops the connection,
    answers garbage or fails TLS (its reader just stops). So the reader runs in a nursery
    of its own, hosted in `nursery`, and its end before the 101 is a 502.
    """
    gate = trio.Event()
    reader_done = trio.Event()

    async def host_reader(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
        try:
            async with trio.open_nursery() as inner:
                task_status.started(inner)
                await gate.wait()  # keeps `inner` open until the reader is in it
        finally:
            reader_done.set()

    ws: WebSocketConnection | None = None
    try:
        inner: trio.Nursery = await nursery.start(host_reader)
        async with trio.open_nursery() as race:

            async def watch() -> None:
                await reader_done.wait()
                race.cancel_scope.cancel()

            race.start_soon(watch)
            # No checkpoint between gate.set() and the reader's start_soon in
            # wrap_client_stream, so `inner` is still open when the reader joins it.
            gate.set()
            ws = await wrap_client_stream(inner, stream, host, resource,
                                          subprotocols=subprotocols, extra_headers=headers,
                                          max_message_size=max_message_size)
            race.cancel_scope.cancel()
    finally:
        gate.set()  # never leave host_reader waiting, whatever happened
    if ws is None:
        raise BotDialError(502, "the bot closed the connection or answered unusably "
                                "during the handshake")
    return ws


def _close_outcome(reason: CloseReason, *, client: bool) -> tuple[Outcome, CloseCode | None]:
    """How a leg's close ends the session, and the close to pass on to the other end."""
    code, text = int(reason.code), reason.reason or ""
    if code == WireCloseReason.ABNORMAL_CLOSURE:
        return (closing.CLIENT_GONE if client else closing.BOT_GONE), None
    if code == WireCloseReason.MESSAGE_TOO_BIG and text.startswith(_TOO_BIG):
        # trio-websocket closed the leg itself for a message over its max_message_size.
        return (closing.client_violation(1009, text) if client
                else closing.bot_violation(1009, text)), None
    return (closing.CLIENT_CLOSED if client else closing.BOT_CLOSED), (code, text)


def _size(message: str | bytes) -> int:
    return len(message.encode()) if isinstance(message, str) else len(message)


def _too_big(message: str | bytes, limit: int) -> bool:
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


class _Leg:
    """What `EmbeddedConnection` needs of a running session."""

    info: SessionInfo
    agent: AgentConfig
    outcome: Outcome | None

    async def run(self) -> None:
        raise NotImplementedError

    async def close(self, outcome: Outcome) -> None:
        raise NotImplementedError

    def flush_counts(self, rt: Runtime) -> None:
        pass

    def traffic(self) -> tuple[int, int, int, int]:
        return (0, 0, 0, 0)

    def ending_close(self, outcome: Outcome) -> tuple[int | None, str]:
        """The close that ended the session (see connection._ending_close)."""
        sent = outcome.to_client or outcome.to_bot
        return sent if sent is not None else (None, "")


class UpstreamRelay(_Leg):
    """Messages both ways between the client and an upstream bot (two tasks)."""

    def __init__(self, client: WebSocketConnection, bot: BotLeg, agent: AgentConfig,
                 info: SessionInfo) -> None:
        self.client = client
        self.bot_leg = bot
        self.bot = bot.ws
        self.agent = agent
        self.limits = agent.limits
        self.info = info
        self.outcome: Outcome | None = None
        self.pass_to_client: CloseCode | None = None  # the bot's own close
        self.pass_to_bot: CloseCode | None = None  # the client's own close
        self.counts = {"client_to_bot": [0, 0], "bot_to_client": [0, 0]}
        self._nursery: trio.Nursery | None = None

    def traffic(self) -> tuple[int, int, int, int]:
        (c2b_m, c2b_b), (b2c_m, b2c_b) = self.counts["client_to_bot"], self.counts[
            "bot_to_client"]
        return (c2b_m, c2b_b, b2c_m, b2c_b)

    def ending_close(self, outcome: Outcome) -> tuple[int | None, str]:
        passed = {"client_closed": self.pass_to_bot,
                  "bot_closed": self.pass_to_client}.get(outcome.reason)
        if passed is not None:
            return passed
        return super().ending_close(outcome)

    def end(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._pump, self.client, self.bot, True)
            nursery.start_soon(self._pump, self.bot, self.client, False)
            if self.limits.ping_interval and math.isfinite(self.limits.ping_interval):
                nursery.start_soon(keepalive, self.client, self.limits,
                                   lambda: self.end(closing.CLIENT_GONE))
                nursery.start_soon(keepalive, self.bot, self.limits,
                                   lambda: self.end(closing.BOT_GONE))

    async def _pump(self, src: WebSocketConnection, dst: WebSocketConnection,
                    from_client: bool) -> None:
        limit = self.limits.max_message_size
        counts = self.counts["client_to_bot" if from_client else "bot_to_client"]
        while True:
            try:
                message = await src.get_message()
            except ConnectionClosed as exc:
                assert exc.reason is not None
                outcome, passed = _close_outcome(exc.reason, client=from_client)
                if from_client:
                    self.pass_to_bot = passed
                else:
                    self.pass_to_client = passed
                self.end(outcome)
                return
            if from_client and _too_big(message, limit):
                self.end(closing.client_violation(1009, f"message exceeds {limit} bytes"))
                return
            try:
                with trio.fail_after(self.limits.stall_timeout):
                    await dst.send_message(message)
            except trio.TooSlowError:
                self.end(closing.BOT_STALLED if from_client else closing.CLIENT_STALLED)
                return
            except ConnectionClosed:
                return  # the other pump reads that close and records why
            counts[0] += 1
            counts[1] += _size(message)

    async def close(self, outcome: Outcome) -> None:
        to_client = outcome.to_client if outcome.to_client is not None else self.pass_to_client
        to_bot = outcome.to_bot if outcome.to_bot is not None else self.pass_to_bot
        timeout = self.limits.close_timeout
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(close_ws, self.client, to_client, timeout)
                nursery.start_soon(self.bot_leg.close, to_bot, timeout)

    def flush_counts(self, rt: Runtime) -> None:
        for direction, (messages, nbytes) in self.counts.items():
            if messages:
                rt.metrics.relayed(direction, messages, nbytes)
        self.counts = {"client_to_bot": [0, 0], "bot_to_client": [0, 0]}


# -- the in-process bot leg ----------------------------------------------------------------


class InprocessAdapter(BotHost, _Leg):
    """An `inprocess.Session`'s leg over a trio-websocket connection.

    Provides what Session uses: `inbox_recv`, `send_event(TextMessage | BytesMessage)`,
    `bot_closed(code)` and `send_close(code, reason)`. The rules are inprocess.py's: the
    bot returning closes the client with 1000, raising with 1011; once the client has left
    the bot gets close_timeout to finish.
    """

    def __init__(self, ws: WebSocketConnection, bot: BotFunction, agent: AgentConfig,
                 info: SessionInfo, session_kwargs: dict[str, Any]) -> None:
        super().__init__(bot, agent.limits, session_kwargs)
        self.ws = ws
        self.agent = agent
        self.info = info
        self.counts = {"client_to_bot": [0, 0], "bot_to_client": [0, 0]}

    async def send_event(self, event: Event) -> None:
        if self._client_left or self.ws.closed is not None:
            raise ClientDisconnected("the client has left")
        if not isinstance(event, TextMessage | BytesMessage):
            raise TypeError(f"cannot send {type(event).__name__} on the embedding path")
        data = event.data if isinstance(event, TextMessage) else bytes(event.data)
        try:
            with trio.fail_after(self.limits.stall_timeout):
                await self.ws.send_message(data)
            counts = self.counts["bot_to_client"]
            counts[0] += 1
            counts[1] += _size(data)
        except ConnectionClosed:
            self._client_left = True
            raise ClientDisconnected("the client has left") from None
        except trio.TooSlowError:
            self.end(closing.CLIENT_STALLED)
            raise ClientDisconnected("the client stopped reading") from None

    async def send_close(self, code: int, reason: str) -> None:
        await close_ws(self.ws, (code, reason), self.limits.close_timeout)

    async def _keepalive(self) -> None:
        await keepalive(self.ws, self.limits, self._vanished)

    def _vanished(self) -> None:
        self._client_left = True
        self.end(closing.CLIENT_GONE)

    async def _reader(self) -> None:
        limit = self.limits.max_message_size
        while True:
            try:
                message = await self.ws.get_message()
            except ConnectionClosed as exc:
                assert exc.reason is not None
                outcome, passed = _close_outcome(exc.reason, client=True)
                self.client_close = passed
                if exc.reason.code in (1002, 1007):
                    outcome = closing.client_violation(int(exc.reason.code))
                self._client_gone(outcome)
                return
            if _too_big(message, limit):
                self.end(closing.client_violation(1009, f"message exceeds {limit} bytes"))
                return
            counts = self.counts["client_to_bot"]
            counts[0] += 1
            counts[1] += _size(message)
            try:
                await self.inbox_send.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def close(self, outcome: Outcome) -> None:
        if not self._client_left and outcome.to_client is not None:
            await close_ws(self.ws, outcome.to_client, self.limits.close_timeout)

    flush_counts = UpstreamRelay.flush_counts
