"""docs/reference.md's configuration tables are generated from the config schema.

`scripts/gen-reference` writes them from `relay/config.py` (the keys the parser accepts
and their defaults) and `relay/config_doc.py` (type and meaning). These tests fail when
the file, the words and the schema drift apart.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import relay.config
from relay.config import AgentConfig, Limits, ServerConfig, StoreConfig
from relay.config_doc import render_reference, schema_default, table

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference.md"


def test_reference_tables_are_what_the_schema_generates() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    assert render_reference(text) == text, "docs/reference.md is stale: run scripts/gen-reference"


def test_a_changed_default_in_the_file_is_written_back_from_the_schema() -> None:
    text = REFERENCE.read_text(encoding="utf-8")
    row = "| `max_connections` | integer | `10000` |"
    assert row in text
    stale = text.replace(row, "| `max_connections` | integer | `9999` |")
    assert render_reference(stale) == text


def test_a_key_the_parser_accepts_without_words_is_named(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay.config, "_STORE_KEYS", (*relay.config._STORE_KEYS, "shiny"))
    with pytest.raises(ValueError, match=r"\[store\]: keys without words here \['shiny'\]"):
        table("store")


def test_words_for_a_key_the_parser_no_longer_accepts_are_named(
        monkeypatch: pytest.MonkeyPatch) -> None:
    kept = tuple(k for k in relay.config._STORE_KEYS if k != "lease_ttl")
    monkeypatch.setattr(relay.config, "_STORE_KEYS", kept)
    with pytest.raises(ValueError, match=r"words for keys the schema lacks \['lease_ttl'\]"):
        table("store")


@pytest.mark.parametrize(("section", "key", "expected"), [
    ("server", "max_connections", ServerConfig().max_connections),
    ("server", "public_keys", ServerConfig().public_keys),
    ("store", "lease_ttl", StoreConfig().lease_ttl),
    ("agents", "bot_protocol", AgentConfig(name="a", bot="ws://h/").bot_protocol),
    ("agents", "stall_timeout", Limits().stall_timeout),
])
def test_defaults_are_read_from_the_schema(section: str, key: str, expected: object) -> None:
    assert schema_default(section, key) == expected


def test_gen_reference_check_passes_on_the_committed_file() -> None:
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gen-reference"), "--check"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
