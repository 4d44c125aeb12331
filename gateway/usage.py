"""Read the upstream's reported `usage` (and how many images it sent) from a relayed response body.

Owns the side channel of the relay: every chunk relayed to the client is also fed here, and at the
end the gateway settles with the real token counts. Bodies are tens of MB of base64, so this never
buffers the body and never visits its bytes one by one in Python: `JsonScanner` jumps over strings
with `bytes.find` (memchr) and only the few structural characters outside strings reach Python.
What it keeps is bounded: the captured top-level values (at most `CAPTURE_CAP` bytes each, beyond
which a value is given up), a short key, and for a stream a fixed set of running sums.

- `JsonUsageReader`: a JSON body; `usage` and the number of objects in the top-level `data` array.
  A body of at most `CAPTURE_CAP` bytes is kept and parsed whole by orjson instead (cheaper).
- `SSEUsageReader`: a `text/event-stream` body, framed by `gateway.sse.SSEParser`, each event's
  data fed to its own `JsonScanner`; the stream's usage, its completed images and its first error.
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

import re
from typing import Any, Protocol

import orjson

from gateway.sse import Data, Dispatch, SSEParser

CAPTURE_CAP = 64 * 1024
_KEY_CAP = 64  # keys we look for are short; a longer top-level key is skipped, not buffered
_QUOTE, _BACKSLASH, _COMMA, _COLON = 0x22, 0x5C, 0x2C, 0x3A
_LBRACE, _RBRACE, _LBRACKET, _RBRACKET = 0x7B, 0x7D, 0x5B, 0x5D
_STRUCTURAL = re.compile(rb'["{}\[\],:]')
_NON_SPACE = re.compile(rb"[^ \t\r\n]")

# Where a JsonScanner is in its document.
_START, _OBJECT, _COMPLETE, _INVALID = 0, 1, 2, 3


class JsonScanner:
    """Streams over one JSON document whose top level is an object, keeping only what was asked for.

    `capture`: top-level keys whose raw values are kept (capped) and parsed once the document is
    complete. `count`: a top-level key whose array's object elements are counted as they close.
    A non-validating scanner: it trusts the upstream to send JSON, but never raises on garbage.
    """

    def __init__(self, capture: frozenset[bytes], count: bytes | None = None) -> None:
        self._capture = capture
        self._count_key = count
        self.count = 0
        self._state = _START
        self._depth = 0
        self._in_string = False
        self._escaped = False  # the first byte of the string's next segment is escaped
        self._key_buf: bytearray | None = None  # set while reading a top-level key
        self._expect_key = False
        self._key: bytes | None = None  # the top-level key whose value is being read
        self._count_next = False  # the value starting now belongs to the counted key
        self._counting = False  # inside the counted array
        self._cap_key: bytes | None = None
        self._cap_parts: list[bytes] = []
        self._cap_len = 0  # -1: the value outgrew CAPTURE_CAP and is given up
        self._cap_from = 0
        self._raw: dict[bytes, bytes] = {}
        self._values: dict[bytes, Any] = {}

    @property
    def complete(self) -> bool:
        """The top-level object was closed: captured values are available."""
        return self._state == _COMPLETE

    def value(self, key: bytes) -> Any:
        """The parsed value of a captured top-level key; None if absent, too big, or the document is
        incomplete or malformed."""
        return self._values.get(key)

    def feed(self, buf: bytes, start: int = 0, end: int | None = None) -> None:
        """Scan `buf[start:end]`, the next piece of the document."""
        end = len(buf) if end is None else end
        if self._state >= _COMPLETE or start >= end:
            return
        pos = self._cap_from = start
        while pos < end and self._state < _COMPLETE:
            if self._in_string:
                pos = self._scan_string(buf, pos, end)
            elif self._state == _START:
                pos = self._open(buf, pos, end)
            else:
                match = _STRUCTURAL.search(buf, pos, end)
                pos = end if match is None else self._structural(buf, match.start())
        if self._cap_key is not None:
            self._capture_piece(buf, self._cap_from, end)

    def _open(self, buf: bytes, pos: int, end: int) -> int:
        match = _NON_SPACE.search(buf, pos, end)
        if match is None:
            return end
        if buf[match.start()] != _LBRACE:
            self._state = _INVALID  # not an object (an HTML error page, `[DONE]`, ...): nothing to read
            return end
        self._state, self._depth, self._expect_key = _OBJECT, 1, True
        return match.start() + 1

    def _scan_string(self, buf: bytes, pos: int, end: int) -> int:
        # memchr to each quote; only a quote preceded by backslashes needs a look back.
        quote = buf.find(b'"', pos, end)
        while quote >= 0 and self._is_escaped(buf, pos, quote):
            quote = buf.find(b'"', quote + 1, end)
        stop = end if quote < 0 else quote
        if self._key_buf is not None:
            self._key_buf += buf[pos : min(stop, pos + _KEY_CAP + 1 - len(self._key_buf))]
        if quote < 0:
            self._escaped = self._is_escaped(buf, pos, end)
            return end
        self._in_string = False
        if self._key_buf is not None:
            self._end_key(self._key_buf)
        return quote + 1

    def _is_escaped(self, buf: bytes, seg: int, at: int) -> bool:
        """Whether the byte at `at` is escaped, the string's segment in `buf` starting at `seg`."""
        first = at
        while first > seg and buf[first - 1] == _BACKSLASH:
            first -= 1
        odd_run = (at - first) % 2 == 1
        # A segment whose first byte is escaped (the previous chunk ended in an escaping
        # backslash) shifts the parity of a backslash run that reaches back to it.
        return odd_run != (first == seg and self._escaped)

    def _end_key(self, raw: bytearray) -> None:
        self._key_buf = None
        self._expect_key = False
        if len(raw) > _KEY_CAP:
            self._key = None
        elif _BACKSLASH in raw:  # `"us\u0061ge"` is still `usage`
            try:
                self._key = orjson.loads(b'"' + raw + b'"').encode()
            except (orjson.JSONDecodeError, UnicodeEncodeError):
                self._key = None
        else:
            self._key = bytes(raw)

    def _structural(self, buf: bytes, at: int) -> int:
        char = buf[at]
        if char == _QUOTE:
            self._in_string, self._escaped = True, False
            self._key_buf = bytearray() if self._depth == 1 and self._expect_key else None
        elif char in (_LBRACE, _LBRACKET):
            self._push(char)
        elif char in (_RBRACE, _RBRACKET):
            self._pop(buf, at, char)
        elif self._depth == 1 and char == _COMMA:
            self._end_member(buf, at)
            self._expect_key = True
        elif self._depth == 1 and char == _COLON:
            self._start_value(at)
        return at + 1

    def _push(self, char: int) -> None:
        self._depth += 1
        if self._depth == 2 and self._count_next and char == _LBRACKET:
            self._counting, self.count = True, 0  # a repeated key: the last one wins, as in orjson
        self._count_next = False

    def _pop(self, buf: bytes, at: int, char: int) -> None:
        if self._depth == 1:
            self._end_member(buf, at)
            self._finish()
            return
        if self._depth == 3 and self._counting and char == _RBRACE:
            self.count += 1
        elif self._depth == 2:
            self._counting = False
        self._depth -= 1

    def _start_value(self, at: int) -> None:
        self._count_next = self._key is not None and self._key == self._count_key
        if self._key in self._capture:
            self._cap_key, self._cap_parts, self._cap_len, self._cap_from = self._key, [], 0, at + 1

    def _end_member(self, buf: bytes, at: int) -> None:
        self._key = None
        self._count_next = False
        if self._cap_key is None:
            return
        self._capture_piece(buf, self._cap_from, at)
        if self._cap_len >= 0:
            self._raw[self._cap_key] = b"".join(self._cap_parts)
        else:
            self._raw.pop(self._cap_key, None)
        self._cap_key, self._cap_parts = None, []

    def _capture_piece(self, buf: bytes, start: int, end: int) -> None:
        if self._cap_len < 0:
            return
        if self._cap_len + end - start > CAPTURE_CAP:
            self._cap_len, self._cap_parts = -1, []  # give the value up; keep scanning
            return
        self._cap_parts.append(buf[start:end])
        self._cap_len += end - start

    def _finish(self) -> None:
        self._state, self._depth = _COMPLETE, 0
        for key, raw in self._raw.items():
            try:
                self._values[key] = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
        self._raw = {}


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
    def event_count(self) -> int:
        """SSE: events dispatched. JSON: 0."""


class JsonUsageReader:
    """A JSON body: the top-level `usage` object and the number of objects in the top-level `data`.

    Most bodies are small (an error, or a URL answer): up to `small_body` bytes are only kept, and
    parsed whole by orjson at `close`, which costs far less than scanning them piece by piece. A
    body that grows past it, or that orjson refuses (truncated, trailing bytes), is scanned by the
    `JsonScanner`, with the same answers. `usage` and `images` are final after `close`.
    """

    error: dict[str, Any] | None = None
    event_count = 0

    def __init__(self, small_body: int = CAPTURE_CAP) -> None:
        self._small_body = small_body
        self._head: list[bytes] | None = []  # None once the scanner has taken over
        self._size = 0
        self._scanner = JsonScanner(frozenset({b"usage"}), count=b"data")
        self._usage: dict[str, Any] | None = None
        self._images = 0

    def feed(self, chunk: bytes) -> None:
        if self._head is None:
            self._scanner.feed(chunk)
            return
        self._size += len(chunk)
        self._head.append(chunk)
        if self._size > self._small_body:
            self._scan_head()

    def close(self) -> None:
        if self._head is not None:
            try:
                body = orjson.loads(b"".join(self._head))
            except orjson.JSONDecodeError:
                self._scan_head()
            else:
                self._head = None
                self._keep(body)
                return
        usage = self._scanner.value(b"usage")
        self._usage = usage if isinstance(usage, dict) else None
        self._images = self._scanner.count

    def _scan_head(self) -> None:
        for part in self._head or ():
            self._scanner.feed(part)
        self._head = None

    def _keep(self, body: Any) -> None:
        if not isinstance(body, dict):
            return
        usage, data = body.get("usage"), body.get("data")
        self._usage = usage if isinstance(usage, dict) else None
        self._images = sum(isinstance(item, dict) for item in data) if isinstance(data, list) else 0

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._usage

    @property
    def images(self) -> int:
        return self._images


_EVENT_KEYS = frozenset({b"type", b"usage", b"error", b"message"})
_DONE = b"[DONE]"
_COMPLETED = frozenset({"image_generation.completed", "image_edit.completed"})
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

    Keeps the first object (returned as it is when it stays alone) and one running total per count
    of `_COUNTS` that every object added so far reported.
    """

    def __init__(self) -> None:
        self.added = 0
        self._first: dict[str, Any] | None = None
        self._totals: dict[tuple[str, str | None], int] = {}

    def add(self, usage: dict[str, Any]) -> None:
        if not self.added:
            self._first = usage
            self._totals = {path: n for path in _COUNTS if (n := _count(usage, *path)) is not None}
        else:
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
    """An event stream: its usage (see the module docstring), its completed images, its first error.

    Only dispatched events count (what a client saw); anything after `data: [DONE]` is ignored, as
    openai-python stops reading there.
    """

    def __init__(self) -> None:
        self._parser = SSEParser()
        self._scanner: JsonScanner | None = None  # the data of the event being received
        self._head = b""  # its first bytes, enough to recognise `[DONE]`
        self._done = False
        self._completed_usage = UsageSum()
        self._other_usage: dict[str, Any] | None = None  # the last `usage` of another event
        self.images = 0
        self.error: dict[str, Any] | None = None
        self.event_count = 0

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
                self._on_data(record)
            elif not self._on_dispatch(record):
                self._done = True
                return

    def close(self) -> None:
        self._parser.close()
        self._scanner, self._head = None, b""

    def _on_data(self, data: Data) -> None:
        if self._scanner is None:
            self._scanner = JsonScanner(_EVENT_KEYS)
        if len(self._head) < len(_DONE):
            self._head += data.buf[data.start : min(data.end, data.start + len(_DONE) - len(self._head))]
        self._scanner.feed(data.buf, data.start, data.end)

    def _on_dispatch(self, dispatch: Dispatch) -> bool:
        """Read a dispatched event; False once it was the `[DONE]` sentinel."""
        self.event_count += 1
        scanner, head = self._scanner, self._head
        self._scanner, self._head = None, b""
        if head.startswith(_DONE):
            return False
        # An event whose data is empty still counts by its `event` field.
        self._read_event(dispatch.event or "", scanner or JsonScanner(_EVENT_KEYS))
        return True

    def _read_event(self, event: str, scanner: JsonScanner) -> None:
        kind = scanner.value(b"type")
        completed = event in _COMPLETED or (isinstance(kind, str) and kind in _COMPLETED)
        self.images += completed
        usage = scanner.value(b"usage")
        if isinstance(usage, dict):
            if completed:
                self._completed_usage.add(usage)
            else:
                self._other_usage = usage
        if self.error is None:
            self.error = _error_of(event, scanner)


def _error_of(event: str, scanner: JsonScanner) -> dict[str, Any] | None:
    error = scanner.value(b"error")
    if error:  # openai-python raises APIError on a truthy `error`
        return error if isinstance(error, dict) else {"message": str(error)}
    if event == "error":
        message = scanner.value(b"message")
        return {"message": message if isinstance(message, str) else "upstream sent an error event"}
    return None


def usage_reader(content_type: str | None) -> UsageReader:
    """The reader for a response of this Content-Type: SSE for `text/event-stream`, else JSON."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return SSEUsageReader() if media_type == "text/event-stream" else JsonUsageReader()
