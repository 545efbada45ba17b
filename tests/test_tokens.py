"""relay.tokens: key ring parsing, mint/verify verdicts, and the token source order."""

from __future__ import annotations

import ast
import base64
import json
import re
from pathlib import Path
from typing import TypedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

import relay.tokens
from relay.errors import ConfigError
from relay.tokens import (
    CLOCK_SKEW,
    TOKEN_LIFETIME,
    Claims,
    KeyRing,
    Refusal,
    RefusalReason,
    find_token,
    keyring_from_env,
    mint,
    verify,
)

T0 = 1_700_000_000.0
SID = "639f91d8-d511-4677-a83b-bd7564d5d92f"
KEYS = KeyRing.parse("k1:first-secret,k2:second-secret")


def _token(
    keys: KeyRing = KEYS, *, agent: str = "my-agent", org: str = "my-org", now: float = T0
) -> str:
    return mint(keys, agent=agent, org=org, session_id=SID, now=now)


def _verify(
    token: str,
    keys: KeyRing = KEYS,
    *,
    agent: str = "my-agent",
    org: str = "my-org",
    now: float = T0 + 1,
) -> Claims | Refusal:
    return verify(token, keys, agent=agent, org=org, now=now)


class Check(TypedDict, total=False):
    """Keyword arguments of _verify that a refusal case overrides."""

    agent: str
    org: str
    now: float


def _replace_char(text: str, index: int, char: str) -> str:
    return text[:index] + char + text[index + 1 :]


def _reencode_payload(token: str, **changes: object) -> str:
    payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    raw = json.dumps(claims, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode() + "." + signature


# ------------------------------------------------------------------ key ring


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("s3cret", (("0", b"s3cret"),)),
        ("a:one,b:two", (("a", b"one"), ("b", b"two"))),
        (" a:one , b:two ", (("a", b"one"), ("b", b"two"))),
        ("a:with:colons", (("a", b"with:colons"),)),
        ("new:x,plain", (("new", b"x"), ("0", b"plain"))),
    ],
)
def test_keyring_parse(value: str, expected: tuple[tuple[str, bytes], ...]) -> None:
    assert KeyRing.parse(value).keys == expected


@pytest.mark.parametrize(
    "value",
    ["", "   ", "a:one,", ",a:one", "a:", "bad id:x", "a:one,a:two", "plain,other", ":x"],
)
def test_keyring_parse_refuses_garbage(value: str) -> None:
    with pytest.raises(ValueError):
        KeyRing.parse(value)


def test_keyring_parse_error_does_not_leak_the_secret() -> None:
    with pytest.raises(ValueError) as info:
        KeyRing.parse("topsecretvalue,othersecret")  # two bare secrets: both id "0"
    assert "topsecret" not in str(info.value)


def test_keyring_random_is_fresh() -> None:
    a, b = KeyRing.random(), KeyRing.random()
    assert a.keys[0][0] == "0" and len(a.keys[0][1]) == 32
    assert a != b


def test_keyring_from_env() -> None:
    keys, warning = keyring_from_env({"RELAY_SECRET": "k:v"}, "RELAY_SECRET", backend="redis")
    assert keys.keys == (("k", b"v"),) and warning is None

    keys, warning = keyring_from_env({}, "RELAY_SECRET", backend="memory")
    assert warning is not None and "RELAY_SECRET" in warning
    assert len(keys.keys) == 1

    keys, warning = keyring_from_env({"OTHER": " "}, "OTHER", backend="memory")
    assert warning is not None

    with pytest.raises(ConfigError) as info:
        keyring_from_env({}, "MY_SECRET", backend="redis")
    assert "MY_SECRET" in str(info.value) and info.value.exit_status == 2

    with pytest.raises(ConfigError) as info:
        keyring_from_env({"RELAY_SECRET": "a:1,a:2"}, "RELAY_SECRET", backend="memory")
    assert "RELAY_SECRET" in str(info.value)


# ------------------------------------------------------------------ mint / verify


def test_valid_token_round_trips() -> None:
    token = _token()
    assert re.fullmatch(r"[A-Za-z0-9._~-]+", token)
    assert _verify(token) == Claims(
        session_id=SID, agent="my-agent", org="my-org", expires_at=T0 + TOKEN_LIFETIME
    )


def _signed(**claims: object) -> str:
    """A token whose payload says exactly ``claims``, correctly signed by KEYS."""
    payload = base64.urlsafe_b64encode(json.dumps(
        {"a": "my-agent", "o": "my-org", "s": SID, "e": T0 + 300, "k": "k1", **claims},
        separators=(",", ":")).encode()).rstrip(b"=").decode()
    return f"{payload}.{relay.tokens._sign(b'first-secret', payload)}"


def test_body_claim_says_a_body_is_held() -> None:
    with_body = mint(KEYS, agent="my-agent", org="my-org", session_id=SID, now=T0, body=True)
    assert re.fullmatch(r"[A-Za-z0-9._~-]+", with_body)
    claims = _verify(with_body)
    assert isinstance(claims, Claims) and claims.has_body
    claims = _verify(_token())  # no claim at all: no body
    assert isinstance(claims, Claims) and not claims.has_body
    assert _verify(_signed(b=0)) == Claims(SID, "my-agent", "my-org", T0 + 300)
    # the claim is signed: it cannot be dropped to pass a body-less session off
    stripped = _reencode_payload(with_body, b=0)
    assert _verify(stripped) == Refusal("bad_signature")


@pytest.mark.parametrize("claim", [2, -1, "1", 1.0, None, [1]])
def test_a_signed_body_claim_that_is_not_0_or_1_is_malformed(claim: object) -> None:
    assert _verify(_signed(b=claim)) == Refusal("malformed")


def test_long_names_stay_url_safe() -> None:
    token = mint(KEYS, agent="a" * 64, org="o_-" * 21, session_id=SID, now=T0)
    assert re.fullmatch(r"[A-Za-z0-9._~-]+", token)
    assert isinstance(verify(token, KEYS, agent="a" * 64, org="o_-" * 21, now=T0), Claims)


def _tampered_payload() -> str:
    token = _token()
    return _reencode_payload(token, s="00000000-0000-0000-0000-000000000000")


def _tampered_signature() -> str:
    token = _token()
    flipped = "A" if token[-5] != "A" else "B"
    return _replace_char(token, len(token) - 5, flipped)


@pytest.mark.parametrize(
    ("case", "token", "check", "reason"),
    [
        ("tampered payload", _tampered_payload(), {}, "bad_signature"),
        ("tampered signature", _tampered_signature(), {}, "bad_signature"),
        ("wrong key id", _reencode_payload(_token(), k="nope"), {}, "bad_signature"),
        ("signed with another ring", _token(KeyRing.parse("k1:other")), {}, "bad_signature"),
        ("other agent", _token(), {"agent": "other-agent"}, "wrong_scope"),
        ("other org", _token(), {"org": "other-org"}, "wrong_scope"),
        ("expired at 300 s + eps", _token(), {"now": T0 + TOKEN_LIFETIME + 1e-6}, "expired"),
        ("expired exactly at 300 s", _token(), {"now": T0 + TOKEN_LIFETIME}, "expired"),
        ("long expired", _token(), {"now": T0 + 86400}, "expired"),
        ("not yet valid", _token(now=T0 + CLOCK_SKEW + 1), {"now": T0}, "not_yet_valid"),
        ("empty", "", {}, "missing"),
        ("garbage", "garbage", {}, "malformed"),
        ("three parts", _token() + ".x", {}, "malformed"),
        ("bad characters", "ab$c.def", {}, "malformed"),
        ("padding", _token() + "=", {}, "malformed"),
        ("payload not JSON", "bm90IGpzb24.c2ln", {}, "malformed"),
        (
            "payload a list",
            base64.urlsafe_b64encode(b"[1]").decode().rstrip("=") + ".c2ln",
            {},
            "malformed",
        ),
        ("huge", "a" * 5000 + ".b", {}, "malformed"),
        ("non-ascii", "é.b", {}, "malformed"),
    ],
)
def test_refusals(case: str, token: str, check: Check, reason: RefusalReason) -> None:
    result = _verify(token, **check)
    assert result == Refusal(reason), case


@pytest.mark.parametrize(
    ("case", "now"),
    [
        ("at issue", T0),
        ("just before expiry", T0 + TOKEN_LIFETIME - 1e-6),
        ("issued within the clock skew ahead", T0 - CLOCK_SKEW + 1),
    ],
)
def test_accepted_times(case: str, now: float) -> None:
    assert isinstance(_verify(_token(), now=now), Claims), case


def test_key_rotation_old_token_verifies_after_new_key_prepended() -> None:
    old = KeyRing.parse("k1:first-secret")
    token = _token(old)
    rotated = KeyRing.parse("k2:new-secret,k1:first-secret")
    assert isinstance(_verify(token, rotated), Claims)
    # New tokens are signed with the new first key: the old ring cannot verify them.
    assert _verify(_token(rotated), old) == Refusal("bad_signature")
    # Once the old key is dropped, its tokens stop verifying.
    assert _verify(token, KeyRing.parse("k2:new-secret")) == Refusal("bad_signature")


def test_same_inputs_same_token_and_distinct_sessions_differ() -> None:
    assert _token() == _token()
    other = mint(KEYS, agent="my-agent", org="my-org", session_id="x", now=T0)
    assert other != _token()


VALID = _token()


@given(
    index=st.integers(min_value=0, max_value=len(VALID) - 1),
    char=st.characters(),
)
def test_any_single_character_mutation_is_refused(index: int, char: str) -> None:
    mutated = _replace_char(VALID, index, char)
    if mutated == VALID:
        return
    assert isinstance(_verify(mutated), Refusal)


@given(
    index=st.integers(min_value=0, max_value=len(VALID) - 1),
    char=st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."),
)
def test_any_single_alphabet_mutation_is_refused(index: int, char: str) -> None:
    mutated = _replace_char(VALID, index, char)
    if mutated != VALID:
        assert isinstance(_verify(mutated), Refusal)


@given(st.text(max_size=300))
def test_verify_never_raises(text: str) -> None:
    assert isinstance(_verify(text), Refusal)


def test_tokens_module_is_sans_io() -> None:
    tree = ast.parse(Path(relay.tokens.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
    }
    assert not imported & {"trio", "socket", "asyncio", "time", "hypercorn", "trio_websocket"}


# ------------------------------------------------------------------ find_token

AUTH = (b"authorization", b"Bearer from-header")


@pytest.mark.parametrize(
    ("case", "headers", "query", "path", "expected"),
    [
        ("nothing", [], "", None, None),
        ("header wins", [AUTH], "token=from-query", "from-path", "from-header"),
        ("query before path", [], "token=from-query", "from-path", "from-query"),
        ("path alone", [], "", "from-path", "from-path"),
        ("empty bearer is present", [(b"authorization", b"Bearer ")], "token=q", "p", ""),
        ("bare 'Bearer' is present", [(b"Authorization", b"Bearer")], "token=q", "p", ""),
        ("empty query is present", [], "token=", "from-path", ""),
        ("query name alone is present", [], "token", "from-path", ""),
        ("empty path is present", [], "", "", ""),
        ("other scheme is not a source", [(b"authorization", b"Basic dTpw")], "token=q", "p", "q"),
        ("other scheme, nothing else", [(b"authorization", b"Basic dTpw")], "", None, None),
        ("scheme is case-insensitive", [(b"AUTHORIZATION", b"bearer tok")], "", None, "tok"),
        ("extra spaces", [(b"authorization", b"Bearer   tok  ")], "", None, "tok"),
        ("first token param wins", [], "token=a&token=b", None, "a"),
        ("other params ignored", [], "serviceHost=a.b&x=1", "p", "p"),
        ("unrelated headers", [(b"origin", b"https://x")], "", None, None),
    ],
)
def test_find_token_order(
    case: str,
    headers: list[tuple[bytes, bytes]],
    query: str,
    path: str | None,
    expected: str | None,
) -> None:
    assert find_token(headers, query, path) == expected, case


def test_find_token_accepts_parsed_query_mappings() -> None:
    assert find_token([], {"token": ["a", "b"]}, "p") == "a"
    assert find_token([], {"token": [""]}, "p") == ""
    assert find_token([], {"token": []}, "p") == ""
    assert find_token([], {"other": ["x"]}, "p") == "p"
    assert find_token([], b"token=raw", None) == "raw"


def test_found_empty_token_is_refused_as_missing() -> None:
    found = find_token([], "token=", _token())
    assert found == ""
    assert _verify(found) == Refusal("missing")
