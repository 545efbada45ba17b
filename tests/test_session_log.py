"""One log line per ended session (logger ``relay.sessions``), text and JSON.

Real gateways on loopback (own listener and `Gateway.handle`), real bots; the log is
read from the `logging` module as an operator would route it. A hostile client controls
its close reason: it must stay inside one quoted value of one line.
"""

from __future__ import annotations

import io
import json
import logging
import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from support import bot_server, http, make_config, open_client, running
from test_admin import ADMIN, sessions
from test_embedded import embedded
from test_embedded import open_websocket_url as embedded_client
from trio_websocket import ConnectionClosed

from relay.session_log import (
    SESSION_LOGGER,
    JsonFormatter,
    SessionRecord,
    closed_by,
    render_json,
    render_text,
)

HOSTILE = 'bye\nsession ended id=forged agent=evil "x=1\r\\ \u2028'
FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse_text(line: str) -> dict[str, object]:
    """A text session line back into its values (quoted values are JSON strings)."""
    assert line.startswith("session ended ")
    fields: dict[str, object] = {}
    rest = line.removeprefix("session ended ")
    pos = 0
    while pos < len(rest):
        match = FIELD.match(rest, pos)
        assert match is not None, rest[pos:]
        name, raw = match.groups()
        assert name not in fields, f"field {name} twice: {line!r}"
        fields[name] = json.loads(raw) if raw.startswith('"') else raw
        pos = match.end() + 1
    return fields


@contextmanager
def captured(formatter: logging.Formatter | None = None) -> Iterator[io.StringIO]:
    """What an operator's handler on ``relay.sessions`` writes."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    if formatter is not None:
        handler.setFormatter(formatter)
    logger = logging.getLogger(SESSION_LOGGER)
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


class RecordFields(TypedDict, total=False):
    """SessionRecord's fields, each optional: what record() may override."""

    id: str
    agent: str
    organization: str
    client_addr: str
    duration: float
    messages_client_to_bot: int
    bytes_client_to_bot: int
    messages_bot_to_client: int
    bytes_bot_to_client: int
    end_reason: str
    code: int | None
    reason: str


def record(**overrides: Unpack[RecordFields]) -> SessionRecord:
    """A typical record with ``overrides`` replacing fields by name (attrs.evolve)."""
    typical = SessionRecord(
        id="s1", agent="a", organization="local", client_addr="127.0.0.1", duration=1.5,
        messages_client_to_bot=1, bytes_client_to_bot=2, messages_bot_to_client=3,
        bytes_bot_to_client=4, end_reason="client_closed", code=4321, reason="bye")
    return attrs.evolve(typical, **overrides)


# -- sans-IO -----------------------------------------------------------------------------------


def test_text_line_has_every_field_once_in_order() -> None:
    line = render_text(record())
    assert line == (
        "session ended id=s1 agent=a organization=local client=127.0.0.1 duration=1.5 "
        "messages_client_to_bot=1 bytes_client_to_bot=2 messages_bot_to_client=3 "
        "bytes_bot_to_client=4 closed_by=client end=client_closed code=4321 reason=bye")


_text_fields = st.text(st.characters(codec="utf-8"), max_size=20)


@given(st.builds(SessionRecord, id=_text_fields, agent=_text_fields, organization=_text_fields,
                 client_addr=_text_fields,
                 duration=st.floats(min_value=0, max_value=1e7, allow_nan=False),
                 messages_client_to_bot=st.integers(0, 2**40),
                 bytes_client_to_bot=st.integers(0, 2**50),
                 messages_bot_to_client=st.integers(0, 2**40),
                 bytes_bot_to_client=st.integers(0, 2**50), end_reason=_text_fields,
                 code=st.none() | st.integers(1000, 4999), reason=_text_fields))
def test_the_text_line_is_exactly_the_fields_in_order(r: SessionRecord) -> None:
    """render_text is written out by hand for speed: it must say what fields() says."""
    parsed = parse_text(render_text(r))
    expected = {("client" if k == "client_addr" else k): v for k, v in r.fields().items()}
    assert list(parsed) == list(expected)
    for name, value in expected.items():
        assert parsed[name] == ("-" if value is None else
                                value if isinstance(value, str) else str(value)), name


@pytest.mark.parametrize("field", ["reason", "client_addr", "id"])
def test_a_hostile_value_cannot_forge_a_line_or_a_field(
        field: Literal["reason", "client_addr", "id"]) -> None:
    hostile: RecordFields = {}
    hostile[field] = HOSTILE
    line = render_text(record(**hostile))
    assert "\n" not in line and "\r" not in line and "\u2028" not in line
    assert line.isascii()
    parsed = parse_text(line)
    name = "client" if field == "client_addr" else field
    assert parsed[name] == HOSTILE  # whole, inside its one quoted value
    assert parsed["agent"] == "a"  # the forged agent=evil stayed inside the value
    assert render_json(record(reason=HOSTILE)).count("\n") == 0
    assert json.loads(render_json(record(reason=HOSTILE)))["reason"] == HOSTILE


def test_no_close_code_and_empty_reason_are_written_plainly() -> None:
    parsed = parse_text(render_text(record(code=None, reason="", end_reason="client_gone")))
    assert (parsed["code"], parsed["reason"], parsed["closed_by"]) == ("-", "", "client")
    assert json.loads(render_json(record(code=None)))["code"] is None


def test_who_closed() -> None:
    assert [closed_by(r) for r in ("client_closed", "client_gone", "bot_closed", "bot_gone",
                                   "bot_error", "timeout", "operator", "replaced",
                                   "client_too_big", "bot_stalled", "shutdown")] == [
        "client", "client", "bot", "bot", "bot", "gateway", "gateway", "gateway",
        "gateway", "gateway", "gateway"]


def test_json_formatter_writes_other_records_as_json_too() -> None:
    logger = logging.getLogger("relay.test_session_log")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    try:
        logger.warning("a message\nwith a newline from %s", "somewhere")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "a message\nwith a newline from somewhere"
    assert (first["level"], first["logger"]) == ("warning", "relay.test_session_log")
    assert "ValueError: boom" in second["exception"]


# -- real sessions -----------------------------------------------------------------------------


async def test_own_listener_logs_a_client_close_with_its_hostile_reason_on_one_line() -> None:
    async with bot_server() as bot, running(make_config(bot.url)) as gw:
        with captured() as out:
            async with open_client(gw.url()) as ws:
                await ws.send_message("hello")
                assert await ws.get_message() == "hello"
                await ws.aclose(4321, HOSTILE)
            with trio.fail_after(30):
                await bot.closed.wait()
            await gw.gateway.shutdown()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines
    fields = parse_text(lines[0])
    assert fields["agent"] == "a" and fields["organization"] == "local"
    assert fields["client"] == "127.0.0.1"
    assert (fields["closed_by"], fields["end"], fields["code"]) == (
        "client", "client_closed", "4321")
    assert fields["reason"] == HOSTILE
    assert (fields["messages_client_to_bot"], fields["messages_bot_to_client"]) == ("1", "1")
    assert (fields["bytes_client_to_bot"], fields["bytes_bot_to_client"]) == ("5", "5")
    assert float(str(fields["duration"])) >= 0
    assert re.fullmatch(r"[0-9a-f-]{36}", str(fields["id"]))


async def test_an_operator_end_is_logged_as_the_gateway_closing_with_4002() -> None:
    with captured(JsonFormatter()) as out:
        async with running(make_config(server={"admin_keys": [ADMIN]})) as gw:
            async with open_client(gw.url()) as ws:
                (s,) = await sessions(gw.api_port)
                status, _, _ = await http("127.0.0.1", gw.api_port, "DELETE",
                                          f"/v1/admin/sessions/{s['id']}",
                                          [("authorization", f"Bearer {ADMIN}")])
                assert status == 204
                with trio.fail_after(30), pytest.raises(ConnectionClosed):
                    await ws.get_message()
            await gw.gateway.shutdown()
    (line,) = out.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["event"] == "session_ended" and entry["logger"] == SESSION_LOGGER
    assert (entry["id"], entry["closed_by"], entry["end"], entry["code"], entry["reason"]) == (
        s["id"], "gateway", "operator", 4002, "ended by operator")


async def test_an_in_process_bot_session_logs_the_clients_code() -> None:
    async with running(make_config()) as gw:
        with captured() as out:
            async with open_client(gw.url()) as ws:
                await ws.send_message("x")
                assert await ws.get_message() == "x"
                await ws.aclose(4100, "done")
            await gw.gateway.shutdown()
    (line,) = out.getvalue().splitlines()
    fields = parse_text(line)
    assert (fields["closed_by"], fields["code"], fields["reason"]) == ("client", "4100", "done")
    assert (fields["messages_client_to_bot"], fields["bytes_bot_to_client"]) == ("1", "1")


async def test_the_embedding_path_logs_its_sessions_too() -> None:
    async with bot_server() as bot:
        with captured() as out:
            async with embedded(make_config(bot.url)) as app:
                url = f"ws://127.0.0.1:{app.port}/ws/generic/a.local"
                async with embedded_client(url) as ws:
                    await ws.send_message("abc")
                    assert await ws.get_message() == "abc"
                    await ws.aclose(4200, HOSTILE)
    (line,) = out.getvalue().splitlines()
    fields = parse_text(line)
    assert (fields["closed_by"], fields["code"], fields["reason"]) == ("client", "4200", HOSTILE)
    assert (fields["messages_client_to_bot"], fields["bytes_client_to_bot"]) == ("1", "3")


# -- relay serve --log-format --------------------------------------------------------------


def test_log_format_must_be_text_or_json() -> None:
    from relay.cli import main

    assert main(["serve", "--log-format", "xml"]) == 2


async def logged(served: Any, marker: str) -> None:
    """Until the process has logged the session's end (its teardown is over)."""
    while True:
        if marker in served.stderr_text():
            return
        await trio.sleep(0.02)  # a separate process: nothing to wait on but its output


async def _serve_one_session(tmp_path: Path, reason: str, marker: str,
                             *args: str) -> list[str]:
    """`relay serve *args`: one echo session closed with 4321 and `reason`; once `marker`
    is logged, SIGTERM (exit 0). Its stderr's lines."""
    from test_serve_process import echo_url, serving

    async with serving(tmp_path, *args) as served:
        with trio.fail_after(30):
            async with open_client(echo_url(served)) as ws:
                await ws.send_message("hi")
                assert await ws.get_message() == "hi"
                await ws.aclose(4321, reason)
            await logged(served, marker)
            served.process.send_signal(signal.SIGTERM)
            assert await served.process.wait() == 0
        return served.stderr_text().splitlines()


async def test_relay_serve_log_format_json_writes_one_json_object_per_line(
        tmp_path: Path) -> None:
    lines = await _serve_one_session(tmp_path, "line1\nline2", "session_ended",
                                     "--log-format", "json")
    entries = [json.loads(line) for line in lines]  # every line is JSON
    ended = [e for e in entries if e.get("event") == "session_ended"]
    assert len(ended) == 1, lines
    assert (ended[0]["agent"], ended[0]["code"], ended[0]["reason"]) == (
        "echo", 4321, "line1\nline2")
    assert any(e.get("logger") == "relay.gateway" for e in entries)


async def test_relay_serve_logs_sessions_as_text_by_default(tmp_path: Path) -> None:
    lines = await _serve_one_session(tmp_path, "line1\nsession ended id=forged",
                                     "session ended")
    ended = [line for line in lines if "session ended" in line]
    assert len(ended) == 1, lines
    prefix, _, text = ended[0].partition(" relay.sessions: ")
    assert prefix.endswith("INFO")
    fields = parse_text(text)
    assert (fields["agent"], fields["code"], fields["reason"]) == (
        "echo", "4321", "line1\nsession ended id=forged")
