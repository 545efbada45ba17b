"""The error tree of relay, and what each error becomes on the wire.

    RelayError
    ├── ConfigError          bad configuration: `relay serve` exits 2 (file, key, problem)
    ├── BindError            a listen address cannot be opened: exit 2, names the address
    ├── HandshakeError       a client's upgrade is refused before accept: HTTP status + JSON
    └── BotDialError         the bot leg could not be opened: 502 (refused/unreachable/
                             rejected) or 504 (no answer within bot_connect_timeout)

Errors carry the status they become (like h11's ``error_status_hint``), so the I/O layer
maps them without a table of its own.
"""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error relay raises on purpose."""


class ConfigError(RelayError):
    """A configuration problem, reported as ``file: key: problem``."""

    exit_status = 2

    def __init__(self, problem: str, *, key: str = "", file: str = "") -> None:
        self.problem = problem
        self.key = key
        self.file = file
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.key) if p]
        return ": ".join([*parts, self.problem])


class BindError(RelayError):
    """A listen address could not be opened."""

    exit_status = 2

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        self.reason = reason
        super().__init__(f"cannot listen on {address}: {reason}")


class HandshakeError(RelayError):
    """A client's upgrade request refused before any 101 is sent."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        super().__init__(f"{status} {code}: {detail}")


#: Why a bot dial failed (the ``reason`` label of ``relay_bot_dial_failures_total``):
#: nothing accepted the TCP connection, the TLS handshake failed, the bot answered
#: anything but a valid 101 (or closed), or it did not answer within bot_connect_timeout.
DIAL_FAILURE_REASONS = ("unreachable", "tls", "rejected", "timeout")


class BotDialError(RelayError):
    """The bot could not be reached (502) or did not answer in time (504)."""

    def __init__(self, status: int, detail: str, *, reason: str = "") -> None:
        assert status in (502, 504)
        self.status = status
        self.detail = detail
        self.reason = reason or ("timeout" if status == 504 else "rejected")
        assert self.reason in DIAL_FAILURE_REASONS
        super().__init__(f"{status}: {detail}")

