"""relay.closing: how a session ended and which close each side gets (sans-IO).

The close-code table as data: each row here is one line of the table in
docs/reference.md ("Close codes"). End-to-end tests show the codes on the wire; these pin
the decisions themselves, including the precedence when two endings race.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from relay import closing
from relay.closing import Outcome, close_reason_text, session_outcome

ROWS = [
    # outcome, reason, what the gateway sends the client, what it sends the bot
    (closing.CLIENT_CLOSED, "client_closed", None, None),  # the client's own close passes
    (closing.BOT_CLOSED, "bot_closed", None, None),  # the bot's own close passes
    (closing.CLIENT_GONE, "client_gone", None, (1001, "")),
    (closing.BOT_GONE, "bot_gone", (1014, "bad gateway"), None),
    (closing.TIMEOUT, "timeout", (4000, "session timeout"), (4000, "session timeout")),
    (closing.REPLACED_BY_NEWER, "replaced", (4001, "replaced"), (4001, "replaced")),
    (closing.SHUTDOWN, "shutdown", (1001, ""), (1001, "")),
    (closing.CLIENT_STALLED, "client_stalled", (1008, "stalled"), (1001, "")),
    (closing.BOT_STALLED, "bot_stalled", (1001, ""), (1008, "stalled")),
]


@pytest.mark.parametrize(("outcome", "reason", "to_client", "to_bot"), ROWS)
def test_close_code_table(outcome: Outcome, reason: str, to_client: tuple[int, str] | None,
                          to_bot: tuple[int, str] | None) -> None:
    assert (outcome.reason, outcome.to_client, outcome.to_bot) == (reason, to_client, to_bot)


def test_the_gateway_never_sends_1005_1006_or_1015() -> None:
    sent = [code for outcome, *_ in ROWS for code in (outcome.to_client, outcome.to_bot)
            if code is not None]
    sent += [closing.TRY_AGAIN_LATER, closing.BOT_ERROR]
    assert not {code for code, _ in sent} & {1005, 1006, 1015}


def test_violations_close_the_offender_with_its_code_and_the_other_side_1001() -> None:
    assert closing.client_violation(1009, "too big") == Outcome(
        "client_too_big", (1009, "too big"), (1001, ""))
    assert closing.client_violation(1002) == Outcome(
        "client_protocol_error", (1002, ""), (1001, ""))
    assert closing.bot_violation(1009, "too big") == Outcome(
        "bot_too_big", (1001, ""), (1009, "too big"))
    assert closing.bot_violation(1007) == Outcome("bot_protocol_error", (1001, ""), (1007, ""))


def test_replacement_and_shutdown_win_over_everything_else() -> None:
    for timed_out in (False, True):
        for relayed in (None, closing.CLIENT_CLOSED, closing.BOT_GONE):
            assert session_outcome("replaced", timed_out, relayed) is closing.REPLACED_BY_NEWER
            assert session_outcome("shutdown", timed_out, relayed) is closing.SHUTDOWN


def test_timeout_only_when_nothing_ended_the_session_first() -> None:
    assert session_outcome(None, True, None) is closing.TIMEOUT
    # the client's close came first; the timeout fired while its answer was awaited
    assert session_outcome(None, True, closing.CLIENT_CLOSED) is closing.CLIENT_CLOSED
    assert session_outcome(None, True, closing.BOT_STALLED) is closing.BOT_STALLED


def test_what_the_relay_recorded_stands_and_nothing_recorded_is_a_shutdown() -> None:
    assert session_outcome(None, False, closing.BOT_CLOSED) is closing.BOT_CLOSED
    # cancelled from outside with no reason given (the embedding app stopped serve())
    assert session_outcome(None, False, None) is closing.SHUTDOWN


@pytest.mark.parametrize(("text", "expected_bytes"), [
    ("", 0),
    ("x" * 123, 123),
    ("x" * 124, 123),
    ("é" * 62, 123 - 1),  # 2-byte characters: a split one is dropped, not sent broken
    ("€" * 41, 123),  # 3-byte characters: 41 fit exactly
    ("€" * 42, 123),
])
def test_close_reason_fits_a_control_frame(text: str, expected_bytes: int) -> None:
    out = close_reason_text(text)
    assert len(out.encode()) == expected_bytes
    assert text.startswith(out)


def test_closing_module_is_sans_io() -> None:
    tree = ast.parse(Path(closing.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert not imported & {"trio", "socket", "h11", "wsproto", "trio_websocket"}
