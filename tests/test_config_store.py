"""The [store] table: backend, url, key_prefix, lease_ttl; every bad value names file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import StoreConfig, load_config
from relay.errors import ConfigError

AGENT = '[agents.a]\nbot = "ws://127.0.0.1:9000/ws"\n'


def load(tmp_path: Path, store: str) -> StoreConfig:
    path = tmp_path / "relay.toml"
    path.write_text("[store]\n" + store + AGENT, encoding="utf-8")
    return load_config(path).store


def test_defaults() -> None:
    assert StoreConfig() == StoreConfig(backend="memory", url="redis://127.0.0.1:6379/0",
                                        key_prefix="relay:", lease_ttl=15.0)


def test_redis_keys_are_read(tmp_path: Path) -> None:
    store = load(tmp_path, 'backend = "redis"\nurl = "rediss://:pw@cache:6380/2"\n'
                           'key_prefix = "gw1:"\nlease_ttl = 9.5\n')
    assert store == StoreConfig(backend="redis", url="rediss://:pw@cache:6380/2",
                                key_prefix="gw1:", lease_ttl=9.5)


@pytest.mark.parametrize(("line", "key", "problem"), [
    ('url = "http://cache:6379"', "store.url", "must start with redis:// or rediss://"),
    ('url = "redis://"', "store.url", "must name a host"),
    ('url = "redis://cache:0/0"', "store.url", "port must be 1 to 65535"),
    ('url = "redis://cache:99999/0"', "store.url", "not a valid Redis URL"),
    ('url = "redis://cache:6379/zero"', "store.url", "database must be a number"),
    ('url = "redis://cache:6379/0?x=1"', "store.url", "must not have a query"),
    ('url = 6379', "store.url", "(integer)"),
    ('key_prefix = ""', "store.key_prefix", "1 to 64 visible ASCII"),
    ('key_prefix = "has space"', "store.key_prefix", "1 to 64 visible ASCII"),
    ('key_prefix = "' + "x" * 65 + '"', "store.key_prefix", "1 to 64 visible ASCII"),
    ("lease_ttl = 0", "store.lease_ttl", "positive, finite number of seconds"),
    ("lease_ttl = 2", "store.lease_ttl", "at least 3 seconds"),
    ('lease_ttl = "15"', "store.lease_ttl", "(string)"),
    ('backend = "valkey"', "store.backend", '"memory", "redis"'),
])
def test_bad_values_name_file_key_and_problem(tmp_path: Path, line: str, key: str,
                                              problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, 'backend = "redis"\n' + line + "\n"
             if not line.startswith("backend") else line + "\n")
    assert info.value.key == key
    assert problem in info.value.problem
    assert str(info.value).startswith(f"{tmp_path / 'relay.toml'}: {key}: ")


def test_password_is_not_echoed_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, 'backend = "redis"\nurl = "redis://u:hunter2@cache:6379/x"\n')
    assert "hunter2" not in str(info.value)
    assert "redis://u:***@cache:6379/x" in str(info.value)


def test_url_is_not_checked_for_the_memory_store(tmp_path: Path) -> None:
    assert load(tmp_path, 'url = "unused"\n').url == "unused"
