"""The metrics' fast `labels()`: the same child as prometheus_client's, and never stale after `clear()`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gateway.metrics import ConfigCollector, Metrics
from tests.support.config import make_settings


def test_fast_labels_return_the_registered_child_and_follow_clear() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    first = metrics.requests.labels("team", "m", "openai", "generate", "200")
    assert metrics.requests.labels("team", "m", "openai", "generate", "200") is first
    assert (
        metrics.requests.labels(tenant="team", model="m", route="openai", operation="generate", status="200")
        is first
    )
    first.inc()
    metrics.requests.labels("team", "m", "openai", "generate", "200").inc()
    labels = {"tenant": "team", "model": "m", "route": "openai", "operation": "generate", "status": "200"}
    assert registry.get_sample_value("gateway_requests_total", labels) == 2

    metrics.requests.clear()
    assert registry.get_sample_value("gateway_requests_total", labels) is None
    metrics.requests.labels("team", "m", "openai", "generate", "200").inc(7)
    assert registry.get_sample_value("gateway_requests_total", labels) == 7


def test_budget_limits_are_read_from_the_configuration_shadowed_ones_included() -> None:
    limits = {"requests_per_minute": 60, "usd_per_day": {"value": 50, "mode": "shadow"}}
    settings = make_settings("http://127.0.0.1:1/v1", limits=limits)
    registry = CollectorRegistry()
    registry.register(ConfigCollector(lambda: settings))
    for limit, value in (("requests_per_minute", 60), ("usd_per_day", 50)):
        assert registry.get_sample_value("gateway_budget_limit", {"tenant": "team", "limit": limit}) == value
