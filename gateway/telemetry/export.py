"""Getting spans out of the process: the OpenTelemetry SDK's provider, sampler, batch processor
and OTLP exporter, built from `telemetry:` settings, and the count of spans that were lost.

The request path only appends a finished span to the batch processor's bounded queue; a thread
of the processor's own exports batches. So a collector that is down or slow costs requests
nothing: while it is, the queue fills and further spans are dropped, counted in
`gateway_trace_spans_dropped_total{reason="queue_full"}`; a batch the exporter gave up on (after
its own retries, within `export_timeout_seconds`) is counted with `reason="export_failed"`.

Built per process, after the workers are started (each worker builds its own), and never made
OpenTelemetry's global provider: the app owns it and shuts it down, giving the last spans at
most SHUTDOWN_MILLIS to go out.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)

from gateway.config.telemetry import TelemetrySettings
from gateway.telemetry.metrics import Counter

# The longest the shutdown waits for the last spans to go out.
SHUTDOWN_MILLIS = 2000
MAX_ATTRIBUTE_CHARS = 256  # longer attribute values are cut by the SDK


class Exporting:
    """The tracer provider of this process and what it exports through."""

    def __init__(self, settings: TelemetrySettings, dropped: Counter) -> None:
        self.processor = _CountingBatchProcessor(
            _CountingExporter(_exporter(settings), dropped),
            dropped,
            max_queue_size=settings.max_queue_size,
            schedule_delay_millis=settings.schedule_delay_ms,
            max_export_batch_size=min(settings.max_export_batch_size, settings.max_queue_size),
            export_timeout_millis=settings.export_timeout_seconds * 1000,
        )
        self.provider = TracerProvider(
            sampler=sampler(settings),
            resource=_resource(settings),
            shutdown_on_exit=False,
            # a value a client chose (a size, a quality in shadow mode) cannot bloat a batch
            span_limits=SpanLimits(max_attribute_length=MAX_ATTRIBUTE_CHARS),
        )
        self.provider.add_span_processor(self.processor)

    def shutdown(self) -> None:
        """Export what is queued, waiting at most SHUTDOWN_MILLIS (blocking: run off the loop)."""
        self.provider.shutdown()


def sampler(settings: TelemetrySettings) -> Sampler:
    """OTEL_TRACES_SAMPLER's values, as the SDK reads them."""
    root: Sampler = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(settings.sampler_arg),
    }[settings.sampler.removeprefix("parentbased_")]
    return ParentBased(root) if settings.sampler.startswith("parentbased_") else root


def _resource(settings: TelemetrySettings) -> Resource:
    try:
        gateway_version = version("image-gateway")
    except PackageNotFoundError:  # run from a source tree that was not installed
        gateway_version = "unknown"
    return Resource.create(
        {
            "service.name": settings.service_name,
            "service.version": gateway_version,
            "service.instance.id": f"{socket.gethostname()}/{os.getpid()}",
        }
    )


def _exporter(settings: TelemetrySettings) -> SpanExporter:
    headers = {k: v.get_secret_value() for k, v in settings.headers.items()} if settings.headers else None
    if settings.protocol == "grpc":  # optional package, checked by the configuration
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
            OTLPSpanExporter as GrpcExporter,
        )

        exporter: SpanExporter = GrpcExporter(
            endpoint=settings.url, headers=headers, timeout=settings.export_timeout_seconds
        )
        return exporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=settings.url, headers=headers, timeout=settings.export_timeout_seconds)


class _CountingExporter(SpanExporter):
    """The exporter, counting the spans of each batch it gave up on."""

    def __init__(self, exporter: SpanExporter, dropped: Counter) -> None:
        self.exporter = exporter
        self.failed = dropped.labels("export_failed")

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.exporter.export(spans)
        except Exception:
            self.failed.inc(len(spans))
            raise
        if result is not SpanExportResult.SUCCESS:
            self.failed.inc(len(spans))
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


class _CountingBatchProcessor(SpanProcessor):
    """The SDK's BatchSpanProcessor, behind a check of its queue: a span that finds it full is
    dropped here and counted (the SDK would push out the oldest instead, with a log line for each,
    and expose no count).

    This reads the SDK's `BatchProcessor` queue (a deque bounded by `max_queue_size`);
    tests/unit/test_tracing_export.py holds it to that. The count is exact: spans end on the event
    loop's thread only, so nothing else fills the queue between the check and the append (the
    export thread only empties it)."""

    def __init__(self, exporter: SpanExporter, dropped: Counter, **options: float) -> None:
        self.inner = BatchSpanProcessor(exporter, **options)  # type: ignore[arg-type]
        self.batches = self.inner._batch_processor  # private: see the docstring
        self.queue_full = dropped.labels("queue_full")

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return
        if len(self.batches._queue) >= self.batches._max_queue_size:
            self.queue_full.inc()
            return
        self.inner.on_end(span)

    def shutdown(self) -> None:
        self.batches.shutdown(timeout_millis=SHUTDOWN_MILLIS)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)
