"""The trio client's session: /start, one WebSocket at a time, and reconnection.

``connect()`` calls /start, opens the WebSocket with the token and yields a ``Session``.
One background task (``Session._run``) owns the connection: it hands every message it
receives to ``receive()``, in order, and when the connection closes it decides:

* a close in ``Reconnect.codes`` (1001, 1006, 1011, 1014 by default) is a *loss*: the
  caller is told (``ConnectionLost``), then, after a jittered backoff, the task calls
  /start again for a fresh token (a one-time token is never reused) and connects with it
  (``AttemptFailed`` per failed try, ``Reconnected`` on success);
* any other close (1000, 4000 session timeout, 4001 replaced, 4002 ended by operator,
  1008, 1009, 1013...) ends the session with ``SessionClosed(code, reason)``;
* tries running out, ``give_up_after`` passing, or a final refusal (401, 403, 404...)
  ends it with ``ReconnectFailed`` (a ``SessionClosed`` carrying the loss's code).

During a reconnect ``receive()`` waits for the next message of the new connection (every
message of the lost one was delivered first), and ``send()`` waits until the new
connection is up and sends there. Once the session has ended, both raise the ending
exception, every time. The first connection is not retried: its failure is raised by
``connect()`` itself (``StartError`` or ``ConnectError``).

A session must be read: like any WebSocket client, one whose incoming messages are not
consumed cannot see its connection close (trio-websocket stops reading the socket).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal, NoReturn, cast

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from relay.client.closewatch import TappedStream
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
from relay.client.policy import Reconnect
from relay.client.start import (
    StartAnswer,
    host_header,
    network_error,
    open_stream,
    post_start,
    split_url,
    start_request,
)

__all__ = ["CLOSE_TIMEOUT", "CONNECT_TIMEOUT", "Session", "TokenIn", "connect"]

logger = logging.getLogger("relay.client")

CONNECT_TIMEOUT = 10.0  # seconds for /start, and again for the TCP/TLS connect + upgrade
CLOSE_TIMEOUT = 2.0  # seconds for our closing handshake: a silent gateway cannot hold us
MAX_MESSAGE_SIZE = 1_048_576  # bytes: the gateway's default max_message_size
TokenIn = Literal["header", "query", "path"]
_TOKEN_IN = ("header", "query", "path")

EventCallback = Callable[[Event], Any]
OnUp = Callable[[WebSocketConnection, StartAnswer], Awaitable[None]]


@asynccontextmanager
async def connect(
    start_url: str,
    public_key: str,
    *,
    body: Any = None,
    token_in: TokenIn = "header",
    reconnect: Reconnect | None = None,
    on_event: EventCallback | None = None,
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    close_timeout: float = CLOSE_TIMEOUT,
    max_message_size: int = MAX_MESSAGE_SIZE,
) -> AsyncIterator[Session]:
    """A relay session for the agent whose /start URL is ``start_url``.

    ``body`` (any JSON value) is sent with every /start, so each new bot gets it.
    ``token_in`` puts the token in the ``Authorization: Bearer`` header (default), the
    ``?token=`` query or the last path segment. ``on_event`` (a function or coroutine
    function) hears ``ConnectionLost`` / ``AttemptFailed`` / ``Reconnected``; it runs in the
    session's own task, so keep it short and do not await ``send``/``receive`` in it.
    ``ssl_context`` is used for https:// and wss:// (default: the system's trust).
    Leaving the block closes the session with 1000.
    """
    split_url(start_url, ("http", "https"))  # ValueError now, not at the first I/O
    request = start_request(public_key, body)
    if token_in not in _TOKEN_IN:
        raise ValueError(f"token_in must be one of {_TOKEN_IN}, got {token_in!r}")
    for name, value in (("connect_timeout", connect_timeout), ("close_timeout", close_timeout)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if isinstance(max_message_size, bool) or not isinstance(max_message_size, int) \
            or max_message_size < 1:
        raise ValueError(f"max_message_size must be an integer >= 1, got {max_message_size!r}")
    session = Session(start_url, public_key, request, token_in=token_in,
                      policy=reconnect or Reconnect(), on_event=on_event,
                      ssl_context=ssl_context, connect_timeout=connect_timeout,
                      close_timeout=close_timeout, max_message_size=max_message_size)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(session._run)
            try:
                yield session
            finally:
                await session.close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _raise_single(group)


class Session:
    """One caller's conversation with an agent, across reconnections (see module doc)."""

    def __init__(self, start_url: str, public_key: str, request: bytes, *, token_in: TokenIn,
                 policy: Reconnect, on_event: EventCallback | None,
                 ssl_context: ssl.SSLContext | None, connect_timeout: float,
                 close_timeout: float, max_message_size: int) -> None:
        self._start_url = start_url
        self._public_key = public_key
        self._request = request  # the /start request body, the same for every try
        self._token_in = token_in
        self._policy = policy
        self._on_event = on_event
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._max_message_size = max_message_size
        self._incoming_send, self._incoming = trio.open_memory_channel[str | bytes](0)
        self._ws: WebSocketConnection | None = None  # None while (re)connecting
        self._ended: SessionClosed | None = None
        self._changed = trio.Event()  # set (and replaced) whenever _ws or _ended changes
        self._interruptible: trio.CancelScope | None = None  # a wait close() may cut short
        self._caller_closing: trio.Event | None = None  # set once close() is done closing
        self._sent = 0
        self._received = 0
        #: the gateway's session id of the current connection (None for auth-none agents
        #: behind an old gateway, or before the first connection)
        self.session_id: str | None = None
        #: the token the current connection used: spent (one-time) once it is connected
        self.token: str | None = None
        #: successful reconnections so far
        self.reconnects = 0

    # -- the caller's side ---------------------------------------------------------------

    async def receive(self) -> str | bytes:
        """The next message (text as str, binary as bytes); waits across a reconnect.

        Raises ``SessionClosed`` (or ``ReconnectFailed``) once the session has ended.
        """
        try:
            return await self._incoming.receive()
        except trio.EndOfChannel:
            self._raise_ended()

    async def send(self, message: str | bytes) -> None:
        """Send one message; during a reconnect, wait for the new connection and send there.

        Raises ``SessionClosed`` (or ``ReconnectFailed``) once the session has ended.
        """
        if not isinstance(message, str | bytes | bytearray):
            raise TypeError(f"a message is str or bytes, not {type(message).__name__}")
        while True:
            if self._ended is not None:
                self._raise_ended()
            ws = self._ws
            if ws is None:
                await self._changed.wait()
                continue
            try:
                await ws.send_message(message)
            except ConnectionClosed:
                # Not sent: the connection is going. Wait for the task's verdict.
                while self._ws is ws and self._ended is None:
                    await self._changed.wait()
                continue
            self._sent += 1
            return

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """End the session with ``code`` and ``reason`` (the bot gets them); idempotent."""
        if code != 1000 and not 3000 <= code <= 4999:
            raise ValueError(f"a client may close with 1000 or 3000-4999, not {code!r}")
        if len(reason.encode("utf-8")) > 123:
            raise ValueError("a close reason is at most 123 bytes of UTF-8")
        if self._ended is not None:
            return
        ws = self._ws
        done = self._caller_closing = trio.Event()
        self._finish(SessionClosed(code, reason, detail=f"closed by this client: {code} "
                                                       f"{reason!r}"))
        try:
            if ws is None:
                if self._interruptible is not None:
                    self._interruptible.cancel()  # a backoff wait or a try in progress
            else:
                with trio.move_on_after(self._close_timeout, shield=True):
                    await ws.aclose(code, reason or None)
        finally:
            done.set()

    # -- the background task -------------------------------------------------------------

    async def _run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False

        async def up(ws: WebSocketConnection, answer: StartAnswer) -> None:
            nonlocal started
            self._ws, self.session_id, self.token = ws, answer.session_id, answer.token
            self._sent = self._received = 0
            self._notify()
            if not started:
                started = True
                task_status.started()

        deadline = trio.current_time() + self._connect_timeout
        closed = await self._link(await self._start(deadline), up, math.inf)
        while self._ended is None:
            code, reason = closed
            if not self._policy.reconnects_on(code):
                self._finish(SessionClosed(code, reason))
                return
            next_closed = await self._replace(code, reason, up)
            if next_closed is None:
                return
            closed = next_closed

    async def _replace(self, code: int, reason: str, up: OnUp) -> tuple[int, str] | None:
        """After a loss: try as the policy says; the next connection's close, or None."""
        lost = ConnectionLost(code, reason, self.session_id, self._sent, self._received)
        self._ws = None
        self._notify()
        await self._emit(lost)
        policy = self._policy
        if policy.max_reconnects is not None and self.reconnects >= policy.max_reconnects:
            self._give_up(lost, 0, f"max_reconnects ({policy.max_reconnects}) reached", None)
            return None
        give_up_at = trio.current_time() + policy.give_up_after
        error: StartError | ConnectError | None = None
        attempt = 0
        previous = self.session_id

        async def reconnected(ws: WebSocketConnection, answer: StartAnswer) -> None:
            self.reconnects += 1
            await up(ws, answer)
            await self._emit(Reconnected(attempt, answer.session_id, previous))

        delay = policy.delay(1, random.random())
        while True:
            if attempt >= policy.attempts:
                why = f"no more attempts ({policy.attempts})"
                break
            if trio.current_time() + delay >= give_up_at:
                why = f"give_up_after ({policy.give_up_after} s) passed"
                break
            attempt += 1
            with self._phase(math.inf):
                await trio.sleep(delay)
            if self._ended is not None:
                return None
            try:
                answer = await self._start(give_up_at)
                return await self._link(answer, reconnected, give_up_at)
            except (StartError, ConnectError) as exc:
                error = exc
            if self._ended is not None:
                return None
            delay = policy.delay(attempt + 1, random.random())
            retrying = (error.retryable and attempt < policy.attempts
                        and trio.current_time() + delay < give_up_at)
            await self._emit(AttemptFailed(attempt, error, retrying=retrying))
            if not error.retryable:
                why = "refused"
                break
        if self._ended is None:
            self._give_up(lost, attempt, why, error)
        return None

    def _give_up(self, lost: ConnectionLost, attempts: int, why: str,
                 error: ClientError | None) -> None:
        self._finish(ReconnectFailed(lost.code, lost.reason, attempts=attempts, why=why,
                                     last_error=error))

    async def _start(self, give_up_at: float) -> StartAnswer:
        with self._phase(give_up_at, self._connect_timeout):
            return await post_start(self._start_url, self._public_key, self._request,
                                     ssl_context=self._ssl_context)
        raise StartError(None, "timeout", self._timeout_detail("/start answered"))

    async def _link(self, answer: StartAnswer, up: OnUp, give_up_at: float) -> tuple[int, str]:
        """Open the WebSocket for ``answer`` and serve it; how it closed (code, reason).

        Raises ``ConnectError`` when it cannot be opened.
        """
        url, headers = _ws_target(answer, self._token_in)
        host, port, target, tls = split_url(url, ("ws", "wss"))
        ctx = (self._ssl_context or ssl.create_default_context()) if tls else None
        stream: trio.abc.Stream | None = None
        with self._phase(give_up_at, self._connect_timeout):
            try:
                stream = await open_stream(host, port, ctx)
            except (OSError, trio.BrokenResourceError) as exc:
                code, why = network_error(exc)
                raise ConnectError(None, code, f"cannot reach {host}:{port}: {why}") from exc
        if stream is None:
            raise ConnectError(None, "timeout", self._timeout_detail("connected"))
        tapped = TappedStream(stream)
        try:
            async with trio.open_nursery() as nursery:
                with self._phase(give_up_at, self._connect_timeout) as phase:
                    ws = await wrap_client_stream(
                        nursery, cast("trio.SocketStream", tapped),
                        host_header(host, port, tls), target, extra_headers=headers,
                        max_message_size=self._max_message_size)
                if phase.cancelled_caught:
                    raise ConnectError(None, "timeout",
                                       self._timeout_detail("the upgrade was answered"))
                try:
                    await up(ws, answer)
                    return await self._pump(ws, tapped)
                finally:
                    with trio.move_on_after(self._close_timeout, shield=True):
                        if self._caller_closing is not None:
                            await self._caller_closing.wait()  # close() closes it gracefully
                        else:
                            await ws.aclose()  # ours; a no-op once either side closed
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            leaf = _single(group)
            if isinstance(leaf, ConnectionRejected):
                raise _rejected(leaf) from None
            _raise_single(group)
        finally:
            await trio.aclose_forcefully(tapped)

    async def _pump(self, ws: WebSocketConnection, tapped: TappedStream) -> tuple[int, str]:
        try:
            while True:
                message = await ws.get_message()
                self._received += 1
                await self._incoming_send.send(message)
        except ConnectionClosed as exc:
            wire = tapped.watcher.close  # what the gateway sent, even a code wsproto refuses
            if wire is not None:
                return wire
            local = exc.reason
            return (local.code, local.reason or "") if local is not None else (1006, "")
        except trio.ClosedResourceError:  # close() ended the session meanwhile
            return 1000, ""

    # -- helpers -------------------------------------------------------------------------

    @contextmanager
    def _phase(self, give_up_at: float, timeout: float = math.inf) -> Iterator[trio.CancelScope]:
        """A wait bounded by ``timeout`` and ``give_up_at``, that close() may cut short."""
        with trio.CancelScope(deadline=min(give_up_at, trio.current_time() + timeout)) as scope:
            self._interruptible = scope
            try:
                yield scope
            finally:
                self._interruptible = None

    def _timeout_detail(self, what: str) -> str:
        if self._ended is not None:
            return "the session was closed"
        return f"not {what} in time ({self._connect_timeout} s, or give_up_after)"

    def _finish(self, ending: SessionClosed) -> None:
        if self._ended is None:
            self._ended = ending
        self._ws = None
        self._incoming_send.close()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _raise_ended(self) -> NoReturn:
        assert self._ended is not None
        raise self._ended.with_traceback(None)

    async def _emit(self, event: Event) -> None:
        if self._on_event is None:
            return
        try:
            result = self._on_event(event)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("relay.client on_event callback failed on %r", event)


def _ws_target(answer: StartAnswer, token_in: TokenIn) -> tuple[str, list[tuple[bytes, bytes]]]:
    """The URL to open and the extra headers, with the token where ``token_in`` says."""
    token = answer.token
    if token is None:
        return answer.ws_url, []
    if token_in == "header":
        return answer.ws_url, [(b"authorization", f"Bearer {token}".encode())]
    base, sep, query = answer.ws_url.partition("?")
    if token_in == "path":
        return f"{base.rstrip('/')}/{token}{sep}{query}", []
    return f"{base}?{query + '&' if query else ''}token={token}", []


def _rejected(exc: ConnectionRejected) -> ConnectError:
    """The gateway's refusal as a ConnectError, with its JSON code when it sent one."""
    code, detail = f"http_{exc.status_code}", ""
    try:
        value = json.loads(exc.body or b"")
    except ValueError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("code"), str):
        code = value["code"]
        detail = str(value.get("detail") or value.get("error") or "")
    return ConnectError(exc.status_code, code, detail or "the upgrade was refused")


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception a group stands for (ignoring Cancelled beside it), or None."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    if len(leaves) == 1:
        return leaves[0]
    others = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    return others[0] if len(others) == 1 else None


def _raise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Re-raise the one exception a nursery wrapped (the caller's own), or the group."""
    leaf = _single(group)
    if leaf is None:
        raise group
    context = leaf.__context__
    try:
        raise leaf
    finally:
        leaf.__context__ = context
        del leaf, context
