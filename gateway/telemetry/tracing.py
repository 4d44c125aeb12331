"""One OpenTelemetry trace per request: the facade the request path calls, off by default.

`Tracing.request` gives each request a `RequestTrace`. While tracing is off (no endpoint
configured, see `gateway.config.telemetry`) that is `OFF`, whose every method does nothing, so the request
path pays a few attribute lookups. While it is on, the request's SERVER span continues the
client's W3C `traceparent`/`tracestate` (or starts a trace) and gets child spans:

* `policy` and `admission` (the store round trip), `relay`, `settlement`: INTERNAL spans, one each;
* one CLIENT span per upstream attempt (a failover shows as several), whose context is sent to the
  upstream in `traceparent` (the same trace id);
* events: `gateway.upstream.skipped` (a target not sent: ejected, cooling, quota, ...) and, on a
  stream, `gateway.stream.first_event` when its first event went to the client.

A request the sampler leaves out gets no spans; its upstream still gets its (unsampled) context.
This module is the facade and its off form, and imports nothing of OpenTelemetry: the live forms
(`telemetry.spans`) and the SDK (`telemetry.export`) are loaded only when tracing is on.

Attributes follow the OpenTelemetry GenAI conventions where they fit (`gen_ai.operation.name`,
`gen_ai.request.model`, `gen_ai.response.model`, `gen_ai.provider.name`, `gen_ai.usage.*`) plus the
gateway's own `gateway.*`. They are chosen field by field: never a prompt, a key or a user id in
clear. The user (`gateway.user`) is an HMAC-SHA-256 keyed with `telemetry.user_hash_key`, and left
out without one: an unkeyed hash, as the store's key names hold, is reversed by hashing a list of
user ids. Spans are exported by a batch
processor on its own thread (`telemetry.export`): a collector that is down or slow costs a request
nothing; what cannot be queued or sent is counted in `gateway_trace_spans_dropped_total`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.config.telemetry import TelemetrySettings
from gateway.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from typing import Any

    from gateway.front.access_log import RequestRecord
    from gateway.runtime import Target
    from gateway.telemetry.export import Exporting
    from gateway.telemetry.spans import Spans


class _NoStage:
    __slots__ = ()

    def __enter__(self) -> _NoStage:
        return self

    def __exit__(self, *_: object) -> None:
        return None


_NO_STAGE = _NoStage()


class AttemptTrace:
    """One upstream attempt's span; this base form (tracing off) does nothing."""

    __slots__ = ()

    def answered(self, status: int) -> None:
        """The upstream answered with `status`."""

    def end(self, outcome: str) -> None:
        """The attempt's outcome, as the access log's `attempts` says it (ok, http_503, ...)."""


NO_ATTEMPT = AttemptTrace()


class RequestTrace:
    """What the request path tells its trace; this base form (tracing off) does nothing."""

    __slots__ = ()

    def stage(self, name: str) -> AbstractContextManager[object]:
        """A child span around one stage: `with trace.stage("policy"): ...`."""
        return _NO_STAGE

    def attempt(self, target: Target, path: str, headers: MutableMapping[str, str]) -> AttemptTrace:
        """Open the span of an attempt at `target`, and put its `traceparent` in `headers`."""
        return NO_ATTEMPT

    def skipped(self, upstream: str, why: str) -> None:
        """A target left out without being sent."""

    def describe(self, body: Mapping[str, Any]) -> None:
        """What was asked for: the image parameters of the request the policy passed."""

    def served(self, target: Target) -> None:
        """Which upstream's answer the client gets."""

    def first_event(self, at: float) -> None:
        """The first event of a stream reached the client at `at` (time.perf_counter())."""

    def failed(self, code: str) -> None:
        """The answer failed after its status was sent (a stream cut, or its `error` event)."""

    def finish(self, record: RequestRecord) -> None:
        """End the request's span with what the access log says of it."""


OFF = RequestTrace()


class Tracing:
    """The app's tracing: off until `start` finds an endpoint configured; then one provider, with
    its batch processor, built in this process (each worker builds its own) and closed with the app."""

    def __init__(self, settings: TelemetrySettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.exporting: Exporting | None = None
        self.spans: Spans | None = None

    def start(self) -> None:
        if not self.settings.active:
            return
        # OpenTelemetry, loaded only where it is used
        from gateway.telemetry.export import Exporting
        from gateway.telemetry.spans import Spans

        self.exporting = Exporting(self.settings, self.metrics.trace_spans_dropped)
        key = self.settings.user_hash_key
        self.spans = Spans(
            self.exporting.provider.get_tracer("gateway"),
            user_hash_key=key.get_secret_value().encode("utf-8") if key is not None else None,
        )

    async def close(self) -> None:
        """Flush what is queued, within the exporter's bound, off the event loop."""
        if self.exporting is not None:
            exporting, self.exporting, self.spans = self.exporting, None, None
            await asyncio.to_thread(exporting.shutdown)

    def request(self, request: web.Request) -> RequestTrace:
        spans = self.spans
        return OFF if spans is None else spans.request(request)
