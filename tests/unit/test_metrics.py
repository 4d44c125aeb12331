"""The metrics' fast `labels()`: the same child as prometheus_client's, and never stale after `clear()`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics


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

    metrics.budget_limit.labels("team", "usd_per_day").set(5)
    metrics.budget_limit.clear()
    assert (
        registry.get_sample_value("gateway_budget_limit", {"tenant": "team", "limit": "usd_per_day"}) is None
    )
    metrics.budget_limit.labels("team", "usd_per_day").set(7)
    assert registry.get_sample_value("gateway_budget_limit", {"tenant": "team", "limit": "usd_per_day"}) == 7
