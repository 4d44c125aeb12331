"""Sans-I/O reader of Server-Sent Events: bytes in, framing records out.

Owns the line, field and event framing of the WHATWG EventSource spec, which is also what
openai-python's decoder does: lines end in CR, LF or CRLF (a CRLF split across two chunks is one
line end), a leading UTF-8 BOM is dropped, `:` lines are comments, one space after the colon is
stripped, a line without a colon is a field with an empty value, the `data` lines of one event
are joined with LF, and an empty line dispatches the event if it had data.

`SSEParser` never buffers a data line: data bytes come out as they arrive, as spans of the chunk
that was fed (nothing is copied), so a consumer can scan a multi-MB base64 line in bounded
memory. `iter_events` assembles whole `Event`s for callers that don't care about memory (tests,
small streams). This module knows nothing of JSON or of `[DONE]`: that is the caller's business.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

_CR, _LF, _SPACE = 0x0D, 0x0A, 0x20
_LINE_ENDS = (_CR, _LF)
_BOM = b"\xef\xbb\xbf"
_NAME_END = re.compile(rb"[:\r\n]")
# Field names we act on are at most 5 bytes; a longer name is kept only far enough to be unknown.
_NAME_CAP = 64
# event / id / retry values longer than this are ignored rather than buffered without bound.
_VALUE_CAP = 4096

# Where the parser is within a line.
_IN_NAME, _AFTER_COLON, _IN_VALUE = 0, 1, 2


# Records are not frozen dataclasses, whose __init__ costs twice as many instructions; they are
# read, never changed.
@dataclass(slots=True)
class Data:
    """Some bytes of the current event's data: `buf[start:end]`, a span so nothing is copied.

    Consecutive `data` lines of one event are separated by a `Data` holding a single LF.
    """

    buf: bytes
    start: int
    end: int

    def tobytes(self) -> bytes:
        return self.buf[self.start : self.end]


@dataclass(slots=True)
class Dispatch:
    """The end of an event that had data: its `event` field, the last event id and its `retry`."""

    event: str | None
    id: str | None
    retry: int | None


Record = Data | Dispatch

_JOINER = Data(b"\n", 0, 1)


@dataclass(frozen=True, slots=True)
class Event:
    """A whole event, as `iter_events` assembles it (and as openai-python's ServerSentEvent holds it)."""

    event: str | None
    data: str
    id: str | None = None
    retry: int | None = None


class SSEParser:
    """Incremental SSE framing: `feed(chunk)` returns the `Data` and `Dispatch` records it completes.

    Memory is bounded by the small caps above, whatever the length of a line or of the stream.
    """

    def __init__(self) -> None:
        self._state = _IN_NAME
        self._name = bytearray()
        self._field = b""
        self._value = bytearray()
        self._skip_lf = False  # the last chunk ended in CR: an LF opening the next one ends no line
        self._bom_checked = False
        self._bom_head = b""
        self._has_data = False
        self._event: str | None = None
        self._last_id: str | None = None
        self._retry: int | None = None
        self._out: list[Record] = []

    def feed(self, chunk: bytes) -> list[Record]:
        """Parse the next chunk of the stream; return the records it completes, in order."""
        if not self._bom_checked:
            chunk = self._strip_bom(chunk)
        out: list[Record] = []
        self._out = out
        pos, end = 0, len(chunk)
        if self._skip_lf and end:
            self._skip_lf = False
            pos = int(chunk[0] == _LF)
        if pos < end and (self._state != _IN_NAME or self._name):
            pos = self._go_on(chunk, pos, end)  # the end of a line begun in an earlier chunk
        # Lines that start in this chunk. Each is framed in one go when it ends here too, as nearly
        # all do: its end is the first LF before the next CR, else that CR (found once per CR, not
        # once per line, so that a chunk of many short lines is scanned once).
        cr = -1
        while pos < end:
            first = chunk[pos]
            if first in _LINE_ENDS:  # an empty line: the event is complete
                self._dispatch()
                pos = pos + 1 if first == _LF else self._after_line_end(chunk, pos, end)
                continue
            if cr < pos:  # (a chunk without CR, as most are, is told by `in`: no arguments to parse)
                cr = chunk.find(b"\r", pos, end) if _CR in chunk else -1
                if cr < 0:
                    cr = end
            eol = chunk.find(b"\n", pos, cr)
            if eol < 0:
                eol = cr
                if eol == end:  # the line goes on in the next chunk
                    self._go_on(chunk, pos, end, end)
                    break
            # (A bytes method given a range costs ~1.5k instructions to parse its arguments; a slice
            # compared, two thirds of that.)
            if chunk[pos : pos + 5] == b"data:":  # data is not copied: a span of the chunk
                start = pos + 5
                start += start < eol and chunk[start] == _SPACE
                if self._has_data:
                    out.append(_JOINER)
                self._has_data = True
                if eol > start:
                    out.append(Data(chunk, start, eol))
            else:
                self._read_field(chunk, pos, eol)
            pos = eol + 1 if chunk[eol] == _LF else self._after_line_end(chunk, eol, end)
        return out

    def close(self) -> None:
        """End of stream: an event not ended by an empty line is discarded, as the spec says."""
        self._state = _IN_NAME
        self._name.clear()
        self._value.clear()
        self._has_data = False
        self._event = self._retry = None

    def _strip_bom(self, chunk: bytes) -> bytes:
        head = self._bom_head + chunk
        if len(head) < len(_BOM) and _BOM.startswith(head):
            self._bom_head = head  # could still be a BOM split across chunks
            return b""
        self._bom_checked = True
        self._bom_head = b""
        return head[len(_BOM) :] if head.startswith(_BOM) else head

    def _read_field(self, buf: bytes, pos: int, eol: int) -> None:
        """A line other than data or blank that starts and ends (at `eol`) in this chunk."""
        # Copied up to a bound: a longer line has an unknown name or a value over _VALUE_CAP.
        name, _, value = buf[pos : min(eol, pos + _NAME_CAP + _VALUE_CAP + 3)].partition(b":")
        self._begin_field(name)
        self._end_field(value[1:] if value[:1] == b" " else value)

    def _go_on(self, buf: bytes, pos: int, end: int, eol: int | None = None) -> int:
        """A line split across chunks, through the name, colon and value states: up to its end, or
        `end`. `eol`: where it ends (`end`: not in this chunk), if the caller found it already."""
        while pos < end:
            if self._state == _IN_NAME:
                pos = self._read_name(buf, pos, end)
            elif self._state == _AFTER_COLON:
                pos += buf[pos] == _SPACE
                self._state = _IN_VALUE
            else:
                pos = self._read_value(buf, pos, end, eol)
            if self._state == _IN_NAME and not self._name:
                break
        return pos

    def _read_name(self, buf: bytes, pos: int, end: int) -> int:
        match = _NAME_END.search(buf, pos, end)
        stop = match.start() if match else end
        room = _NAME_CAP + 1 - len(self._name)
        self._name += buf[pos : min(stop, pos + room)]
        if match is None:
            return end
        if buf[stop] != _CR and buf[stop] != _LF:
            self._begin_value()
            self._state = _AFTER_COLON
            return stop + 1
        if self._name:  # a field name alone: the field, with an empty value
            self._begin_value()
            self._end_line()
        else:
            self._dispatch()
        return self._after_line_end(buf, stop, end)

    def _read_value(self, buf: bytes, pos: int, end: int, eol: int | None = None) -> int:
        if eol is None:
            eol = _line_end(buf, pos, end)
        if self._field == b"data":
            if eol > pos:
                self._out.append(Data(buf, pos, eol))
        elif self._field in (b"event", b"id", b"retry") and len(self._value) <= _VALUE_CAP:
            self._value += buf[pos : min(eol, pos + _VALUE_CAP + 1)]
        if eol == end:
            return end
        self._end_line()
        return self._after_line_end(buf, eol, end)

    def _after_line_end(self, buf: bytes, eol: int, end: int) -> int:
        self._state = _IN_NAME
        if buf[eol] == _LF:
            return eol + 1
        if eol + 1 == end:
            self._skip_lf = True
            return end
        return eol + 2 if buf[eol + 1] == _LF else eol + 1

    def _begin_value(self) -> None:
        self._begin_field(bytes(self._name))
        self._name.clear()
        self._value.clear()

    def _begin_field(self, name: bytes) -> None:
        self._field = name
        if name == b"data":
            if self._has_data:
                self._out.append(_JOINER)
            self._has_data = True

    def _end_line(self) -> None:
        self._state = _IN_NAME
        self._end_field(bytes(self._value))

    def _end_field(self, value: bytes) -> None:
        if len(value) > _VALUE_CAP:
            return
        if self._field == b"event":
            self._event = value.decode("utf-8", "replace")
        elif self._field == b"id" and b"\0" not in value:
            self._last_id = value.decode("utf-8", "replace")
        elif self._field == b"retry" and value.isdigit():
            self._retry = int(value)

    def _dispatch(self) -> None:
        if self._has_data:
            self._out.append(Dispatch(self._event, self._last_id, self._retry))
        # The last event id survives dispatch; the event type and retry belong to one event.
        self._has_data = False
        self._event = self._retry = None


def _line_end(buf: bytes, pos: int, end: int) -> int:
    """Where the line at `pos` ends (its CR or LF), or `end`."""
    cr = buf.find(b"\r", pos, end)
    lf = buf.find(b"\n", pos, end if cr < 0 else cr)
    return lf if lf >= 0 else end if cr < 0 else cr


def iter_events(chunks: Iterable[bytes]) -> Iterator[Event]:
    """Whole events of a stream, data decoded as UTF-8. Buffers each event's data: small streams only."""
    parser = SSEParser()
    data = bytearray()
    for chunk in chunks:
        for record in parser.feed(chunk):
            if isinstance(record, Data):
                data += record.tobytes()
            else:
                yield Event(record.event, data.decode("utf-8", "replace"), record.id, record.retry)
                data.clear()
    parser.close()
