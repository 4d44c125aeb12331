"""Writing a success: the JSON body or the SSE stream, piece by piece from cached image bytes.

Nothing builds a whole response in memory: the JSON body is written as head, one image at a time,
tail (with `Content-Length`); the stream writes one event per write. `Knobs` carries the test-only
`x-mock-*` switches that shape the bytes (line endings, comments, an `error` event, `[DONE]`, a
dropped connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from gateway.mock_upstream.errors import UpstreamError
from gateway.mock_upstream.options import MockOptions
from gateway.mock_upstream.validation import Generation

ImageSource = Callable[[int], Awaitable[bytes]]  # variant -> base64 image (0 final, 1.. partials)
_TRUE = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True, slots=True)
class Knobs:
    """The test-only request headers (see the package docstring)."""

    latency_ms: float | None = None
    status: int | None = None
    fail_after: int | None = None
    usage_first: bool = False
    crlf: bool = False
    comments: bool = False
    error_after: int | None = None
    done: bool = False

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], options: MockOptions) -> Knobs:
        """The knobs a request's headers set; the stream's error and `[DONE]` default to `options`."""
        status = _int_header(headers, "x-mock-status")
        if status is not None and not 400 <= status <= 599:
            raise UpstreamError(400, "x-mock-status must be between 400 and 599.", param="x-mock-status")
        fail_after = _int_header(headers, "x-mock-fail-after-events")
        error_after = _int_header(headers, "x-mock-sse-error-after-events")
        done = headers.get("x-mock-sse-done")
        return cls(
            latency_ms=_header(headers, "x-mock-latency-ms"),
            status=status,
            fail_after=fail_after,
            usage_first=headers.get("x-mock-usage-first", "").lower() in _TRUE,
            crlf=headers.get("x-mock-sse-crlf", "").lower() in _TRUE,
            comments=headers.get("x-mock-sse-comments", "").lower() in _TRUE,
            error_after=options.sse_error_after_events if error_after is None else error_after,
            done=options.sse_done if done is None else done.lower() in _TRUE,
        )


def _header(headers: Mapping[str, str], name: str) -> float | None:
    text = headers.get(name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise UpstreamError(400, f"{name} must be a non-negative number, got {text!r}.", param=name)
    return value


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = _header(headers, name)
    return None if value is None else int(value)


def _drop_connection(request: web.Request) -> None:
    """Abort the transport: no terminating chunk, the client sees a truncated body."""
    if request.transport is not None:
        request.transport.abort()


def _fields(gen: Generation) -> dict[str, Any]:
    return {
        "background": gen.background,
        "output_format": gen.output_format,
        "quality": gen.quality,
        "size": gen.size,
    }


@dataclass(frozen=True, slots=True)
class Reply:
    """What a success is made of: the request, its images, its usage and its timestamp.

    `usage` is the whole request's (a JSON body's); `image_usages` one per image, adding up to it
    (a stream's, one on each completed event).
    """

    gen: Generation
    images: ImageSource
    usage: dict[str, Any]
    image_usages: list[dict[str, Any]]
    created: int


async def write_json(request: web.Request, reply: Reply, knobs: Knobs) -> web.StreamResponse:
    """`{"created", "data", ..., "usage"}` with `usage` last, or first when the knob says so."""
    gen = reply.gen
    b64 = await reply.images(0)
    usage_part = b'"usage":' + orjson.dumps(reply.usage)
    head = b'{"created":%d,' % reply.created + (usage_part + b"," if knobs.usage_first else b"") + b'"data":['
    tail = b"]," + orjson.dumps(_fields(gen))[1:-1] + (b"" if knobs.usage_first else b"," + usage_part) + b"}"
    item = (b'{"b64_json":"', b64, b'"}')
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(head) + len(tail) + gen.n * sum(map(len, item)) + (gen.n - 1)
    await response.prepare(request)
    with contextlib.suppress(ConnectionResetError):  # the client left: nothing more to do
        await response.write(head)
        for index in range(gen.n):
            if index == knobs.fail_after:
                _drop_connection(request)
                return response
            for piece in (b"," if index else b"", *item):
                await response.write(piece)
        await response.write(tail)
    return response


def _event(name: str, b64: bytes, rest: dict[str, Any], eol: bytes) -> bytes:
    data = b'{"type":"%s","b64_json":"' % name.encode() + b64 + b'",' + orjson.dumps(rest)[1:]
    return b"event: " + name.encode() + eol + b"data: " + data + eol + eol


async def _events(reply: Reply, eol: bytes) -> list[Callable[[], bytes]]:
    """The events in order (per image its partials, then its completed with that image's usage), each
    built only when sent."""
    gen = reply.gen
    final, *partials = [await reply.images(variant) for variant in range(gen.partial_images + 1)]
    fields = {"created_at": reply.created, **_fields(gen)}
    events: list[Callable[[], bytes]] = []
    for image in range(gen.n):
        for index, b64 in enumerate(partials):
            rest = {"partial_image_index": index, **fields}
            events.append(functools.partial(_event, f"{gen.events}.partial_image", b64, rest, eol))
        rest = {**fields, "usage": reply.image_usages[image]}
        events.append(functools.partial(_event, f"{gen.events}.completed", final, rest, eol))
    return events


_STREAM_ERROR = {
    "type": "error",
    "error": {
        "message": "Mock upstream failing the stream as asked.",
        "type": "server_error",
        "param": None,
        "code": None,
    },
}


def _error_event(eol: bytes) -> bytes:
    """An error after the stream has begun, as FACTS §4 shapes it (what openai-python raises on)."""
    return b"event: error" + eol + b"data: " + orjson.dumps(_STREAM_ERROR) + eol + eol


async def write_sse(
    request: web.Request, reply: Reply, knobs: Knobs, interval_s: float
) -> web.StreamResponse:
    """The `image_generation.*` (`image_edit.*`) event stream: one completed event per image, each
    with its own `usage`; or, when a knob says so, an `error` event instead of the events after the
    first K (a generation that failed once the stream had begun)."""
    eol = b"\r\n" if knobs.crlf else b"\n"
    comment = b": keep-alive" + eol + eol if knobs.comments else b""
    events = await _events(reply, eol)
    if knobs.error_after is not None and knobs.error_after < len(events):
        events = [*events[: knobs.error_after], functools.partial(_error_event, eol)]
    headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    with contextlib.suppress(ConnectionResetError):  # the client left: nothing more to do
        for sent, event in enumerate(events):
            if sent == knobs.fail_after:
                _drop_connection(request)
                return response
            if sent and interval_s > 0:
                await asyncio.sleep(interval_s)
            await response.write(comment + event())
        if knobs.done:
            await response.write(comment + b"data: [DONE]" + eol + eol)
        await response.write_eof()
    return response
