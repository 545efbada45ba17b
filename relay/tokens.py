"""[sans-IO] Session tokens: the HMAC key ring, minting, checking, and where a token is found.

This module owns everything about a token except its one-time use (that is the store's,
see ``relay.store``): the key ring read from ``RELAY_SECRET``, the token format, the
verdict on a presented token, and the order in which an upgrade request's sources are
searched. No I/O and no trio: wall-clock time comes in as ``now`` (unix seconds), so the
fake clock of a test moves token expiry too.

Token format (SPEC §4, §8)::

    <payload>.<signature>
    payload   = base64url(compact JSON {"a": agent, "o": org, "s": session id,
                                        "e": expires_at, "k": key id[, "b": 1]}),
                no padding; "b" is there when /start held a body for the session
    signature = base64url(HMAC-SHA256(key[k], payload as ASCII)), no padding

Both parts use only ``[A-Za-z0-9_-]`` and the separator is ``.``, so a token goes into a
URL path or query unescaped. The signature is compared as *text* against the canonical
encoding of the expected MAC (``hmac.compare_digest``): base64 has spare bits in its last
character, and decoding before comparing would accept a token whose last character was
changed.

Verdicts (``Refusal.reason``; every one becomes 403 at the upgrade, and is the label of
the ``token_refusals`` metric):

    missing        a source was present but empty (``?token=``, ``Bearer `` alone)
    malformed      not two base64url parts, or a payload that is not ours
    bad_signature  the MAC does not match, or the key id is not in the ring
    wrong_scope    signed for another agent or organization
    expired        ``now >= expires_at`` (valid for [issue, issue + 300 s))
    not_yet_valid  issued more than ``CLOCK_SKEW`` seconds in the future: the signer's clock
                   (another instance) is ahead, or the key leaked to someone minting
                   long-lived tokens; either way it must not be honoured

"replayed" is not decided here: only the store knows whether a session was used. The
body claim is what lets the store tell "this session's body is gone" (refused,
``body_unavailable``) from "this session never had one".
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Literal
from urllib.parse import parse_qsl

import attrs

from relay.errors import ConfigError

__all__ = [
    "CLOCK_SKEW",
    "TOKEN_LIFETIME",
    "Claims",
    "KeyRing",
    "Refusal",
    "RefusalReason",
    "find_token",
    "keyring_from_env",
    "mint",
    "verify",
]

TOKEN_LIFETIME = 300  # seconds: SPEC §4 "valid 5 minutes from issue"
CLOCK_SKEW = 30  # seconds: instances sharing a key may disagree this much on the time

RefusalReason = Literal[
    "missing", "malformed", "bad_signature", "wrong_scope", "expired", "not_yet_valid"
]

# Key ids travel inside the payload and appear in logs: keep them short and plain.
_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
# A token far longer than ours is refused before any decoding work.
_MAX_TOKEN_LENGTH = 1024  # characters: ours are ~230 with 64-char names


@attrs.frozen
class KeyRing:
    """Ordered HMAC keys: the first signs, every one verifies (rotation, SPEC §4)."""

    keys: tuple[tuple[str, bytes], ...] = attrs.field()

    @keys.validator
    def _check(self, _attribute: object, value: tuple[tuple[str, bytes], ...]) -> None:
        if not value:
            raise ValueError("a key ring needs at least one key")
        seen: set[str] = set()
        for key_id, secret in value:
            if not _KEY_ID.fullmatch(key_id):
                raise ValueError(f"key id {key_id!r} must match [A-Za-z0-9_-]{{1,64}}")
            if not secret:
                raise ValueError(f"key {key_id!r} has an empty secret")
            if key_id in seen:
                raise ValueError(f"key id {key_id!r} appears twice")
            seen.add(key_id)

    @property
    def signing(self) -> tuple[str, bytes]:
        """The (key id, secret) that signs new tokens."""
        return self.keys[0]

    def secret_for(self, key_id: str) -> bytes | None:
        for candidate, secret in self.keys:
            if candidate == key_id:
                return secret
        return None

    @classmethod
    def parse(cls, value: str) -> KeyRing:
        """Read the env var format: comma-separated ``id:secret``; a bare secret is id ``0``.

        Raises ``ValueError`` (naming the entry's position, never the secret) when the
        value is empty, an entry is empty, an id is not ``[A-Za-z0-9_-]{1,64}``, or an id
        repeats. A secret may itself contain ``:`` (only the first one splits).
        """
        entries = value.split(",")
        pairs: list[tuple[str, bytes]] = []
        for position, raw in enumerate(entries, start=1):
            entry = raw.strip()
            if not entry:
                raise ValueError(f"entry {position} of {len(entries)} is empty")
            if ":" in entry:
                key_id, _, secret = entry.partition(":")
                if not _KEY_ID.fullmatch(key_id):
                    raise ValueError(f"entry {position}: key id must match [A-Za-z0-9_-]{{1,64}}")
                if not secret:
                    raise ValueError(f"entry {position}: key {key_id!r} has no secret")
            else:
                key_id, secret = "0", entry
            pairs.append((key_id, secret.encode("utf-8")))
        return cls(tuple(pairs))

    @classmethod
    def random(cls) -> KeyRing:
        """One fresh 256-bit key, id ``0``: tokens die with the process."""
        return cls((("0", secrets.token_bytes(32)),))


def keyring_from_env(
    env: Mapping[str, str], var: str, *, backend: str
) -> tuple[KeyRing, str | None]:
    """The key ring named by ``[server] secret_env``, plus a warning to log, if any.

    Unset (or empty/blank, as ``VAR=${VAR}`` leaves it when the host has none): with the
    memory store, a random key and a warning; with any shared store (Redis), a
    ``ConfigError``, because instances with different random keys reject each other's
    tokens. A value that does not parse is a ``ConfigError`` naming the variable.
    """
    value = env.get(var, "")
    if not value.strip():
        if backend == "memory":
            return KeyRing.random(), (
                f"{var} is not set: using a random HMAC key; tokens from /start stop "
                "working when this process restarts"
            )
        raise ConfigError(
            f"must be set when the store backend is {backend!r} (instances share tokens)",
            key=f"environment variable {var}",
        )
    try:
        return KeyRing.parse(value), None
    except ValueError as error:
        raise ConfigError(str(error), key=f"environment variable {var}") from None


@attrs.frozen
class Claims:
    """What a valid token says."""

    session_id: str
    agent: str
    org: str
    expires_at: float
    has_body: bool = False  # minted with a body held for the session


@attrs.frozen
class Refusal:
    """Why a token was refused (see the module docstring for each reason)."""

    reason: RefusalReason


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, payload: str) -> str:
    return _b64encode(hmac.new(secret, payload.encode("ascii"), hashlib.sha256).digest())


def mint(keys: KeyRing, *, agent: str, org: str, session_id: str, now: float,
         body: bool = False) -> str:
    """A token for ``session_id`` on ``agent``.``org``, valid until ``now + TOKEN_LIFETIME``.

    ``body``: a body is held for the session, so the upgrade needs it (claim ``"b"``).
    """
    key_id, secret = keys.signing
    claims: dict[str, object] = {"a": agent, "o": org, "s": session_id,
                                 "e": now + TOKEN_LIFETIME, "k": key_id}
    if body:
        claims["b"] = 1
    payload = _b64encode(json.dumps(claims, separators=(",", ":")).encode("utf-8"))
    return f"{payload}.{_sign(secret, payload)}"


def verify(token: str, keys: KeyRing, *, agent: str, org: str, now: float) -> Claims | Refusal:
    """Check ``token`` for ``agent``.``org`` at ``now``; never raises on bad input.

    Order: shape, signature (so nothing unsigned is trusted), scope, time.
    """
    if not token:
        return Refusal("missing")
    if len(token) > _MAX_TOKEN_LENGTH or token.count(".") != 1:
        return Refusal("malformed")
    payload, signature = token.split(".")
    if not (_B64URL.fullmatch(payload) and _B64URL.fullmatch(signature)):
        return Refusal("malformed")
    try:
        claims = json.loads(_b64decode(payload))
    except (binascii.Error, ValueError):  # bad base64, bad UTF-8, bad JSON
        return Refusal("malformed")
    if not isinstance(claims, dict) or not isinstance(claims.get("k"), str):
        return Refusal("malformed")
    secret = keys.secret_for(claims["k"])
    if secret is None:
        return Refusal("bad_signature")
    if not hmac.compare_digest(_sign(secret, payload), signature):
        return Refusal("bad_signature")
    # Signed by us, so the shape is ours; checked anyway so a bug cannot become a crash.
    session_id, token_agent, token_org = claims.get("s"), claims.get("a"), claims.get("o")
    expires_at, has_body = claims.get("e"), claims.get("b", 0)
    if not (
        isinstance(has_body, int)
        and has_body in (0, 1)
        and isinstance(session_id, str)
        and isinstance(token_agent, str)
        and isinstance(token_org, str)
        and isinstance(expires_at, int | float)
        and not isinstance(expires_at, bool)
    ):
        return Refusal("malformed")
    if not (
        hmac.compare_digest(token_agent.encode(), agent.encode())
        and hmac.compare_digest(token_org.encode(), org.encode())
    ):
        return Refusal("wrong_scope")
    if now >= expires_at:
        return Refusal("expired")
    if expires_at - now > TOKEN_LIFETIME + CLOCK_SKEW:
        return Refusal("not_yet_valid")
    return Claims(
        session_id=session_id, agent=token_agent, org=token_org, expires_at=float(expires_at),
        has_body=bool(has_body),
    )


def find_token(
    headers: Sequence[tuple[bytes, bytes]],
    query: Mapping[str, Sequence[str]] | str | bytes,
    path_token: str | None,
) -> str | None:
    """The token of an upgrade request, from the first source *present* (SPEC §5, §8).

    Order: ``Authorization: Bearer``, then the ``token`` query parameter, then the path
    segment. A present source is authoritative even when empty (``?token=``, ``Bearer``
    with nothing after it gives ``""``, which ``verify`` refuses as "missing"); an
    ``Authorization`` header of another scheme is not a source. ``None`` means no source.

    ``query`` is either the raw query string or a mapping of name → values as
    ``urllib.parse.parse_qs(..., keep_blank_values=True)`` gives (without
    ``keep_blank_values`` an empty ``?token=`` would vanish and a later source would win).
    ``path_token`` is ``None`` when the URL has no token segment.
    """
    for name, value in headers:
        if name.lower() != b"authorization":
            continue
        scheme, _, rest = value.strip().partition(b" ")
        if scheme.lower() == b"bearer":  # auth schemes are case-insensitive (RFC 9110 §11.1)
            return rest.strip().decode("latin-1")
    if isinstance(query, bytes):
        query = query.decode("latin-1")
    if isinstance(query, str):
        for name_, value_ in parse_qsl(query, keep_blank_values=True):
            if name_ == "token":
                return value_
    else:
        values = query.get("token")
        if values is not None:
            return values[0] if values else ""
    return path_token
