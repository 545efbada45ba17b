"""`relay check-config` runs every check `relay serve` runs before it binds; python: bots load
from the working directory (or --app-dir); `relay --version`; mint-token's error text.

`check-config` and `serve` share one preflight (relay.cli._preflight → relay.preflight.prepare),
so for each config serve refuses, check-config must refuse it with the same message. serve
is only run here with configs refused before anything binds (relay.server cannot even be
imported: the `no_server` fixture).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import relay
from relay.cli import main

ROOT = Path(relay.__file__).resolve().parent.parent
GOOD_SECRET = "k1:preflight-test-secret-of-32-bytes!"


@pytest.fixture(autouse=True)
def hermetic(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A known key ring, sys.path restored (the preflight adds --app-dir), logging restored."""
    monkeypatch.setenv("RELAY_SECRET", GOOD_SECRET)
    monkeypatch.setattr(sys, "path", sys.path[:])
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "relay.server", None)


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


BINDS = '[server]\nws_bind = ["127.0.0.1:0"]\napi_bind = ["127.0.0.1:0"]\n'

# Configs that parse but that serve refuses before binding: (config text, what stderr names)
REFUSED = {
    "unimportable module": (BINDS + '[agents.a]\nbot = "python:no_such_module_xyz:bot"\n',
                            "agents.a.bot: cannot load bot 'python:no_such_module_xyz:bot': "
                            "No module named 'no_such_module_xyz'"),
    "missing function": (BINDS + '[agents.a]\nbot = "python:relay.echo:no_such_bot"\n',
                         "agents.a.bot: cannot load bot 'python:relay.echo:no_such_bot'"),
    "not callable": (BINDS + '[agents.a]\nbot = "python:relay.config:ECHO_BOT"\n',
                     "agents.a.bot: bot 'python:relay.config:ECHO_BOT' is not callable"),
    "workers on the memory store": (BINDS + 'workers = 2\n'
                                    '[agents.a]\nbot = "python:relay.echo:echo_bot"\n',
                                    'server.workers: 2 workers need [store] backend = "redis"'),
    "missing TLS files": (BINDS + 'certfile = "/nonexistent/c.pem"\n'
                          'keyfile = "/nonexistent/k.pem"\n'
                          '[agents.a]\nbot = "python:relay.echo:echo_bot"\n',
                          "server.certfile: cannot load TLS certificate/key"),
}


@pytest.mark.parametrize(("text", "named"), list(REFUSED.values()), ids=list(REFUSED))
@pytest.mark.usefixtures("no_server")
def test_check_config_refuses_what_serve_refuses_with_the_same_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, named: str) -> None:
    path = write(tmp_path, text)
    assert main(["serve", "--config", str(path)]) == 2
    serve_err = capsys.readouterr().err
    assert main(["check-config", str(path)]) == 2
    out, check_err = capsys.readouterr()
    assert out == ""
    assert check_err == serve_err
    assert check_err.startswith(f"relay: {path}: {named}"), check_err


@pytest.mark.usefixtures("no_server")
def test_check_config_refuses_a_bad_key_ring_like_serve(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_SECRET", "a:1,a:2")  # one key id twice
    path = write(tmp_path, BINDS + '[agents.a]\nbot = "ws://127.0.0.1:9/b"\n')
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relay: environment variable RELAY_SECRET: ")
    assert main(["serve", "--config", str(path)]) == 2
    assert capsys.readouterr().err == err


def test_check_config_prints_the_warnings_serve_would_log(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_SECRET")
    path = write(tmp_path, '[agents.a]\nbot = "ws://127.0.0.1:9/b"\n')
    assert main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"{path}: ok (1 agent)"
    assert "relay: warning: RELAY_SECRET is not set: using a random HMAC key" in err


# -- python: bots next to the user's own code ---------------------------------------------


def bot_module(directory: Path) -> str:
    """A fresh module name (sys.modules caches imports), defining `bot`, in directory."""
    name = f"mybot_{uuid.uuid4().hex[:8]}"
    (directory / f"{name}.py").write_text(
        "async def bot(session):\n    await session.send(await session.receive())\n")
    return name


def test_python_bot_in_the_working_directory_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    name = bot_module(tmp_path)
    write(tmp_path, f'[agents.a]\nbot = "python:{name}:bot"\n', "bot.toml")
    monkeypatch.chdir(tmp_path)
    assert main(["check-config", "bot.toml"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "bot.toml: ok (1 agent)"


def test_app_dir_names_where_python_bots_live(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    app = tmp_path / "app"
    app.mkdir()
    name = bot_module(app)
    path = write(tmp_path, f'[agents.a]\nbot = "python:{name}:bot"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["check-config", str(path)]) == 2  # not on the import path from here
    assert f"No module named '{name}'" in capsys.readouterr().err
    assert main(["check-config", str(path), "--app-dir", str(app)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{path}: ok (1 agent)"


def console_script() -> Path:
    script = Path(sys.executable).parent / "relay"
    if not script.exists():
        pytest.fail("the relay console script is not installed next to this python: "
                    "scripts/test installs the project into .venv")
    return script


def test_relay_console_script_finds_a_bot_in_the_working_directory(tmp_path: Path) -> None:
    """The user's case: `relay check-config bot.toml` beside mybot.py (the console script,
    unlike `python -m`, does not put the working directory on sys.path by itself)."""
    name = bot_module(tmp_path)
    write(tmp_path, f'[agents.a]\nbot = "python:{name}:bot"\n', "bot.toml")
    done = subprocess.run([str(console_script()), "check-config", "bot.toml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "RELAY_SECRET": GOOD_SECRET})
    assert (done.returncode, done.stdout.splitlines()[0]) == (0, "bot.toml: ok (1 agent)"), done
    assert "cannot load bot" not in done.stderr


def test_scripts_serve_resolves_a_relative_config_where_the_user_stands(
        tmp_path: Path) -> None:
    """scripts/serve from another folder: `--config bot.toml` is the user's bot.toml (here
    one serve refuses before binding, naming that file and the missing function)."""
    write(tmp_path, BINDS + '[agents.a]\nbot = "python:relay.echo:no_such_bot"\n', "bot.toml")
    done = subprocess.run([str(ROOT / "scripts" / "serve"), "--config", "bot.toml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          check=False, env={**os.environ, "RELAY_SECRET": GOOD_SECRET})
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].startswith("relay: bot.toml: agents.a.bot: "), done.stderr


# -- small CLI things ---------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"relay {version('relay')}\n"


def test_mint_token_without_secret_says_which_variable_in_one_sentence(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_SECRET")
    path = write(tmp_path, '[agents.t]\nbot = "ws://127.0.0.1:9/b"\nwebsocket_auth = "token"\n')
    assert main(["mint-token", "t", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("relay: environment variable RELAY_SECRET is not set: ")
    assert ": is not set" not in err
