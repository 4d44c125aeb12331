"""gateway.relay.sse: SSE framing against the spec, openai-python's decoder, and any split into chunks."""

from __future__ import annotations

import itertools
import re
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder

from gateway.relay.sse import Data, Dispatch, Event, SSEParser, iter_events

BOM = b"\xef\xbb\xbf"


def reference_events(stream: bytes) -> list[Event]:
    """The WHATWG event-stream interpretation, written for clarity on a whole stream."""
    stream = stream.removeprefix(BOM)
    lines = re.split(rb"\r\n|\r|\n", stream)[:-1]  # the last piece has no line end: discarded
    events: list[Event] = []
    data: list[bytes] | None = None
    event = last_id = None
    retry = None
    for line in lines:
        if not line:
            if data is not None:
                events.append(Event(event, b"\n".join(data).decode(), last_id, retry))
            data, event, retry = None, None, None
            continue
        name, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if name == b"data":
            data = [*(data or []), value]
        elif name == b"event":
            event = value.decode()
        elif name == b"id" and b"\0" not in value:
            last_id = value.decode()
        elif name == b"retry" and value.isdigit():
            retry = int(value)
    return events


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    """`body` cut at each of `cuts` (empty chunks included when cuts repeat the ends)."""
    bounds = [0, *sorted(set(cuts)), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds)]


def byte_chunks(body: bytes) -> Iterator[bytes]:
    return (body[i : i + 1] for i in range(len(body)))


values = st.text(alphabet=' :ab"{}\\é\0\u2028', max_size=8)
lines = st.one_of(
    st.tuples(st.sampled_from(["data", "event", "id", "retry", "other", ""]), st.just(":"), values),
    st.tuples(st.sampled_from(["retry"]), st.just(": "), st.from_regex(r"\A[0-9]{1,4}\Z")),
    st.tuples(st.sampled_from(["data", "event", "id"]), st.just(""), st.just("")),  # no colon
    st.just(("", "", "")),  # a blank line dispatches
)
endings = st.sampled_from(["\n", "\r", "\r\n"])


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    parts = [
        name + colon + value + draw(endings) for name, colon, value in draw(st.lists(lines, max_size=25))
    ]
    return draw(st.sampled_from([b"", BOM])) + "".join(parts).encode()


@settings(max_examples=400, deadline=None)
@given(stream=streams(), data=st.data())
def test_any_split_matches_the_spec(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert list(iter_events(split(stream, cuts))) == reference_events(stream)


@settings(max_examples=200, deadline=None)
@given(stream=streams())
def test_one_byte_chunks_match_the_spec(stream: bytes) -> None:
    assert list(iter_events(byte_chunks(stream))) == reference_events(stream)


@st.composite
def openai_compatible_streams(draw: st.DrawFn) -> bytes:
    """Streams where openai-python's decoder and the spec agree: every event has data, no ids."""
    events = []
    for _ in range(draw(st.integers(0, 6))):
        fields = [f"data:{draw(values)}" for _ in range(draw(st.integers(1, 3)))]
        fields += [draw(st.sampled_from([": comment", "event: x.completed", "retry: 5", "other: 1"]))]
        fields = draw(st.permutations(fields))
        events.append("".join(field + draw(endings) for field in fields) + draw(endings))
    return "".join(events).replace("\0", "").encode()


@settings(max_examples=300, deadline=None)
@given(stream=openai_compatible_streams(), data=st.data())
def test_agrees_with_openai_python(stream: bytes, data: st.DataObject) -> None:
    chunks = split(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    theirs = [Event(e.event, e.data, e.id, e.retry) for e in SSEDecoder().iter_bytes(iter(chunks))]
    assert list(iter_events(chunks)) == theirs


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    # Were the LF read as a second line end, the empty line would dispatch `a` alone.
    chunks = [b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]
    assert list(iter_events(chunks)) == [Event(None, "a\nb")]


def test_cr_only_and_lf_only_and_crlf() -> None:
    for end in (b"\r", b"\n", b"\r\n"):
        stream = b"event: e" + end + b"data: x" + end + end
        assert list(iter_events([stream])) == [Event("e", "x")], end


def test_comments_and_space_after_colon() -> None:
    stream = b": keep-alive\ndata:no space\ndata:  two spaces\n:\n\n"
    assert list(iter_events([stream])) == [Event(None, "no space\n two spaces")]


def test_field_without_colon_and_empty_data_line() -> None:
    assert list(iter_events([b"data\ndata:\n\n"])) == [Event(None, "\n")]


def test_blank_line_without_data_dispatches_nothing_and_resets_type() -> None:
    assert list(iter_events([b"event: ignored\n\ndata: x\n\n"])) == [Event(None, "x")]


def test_last_event_id_persists_and_retry_is_per_event() -> None:
    stream = b"id: 7\nretry: 300\ndata: a\n\ndata: b\n\nid: 8\x00\nretry: 1x\ndata: c\n\n"
    assert list(iter_events([stream])) == [
        Event(None, "a", "7", 300),
        Event(None, "b", "7"),
        Event(None, "c", "7"),
    ]


def test_bom_is_stripped_even_when_split() -> None:
    assert list(iter_events([b"\xef", b"\xbb", b"\xbfdata: x\n\n"])) == [Event(None, "x")]
    assert list(iter_events([b"\xef\xbbdata: x\n\n"])) == []  # not a BOM: a field named so


def test_incomplete_event_at_end_is_discarded() -> None:
    parser = SSEParser()
    records = parser.feed(b"data: a\n\ndata: b\n")
    parser.close()
    assert [type(r) for r in records] == [Data, Dispatch, Data]
    assert list(iter_events([b"data: a\n\ndata: b"])) == [Event(None, "a")]


def test_data_comes_out_as_spans_of_the_chunk_without_waiting_for_the_line_end() -> None:
    parser = SSEParser()
    chunk = b"event: big\ndata: " + b"A" * 1000
    (record,) = parser.feed(chunk)
    assert isinstance(record, Data)
    assert record.buf is chunk and record.tobytes() == b"A" * 1000
    assert [r.tobytes() for r in parser.feed(b"BB") if isinstance(r, Data)] == [b"BB"]
    assert parser.feed(b"\n\n") == [Dispatch("big", None, None)]


def test_long_fields_are_bounded() -> None:
    tracemalloc.start()
    parser = SSEParser()
    for _ in range(200):  # 13 MB of comment, unknown field name, event value, data
        for prefix in (b":", b"x" * 65, b"event: ", b"data: "):
            parser.feed(prefix + b"y" * 16384)
            for _ in range(3):
                parser.feed(b"y" * 16384)
            parser.feed(b"\n")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 256 * 1024
    assert parser.feed(b"\n") == [Dispatch(None, None, None)]  # the over-long event name was ignored


@pytest.mark.parametrize("size", [4096, 4097])
def test_a_value_over_the_cap_is_ignored_whether_its_line_comes_whole_or_in_pieces(size: int) -> None:
    stream = b"event: " + b"e" * size + b"\nretry: " + b"1" * size + b"\ndata: a\n\n"
    expected = [Event("e" * size, "a", None, int("1" * size))] if size == 4096 else [Event(None, "a")]
    for chunks in ([stream], split(stream, [3, 200, 4200, len(stream) - 3]), byte_chunks(stream)):
        assert list(iter_events(chunks)) == expected
