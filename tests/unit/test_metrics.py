"""The metrics' fast `labels()`: the same child as prometheus_client's, and never stale after `clear()`;
the kept counters, histograms and gauges export what prometheus_client's own updates would."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry.metrics import ConfigCollector, KeptCounter, KeptGauge, KeptHistogram, Metrics
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


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(registry: CollectorRegistry, name: str) -> Samples:
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return _by_sample(family for family in families if family.name == name)


def _by_sample(families: Iterable[Metric]) -> Samples:
    """Each sample's value by its name and labels (creation times left out)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families
        for s in family.samples
        if not s.name.endswith("_created")
    }


def _count_requests(requests: KeptCounter, durations: KeptHistogram, direct: Metrics) -> None:
    """The same requests counted through the kept metrics and straight on `direct`'s: durations at
    bucket bounds exactly, between them, beyond the last (+Inf), zero and an inexact sum; two label
    sets each."""
    for i, amount in enumerate([0.0, 0.005, 0.0051, 0.25, 0.3, 300.0, 301.5, 0.005, 7.0, 0.1 + 0.2]):
        labels = ("team", "m", "true" if i % 3 else "false")
        durations.observe(labels, amount)
        direct.request_duration.labels(*labels).observe(amount)
        counted = ("team", "m", "openai", "generate", str(200 + i % 2))
        requests.inc(counted)
        direct.requests.labels(*counted).inc()


def test_kept_updates_export_what_prometheus_clients_own_would_once_the_registry_is_read() -> None:
    kept_registry, direct_registry = CollectorRegistry(), CollectorRegistry()
    kept_metrics, direct = Metrics(kept_registry), Metrics(direct_registry)
    requests = KeptCounter(kept_metrics, kept_metrics.requests)
    durations = KeptHistogram(kept_metrics, kept_metrics.request_duration)
    _count_requests(requests, durations, direct)
    assert kept_registry.get_sample_value("gateway_requests_total", {"status": "200"}) is None  # kept
    for name in ("gateway_request_duration_seconds", "gateway_requests"):
        assert _samples(kept_registry, name) == _samples(direct_registry, name)
        assert _samples(kept_registry, name)
    durations.observe(("team", "m", "true"), 0.01)  # after a flush, counted on top
    direct.request_duration.labels("team", "m", "true").observe(0.01)
    kept_metrics.apply_kept()  # what the store does once a second, for workers' metric files
    assert _samples(kept_registry, "gateway_request_duration_seconds") == _samples(
        direct_registry, "gateway_request_duration_seconds"
    )


def test_with_workers_updates_applied_at_once_are_prometheus_clients_own_sample_for_sample() -> None:
    """The at-once path (workers) writes each update straight to its child, without the kept dicts
    and their flush: the metric's own samples, unread by the registry, are those of plain updates."""
    at_once_metrics, direct = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    at_once_metrics.shared = True  # as with workers
    requests = KeptCounter(at_once_metrics, at_once_metrics.requests, next_scrape=True)
    durations = KeptHistogram(at_once_metrics, at_once_metrics.request_duration, next_scrape=True)
    _count_requests(requests, durations, direct)
    for name in ("request_duration", "requests"):
        # the metric's own samples (what its files hold), not the registry's read, which applies all
        samples = _by_sample(getattr(at_once_metrics, name).collect())
        assert samples == _by_sample(getattr(direct, name).collect())
        assert samples


def test_a_kept_gauge_is_read_when_the_registry_is() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    in_flight = KeptGauge(metrics, metrics.in_flight)
    with in_flight:
        in_flight.value += 2
        assert registry.get_sample_value("gateway_in_flight_requests") == 3
    assert registry.get_sample_value("gateway_in_flight_requests") == 2


def test_with_workers_what_the_next_scrape_must_find_is_applied_at_once() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.shared = True  # as with workers: a scrape reads the metric files, not this registry
    requests = KeptCounter(metrics, metrics.requests, next_scrape=True)
    durations = KeptHistogram(metrics, metrics.request_duration, next_scrape=True)
    kept = KeptCounter(metrics, metrics.upstream_errors)
    requests.inc(("team", "m", "openai", "generate", "200"))
    durations.observe(("team", "m", "false"), 0.02)
    kept.inc(("openai", "http_500"))

    def value(metric: Any, sample: str, **labels: str) -> float | None:
        # the metric's own samples (what its files hold), not the registry's read, which applies all
        for family in metric.collect():
            for s in family.samples:
                if s.name == sample and labels.items() <= s.labels.items():
                    return float(s.value)
        return None

    assert value(metrics.requests, "gateway_requests_total", status="200") == 1
    assert value(metrics.request_duration, "gateway_request_duration_seconds_count") == 1
    assert value(metrics.upstream_errors, "gateway_upstream_errors_total", kind="http_500") is None
    metrics.apply_kept()
    assert value(metrics.upstream_errors, "gateway_upstream_errors_total", kind="http_500") == 1
