"""[sans-IO] Safe exposure: what a gateway listening beyond loopback must have configured.

The development defaults (the well-known public key ``pk_dev_123``, any ``RELAY_SECRET``)
are fine while every bind is on loopback: only this machine can reach the gateway. Once any
``ws_bind`` or ``api_bind`` address is outside loopback, ``check_exposure`` requires

- ``[server] public_keys`` set in the file to keys of your own (the development key is
  public: anyone could mint tokens with it), and
- every secret in the key ring (the variable ``[server] secret_env`` names) to be at least
  ``MIN_SECRET_BYTES`` bytes: a token is an HMAC over known fields, so one token lets anyone
  brute-force a short secret offline, and then mint tokens at will. Unset is fine with the
  memory store: the gateway then uses a random 32-byte key, and
- every ``[server] admin_keys`` entry to be at least ``MIN_ADMIN_KEY_CHARS`` characters:
  an admin key ends any session and drains any agent, and the API answers every guess.

It raises ``ConfigError`` naming the key (``relay serve`` and ``relay check-config`` exit 2
with it) and otherwise returns the warnings to log for development defaults on loopback.

Loopback: ``127.0.0.0/8``, ``::1`` (also as ``::ffff:127.x.y.z``) and the host name
``localhost``. Every other host name counts as outside loopback, since it may resolve to
any address; ``0.0.0.0`` and ``::`` are every interface.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from relay.config import Bind, Config
from relay.errors import ConfigError
from relay.tokens import KeyRing

__all__ = [
    "DEV_PUBLIC_KEY",
    "MIN_ADMIN_KEY_CHARS",
    "MIN_SECRET_BYTES",
    "check_exposure",
    "is_loopback",
]

#: The public key a config without ``public_keys`` accepts (SPEC §2's example, well known).
DEV_PUBLIC_KEY = "pk_dev_123"
#: Shortest HMAC secret accepted beyond loopback, in bytes (256 bits, SHA-256's size).
MIN_SECRET_BYTES = 32
#: Shortest admin key accepted beyond loopback (e.g. ``openssl rand -hex 16``).
MIN_ADMIN_KEY_CHARS = 32


def is_loopback(host: str) -> bool:
    """Whether a bind host only ever listens on this machine's loopback interface."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a host name other than localhost: it may resolve anywhere
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _first_exposed(config: Config) -> str | None:
    """``server.ws_bind[0] (0.0.0.0:8700)`` for the first bind outside loopback, if any."""
    server = config.server
    listed: tuple[tuple[str, tuple[Bind, ...]], ...] = (
        ("ws_bind", server.ws_bind),
        ("api_bind", server.api_bind),
    )
    for name, binds in listed:
        for i, bind in enumerate(binds):
            if not is_loopback(bind.host):
                return f"server.{name}[{i}] = {bind}"
    return None


def check_exposure(config: Config, environ: Mapping[str, str]) -> list[str]:
    """Refuse unsafe settings when a bind is outside loopback; else the warnings to log.

    Raises ``ConfigError`` (key ``server.public_keys`` or ``environment variable NAME``)
    when a bind is outside loopback and the development public key is accepted, or a
    secret in the key ring is shorter than ``MIN_SECRET_BYTES``; a key ring that does not
    parse is a ``ConfigError`` whatever the binds. Secrets are never quoted.
    """
    exposed = _first_exposed(config)
    var = config.server.secret_env
    value = environ.get(var, "")
    short: list[tuple[str, int]] = []
    if value.strip():
        try:
            ring = KeyRing.parse(value)
        except ValueError as error:
            raise ConfigError(str(error), key=f"environment variable {var}") from None
        short = [(kid, len(secret)) for kid, secret in ring.keys if len(secret) < MIN_SECRET_BYTES]
    dev_key = DEV_PUBLIC_KEY in config.server.public_keys

    if exposed is not None:
        if dev_key:
            raise ConfigError(
                f"must be set to keys of your own when a bind is outside loopback ({exposed}): "
                f"the development key {DEV_PUBLIC_KEY!r} is public",
                key="server.public_keys",
                file=config.source,
            )
        if short:
            kid, size = short[0]
            raise ConfigError(
                f"key {kid!r} has a {size}-byte secret; every secret must be at least "
                f"{MIN_SECRET_BYTES} bytes when a bind is outside loopback ({exposed}), "
                "or one token lets anyone guess it offline",
                key=f"environment variable {var}",
            )
        for i, admin_key in enumerate(config.server.admin_keys):
            if len(admin_key) < MIN_ADMIN_KEY_CHARS:
                raise ConfigError(
                    f"is {len(admin_key)} characters long; admin keys must be at least "
                    f"{MIN_ADMIN_KEY_CHARS} when a bind is outside loopback ({exposed}): "
                    "the operator API answers every guess",
                    key=f"server.admin_keys[{i}]",
                    file=config.source,
                )
        return []

    warnings: list[str] = []
    if dev_key:
        warnings.append(
            f"the development public key {DEV_PUBLIC_KEY!r} is accepted: fine while every "
            "bind is on loopback; set [server] public_keys before binding beyond it"
        )
    for kid, size in short:
        warnings.append(
            f"{var}: key {kid!r} has a {size}-byte secret: fine while every bind is on "
            f"loopback; use at least {MIN_SECRET_BYTES} bytes before binding beyond it"
        )
    return warnings
