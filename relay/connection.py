"""One client's life: upgrade request → checks → admission → bot leg → 101 → relay → teardown.

Everything a connection does runs inside its own cancel scope (`ClientConnection.scope`):
replacement and shutdown cancel it with a reason, and the teardown that follows runs
shielded and bounded. The order of checks before the upgrade is SPEC §5's:

1. routing (404) and the upgrade headers (400/405/426);
2. token auth (403), before anything is allocated; a valid token is reserved here, so
   of several upgrades with one token only one goes on (the rest get 403 `replayed`);
3. admission (replace the oldest client, or accept-and-close 1013 when full and rejecting,
   which releases the reservation: nobody was replaced, the token stays usable);
4. the token is consumed, then the bot is dialled (502/504; the token stays used);
5. only then is the client's 101 sent, carrying the bot's subprotocol and extensions, so
   no early client frame can be lost.

Provider endpoints (`/ws/twilio`, ...) share step 1, then follow their own order, since a
provider speaks only after its 101 (provider_connection.py).

The session timeout counts from the 101. `done` is set once the bot leg is closed and
`on_client_disconnected` has fired: a newcomer waits on it before dialling its own bot.
"""

from __future__ import annotations

import logging
import math

import attrs
import h11
import trio

from . import closing
from .admin import draining_reject
from .auth import Grant, authenticate, consume, release
from .config import AgentConfig
from .errors import BotDialError
from .frames import (
    MAX_FRAME_PAYLOAD,
    OP_CLOSE,
    OP_TEXT,
    ControlFrame,
    FrameScanner,
    Violation,
    encode_close,
    encode_frame,
    parse_close,
)
from .handshake import (
    Reject,
    Route,
    Upgrade,
    accept_headers,
    bot_request_headers,
    bot_request_target,
    decide,
    parse_bot_url,
    reason_phrase,
    refuse_early,
)
from .http1 import encode_101
from .inprocess import InprocessLeg
from .limits import REFUSAL_DETAILS, TOO_MANY_HANDSHAKES, TOO_MANY_HANDSHAKES_FROM_IP
from .metrics import CONNECTION_REFUSALS
from .passthrough import Passthrough
from .provider_connection import open_provider
from .registry import CancellableMember
from .runtime import Runtime, SessionInfo
from .session_log import SessionRecord, log_session
from .upstream import dial_bot, new_key
from .wire import Conn, close_shielded

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 16384  # bytes: an upgrade request with its headers; more is refused (431)
REFUSE_TIMEOUT = 1.0  # seconds to write a refusal (and linger) before dropping a client
LINGER_BYTES = 1 << 20  # bytes we read and drop after a refusal before closing anyway

Leg = Passthrough | InprocessLeg

#: Handshake slots free up within handshake_timeout: those refusals say when to retry.
RETRY_AFTER = {reason: ((b"retry-after", b"1"),)
               for reason in (TOO_MANY_HANDSHAKES, TOO_MANY_HANDSHAKES_FROM_IP)}


@attrs.define
class _Opened:
    leg: Leg
    info: SessionInfo
    agent: AgentConfig


class ClientConnection(CancellableMember):
    """Supervises one client connection from its first byte to its last."""

    def __init__(self, rt: Runtime, conn: Conn) -> None:
        super().__init__()
        self.rt = rt
        self.conn = conn
        self.info: SessionInfo | None = None
        # The HTTP/1.1 state: needed until the 101 or the refusal is written, then dropped
        # (an idle session should not keep h11's buffers and state for hours).
        self._h: h11.Connection | None = h11.Connection(
            h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self._responded = False
        self._agent: str | None = None
        self._leg: Leg | None = None
        self._flushed = (0, 0, 0, 0)
        self._ip = conn.peer()
        self._limited: str | None = None
        self._handshaking = False

    def _end_handshake(self) -> None:
        """This connection's upgrade request has been read (or never will be)."""
        if self._handshaking:
            self._handshaking = False
            self.rt.gate.handshake_done(self._ip)
            self.rt.metrics.handshakes_in_flight.set(self.rt.gate.handshakes_total)

    async def serve(self) -> None:
        gate = self.rt.gate
        self._limited = gate.open(self._ip)
        self._handshaking = self._limited is None
        self.rt.metrics.handshakes_in_flight.set(gate.handshakes_total)
        try:
            await self._serve()
        except Exception:
            log.exception("connection from %s failed", self.conn.peer())
        finally:
            self._end_handshake()
            gate.close(self._ip)
            if self._agent is not None:
                self.rt.registry.release(self, self._agent)
            await close_shielded(self.conn)
            self.done.set()

    async def _serve(self) -> None:
        opened: _Opened | None = None
        timed_out = False
        try:
            with self.scope:
                opened = await self._open()
                if opened is None:
                    return
                self.info = opened.info
                self._leg = opened.leg
                opened.info.connected_at = trio.current_time()
                self.rt.registry.connected(self, opened.agent.name)
                await self.rt.events.fire("on_client_connected", opened.info)
                self.rt.metrics.session_started(opened.agent.name)
                timeout = opened.agent.limits.session_timeout
                with trio.move_on_after(
                    timeout if timeout is not None else math.inf
                ) as tscope:
                    await opened.leg.run()
                timed_out = tscope.cancelled_caught
        finally:
            # Also when a scope outside ours cancelled us (the embedding app stopping
            # serve): teardown is shielded and bounded, so it always runs to the end.
            with trio.CancelScope(shield=True):
                if opened is not None:
                    await self._finish(opened, timed_out)
                elif self.scope.cancelled_caught and not self._responded:
                    await self._refuse(Reject(503, self.cancel_reason or "cancelled",
                                              "The gateway ended this request before it was "
                                              f"accepted ({self.cancel_reason})."))

    async def _finish(self, opened: _Opened, timed_out: bool) -> None:
        """Close both legs as the outcome says, then count and tell."""
        outcome = closing.session_outcome(self.cancel_reason, timed_out, opened.leg.outcome)
        opened.info.end_reason = outcome.reason
        if outcome is closing.TIMEOUT:
            await self.rt.events.fire("on_session_timeout", opened.info)
        await opened.leg.close(outcome)
        self._log_end(opened, outcome)
        self.flush_counts()
        self.rt.metrics.session_ended(opened.agent.name, outcome.reason)
        await self.rt.events.fire("on_client_disconnected", opened.info)

    def _log_end(self, opened: _Opened, outcome: closing.Outcome) -> None:
        info, leg = opened.info, opened.leg
        code, reason = _ending_close(leg, outcome)
        c2b_m, c2b_b, b2c_m, b2c_b = self.traffic()
        started = info.connected_at if info.connected_at is not None else trio.current_time()
        log_session(SessionRecord(
            id=info.id, agent=info.agent, organization=info.organization,
            client_addr=info.client_addr, duration=trio.current_time() - started,
            messages_client_to_bot=c2b_m, bytes_client_to_bot=c2b_b,
            messages_bot_to_client=b2c_m, bytes_bot_to_client=b2c_b,
            end_reason=outcome.reason, code=code, reason=reason))

    def traffic(self) -> tuple[int, int, int, int]:
        """Messages and payload bytes relayed so far: client→bot, then bot→client."""
        return self._leg.relayed() if self._leg is not None else (0, 0, 0, 0)

    def flush_counts(self) -> None:
        """Add what was relayed since the last flush to the metrics (a batch, not a message)."""
        leg = self._leg
        if leg is None:
            return
        counts = leg.relayed()
        last = self._flushed
        if counts != last:
            self.rt.metrics.relayed("client_to_bot", counts[0] - last[0], counts[1] - last[1])
            self.rt.metrics.relayed("bot_to_client", counts[2] - last[2], counts[3] - last[3])
            self._flushed = counts

    # -- before the upgrade ----------------------------------------------------------------

    async def _read_request(self) -> tuple[h11.Request, bytes] | Reject | None:
        """The client's request head and any bytes after it; None when it left."""
        buf = bytearray(4096)
        request: h11.Request | None = None
        h = self._h
        assert h is not None  # only dropped once a response has been written
        with trio.move_on_after(self.rt.config.server.handshake_timeout):
            while True:
                try:
                    event = h.next_event()
                except h11.RemoteProtocolError as exc:
                    status = exc.error_status_hint
                    return Reject(status,
                                  "headers_too_large" if status == 431 else "bad_request",
                                  f"The upgrade request is not valid HTTP/1.1: {exc}")
                if event is h11.NEED_DATA:
                    n = await self.conn.receive_into(buf)
                    h.receive_data(bytes(buf[:n]))
                elif isinstance(event, h11.Request):
                    # h11 bounds only an *incomplete* head; a whole head that arrived in
                    # one read is measured here, so the limit holds however it was sent.
                    size = len(event.target) + sum(
                        len(k) + len(v) + 4 for k, v in event.headers.raw_items())
                    if size > MAX_REQUEST_HEAD:
                        return Reject(431, "headers_too_large",
                                      f"The upgrade request head exceeds {MAX_REQUEST_HEAD} "
                                      "bytes.")
                    request = event
                elif isinstance(event, h11.Data):
                    return Reject(400, "unexpected_body",
                                  "A WebSocket upgrade carries no request body.")
                elif event is h11.PAUSED or isinstance(event, h11.EndOfMessage):
                    if request is not None and (
                        event is h11.PAUSED or h.their_state is h11.MIGHT_SWITCH_PROTOCOL  # type: ignore[attr-defined]
                    ):
                        return request, bytes(h.trailing_data[0])
                    if request is not None:
                        return request, b""
                elif isinstance(event, h11.ConnectionClosed):
                    return None
        return Reject(408, "handshake_timeout",
                      "The upgrade request did not arrive within "
                      f"{self.rt.config.server.handshake_timeout} s.")

    async def _refuse(self, reject: Reject) -> None:
        """Answer with a plain HTTP error (no 101, no close frame) and close."""
        if self._responded:
            return
        self._responded = True
        h, self._h = self._h, None
        assert h is not None
        body = reject.body()
        # One Connection header: we close after a refusal, and a 426 also names the
        # Upgrade header it sends (RFC 9110 §7.8), so "Connection: Upgrade, close".
        options = [v for k, v in reject.headers if k.lower() == b"connection"]
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b", ".join([*options, b"close"])),
            *((k, v) for k, v in reject.headers if k.lower() != b"connection"),
        ]
        try:
            data = h.send(h11.Response(status_code=reject.status, headers=headers,
                                       reason=reason_phrase(reject.status).encode()))
            data = (data or b"") + (h.send(h11.Data(data=body)) or b"")
            data += h.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            # h11 is in an error state (malformed request): write the response by hand.
            data = (f"HTTP/1.1 {reject.status} {reason_phrase(reject.status)}\r\n"
                    "content-type: application/json\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body
        with trio.move_on_after(REFUSE_TIMEOUT, shield=True):
            try:
                await self.conn.send_all(data)
            except Exception:
                return
            # Lingering close (RFC 9112 §9.6): stop writing, then read what the client had
            # already sent, so closing does not reset the connection and lose our answer.
            self.conn.shutdown_write()
            buf = bytearray(16384)
            read = 0
            while read < LINGER_BYTES and (n := await self.conn.receive_into(buf)):
                read += n

    async def _accept(self, subprotocol: bytes | None, extensions: tuple[bytes, ...],
                      key: bytes) -> bool:
        self._responded = True
        self._h = None  # the request was whole and valid; the 101 is written by hand (http1.py)
        data = encode_101(accept_headers(key, subprotocol, extensions))
        try:
            await self.conn.send_all(data, self._stall())
        except Exception:
            return False
        return True

    def _stall(self) -> float:
        return self.rt.config.server.defaults.stall_timeout

    async def _open(self) -> _Opened | None:
        rt = self.rt
        server = rt.config.server
        refusal = refuse_early(shutting_down=rt.shutting_down,
                               over_capacity=rt.open_connections > server.max_connections)
        if refusal is None and self._limited is not None:
            refusal = Reject(503, self._limited, REFUSAL_DETAILS[self._limited],
                             RETRY_AFTER.get(self._limited, ()))
        if refusal is not None:  # answered before reading anything
            if refusal.code in CONNECTION_REFUSALS:  # a limit (not shutting down)
                rt.metrics.connection_refused(refusal.code)
            await self._refuse(refusal)
            return None
        got = await self._read_request()
        self._end_handshake()
        if got is None:
            return None
        if isinstance(got, Reject):
            await self._refuse(got)
            return None
        request, early = got
        # 1. routing, upgrade headers, Origin
        decision = decide(request.method, request.http_version, request.target,
                          list(request.headers), organization=server.organization,
                          agents=rt.config.agents, cors_origins=server.cors_origins,
                          providers=True)
        if isinstance(decision, Reject):
            await self._refuse(decision)
            return None
        r, upgrade = decision.route, decision.upgrade
        if r.provider is not None:  # /ws/{provider}: its own order (provider_connection.py)
            opened = await open_provider(self, r, upgrade, list(request.headers), early)
            return _Opened(*opened) if opened is not None else None
        agent = rt.config.agents[r.agent]
        if rt.operations.is_draining(agent.name):  # before the token: it stays usable
            await self._refuse(draining_reject(agent.name))
            return None
        # 2. token (verified and reserved: burned only once every check has passed)
        grant = await authenticate(rt, agent, r, list(request.headers))
        if isinstance(grant, Reject):
            await self._refuse(grant)
            return None
        # 3. admission
        if not await rt.registry.admit(self, agent):
            await release(rt, grant)
            await self._accept_and_close(upgrade.key, closing.TRY_AGAIN_LATER)
            return None
        self._agent = agent.name
        # 4. consume the token, then dial the bot
        consumed = await consume(rt, agent, grant)
        if isinstance(consumed, Reject):
            await self._refuse(consumed)
            return None
        info = SessionInfo(id=consumed.session_id, agent=agent.name,
                           organization=server.organization, client_addr=self.conn.peer())
        if agent.bot.startswith("python:"):
            leg: Leg = InprocessLeg(
                self.conn, rt.bots[agent.name], agent.limits, initial=early,
                session_kwargs=dict(id=info.id, agent=agent.name,
                                    organization=server.organization, body=consumed.body_value,
                                    client_addr=info.client_addr, query=r.bot_query))
            if not await self._accept(None, (), upgrade.key):
                return None
            return _Opened(leg, info, agent)
        try:
            passthrough = await self._dial(agent, r, upgrade, consumed, early)
        except _ClientLeft:
            return None
        except BotDialError as exc:
            rt.dial_failures.report(agent.name, agent.bot, exc, info.client_addr)
            await self._refuse(Reject(exc.status, "bad_gateway" if exc.status == 502
                                      else "gateway_timeout", exc.detail))
            return None
        return _Opened(passthrough, info, agent)

    async def _dial(self, agent: AgentConfig, r: Route, upgrade: Upgrade, grant: Grant,
                    early: bytes, *, client_accepted: bool = False) -> Passthrough:
        """Open the bot leg; then the client's 101 (unless `client_accepted` already)."""
        rt = self.rt
        target = parse_bot_url(agent.bot)
        key = new_key()
        extra_query, extra_headers = grant.bot_extras(agent)
        headers = bot_request_headers(
            target, key, upgrade, session_id=grant.session_id, agent=agent.name,
            organization=rt.config.server.organization, client_addr=self.conn.peer(),
            extra=extra_headers)
        started = trio.current_time()
        bot_conn, accepted, bot_early = await dial_bot(
            target, bot_request_target(target, r.bot_query, extra_query), headers, key,
            connect_timeout=agent.limits.bot_connect_timeout, ssl_context=rt.bot_ssl)
        rt.metrics.bot_dial(agent.name, trio.current_time() - started)
        if client_accepted and (accepted.subprotocol or accepted.extensions):
            # The client's 101 is gone, with neither: the bot cannot pick one now.
            with trio.CancelScope(shield=True):
                await bot_conn.aclose()
            raise BotDialError(502, "the bot chose a subprotocol or extension nobody offered")
        passthrough = Passthrough(self.conn, bot_conn, agent.limits,
                                  client_initial=early, bot_initial=bot_early)
        try:
            first = grant.first_frame(agent)
            if first is not None:
                with trio.fail_after(agent.limits.stall_timeout):
                    await passthrough.send_first(encode_frame(OP_TEXT, first, mask=True))
            if not client_accepted and not await self._accept(
                    accepted.subprotocol, accepted.extensions, upgrade.key):
                raise _ClientLeft
        except BaseException:
            with trio.CancelScope(shield=True):
                await bot_conn.aclose()
            raise
        return passthrough

    async def _accept_and_close(self, key: bytes, code: tuple[int, str]) -> None:
        """Accept the upgrade and close at once with `code`, so a browser can read why."""
        if not await self._accept(None, (), key):
            return
        with trio.move_on_after(REFUSE_TIMEOUT, shield=True):
            try:
                await self.conn.send_all(encode_close(code[0], code[1], mask=False))
            except Exception:
                return
            # Wait for the client's answering close, then close TCP first (RFC 6455 §7.1.1).
            scanner = FrameScanner(masked=True, max_message_size=MAX_FRAME_PAYLOAD)
            buf = bytearray(1024)
            while n := await self.conn.receive_into(buf):
                for piece in scanner.feed(memoryview(buf)[:n]):
                    if isinstance(piece, Violation) or (
                        isinstance(piece, ControlFrame) and piece.opcode == OP_CLOSE
                    ):
                        return


def _ending_close(leg: Leg, outcome: closing.Outcome) -> tuple[int | None, str]:
    """The close that ended the session: the closing peer's own frame when it sent one
    (1005 for an empty one), else the gateway's; (None, "") when a peer just vanished."""
    if isinstance(leg, Passthrough):
        side = {"client_closed": leg.client, "bot_closed": leg.bot}.get(outcome.reason)
        if side is not None and side.close_from is not None:
            try:
                code, reason = parse_close(side.close_from.payload)
            except ValueError:
                return None, ""
            return (code if code is not None else 1005), reason
    if isinstance(leg, InprocessLeg):
        return leg.ending_close(outcome)
    sent = outcome.to_client or outcome.to_bot
    return sent if sent is not None else (None, "")


class _ClientLeft(Exception):
    """The client went away while we answered its upgrade."""

