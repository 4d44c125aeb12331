"""Prometheus metrics: every `gateway_*` series, built on a registry passed in (never the global one).

Labels are bounded: tenant, model, upstream, route, outcome-like enums. Never keys, prompts or users.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, values
from prometheus_client import Counter as _Counter
from prometheus_client import Gauge as _Gauge
from prometheus_client import Histogram as _Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.config import Settings


class _FastLabels:
    """`labels()` validates, converts and locks on every call: microseconds, and a request makes
    a dozen such calls. An existing child is looked up directly in the metric's own child table
    (keyed by the tuple of label strings; `clear()` replaces it, so nothing goes stale); a new
    one is created by prometheus_client as usual."""

    def labels(self, *labelvalues: Any, **labelkwargs: Any) -> Any:
        child = self._metrics.get(labelvalues)  # type: ignore[attr-defined]
        if child is None or labelkwargs:
            return super().labels(*labelvalues, **labelkwargs)  # type: ignore[misc]
        return child


class Counter(_FastLabels, _Counter):
    pass


class Gauge(_FastLabels, _Gauge):
    pass


class Histogram(_FastLabels, _Histogram):
    pass


class ExactUsdCounter:
    """A USD counter without float drift: each label set's total is kept in integer nano-USD and
    the exported value set from it (one correctly rounded division), instead of adding floats
    request after request (0.19800299999999998). Several workers' values are summed at scrape."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self._nano: dict[tuple[str, ...], int] = {}

    def add(self, *labels: str, nano_usd: int) -> None:
        total = self._nano.get(labels, 0) + nano_usd
        self._nano[labels] = total
        # prometheus_client has no public setter for a counter: its value object (in-process or a
        # multiprocess mmap) has one.
        self.counter.labels(*labels)._value.set(total / 1e9)


class KeptCounter:
    """A counter's per-request increments, counted in a dict and applied with the other updates
    kept back (`Metrics.before_collect`): a dict update instead of prometheus_client's label
    lookup, checks and lock (7k instructions) per request.

    `next_scrape`: what a client must find at its next scrape (the request metrics, counted at the
    answer). With workers a scrape reads the metric files, which the kept updates reach only once
    a second: there each update of such a metric goes straight to its child, nothing kept."""

    def __init__(self, metrics: Metrics, counter: Counter, *, next_scrape: bool = False) -> None:
        self._counter = counter
        self._counts: dict[tuple[str, ...], int] = {}
        self._at_once = next_scrape and metrics.shared
        metrics.before_collect(self.flush)

    def inc(self, labels: tuple[str, ...]) -> None:
        if self._at_once:  # nothing is ever kept: straight to the metric
            self._counter.labels(*labels).inc(1)
            return
        counts = self._counts
        counts[labels] = counts.get(labels, 0) + 1

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for labels, count in counts.items():
            self._counter.labels(*labels).inc(count)


class KeptHistogram:
    """A histogram's per-request observations, counted per bucket in a list and applied with the
    other updates kept back: a bisection instead of prometheus_client's label lookup, bucket loop
    and two locked increments (11k instructions). The buckets and the count exported are the
    same; the sum, added once per flush, may differ from one added per observation in its last
    float digits. `next_scrape` as for KeptCounter."""

    def __init__(self, metrics: Metrics, histogram: Histogram, *, next_scrape: bool = False) -> None:
        self._histogram = histogram
        self._at_once = next_scrape and metrics.shared
        # prometheus_client has no public way to add many observations at once: its bounds (+Inf
        # last) and each child's bucket and sum values (in-process, or a multiprocess mmap) do.
        self._bounds: list[float] = histogram._upper_bounds
        self._kept: dict[tuple[str, ...], list[float]] = {}  # per bucket, then the sum
        metrics.before_collect(self.flush)

    def observe(self, labels: tuple[str, ...], amount: float) -> None:
        bucket = bisect_left(self._bounds, amount)  # the first bucket whose bound >= amount
        if self._at_once:  # nothing is ever kept: straight to the child's bucket and sum
            child = self._histogram.labels(*labels)
            child._buckets[bucket].inc(1)
            child._sum.inc(amount)
            return
        kept = self._kept.get(labels)
        if kept is None:
            kept = self._kept[labels] = [0] * (len(self._bounds) + 1)
        kept[bucket] += 1
        kept[-1] += amount

    def flush(self) -> None:
        kept, self._kept = self._kept, {}
        for labels, counts in kept.items():
            child = self._histogram.labels(*labels)
            for bucket, count in zip(child._buckets, counts, strict=False):
                if count:
                    bucket.inc(count)
            child._sum.inc(counts[-1])


class KeptGauge:
    """A gauge of what is under way in this process (`value`; `with gauge:` counts the block), set
    to its value with the other updates kept back instead of through a lock at every change."""

    __slots__ = ("_gauge", "value")

    def __init__(self, metrics: Metrics, gauge: Gauge) -> None:
        self._gauge = gauge
        self.value = 0
        metrics.before_collect(self.flush)

    def __enter__(self) -> None:
        self.value += 1

    def __exit__(self, *_: object) -> None:
        self.value -= 1

    def flush(self) -> None:
        self._gauge.set(self.value)


# Generations take seconds to minutes; the gateway's own overhead is measured in milliseconds.
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_DRIFT_BUCKETS = (-1000, -100, -1, 0, 1, 100, 500, 1000, 2500, 5000, 10000, 50000)


class _BeforeCollect(Collector):
    """Registered first, so it runs first whenever the registry is read: applies the updates that
    were kept back (see `Metrics.before_collect`). Exports nothing itself."""

    def __init__(self) -> None:
        self.flushes: list[Callable[[], None]] = []

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for flush in self.flushes:
            flush()
        return iter(())


class Metrics:
    """All of the gateway's metrics, registered on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Values written to the workers' shared metric files (multiprocess mode), not kept in memory
        self.shared = values.ValueClass is not values.MutexValue
        r = registry
        self._before_collect = _BeforeCollect()
        r.register(self._before_collect)
        self.requests = Counter(
            "gateway_requests",
            "Requests answered, by tenant, model, route, operation (generate|edit|variation), HTTP status.",
            ["tenant", "model", "route", "operation", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from request received to last byte sent.",
            ["tenant", "model", "stream"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.upstream_ttfb = Histogram(
            "gateway_upstream_ttfb_seconds",
            "Time from forwarding to the upstream's response headers.",
            ["upstream"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.first_event = Histogram(
            "gateway_stream_first_event_seconds",
            "Time from request received to the first SSE bytes sent.",
            ["tenant", "model"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_in_flight_requests",
            "Requests being served now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_open = Gauge(
            "gateway_connections_open",
            "Client connections open now, by listener: tenant (the API port), ops (server.ops_port).",
            ["listener"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connections_closed = Counter(
            "gateway_connections_closed",
            "Client connections the front door closed, by listener (tenant, ops) and reason:"
            " header_timeout, keepalive_timeout, body_timeout, write_timeout (the client did not take"
            " its answers), idle_evicted and stalled_evicted (to make room at the listener's"
            " connection cap: an idle connection, else one whose writes are paused), refused (at the"
            " cap with neither), malformed (an HTTP parser error), head_too_large (431).",
            ["listener", "reason"],
            registry=r,
        )
        self.body_bytes_buffered = Gauge(
            "gateway_body_bytes_buffered",
            "Bytes of request bodies being read now (bounded by server.max_buffered_body_bytes).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.open_streams = Gauge(
            "gateway_open_streams",
            "SSE streams being relayed now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.gc_pause = Histogram(
            "gateway_gc_pause_seconds",
            "Garbage collections of this process, by generation (0, 1, 2: full), and how long each"
            " stopped it (garbage.py).",
            ["generation"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.policy_decisions = Counter(
            "gateway_policy_decisions",
            "Policy outcomes other than a plain allow, by tenant and rule.",
            ["tenant", "rule", "decision"],
            registry=r,
        )
        self.ratelimit_decisions = Counter(
            "gateway_ratelimit_decisions",
            "Limiter outcomes by tenant and limit.",
            ["tenant", "limit", "decision"],
            registry=r,
        )
        # What is charged, as the ledger and budgets charge it: from the upstream's usage, or at
        # the estimate when the usage cannot be known (`settled`); refunds charge nothing.
        self.tokens = Counter(
            "gateway_tokens",
            "Charged tokens by tenant, model, price bucket and how they were settled.",
            ["tenant", "model", "bucket", "settled"],
            registry=r,
        )
        self.images = Counter(
            "gateway_images",
            "Charged images by tenant, model, size, quality and how they were settled.",
            ["tenant", "model", "size", "quality", "settled"],
            registry=r,
        )
        self.spend = ExactUsdCounter(
            Counter(
                "gateway_spend_usd",
                "Charged spend in USD by tenant, model and how it was settled.",
                ["tenant", "model", "settled"],
                registry=r,
            )
        )
        self.budget_remaining = Gauge(
            "gateway_budget_remaining",
            "What is left of each limit after the latest admission.",
            ["tenant", "limit"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.reservation_drift = Histogram(
            "gateway_reservation_drift_tokens",
            "Estimated minus actual tokens per settled request.",
            ["tenant", "model"],
            buckets=_DRIFT_BUCKETS,
            registry=r,
        )
        self.usage_missing = Counter(
            "gateway_usage_missing",
            "Responses settled without a reported usage (billed at the estimate).",
            ["tenant", "model"],
            registry=r,
        )
        self.settlements_retried = Counter(
            "gateway_settlements_retried",
            "Settlements the store did not take at once, left to the outbox to retry.",
            registry=r,
        )
        self.settlements_pending = Gauge(
            "gateway_settlements_pending",
            "Settlements and releases waiting in the outbox for the store.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.settlements_lost = Counter(
            "gateway_settlements_lost",
            "Settlements or releases given up (outbox full, or pending at shutdown), by kind.",
            ["kind"],
            registry=r,
        )
        for kind in ("settle", "release"):
            self.settlements_lost.labels(kind)  # exported at 0 from the start, for alerts
        self.store_up = Gauge(
            "gateway_store_up",
            "1 while the limits store answers, 0 while it does not.",
            registry=r,
            multiprocess_mode="min",
        )
        self.store_errors = Counter(
            "gateway_store_errors",
            "Store operations that failed, by operation.",
            ["operation"],
            registry=r,
        )
        self.store_latency = Histogram(
            "gateway_store_latency_seconds",
            "Store operation latency, by operation.",
            ["operation"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.degraded_decisions = Counter(
            "gateway_store_degraded_decisions",
            "Requests decided without the store, by on_unavailable mode.",
            ["mode"],
            registry=r,
        )
        self.load_shed = Counter(
            "gateway_load_shed",
            "Requests refused with 503 overloaded: server.max_pending_admissions were being decided.",
            registry=r,
        )
        self.tenant_share_refused = Counter(
            "gateway_tenant_share_refused",
            "Requests refused with 429 at the front door: their tenant held its server.max_tenant_share"
            " of a bound (pending_admissions, buffered_body_bytes).",
            ["tenant", "bound"],
            registry=r,
        )
        self.pending_admissions = Gauge(
            "gateway_pending_admissions",
            "Requests between arrival and their admission decision.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Upstream failures by upstream and kind.",
            ["upstream", "kind"],
            registry=r,
        )
        self.upstream_up = Gauge(
            "gateway_upstream_up",
            "1 while an upstream is in rotation, 0 while it is ejected after consecutive failures.",
            ["upstream"],
            registry=r,
            multiprocess_mode="min",
        )
        self.upstream_attempts = Counter(
            "gateway_upstream_attempts",
            "Attempts at an upstream by outcome (skipped_* were never sent).",
            ["upstream", "outcome"],
            registry=r,
        )
        self.failovers = Counter(
            "gateway_failovers",
            "Requests passed from one upstream to the next after a failure that made no image.",
            ["route", "from_upstream", "to_upstream"],
            registry=r,
        )
        self.upstream_budget_remaining = Gauge(
            "gateway_upstream_budget_remaining",
            "What is left of the organisation's quota at an upstream after the latest reservation.",
            ["upstream", "limit"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.clients_gone = Counter(
            "gateway_clients_gone",
            "Requests whose client left, or stopped reading, before the end of the response.",
            ["tenant", "model"],
            registry=r,
        )
        self.trace_spans_dropped = Counter(
            "gateway_trace_spans_dropped",
            "Finished spans never exported: the export queue was full, or the collector refused them.",
            ["reason"],
            registry=r,
        )
        for reason in ("queue_full", "export_failed"):
            self.trace_spans_dropped.labels(reason)  # exported at 0 from the start, for alerts

    def before_collect(self, flush: Callable[[], None]) -> None:
        """Have `flush` apply updates kept back in this process whenever the registry is read (and
        at every `apply_kept`)."""
        self._before_collect.flushes.append(flush)

    def apply_kept(self) -> None:
        """Apply every update kept back in this process: with workers, a scrape reads every worker's
        metric files, not this process's registry, so the store calls this once a second."""
        for flush in self._before_collect.flushes:
            flush()

    def initialise(self, settings: Settings) -> None:
        """Export at 0 the counters dashboards and alerts take `rate()` of, for every label set the
        configuration names (at start and after a reload), so they read 0 instead of "no data"
        until they first fire. The store's own are initialised by the store."""
        for upstream in settings.upstreams:
            for kind in UPSTREAM_ERROR_KINDS:
                self.upstream_errors.labels(upstream, kind)
        for tenant in settings.tenants:
            for model in settings.models_for(tenant):
                self.usage_missing.labels(tenant, model)
                self.clients_gone.labels(tenant, model)


# The kinds of gateway_upstream_errors_total known in advance (an upstream's error status adds
# `http_<status>` when it first happens).
UPSTREAM_ERROR_KINDS = (
    "upstream_unavailable",
    "upstream_connect_timeout",
    "upstream_read_timeout",
    "upstream_auth_failed",
    "stream_error",
)


class ConfigCollector(Collector):
    """Series that describe the configuration, read from it at every scrape: `gateway_budget_limit`.

    Not a gauge: in multiprocess mode (workers) a gauge's labels cannot be cleared, so a limit
    removed by a reload would be exported for ever; read at scrape time it simply goes away."""

    def __init__(self, settings: Callable[[], Settings]) -> None:
        self._settings = settings

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "gateway_budget_limit",
            "The configured size of each tenant limit (USD for usd_* limits).",
            labels=["tenant", "limit"],
        )
        for tenant, tenant_settings in self._settings().tenants.items():
            limits = tenant_settings.limits.model_dump(exclude_none=True, exclude={"modes"})
            for limit, value in limits.items():
                family.add_metric([tenant, limit], float(value))
        yield family
        upstreams = GaugeMetricFamily(
            "gateway_upstream_budget_limit",
            "The configured size of each upstream's provider quota (upstreams.*.limits).",
            labels=["upstream", "limit"],
        )
        for upstream, upstream_settings in self._settings().upstreams.items():
            if upstream_settings.limits is not None:
                for limit, value in upstream_settings.limits.model_dump(exclude_none=True).items():
                    upstreams.add_metric([upstream, limit], float(value))
        yield upstreams
