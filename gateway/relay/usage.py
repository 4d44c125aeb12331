"""Read the upstream's reported `usage` (and how many images it sent) from a relayed response body.

Owns the side channel of the relay: every chunk relayed to the client is also fed here, and at the
end the gateway settles with the real token counts. Bodies are tens of MB of base64, so they are
read as they pass (`gateway.relay.json_scan.JsonDocument`: kept without their `b64_json` images and
parsed whole while that is at most `CAPTURE_CAP` bytes, else scanned), never buffered beyond that;
for a stream only a fixed set of running sums is kept.

- `JsonUsageReader`: a JSON body; `usage` and the number of objects in the top-level `data` array.
- `SSEUsageReader`: a `text/event-stream` body, framed by `gateway.relay.sse.SSEParser`, each event's
  data fed to its own `JsonDocument`; the stream's usage, its completed images, its image events
  (partial or completed) and its first error.
- `usage_reader(content_type)` picks one. Neither raises on a truncated or non-JSON body.

The usage of a stream. A streamed request for n images has one completed event per image
(`image_generation.completed`, or `image_edit.completed` for edits; named by the `event` field or
the data's `type`), each carrying the usage of its own image. So:
- when completed events carry `usage`, the stream's usage is their SUM, count by count, and a
  `usage` on any other event (a relay's closing summary) is ignored: it would count them twice;
  one completed event's `usage` is taken as it is;
- when no completed event carries `usage`, the `usage` of the last other event that has one.
The sum covers OpenAI's counts: `input_tokens`, `input_tokens_details.{text,image}_tokens`,
`output_tokens`, `output_tokens_details.{image,text}_tokens`, `total_tokens`. A count is summed only
when every usage-carrying completed event reports it (a non-negative integer); a count one of them
lacks is left out, never summed in part nor invented, so the cost module derives it from the
counts that are there, as it does for a single usage (`output_tokens` from `total_tokens`, the
text/image split from `input_tokens`). Only dispatched events count, up to `data: [DONE]`.
"""

from __future__ import annotations

from typing import Any, Protocol

from gateway.relay.json_scan import CAPTURE_CAP, KEPT_CAP, JsonDocument, parse_whole
from gateway.relay.sse import Data, Dispatch, SSEParser

__all__ = ["CAPTURE_CAP", "JsonUsageReader", "SSEUsageReader", "UsageReader", "usage_reader"]


class UsageReader(Protocol):
    """What the relay feeds a response body to, and reads the billing facts from at the end."""

    def feed(self, chunk: bytes) -> None:
        """The next chunk of the body, cut anywhere."""

    def close(self) -> None:
        """The body ended (possibly truncated)."""

    @property
    def usage(self) -> dict[str, Any] | None:
        """The upstream's `usage` object (a stream's: see the module docstring), or None."""

    @property
    def images(self) -> int:
        """JSON: objects in the top-level `data` array. SSE: completed image events."""

    @property
    def error(self) -> dict[str, Any] | None:
        """SSE: the first error in the stream (the object of a data JSON's truthy `error`, else of an
        `error` event), which is where openai-python stops reading. JSON: None."""

    @property
    def image_events(self) -> int:
        """SSE: image events dispatched, partial or completed (see `_IMAGE_EVENTS`): none means no
        image was begun, whatever else the stream held (an error, `[DONE]`, an unknown event).
        JSON: 0."""

    @property
    def done(self) -> bool:
        """SSE: `data: [DONE]` was read, where openai-python stops reading and closes. JSON: False."""


_IMAGE = b"b64_json"  # an image's base64, nearly all of a body's bytes and never read
_BODY_KEYS = frozenset({b"usage"})


class JsonUsageReader:
    """A JSON body: the top-level `usage` object and the number of objects in the top-level `data`.

    Read as a `JsonDocument`: kept and parsed whole while it is at most `small_body` bytes without
    its images, else scanned. `usage` and `images` are final after `close`.
    """

    error: dict[str, Any] | None = None
    image_events = 0
    done = False

    def __init__(self, small_body: int = KEPT_CAP) -> None:
        self._document = JsonDocument(_BODY_KEYS, b"data", small_body, _IMAGE)
        self._usage: dict[str, Any] | None = None
        self._images = 0

    def feed(self, chunk: bytes) -> None:
        self._document.feed(chunk)

    def close(self) -> None:
        self._document.close()
        usage = self._document.value(b"usage")
        self._usage = usage if isinstance(usage, dict) else None
        self._images = self._document.count

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._usage

    @property
    def images(self) -> int:
        return self._images


_EVENT_KEYS = frozenset({b"type", b"usage", b"error", b"message"})
_DONE = b"[DONE]"
_COMPLETED = frozenset({"image_generation.completed", "image_edit.completed"})
# The events that carry an image, final or partial: the upstream's proof that it generated.
_IMAGE_EVENTS = _COMPLETED | {"image_generation.partial_image", "image_edit.partial_image"}
# The counts a stream's usage sums, in the order of OpenAI's `usage` object: (key, detail key).
_COUNTS: tuple[tuple[str, str | None], ...] = (
    ("input_tokens", None),
    ("input_tokens_details", "text_tokens"),
    ("input_tokens_details", "image_tokens"),
    ("output_tokens", None),
    ("output_tokens_details", "image_tokens"),
    ("output_tokens_details", "text_tokens"),
    ("total_tokens", None),
)


def _count(usage: dict[str, Any], key: str, detail: str | None) -> int | None:
    value = usage.get(key)
    if detail is not None:
        value = value.get(detail) if isinstance(value, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class UsageSum:
    """The sum of the `usage` objects of a stream's completed events, in constant memory.

    Keeps the first object (returned as it is when it stays alone, as it does for one image) and,
    from the second on, one running total per count of `_COUNTS` that every object added reported.
    """

    def __init__(self) -> None:
        self.added = 0
        self._first: dict[str, Any] | None = None
        self._totals: dict[tuple[str, str | None], int] = {}

    def add(self, usage: dict[str, Any]) -> None:
        if not self.added:
            self._first = usage
        else:
            if self.added == 1:
                assert self._first is not None
                first = self._first
                self._totals = {path: n for path in _COUNTS if (n := _count(first, *path)) is not None}
            for path, total in list(self._totals.items()):
                n = _count(usage, *path)
                if n is None:
                    del self._totals[path]  # not reported by every event: left for the cost module to derive
                else:
                    self._totals[path] = total + n
        self.added += 1

    @property
    def value(self) -> dict[str, Any] | None:
        """None before the first `add`; the object itself after one; after more, the summed counts."""
        if self.added <= 1:
            return self._first
        summed: dict[str, Any] = {}
        for (key, detail), total in self._totals.items():
            if detail is None:
                summed[key] = total
            else:
                summed.setdefault(key, {})[detail] = total
        return summed


class SSEUsageReader:
    """An event stream: its usage (see the module docstring), its completed images, its image events,
    its first error.

    Only dispatched events count (what a client saw); anything after `data: [DONE]` is ignored, as
    openai-python stops reading there. An event's data is kept and parsed whole while it is at most
    `small_event` bytes without its image, else scanned (`JsonDocument`).
    """

    def __init__(self, small_event: int = KEPT_CAP) -> None:
        self._parser = SSEParser()
        self._small_event = small_event
        # The data of the event being received: while it is one span of the chunk being read, that
        # span (read whole at the dispatch, if it comes in the same chunk); else a JsonDocument.
        self._span: Data | None = None
        self._document: JsonDocument | None = None
        self._head = b""  # its first bytes, enough to recognise `[DONE]`
        self._done = False
        self._completed_usage = UsageSum()
        self._other_usage: dict[str, Any] | None = None  # the last `usage` of another event
        self.images = 0
        self.error: dict[str, Any] | None = None
        self.image_events = 0

    @property
    def done(self) -> bool:
        return self._done

    @property
    def usage(self) -> dict[str, Any] | None:
        """The sum of the completed events' usage, else the last usage of another event, else None."""
        if self._completed_usage.added:
            return self._completed_usage.value
        return self._other_usage

    def feed(self, chunk: bytes) -> None:
        if self._done:
            return
        for record in self._parser.feed(chunk):
            if isinstance(record, Data):
                if self._span is None and self._document is None:
                    self._span = record  # the event's data so far: one span of this chunk
                else:
                    self._on_data(record)
            elif not self._on_dispatch(record):
                self._done, self._span = True, None
                return
        if self._span is not None:
            self._keep_span()  # the event goes on in the next chunk: what it has is kept, not this chunk

    def close(self) -> None:
        self._parser.close()
        self._span, self._document, self._head = None, None, b""

    def _on_data(self, data: Data) -> None:
        """More data of an event that has some already."""
        self._keep_span()
        self._feed(data.buf, data.start, data.end)

    def _keep_span(self) -> None:
        span, self._span = self._span, None
        if span is not None:
            self._feed(span.buf, span.start, span.end)

    def _feed(self, buf: bytes, start: int, end: int) -> None:
        if self._document is None:
            self._document = JsonDocument(_EVENT_KEYS, small=self._small_event, unread=_IMAGE)
        if len(self._head) < len(_DONE):
            self._head += buf[start : min(end, start + len(_DONE) - len(self._head))]
        self._document.feed(buf, start, end)

    def _on_dispatch(self, dispatch: Dispatch) -> bool:
        """Read a dispatched event; False once it was the `[DONE]` sentinel."""
        event, span = dispatch.event or "", self._span
        if span is not None:  # the whole data in one span, as an upstream nearly always writes it
            self._span = None
            if span.buf[span.start] == _DONE[0] and span.buf.startswith(_DONE, span.start, span.end):
                return False
            body = parse_whole(span.buf, span.start, span.end, _IMAGE, self._small_event)
            if body is not None:
                self._read_event(event, body)
                return True
            self._feed(span.buf, span.start, span.end)
        document, head = self._document, self._head
        self._document, self._head = None, b""
        if head.startswith(_DONE):
            return False
        # An event whose data is empty still counts by its `event` field.
        if document is None:
            self._read_event(event, {})
        else:
            document.close()
            self._read_event(event, document.values())
        return True

    def _read_event(self, event: str, values: dict[str, Any]) -> None:
        """Count an event, given the top-level values of its data (`_EVENT_KEYS` at least)."""
        kind = values.get("type")
        completed = event in _COMPLETED or (isinstance(kind, str) and kind in _COMPLETED)
        self.images += completed
        self.image_events += event in _IMAGE_EVENTS or (isinstance(kind, str) and kind in _IMAGE_EVENTS)
        usage = values.get("usage")
        if isinstance(usage, dict):
            if completed:
                self._completed_usage.add(usage)
            else:
                self._other_usage = usage
        if self.error is None and (event == "error" or values.get("error")):
            self.error = _error_of(event, values)


def _error_of(event: str, values: dict[str, Any]) -> dict[str, Any] | None:
    error = values.get("error")
    if error:  # openai-python raises APIError on a truthy `error`
        return error if isinstance(error, dict) else {"message": str(error)}
    if event == "error":
        message = values.get("message")
        return {"message": message if isinstance(message, str) else "upstream sent an error event"}
    return None


def usage_reader(content_type: str | None) -> UsageReader:
    """The reader for a response of this Content-Type: SSE for `text/event-stream`, else JSON."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return SSEUsageReader() if media_type == "text/event-stream" else JsonUsageReader()
