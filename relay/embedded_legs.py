"""The embedding path's running sessions (``embedded.py``): what relays once accepted.

``UpstreamRelay`` pumps whole messages both ways between the client and an upstream
bot (two tasks, plus keepalive pings to both); ``InprocessAdapter`` runs an in-process
bot (``inprocess.BotHost``) over the client's trio-websocket connection. Both are a
``Leg``: run, close as the outcome says, count what they relayed.
"""

from __future__ import annotations

import math
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.events import BytesMessage, Event, TextMessage

from . import closing
from .closing import CloseCode, Outcome
from .config import AgentConfig
from .embedded_dial import BotLeg
from .embedded_ws import close_outcome, close_ws, keepalive, message_size, too_big
from .inprocess import BotFunction, BotHost, ClientDisconnected
from .runtime import Runtime, SessionInfo

__all__ = ["InprocessAdapter", "Leg", "UpstreamRelay"]


class Leg:
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


class UpstreamRelay(Leg):
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
                outcome, passed = close_outcome(exc.reason, client=from_client)
                if from_client:
                    self.pass_to_bot = passed
                else:
                    self.pass_to_client = passed
                self.end(outcome)
                return
            if from_client and too_big(message, limit):
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
            counts[1] += message_size(message)

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


class InprocessAdapter(BotHost, Leg):
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
            counts[1] += message_size(data)
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
                outcome, passed = close_outcome(exc.reason, client=True)
                self.client_close = passed
                if exc.reason.code in (1002, 1007):
                    outcome = closing.client_violation(int(exc.reason.code))
                self._client_gone(outcome)
                return
            if too_big(message, limit):
                self.end(closing.client_violation(1009, f"message exceeds {limit} bytes"))
                return
            counts = self.counts["client_to_bot"]
            counts[0] += 1
            counts[1] += message_size(message)
            try:
                await self.inbox_send.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def close(self, outcome: Outcome) -> None:
        if not self._client_left and outcome.to_client is not None:
            await close_ws(self.ws, outcome.to_client, self.limits.close_timeout)

    flush_counts = UpstreamRelay.flush_counts
    traffic = UpstreamRelay.traffic
