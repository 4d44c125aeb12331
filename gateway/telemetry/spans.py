"""The live forms of `telemetry.tracing`'s facade: a request's spans, made with the OpenTelemetry
API (loaded only when tracing is on). What each span and attribute is: `telemetry.tracing`."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Mapping, MutableMapping
from functools import lru_cache
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.telemetry.activity import decision
from gateway.telemetry.tracing import NO_ATTEMPT, AttemptTrace, RequestTrace
from policies.end_user import end_user

if TYPE_CHECKING:
    from gateway.front.access_log import RequestRecord
    from gateway.runtime import Target

_PROPAGATOR = TraceContextTextMapPropagator()
# OpenTelemetry has no well-known gen_ai.operation.name for images: these are the gateway's own.
OPERATIONS = {"generate": "image_generation", "edit": "image_edit", "variation": "image_variation"}
_USER_HASH_CHARS = 32  # 128 bits of the HMAC: enough to tell users apart, no more to carry


class Spans:
    """Opens each request's SERVER span, continuing the client's trace. `user_hash_key`: the key of
    the HMAC that `gateway.user` is made with; None: no `gateway.user`."""

    def __init__(self, tracer: trace.Tracer, user_hash_key: bytes | None = None) -> None:
        self.tracer = tracer
        self.user_hash_key = user_hash_key

    def request(self, request: web.Request) -> RequestTrace:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else None
        attributes: dict[str, Any] = {"http.request.method": request.method, "url.path": request.path}
        if route is not None:
            attributes["http.route"] = route
        span = self.tracer.start_span(
            f"{request.method} {route}" if route else request.method,
            _PROPAGATOR.extract(request.headers),
            SpanKind.SERVER,
            attributes=attributes,
        )
        return _Live(self.tracer, span, self.user_hash_key) if span.is_recording() else _Unsampled(span)


class _Stage:
    """A child span as a context manager: ended on exit, marked as an error if the stage raised."""

    __slots__ = ("span",)

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def __enter__(self) -> _Stage:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:
            _failed(self.span, "cancelled" if isinstance(exc, asyncio.CancelledError) else _code(exc))
        self.span.end()


class _Attempt(AttemptTrace):
    __slots__ = ("span",)

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def answered(self, status: int) -> None:
        self.span.set_attribute("http.response.status_code", status)

    def end(self, outcome: str) -> None:
        self.span.set_attribute("gateway.attempt.outcome", outcome)
        if outcome != "ok":  # a client span's 4xx is an error too (HTTP semantic conventions)
            self.span.set_status(Status(StatusCode.ERROR))
            self.span.set_attribute("error.type", outcome)
        self.span.end()


class _Unsampled(RequestTrace):
    """A request the sampler left out: no spans, but the upstream still gets the trace's context
    (its `traceparent` says "not sampled"), so the trace stays one across services."""

    __slots__ = ("context",)

    def __init__(self, span: trace.Span) -> None:
        self.context = trace.set_span_in_context(span)

    def attempt(self, target: Target, path: str, headers: MutableMapping[str, str]) -> AttemptTrace:
        _PROPAGATOR.inject(headers, self.context)
        return NO_ATTEMPT


class _Live(RequestTrace):
    __slots__ = ("context", "span", "tracer", "user_hash_key")

    def __init__(self, tracer: trace.Tracer, span: trace.Span, user_hash_key: bytes | None) -> None:
        self.tracer = tracer
        self.span = span
        self.context = trace.set_span_in_context(span)
        self.user_hash_key = user_hash_key

    def stage(self, name: str) -> _Stage:
        return _Stage(self.tracer.start_span(name, self.context))

    def attempt(self, target: Target, path: str, headers: MutableMapping[str, str]) -> AttemptTrace:
        span = self.tracer.start_span(
            f"POST {target.upstream_name}",
            self.context,
            SpanKind.CLIENT,
            attributes=_attempt_attributes(
                target.upstream_name, target.flavor, target.upstream_model, target.upstream.base_url + path
            ),
        )
        _PROPAGATOR.inject(headers, trace.set_span_in_context(span))
        return _Attempt(span)

    def skipped(self, upstream: str, why: str) -> None:
        self.span.add_event("gateway.upstream.skipped", {"gateway.upstream": upstream, "gateway.reason": why})

    def describe(self, body: Mapping[str, Any]) -> None:
        n = body.get("n", 1)
        attributes: dict[str, Any] = {
            "gen_ai.output.type": "image",
            "gateway.image.n": n if isinstance(n, int) else 1,
            "gateway.stream": body.get("stream") is True,
        }
        for field in ("size", "quality", "background", "output_format"):
            if isinstance(value := body.get(field), str):
                attributes[f"gateway.image.{field}"] = value
        if self.user_hash_key is not None and (user := end_user(body)) is not None:
            digest = hmac.digest(self.user_hash_key, user.encode("utf-8"), "sha256")
            attributes["gateway.user"] = digest.hex()[:_USER_HASH_CHARS]
        self.span.set_attributes(attributes)

    def served(self, target: Target) -> None:
        self.span.set_attributes(
            {"gen_ai.provider.name": target.flavor, "gen_ai.response.model": target.upstream_model}
        )

    def first_event(self, at: float) -> None:
        when = time.time_ns() - int((time.perf_counter() - at) * 1e9)
        self.span.add_event("gateway.stream.first_event", timestamp=when)

    def failed(self, code: str) -> None:
        _failed(self.span, code)

    def finish(self, record: RequestRecord) -> None:
        span, fields = self.span, record.fields
        attributes: dict[str, Any] = {
            "http.response.status_code": record.status,
            "gateway.request_id": record.request_id,
            "gateway.decision": decision(record.status),
        }
        if record.operation:
            attributes["gen_ai.operation.name"] = OPERATIONS.get(record.operation, record.operation)
        for name, value in (
            ("gateway.tenant", record.tenant),
            ("gateway.key_name", record.key),
            ("gen_ai.request.model", record.model),
            ("gateway.upstream", record.upstream),
        ):
            if value:
                attributes[name] = value
        if "settled" in fields:
            attributes["gateway.settled"] = fields["settled"]
            attributes["gateway.cost_usd"] = float(fields["usd"])
            attributes["gateway.images"] = fields["images"]
            attributes["gen_ai.usage.input_tokens"] = fields["tokens_text_in"] + fields["tokens_image_in"]
            attributes["gen_ai.usage.output_tokens"] = fields["tokens_image_out"]
        if "attempts" in fields:
            sent = [a for a in fields["attempts"] if not a["outcome"].startswith("skipped_")]
            attributes["gateway.attempts"] = len(sent)
        if fields.get("client_gone"):
            attributes["gateway.client_gone"] = True
        span.set_attributes(attributes)
        if record.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("error.type", str(record.status))
        span.end()


@lru_cache(maxsize=256)  # the same for every attempt at a target (the SDK copies it)
def _attempt_attributes(upstream: str, flavor: str, model: str, target_url: str) -> dict[str, Any]:
    url = urlsplit(target_url)
    return {
        "gateway.upstream": upstream,
        "gen_ai.provider.name": flavor,
        "gen_ai.request.model": model,
        "http.request.method": "POST",
        "server.address": url.hostname or "",
        "server.port": url.port or (443 if url.scheme == "https" else 80),
        "url.full": f"{url.scheme}://{url.netloc.rpartition('@')[2]}{url.path}",  # never credentials
    }


def _code(exc: BaseException) -> str:
    """What an exception is called on a span: the gateway's error code, else its class; never its
    message (which may quote the request)."""
    return getattr(exc, "error_code", None) or type(exc).__name__


def _failed(span: trace.Span, code: str) -> None:
    span.set_attribute("error.type", code)
    span.set_status(Status(StatusCode.ERROR))
