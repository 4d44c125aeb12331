"""The metrics' fast `labels()`: the same child as prometheus_client's, and never stale after `clear()`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gateway.metrics import Metrics


def test_fast_labels_return_the_registered_child_and_follow_clear() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    first = metrics.requests.labels("team", "m", "/v1/images/generations", "200")
    assert metrics.requests.labels("team", "m", "/v1/images/generations", "200") is first
    assert (
        metrics.requests.labels(tenant="team", model="m", route="/v1/images/generations", status="200")
        is first
    )
    first.inc()
    metrics.requests.labels("team", "m", "/v1/images/generations", "200").inc()
    labels = {"tenant": "team", "model": "m", "route": "/v1/images/generations", "status": "200"}
    assert registry.get_sample_value("gateway_requests_total", labels) == 2

    metrics.requests.clear()
    assert registry.get_sample_value("gateway_requests_total", labels) is None
    metrics.requests.labels("team", "m", "/v1/images/generations", "200").inc(7)
    assert registry.get_sample_value("gateway_requests_total", labels) == 7
