"""relay.cli: exit statuses and messages of `relay serve` and `relay check-config`.

These tests call ``main([...])`` in-process with temporary config files. None of them starts
the gateway: `serve` is only run with configs that must be refused before anything binds.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import relay
from relay.cli import main

GOOD = '[agents.a]\nbot = "ws://127.0.0.1:9000/ws"\n'
TWO_AGENTS = GOOD + '[agents.b]\nbot = "python:relay.echo:echo_bot"\n'
OWN_KEYS = '[server]\npublic_keys = ["pk_test"]\n'  # no development-key warning
BAD = '[agents.a]\nbot = "ws://127.0.0.1:9000/ws"\nsession_timeout = 0\n'


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """`serve` configures the root logger; put it back so later tests log as before."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def key_ring(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key ring in the environment: check-config runs serve's checks, and without one it
    prints serve's random-key warning (tested in test_preflight.py)."""
    monkeypatch.setenv("RELAY_SECRET", "k1:cli-test-secret-of-at-least-32-bytes")


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any import of relay.server fail: a refused config must never get that far."""
    monkeypatch.setitem(sys.modules, "relay.server", None)


# --------------------------------------------------------------------------------------
# check-config
# --------------------------------------------------------------------------------------


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, OWN_KEYS + GOOD)
    assert main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == (f"{path}: ok (1 agent)\n"
                   '  a: ws://127.0.0.1:9000/ws (websocket_auth "none", '
                   'bot_protocol "pipecat-cloud")\n')
    assert err == ""


def test_check_config_counts_agents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, TWO_AGENTS)
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{path}: ok (2 agents)"


def test_check_config_names_each_agents_bot_protocol(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The default protocol is pipecat-cloud; an operator sees which one each agent uses."""
    path = write(tmp_path, GOOD + '[agents.r]\nbot = "ws://127.0.0.1:9001/"\n'
                 'bot_protocol = "relay"\nwebsocket_auth = "token"\n')
    assert main(["check-config", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        '  a: ws://127.0.0.1:9000/ws (websocket_auth "none", bot_protocol "pipecat-cloud")',
        '  r: ws://127.0.0.1:9001/ (websocket_auth "token", bot_protocol "relay")',
    ]


def test_check_config_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BAD)
    assert main(["check-config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"relay: {path}: agents.a.session_timeout: must be a positive")
    assert err.endswith("\n") and err.count("\n") == 1


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "missing.toml"
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err == f"relay: {path}: config file not found\n"


def test_check_config_invalid_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[agents.a\n")
    assert main(["check-config", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"relay: {path}: invalid TOML")


def test_check_config_needs_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config"]) == 2
    assert "FILE" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# serve: refused before anything binds
# --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_server")
def test_serve_bad_config_exits_2_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, BAD)
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"relay: {path}: agents.a.session_timeout: " in err


@pytest.mark.usefixtures("no_server")
def test_serve_unknown_key_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[server]\nws_bnd = []\n" + GOOD)
    assert main(["serve", "--config", str(path)]) == 2
    assert f"relay: {path}: server.ws_bnd: unknown key" in capsys.readouterr().err


@pytest.mark.usefixtures("no_server")
def test_serve_bad_bind_string_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '[server]\napi_bind = ["127.0.0.1:99999"]\n' + GOOD)
    assert main(["serve", "--config", str(path)]) == 2
    assert f"relay: {path}: server.api_bind[0]: " in capsys.readouterr().err


@pytest.mark.usefixtures("no_server")
def test_serve_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.toml"
    assert main(["serve", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"relay: {path}: config file not found\n"


@pytest.mark.usefixtures("no_server")
def test_serve_log_level_configures_stderr_logging(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, BAD)
    assert main(["serve", "--log-level", "DEBUG", "--config", str(path)]) == 2
    assert logging.getLogger().level == logging.DEBUG
    logging.getLogger("relay.test").debug("hello from the test")
    assert "DEBUG relay.test: hello from the test" in capsys.readouterr().err


def test_serve_rejects_unknown_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--log-level", "chatty"]) == 2
    assert "--log-level" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# usage
# --------------------------------------------------------------------------------------


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "a command is required" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["launch"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "serve" in out and "check-config" in out


# --------------------------------------------------------------------------------------
# python -m relay
# --------------------------------------------------------------------------------------


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    root = str(Path(relay.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_python_m_relay_check_config(tmp_path: Path) -> None:
    good = write(tmp_path, OWN_KEYS + TWO_AGENTS, "good.toml")
    result = run_module("check-config", str(good))
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"{good}: ok (2 agents)\n"
        '  a: ws://127.0.0.1:9000/ws (websocket_auth "none", bot_protocol "pipecat-cloud")\n'
        '  b: python:relay.echo:echo_bot (websocket_auth "none", in-process, body as '
        'session.body)\n',
        "",
    )

    bad = write(tmp_path, BAD, "bad.toml")
    result = run_module("check-config", str(bad))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"relay: {bad}: agents.a.session_timeout: ")


def test_serve_with_an_unimportable_python_bot_exits_2_naming_the_agent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        '[server]\nws_bind = ["127.0.0.1:0"]\napi_bind = ["127.0.0.1:0"]\n'
        '[agents.a]\nbot = "python:no_such_module_here:bot"\n'
    )
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "agents.a.bot" in err and "no_such_module_here" in err
