"""[sans-IO] Checks of single config values, and how a problem names its key and value.

`_Table` walks one TOML table for `relay.config`'s parsers: it knows the dotted key of
everything it hands out, so a problem is raised as `ConfigError(problem, key=...)`. The
`_..._problem` functions return a sentence or None."""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn
from urllib.parse import urlsplit

from relay.config_schema import NAME_RE, Bind
from relay.errors import ConfigError


def parse_bind(text: str) -> Bind:
    """Parse ``"host:port"`` or ``"[ipv6]:port"`` (port 0..65535; 0 picks a free port)."""
    if not isinstance(text, str):
        raise ConfigError(f'must be a string like "127.0.0.1:8700", got {_show(text)}')
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ConfigError(f'{_show(text)} is not "[ipv6]:port"')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{_show(text)}: {_show(host)} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f'{_show(text)} has no port: write "host:port"')
        if ":" in host:
            raise ConfigError(f'{_show(text)}: write an IPv6 address in brackets, "[::1]:8700"')
        if not host:
            raise ConfigError(
                f'{_show(text)} has no host: use "0.0.0.0:port" or "[::]:port" for all interfaces'
            )
        if not _HOSTNAME_RE.fullmatch(host):
            raise ConfigError(f"{_show(text)}: {_show(host)} is not a host name or IPv4 address")
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or int(port_text) > 65535:
        raise ConfigError(f"{_show(text)}: port must be a number from 0 to 65535")
    return Bind(host, int(port_text))


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?")


# --------------------------------------------------------------------------------------
# Value checks
# --------------------------------------------------------------------------------------


def _bot_problem(bot: str) -> str | None:
    if bot.startswith("python:"):
        module, sep, function = bot[len("python:") :].rpartition(":")
        parts = module.split(".")
        if not sep or not all(p.isidentifier() for p in parts) or not function.isidentifier():
            return f"{_show(bot)} is not python:package.module:function"
        return None
    if bot.startswith(("ws://", "wss://")):
        return _url_problem(bot, ("ws", "wss"), allow_query=True)
    return f"must be a ws:// or wss:// URL or python:package.module:function, got {_show(bot)}"


def _url_problem(url: str, schemes: tuple[str, ...], *, allow_query: bool) -> str | None:
    wanted = " or ".join(f"{s}://" for s in schemes)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"{_show(url)} is not a valid URL: {exc}"
    if parts.scheme not in schemes or not url.startswith(f"{parts.scheme}://"):
        return f"must start with {wanted}, got {_show(url)}"
    if not parts.hostname:
        return f"{_show(url)} has no host"
    if "@" in parts.netloc:
        redacted = url.replace(parts.netloc, "***@" + parts.netloc.rpartition("@")[2], 1)
        return (f"{_show(redacted)} must not carry credentials (user:password@host): relay "
                "does not send them; keep the bot reachable only from the gateway's network")
    if parts.fragment or (parts.query and not allow_query):
        return f"{_show(url)} must not have a query or fragment"
    return None


def _origin_problem(origin: str) -> str | None:
    if origin == "*":
        return None
    problem = _url_problem(origin, ("http", "https"), allow_query=False)
    if problem:
        return f'must be "*" or an origin like "https://app.example.com": {problem}'
    parts = urlsplit(origin)
    if parts.path or parts.username or parts.password:
        bare = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return f"{_show(origin)} is not an origin (scheme://host[:port] only): use {_show(bare)}"
    return None


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "table"
    return type(value).__name__


def _show(value: object) -> str:
    """A value as the user wrote it in TOML, shortened."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
    elif isinstance(value, Mapping):
        text = "a table"
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _got(value: object) -> str:
    return f"got {_show(value)} ({_type_name(value)})"


def _quote(name: str) -> str:
    """A key as it would be written in a dotted TOML key."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name, ensure_ascii=False)


_ABSENT: Any = object()


class _Table:
    """One TOML table being read: typed getters that raise with the dotted key path."""

    def __init__(self, data: Any, path: str, file: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"must be a table, {_got(data)}", key=path, file=file)
        self.data: Mapping[str, Any] = data
        self.path = path
        self.file = file

    def key(self, name: str) -> str:
        return f"{self.path}.{_quote(name)}" if self.path else _quote(name)

    def fail(self, name: str, problem: str) -> NoReturn:
        raise ConfigError(problem, key=self.key(name), file=self.file)

    def fail_at(self, key: str, problem: str) -> NoReturn:
        raise ConfigError(problem, key=key, file=self.file)

    def has(self, name: str) -> bool:
        return name in self.data

    def reject_unknown(self, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        for name in self.data:
            if name not in allowed:
                close = difflib.get_close_matches(name, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.fail(name, f"unknown key{hint}")

    def table(self, name: str) -> _Table:
        return _Table(self.data.get(name, {}), self.key(name), self.file)

    def _get(self, name: str, default: Any) -> Any:
        return self.data.get(name, default)

    def string(self, name: str, default: str) -> str:
        value = self._get(name, default)
        if not isinstance(value, str):
            self.fail(name, f"must be a string, {_got(value)}")
        return value

    def name(self, name: str, default: str) -> str:
        value = self.string(name, default)
        if not NAME_RE.fullmatch(value):
            self.fail(name, f"must be 1 to 64 characters from A-Z a-z 0-9 _ -, got {_show(value)}")
        return value

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.string(name, default)
        if value not in choices:
            options = ", ".join(json.dumps(c) for c in choices)
            self.fail(name, f"must be one of {options}, got {_show(value)}")
        return value

    def positive_int(self, name: str, default: int) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(name, f"must be a positive integer, {_got(value)}")
        if value <= 0:
            self.fail(name, f"must be a positive integer, got {value}")
        return value

    def _number(self, name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(name, f"must be a number of seconds, {_got(value)}")
        return float(value)

    def rate(self, name: str, default: float) -> float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(name, f"must be a number per second, {_got(value)}")
        if not math.isfinite(value) or value <= 0:
            self.fail(name, f"must be a positive, finite number per second, got {value!r}")
        return float(value)

    def seconds(self, name: str, default: float) -> float:
        value = self._number(name, self._get(name, default))
        if not math.isfinite(value) or value <= 0:
            self.fail(name, f"must be a positive, finite number of seconds, got {value!r}")
        return value

    def seconds_or_none(self, name: str) -> float | None:
        """Like ``seconds``, but ``inf`` means "no limit" (TOML has no null)."""
        value = self._number(name, self._get(name, _ABSENT))
        if value == math.inf:
            return None
        if math.isnan(value) or value <= 0:
            self.fail(name, f"must be a positive number of seconds (inf = none), got {value!r}")
        return value

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(name, default)
        if not isinstance(value, list | tuple):
            self.fail(name, f"must be an array of strings, {_got(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.fail_at(f"{self.key(name)}[{i}]", f"must be a string, {_got(item)}")
        return tuple(value)

    def binds(self, name: str, default: tuple[Bind, ...]) -> tuple[Bind, ...]:
        if not self.has(name):
            return default
        texts = self.strings(name, ())
        if not texts:
            self.fail(name, 'must list at least one "host:port" address')
        binds: list[Bind] = []
        for i, text in enumerate(texts):
            try:
                binds.append(parse_bind(text))
            except ConfigError as exc:
                self.fail_at(f"{self.key(name)}[{i}]", exc.problem)
        return tuple(binds)
