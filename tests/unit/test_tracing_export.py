"""The span export's accounting: every finished span is exported or counted as dropped.

`_CountingBatchProcessor` reads the SDK batch processor's queue to count what a full queue drops;
this holds it to the SDK's behaviour (a newer SDK that changed it fails here, not silently)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from prometheus_client import CollectorRegistry

from gateway.config.telemetry import TelemetrySettings
from gateway.telemetry.export import _CountingBatchProcessor, _CountingExporter, sampler
from gateway.telemetry.metrics import Metrics


class HeldExporter(SpanExporter):
    """Blocks every export until released (a collector that hangs); then succeeds or fails."""

    def __init__(self, result: SpanExportResult) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.result = result
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(10)
        self.exported += len(spans)
        return self.result


def run(result: SpanExportResult, spans: int) -> tuple[HeldExporter, Metrics]:
    metrics = Metrics(CollectorRegistry())
    exporter = HeldExporter(result)
    dropped = metrics.trace_spans_dropped
    processor = _CountingBatchProcessor(
        _CountingExporter(exporter, dropped),
        dropped,
        max_queue_size=4,
        schedule_delay_millis=10,
        max_export_batch_size=2,
        export_timeout_millis=1000,
    )
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    for _ in range(2):  # a batch: the export thread takes it and hangs in the exporter
        tracer.start_span("s").end()
    assert exporter.entered.wait(5)
    for _ in range(spans - 2):  # meanwhile the queue fills, then drops
        tracer.start_span("s").end()
    exporter.release.set()
    provider.shutdown()
    return exporter, metrics


def dropped(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("gateway_trace_spans_dropped_total", {"reason": reason}) or 0.0


def test_a_full_queue_drops_and_counts_every_span_it_drops() -> None:
    exporter, metrics = run(SpanExportResult.SUCCESS, 50)
    assert dropped(metrics, "queue_full") == 50 - 2 - 4  # the batch under way, and a full queue
    assert exporter.exported == 6
    assert dropped(metrics, "export_failed") == 0


def test_a_failed_export_counts_its_spans() -> None:
    exporter, metrics = run(SpanExportResult.FAILURE, 50)
    assert dropped(metrics, "export_failed") == exporter.exported > 0
    assert exporter.exported + dropped(metrics, "queue_full") == 50


def test_samplers_as_the_sdk_names_them() -> None:
    ratio = sampler(TelemetrySettings(sampler="parentbased_traceidratio", sampler_arg=0.5))
    assert isinstance(ratio, ParentBased)
    assert "TraceIdRatioBased{0.5}" in ratio.get_description()
    assert isinstance(sampler(TelemetrySettings(sampler="traceidratio", sampler_arg=0.1)), TraceIdRatioBased)
    assert sampler(TelemetrySettings(sampler="always_off")).get_description() == "AlwaysOffSampler"
