"""relay.metrics: each gateway's own registry, and what /metrics exposes."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from relay.metrics import Metrics


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    data, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(data.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_sessions_started_ended_active() -> None:
    m = Metrics()
    m.session_started("a")
    m.session_started("a")
    m.session_started("b")
    m.session_ended("a", "client_closed")
    s = _samples(m)
    assert s[("relay_sessions_active", (("agent", "a"),))] == 1
    assert s[("relay_sessions_active", (("agent", "b"),))] == 1
    assert s[("relay_sessions_started_total", (("agent", "a"),))] == 2
    assert s[("relay_sessions_ended_total", (("agent", "a"), ("reason", "client_closed")))] == 1


def test_relayed_counts_batches() -> None:
    m = Metrics()
    s = _samples(m)
    assert s[("relay_messages_relayed_total", (("direction", "client_to_bot"),))] == 0
    m.relayed("client_to_bot", 3, 300)
    m.relayed("client_to_bot", 1, 0)
    m.relayed("bot_to_client", 2, 10)
    s = _samples(m)
    assert s[("relay_messages_relayed_total", (("direction", "client_to_bot"),))] == 4
    assert s[("relay_bytes_relayed_total", (("direction", "client_to_bot"),))] == 300
    assert s[("relay_messages_relayed_total", (("direction", "bot_to_client"),))] == 2
    assert s[("relay_bytes_relayed_total", (("direction", "bot_to_client"),))] == 10
    with pytest.raises(ValueError):
        m.relayed("sideways", 1, 1)


def test_refusals_starts_dials_store_full() -> None:
    m = Metrics()
    m.token_refused("expired")
    m.token_refused("expired")
    m.token_refused("replayed")
    m.start_request(200)
    m.start_request(401)
    m.bot_dial("a", 0.02)
    m.bot_dial("a", 3.0)
    m.store_full("body_bytes")
    s = _samples(m)
    assert s[("relay_token_refusals_total", (("reason", "expired"),))] == 2
    assert s[("relay_token_refusals_total", (("reason", "replayed"),))] == 1
    assert s[("relay_start_requests_total", (("status", "401"),))] == 1
    assert s[("relay_bot_dial_seconds_count", (("agent", "a"),))] == 2
    assert s[("relay_bot_dial_seconds_bucket", (("agent", "a"), ("le", "0.025")))] == 1
    assert s[("relay_bot_dial_seconds_sum", (("agent", "a"),))] == pytest.approx(3.02)
    assert s[("relay_store_full_total", (("bound", "body_bytes"),))] == 1


def test_two_gateways_do_not_share_or_touch_the_global_registry() -> None:
    a, b = Metrics(), Metrics()
    a.session_started("x")
    assert _samples(b).get(("relay_sessions_started_total", (("agent", "x"),))) is None
    assert REGISTRY.get_sample_value("relay_sessions_started_total", {"agent": "x"}) is None
