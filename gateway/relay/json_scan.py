"""Streaming over one JSON document without holding it: the top-level values asked for, and a count.

Upstream bodies are tens of MB of base64. `JsonScanner` never buffers the document and never visits
its bytes one by one in Python: it jumps over strings with `bytes.find` (memchr), and only the few
structural characters outside strings reach Python. What it keeps is bounded: the captured
top-level values (at most `CAPTURE_CAP` bytes each, beyond which a value is given up) and a short
key. `JsonDocument` gets the same answers more cheaply from a document that stays small once its
images (a key never read) are cut out, which is nearly every upstream body and event: it keeps that
and parses it whole with orjson, handing it to a `JsonScanner` only if it outgrows `CAPTURE_CAP`.
Used by `gateway.relay.usage` for JSON bodies and for each SSE event's data.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import orjson

CAPTURE_CAP = 64 * 1024
# What a JsonDocument keeps to parse whole: an event or a body without its images is about 1 KB, and
# every open stream holds up to twice this while an event is under way.
KEPT_CAP = 8 * 1024
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
        quote, self._escaped = _string_end(buf, pos, end, self._escaped)
        stop = end if quote < 0 else quote
        if self._key_buf is not None:
            self._key_buf += buf[pos : min(stop, pos + _KEY_CAP + 1 - len(self._key_buf))]
        if quote < 0:
            return end
        self._in_string = False
        if self._key_buf is not None:
            self._end_key(self._key_buf)
        return quote + 1

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


def _string_end(buf: bytes, seg: int, end: int, escaped: bool, quote: int | None = None) -> tuple[int, bool]:
    """The closing quote of the string whose next segment is `buf[seg:end]`, or -1 if it goes on, and
    then whether the segment after it starts escaped. `escaped`: whether this one does. `quote`: the
    segment's first quote (or -1), if the caller found it already."""
    # memchr to each quote; only a quote preceded by a backslash (or opening a segment that starts
    # escaped) needs a look back.
    if quote is None:
        quote = buf.find(b'"', seg, end)
    while quote >= 0 and (buf[quote - 1] == _BACKSLASH if quote > seg else escaped):
        if not _is_escaped(buf, seg, quote, escaped):
            break
        quote = buf.find(b'"', quote + 1, end)
    return quote, quote < 0 and _is_escaped(buf, seg, end, escaped)


def _is_escaped(buf: bytes, seg: int, at: int, escaped: bool) -> bool:
    """Whether the byte at `at` is escaped, the string's segment in `buf` starting at `seg`."""
    first = at
    while first > seg and buf[first - 1] == _BACKSLASH:
        first -= 1
    odd_run = (at - first) % 2 == 1
    # A segment whose first byte is escaped (the previous chunk ended in an escaping
    # backslash) shifts the parity of a backslash run that reaches back to it.
    return odd_run != (first == seg and escaped)


class JsonDocument:
    """One JSON document fed in pieces, read for the same answers as a `JsonScanner` gives.

    Most documents are small (an error, a URL answer, an event with a small image): up to `small`
    bytes are only kept, and parsed whole by orjson at `close`, which costs far less than scanning
    them piece by piece. A document that grows past it, or that orjson refuses (truncated, trailing
    bytes), is scanned by a `JsonScanner` instead.

    `unread`: a key whose string values the caller never reads (an image's `b64_json`: nearly all of
    a big document's bytes). They are cut out of what is kept (`_cut`), so a document with multi-MB
    images still stays under `small`: it is scanned only if what is left outgrows it (or has a
    backslash). Where such a member sits inside a captured value, that value reads it as "".
    `value` and `count` are final after `close`.
    """

    def __init__(
        self,
        capture: frozenset[bytes],
        count: bytes | None = None,
        small: int = KEPT_CAP,
        unread: bytes | None = None,
    ) -> None:
        self._capture, self._count_key, self._small = capture, count, small
        self._unread = unread
        self._member = None if unread is None else _member(unread)
        self._kept: list[bytes] | None = []  # None once the scanner has taken over
        self._size = 0
        self._cutting = False  # inside an unread value: its bytes are dropped
        self._escaped = False  # and the first byte of its next segment is escaped
        self._scanner: JsonScanner | None = None
        self._body: dict[str, Any] = {}
        self.count = 0

    def feed(self, buf: bytes, start: int = 0, end: int | None = None) -> None:
        """The next piece of the document, `buf[start:end]`."""
        end = len(buf) if end is None else end
        if self._cutting:
            # Most pieces of an image hold no quote and end in no backslash: dropped after one memchr.
            quote = buf.find(b'"', start, end)
            if quote < 0 and start < end and buf[end - 1] != _BACKSLASH:
                self._escaped = False
                return
            start = self._cut_on(buf, start, end, quote)
            if start == end:  # the image goes on
                return
        if self._kept is None:
            assert self._scanner is not None
            self._scanner.feed(buf, start, end)
        elif self._size + end - start <= self._small:
            self._size += end - start
            self._kept.append(buf[start:end])
        else:
            # Full: go on without the unread value it ends in, if it does; else with as much of
            # this piece as fits, up to its first unread member if that fits (a first piece bigger
            # than `small`), if that does; else scan.
            if not self._cut_kept():
                fits = start + max(0, self._small - self._size)
                if self._member is not None and (at := buf.find(self._member, start, fits)) >= 0:
                    fits = at + len(self._member)
                self._kept.append(buf[start:fits])
                self._size, start = self._size + fits - start, fits
                if not self._cut_kept():
                    self._scan_kept()
            self.feed(buf, start, end)

    def close(self) -> None:
        if self._kept is not None:
            document = b"".join(self._kept)
            body = parse_whole(document, 0, len(document), self._unread, None)
            if body is not None:
                self._kept = None
                self._keep(body)
                return
            self._scan_kept()
        assert self._scanner is not None
        self.count = self._scanner.count

    def value(self, key: bytes) -> Any:
        """The parsed value of a captured top-level key; None if absent, too big to have been captured,
        or the document is incomplete or malformed."""
        if self._scanner is not None:
            return self._scanner.value(key)
        return self._body.get(key.decode())

    def values(self) -> dict[str, Any]:
        """The captured top-level values by key (a parsed document's other members too), after `close`."""
        if self._scanner is None:
            return self._body
        return {
            key.decode(): value for key in self._capture if (value := self._scanner.value(key)) is not None
        }

    def _cut_kept(self) -> bool:
        """If what is kept ends in an unread value: keep it with its unread values cut out, and drop
        that value's bytes as they come."""
        if not self._kept or self._member is None:
            return False
        document = b"".join(self._kept)
        cut = _cut(document, 0, len(document), self._member)
        if cut is None or not cut[1]:
            return False
        self._kept, self._size, self._cutting, self._escaped = [cut[0]], len(cut[0]), True, cut[2]
        return True

    def _cut_on(self, buf: bytes, start: int, end: int, quote: int) -> int:
        """Drop the unread value's bytes: where the document goes on (its closing quote), or `end`.
        `quote`: the first quote in `buf[start:end]`, or -1."""
        quote, self._escaped = _string_end(buf, start, end, self._escaped, quote)
        if quote < 0:
            return end
        assert self._kept is not None
        self._kept.append(b'"')  # what is kept is whole again, should it have to be scanned
        self._size += 1
        self._cutting = False
        return quote + 1

    def _scan_kept(self) -> None:
        self._scanner = JsonScanner(self._capture, self._count_key)
        for part in self._kept or ():
            self._scanner.feed(part)
        self._kept = None

    def _keep(self, body: Any) -> None:
        if not isinstance(body, dict):
            return
        self._body = body
        items = body.get(self._count_key.decode()) if self._count_key is not None else None
        self.count = sum(isinstance(item, dict) for item in items) if isinstance(items, list) else 0


def parse_whole(
    buf: bytes, start: int, end: int, unread: bytes | None, small: int | None = KEPT_CAP
) -> dict[str, Any] | None:
    """`buf[start:end]`, a whole document, read as a `JsonDocument` fed it in one piece would read it,
    where that is cheap: it is JSON and at most `small` bytes (None: any size) once the string values
    of `unread` are cut out. Its top-level object ({} for another JSON value), else None (then feed a
    JsonDocument). Nothing of an image is copied: each is skipped with memchr."""
    cut = None if unread is None else _cut(buf, start, end, _member(unread))
    if cut is None:  # nothing to cut, or a backslash outside the images: parsed as it is
        if small is not None and end - start > small:
            return None
        document = buf[start:end]
    elif cut[1]:
        return None  # it ends inside an unread value: truncated
    elif small is not None and len(cut[0]) > small:
        return None
    else:
        document = cut[0]
    try:
        body = orjson.loads(document)
    except orjson.JSONDecodeError:
        return None
    return body if isinstance(body, dict) else {}


@functools.cache
def _member(unread: bytes) -> bytes:
    """How an unread key's string value opens: `"key":"`, written without spaces, as APIs do."""
    return b'"%s":"' % unread


def _cut(buf: bytes, start: int, end: int, member: bytes) -> tuple[bytes, bool, bool] | None:
    """`buf[start:end]` with the string value of each `member` (`"key":"`, written without spaces, as
    APIs do) cut out; whether it ends inside one (then cut from its opening quote on), and if so
    whether that value's next byte is escaped. None where there is a backslash outside those values:
    only without one is every quote there a string's start or end, so that a match is that member.
    A value's end is found as `JsonDocument` finds it, by memchr over a multi-KB image."""
    # The backslash is looked for once, in what is kept: where there is one, a match may have been
    # inside a string, and the cut is thrown away. (Looked for as an integer, a plain memchr: a bytes
    # needle is first tried as an integer, a TypeError raised and cleared, and `find` parses its
    # arguments; ~2k instructions either way.)
    kept, pos, opening = [], start, len(member)
    while (at := buf.find(member, pos, end)) >= 0:
        kept.append(buf[pos : at + opening])
        pos, escaped = _string_end(buf, at + opening, end, False)
        if pos < 0:
            document = b"".join(kept)
            return None if _BACKSLASH in document else (document, True, escaped)
    kept.append(buf[pos:end])
    document = b"".join(kept)
    return None if _BACKSLASH in document else (document, False, False)
