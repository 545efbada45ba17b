"""[sans-IO] When the trio client reconnects, and how long it waits between tries.

A connection that ends with one of ``Reconnect.codes`` (by default 1001, 1006, 1011, 1014:
the gateway or the network went away, or the bot did) is *lost*: the client asks /start
for a fresh token and connects again, up to ``attempts`` tries per loss, none starting
later than ``give_up_after`` seconds after the loss, and at most ``max_reconnects``
successful reconnections over the session's life. Any other close ends the session.

Delays grow exponentially (``first_delay * factor ** (try - 1)``, capped at
``max_delay``) and are jittered downwards by up to ``jitter`` of themselves, so many
clients dropped by one restart do not come back in lockstep. The random draw is passed
in, so the schedule is a plain function of its inputs.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

__all__ = ["ABNORMAL_CLOSES", "Reconnect"]

#: Close codes that mean "gone, not finished": 1001 going away (a gateway shutting down or
#: restarting), 1006 no close frame (TCP drop), 1011 bot error, 1014 bot gone (bad gateway).
ABNORMAL_CLOSES = frozenset({1001, 1006, 1011, 1014})


def _non_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"Reconnect.{attribute.name} must be a finite number >= 0, "
                         f"got {value!r}")


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"Reconnect.{attribute.name} must be a finite number > 0, "
                         f"got {value!r}")


def _count(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None and attribute.name == "max_reconnects":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Reconnect.{attribute.name} must be an integer >= 0, got {value!r}")


def _factor(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"Reconnect.factor must be a finite number >= 1, got {value!r}")


def _fraction(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0 <= value <= 1:
        raise ValueError(f"Reconnect.jitter must be between 0 and 1, got {value!r}")


def _codes(instance: object, attribute: attrs.Attribute[frozenset[int]],
           value: frozenset[int]) -> None:
    for code in value:
        if isinstance(code, bool) or not isinstance(code, int) or not 1000 <= code <= 4999:
            raise ValueError(f"Reconnect.codes must hold close codes 1000-4999, got {code!r}")


@attrs.frozen
class Reconnect:
    """The reconnection policy of one ``relay.client`` session (see the module docstring)."""

    attempts: int = attrs.field(default=5, validator=_count)  # tries per loss; 0 = never
    first_delay: float = attrs.field(default=0.5, validator=_non_negative)  # seconds
    max_delay: float = attrs.field(default=10.0, validator=_non_negative)  # seconds
    factor: float = attrs.field(default=2.0, validator=_factor)
    jitter: float = attrs.field(default=0.25, validator=_fraction)  # fraction of a delay
    give_up_after: float = attrs.field(default=60.0, validator=_positive)  # seconds per loss
    max_reconnects: int | None = attrs.field(default=None, validator=_count)  # per session
    codes: frozenset[int] = attrs.field(default=ABNORMAL_CLOSES, converter=frozenset,
                                        validator=_codes)

    def delay(self, attempt: int, draw: float) -> float:
        """Seconds to wait before try ``attempt`` (1-based); ``draw`` is uniform in [0, 1)."""
        if attempt < 1:
            raise ValueError(f"attempt is 1-based, got {attempt!r}")
        base = min(self.first_delay, self.max_delay)
        for _ in range(attempt - 1):  # stops as soon as the cap is reached
            if base >= self.max_delay or self.factor == 1 or base == 0:
                break
            base = min(self.max_delay, base * self.factor)
        return base * (1 - self.jitter * draw)

    def reconnects_on(self, code: int) -> bool:
        """Whether a connection closed with ``code`` is lost (reconnect) or ended."""
        return code in self.codes
