"""relay.exposure: beyond loopback, own public keys and 32-byte secrets, or exit 2.

Unit tests of ``check_exposure`` (the one function ``serve`` and ``check-config`` call),
then both commands in-process with temporary config files and an environment of the test's
choosing. ``serve`` is only run with configs it must refuse before anything binds.
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
from relay.config import Config, build_config, default_config
from relay.errors import ConfigError
from relay.exposure import MIN_SECRET_BYTES, check_exposure, is_loopback

AGENT = '[agents.a]\nbot = "ws://127.0.0.1:9000/ws"\n'
STRONG = "k1:" + "s" * MIN_SECRET_BYTES  # a secret of exactly the minimum
OWN_KEYS = ["pk_live_abc"]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),  # all of 127.0.0.0/8
        ("127.255.255.254", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LocalHost", True),
        ("localhost.", True),
        ("0.0.0.0", False),  # every interface
        ("::", False),
        ("192.168.1.20", False),  # a LAN address
        ("10.0.0.5", False),
        ("fe80::1", False),
        ("::ffff:10.0.0.1", False),
        ("relay.internal", False),  # a host name may resolve anywhere
        ("localhost.example.com", False),
        ("my-host", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def config_with(
    ws: str = "127.0.0.1:8700", api: str = "127.0.0.1:8701", **server: object
) -> Config:
    return build_config(
        server={"ws_bind": [ws], "api_bind": [api], **server},
        agents={"a": {"bot": "ws://127.0.0.1:9000/ws"}},
        source="relay.toml",
    )


EXPOSED = [
    ("0.0.0.0:8700", "127.0.0.1:8701", "server.ws_bind[0] = 0.0.0.0:8700"),
    ("[::]:8700", "127.0.0.1:8701", "server.ws_bind[0] = [::]:8700"),
    ("127.0.0.1:8700", "192.168.1.20:8701", "server.api_bind[0] = 192.168.1.20:8701"),
    ("relay.internal:8700", "[::1]:8701", "server.ws_bind[0] = relay.internal:8700"),
]


@pytest.mark.parametrize(("ws", "api", "where"), EXPOSED)
def test_exposed_without_public_keys_is_refused_naming_the_key(
    ws: str, api: str, where: str
) -> None:
    with pytest.raises(ConfigError) as info:
        check_exposure(config_with(ws, api), {"RELAY_SECRET": STRONG})
    assert info.value.key == "server.public_keys"
    assert info.value.file == "relay.toml"
    assert where in info.value.problem and "pk_dev_123" in info.value.problem


@pytest.mark.parametrize(("ws", "api", "where"), EXPOSED)
def test_exposed_listing_the_development_key_is_refused(ws: str, api: str, where: str) -> None:
    config = config_with(ws, api, public_keys=["pk_live_abc", "pk_dev_123"])
    with pytest.raises(ConfigError) as info:
        check_exposure(config, {"RELAY_SECRET": STRONG})
    assert info.value.key == "server.public_keys" and where in info.value.problem


@pytest.mark.parametrize(("ws", "api", "where"), EXPOSED)
@pytest.mark.parametrize(
    ("secret", "kid", "size"),
    [
        ("x", "0", 1),
        ("s" * (MIN_SECRET_BYTES - 1), "0", MIN_SECRET_BYTES - 1),
        (f"{STRONG},old:short", "old", 5),  # every key of the ring, not only the signing one
        ("k:" + "é" * 15, "k", 30),  # bytes of UTF-8, not characters
    ],
)
def test_exposed_with_a_short_secret_is_refused_naming_the_variable(
    ws: str, api: str, where: str, secret: str, kid: str, size: int
) -> None:
    config = config_with(ws, api, public_keys=OWN_KEYS, secret_env="GW_SECRET")
    with pytest.raises(ConfigError) as info:
        check_exposure(config, {"GW_SECRET": secret})
    assert info.value.key == "environment variable GW_SECRET"
    assert f"key {kid!r} has a {size}-byte secret" in info.value.problem
    assert where in info.value.problem
    assert secret.split(",")[-1].split(":")[-1] not in str(info.value)  # never quoted


@pytest.mark.parametrize(("ws", "api", "where"), EXPOSED)
@pytest.mark.parametrize("secret", [STRONG, f"new:{'n' * 40},{STRONG}", "", "   "])
def test_exposed_with_own_keys_and_strong_or_unset_secrets_passes(
    ws: str, api: str, where: str, secret: str
) -> None:
    """Unset (or blank) is fine: the memory store then uses a random 32-byte key."""
    assert (
        check_exposure(config_with(ws, api, public_keys=OWN_KEYS), {"RELAY_SECRET": secret}) == []
    )


@pytest.mark.parametrize(
    ("ws", "api"),
    [
        ("127.0.0.1:8700", "127.0.0.1:8701"),
        ("127.0.0.2:8700", "[::1]:8701"),
        ("localhost:8700", "localhost:8701"),
    ],
)
def test_loopback_only_keeps_development_defaults_with_warnings(ws: str, api: str) -> None:
    warnings = check_exposure(config_with(ws, api), {"RELAY_SECRET": "x"})
    assert len(warnings) == 2
    assert "'pk_dev_123'" in warnings[0] and "public_keys" in warnings[0]
    assert "RELAY_SECRET: key '0' has a 1-byte secret" in warnings[1]
    assert (
        check_exposure(config_with(ws, api, public_keys=OWN_KEYS), {"RELAY_SECRET": STRONG}) == []
    )


def test_embedded_default_is_loopback_with_the_development_key_warning() -> None:
    assert len(check_exposure(default_config(), {})) == 1


def test_a_key_ring_that_does_not_parse_is_refused_even_on_loopback() -> None:
    with pytest.raises(ConfigError) as info:
        check_exposure(config_with(), {"RELAY_SECRET": "a:x,,b:y"})
    assert info.value.key == "environment variable RELAY_SECRET"
    assert "entry 2 of 3 is empty" in info.value.problem


# ---------------------------------------------------------------------------- the CLI


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any import of relay.server fails: a refused config must never get that far."""
    monkeypatch.setitem(sys.modules, "relay.server", None)


def write(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text("[server]\n" + server + AGENT, encoding="utf-8")
    return path


CLI_CASES = [
    # (server table, RELAY_SECRET, key named in the error)
    ('ws_bind = ["0.0.0.0:0"]\n', STRONG, "server.public_keys"),
    ('api_bind = ["[::]:0"]\n', STRONG, "server.public_keys"),
    (
        'ws_bind = ["192.168.1.20:0"]\npublic_keys = ["pk_x"]\n',
        "short",
        "environment variable RELAY_SECRET",
    ),
    (
        'api_bind = ["0.0.0.0:0"]\npublic_keys = ["pk_x"]\n',
        "x" * 31,
        "environment variable RELAY_SECRET",
    ),
]


@pytest.mark.usefixtures("no_server")
@pytest.mark.parametrize("command", ["serve", "check-config"])
@pytest.mark.parametrize(("server", "secret", "key"), CLI_CASES)
def test_cli_exits_2_naming_the_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    server: str,
    secret: str,
    key: str,
) -> None:
    path = write(tmp_path, server)
    monkeypatch.setenv("RELAY_SECRET", secret)
    argv = ["serve", "--config", str(path)] if command == "serve" else ["check-config", str(path)]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    prefix = f"relay: {path}: {key}: " if key.startswith("server.") else f"relay: {key}: "
    assert err.startswith(prefix) and "outside loopback" in err
    assert secret not in err


def test_check_config_on_loopback_passes_with_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, 'ws_bind = ["127.0.0.2:0"]\napi_bind = ["localhost:0"]\n')
    monkeypatch.setenv("RELAY_SECRET", "short")
    assert main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == f"{path}: ok (1 agent)"  # then a line per agent
    lines = err.splitlines()
    assert len(lines) == 2 and all(line.startswith("relay: warning: ") for line in lines)
    assert "pk_dev_123" in lines[0] and "RELAY_SECRET: key '0' has a 5-byte secret" in lines[1]


def test_check_config_exposed_with_safe_keys_passes_silently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, 'ws_bind = ["0.0.0.0:0"]\npublic_keys = ["pk_x"]\n')
    monkeypatch.setenv("RELAY_SECRET", STRONG)
    assert main(["check-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert (out.splitlines()[0], err) == (f"{path}: ok (1 agent)", "")


def test_python_m_relay_serve_on_every_interface_without_keys_exits_2(tmp_path: Path) -> None:
    """The review's finding, black-box: `relay serve` on 0.0.0.0 with the development key."""
    path = write(tmp_path, 'ws_bind = ["0.0.0.0:0"]\napi_bind = ["127.0.0.1:0"]\n')
    root = str(Path(relay.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root, "RELAY_SECRET": "x"}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"relay: {path}: server.public_keys: must be set" in result.stderr
    assert "server.ws_bind[0] = 0.0.0.0:0" in result.stderr
    assert "listening" not in result.stderr  # refused before anything was bound
