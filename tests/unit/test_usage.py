"""gateway.usage: the usage readers agree with a whole-body parse under any chunking, in bounded memory."""

from __future__ import annotations

import base64
import json
import os
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sse import iter_events
from gateway.usage import CAPTURE_CAP, JsonUsageReader, SSEUsageReader, UsageReader, usage_reader
from tests.unit.test_sse import split

SSE = "text/event-stream"
USAGE = {
    "input_tokens": 50,
    "input_tokens_details": {"text_tokens": 40, "image_tokens": 10},
    "output_tokens": 4160,
    "total_tokens": 4210,
}


def read(chunks: list[bytes] | Iterator[bytes], content_type: str = "application/json") -> UsageReader:
    reader = usage_reader(content_type)
    for chunk in chunks:
        reader.feed(chunk)
    reader.close()
    return reader


def every_split(body: bytes) -> Iterator[list[bytes]]:
    """The body whole, in 1-byte chunks, and cut in two at every position."""
    yield [body]
    yield [body[i : i + 1] for i in range(len(body))]
    for i in range(len(body) + 1):
        yield [body[:i], body[i:]]


# --- JSON bodies: property -------------------------------------------------------------------------

tricky_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        ['the "usage": {"total_tokens": 1}', "\\", '\\"', '"usage"', '{"usage":', "}]", "a/b", "é\u2028"]
    ),
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | tricky_text
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["usage", "data", "x", "type"]) | st.text(max_size=4), children, max_size=3
        )
    ),
    max_leaves=12,
)
b64 = st.binary(max_size=200).map(lambda raw: base64.b64encode(raw).decode())
images = st.fixed_dictionaries(
    {"b64_json": b64}, optional={"revised_prompt": tricky_text, "usage": json_values}
)
usages = st.one_of(
    st.none(),
    st.just(USAGE),
    st.dictionaries(
        st.text(max_size=12),
        st.integers(0, 10**7) | st.dictionaries(st.text(max_size=8), st.integers(0, 2**63 - 1)),
    ),
    json_values,
)
extra_keys = st.text(max_size=80).filter(lambda key: key not in ("usage", "data"))


@st.composite
def json_bodies(draw: st.DrawFn) -> bytes:
    members: dict[str, Any] = draw(st.dictionaries(extra_keys, json_values, max_size=4))
    members["data"] = draw(st.lists(images, max_size=4))
    if draw(st.booleans()):
        members["usage"] = draw(usages)
    body = dict(draw(st.permutations(list(members.items()))))
    serialized: bytes = draw(st.sampled_from(SERIALIZERS))(body)
    return serialized


SERIALIZERS = [
    orjson.dumps,
    lambda body: json.dumps(body).encode(),  # ensure_ascii: \uXXXX escapes everywhere
    lambda body: json.dumps(body, indent=2, ensure_ascii=False).encode(),
    lambda body: orjson.dumps(body).replace(b"/", b"\\/"),  # `/` only occurs inside strings
]


def expected(body: bytes) -> tuple[dict[str, Any] | None, int]:
    parsed = orjson.loads(body)
    usage = parsed.get("usage")
    data = parsed.get("data")
    return (usage if isinstance(usage, dict) else None), (len(data) if isinstance(data, list) else 0)


@settings(max_examples=300, deadline=None)
@given(body=json_bodies(), data=st.data())
def test_json_any_split_matches_a_whole_parse(body: bytes, data: st.DataObject) -> None:
    chunks = split(body, data.draw(st.lists(st.integers(0, len(body)), max_size=20)))
    reader = read(chunks)
    assert (reader.usage, reader.images) == expected(body)
    assert reader.error is None and reader.event_count == 0


@settings(max_examples=100, deadline=None)
@given(body=json_bodies())
def test_json_one_byte_chunks_match_a_whole_parse(body: bytes) -> None:
    reader = read(body[i : i + 1] for i in range(len(body)))
    assert (reader.usage, reader.images) == expected(body)


@settings(max_examples=100, deadline=None)
@given(body=json_bodies(), data=st.data())
def test_json_truncated_body_has_no_usage(body: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(body.rstrip()) - 1))
    assert read(split(body[:cut], data.draw(st.lists(st.integers(0, cut), max_size=5)))).usage is None


# --- JSON bodies: adversarial ----------------------------------------------------------------------

REAL = orjson.dumps(USAGE).decode()


@pytest.mark.parametrize(
    ("body", "usage", "images"),
    [
        ('{"note": "usage", "data": []}', None, 0),
        ('{"x": {"usage": ' + REAL + '}, "y": ["usage", {"usage": 1}]}', None, 0),
        ('{"data": [{"b64_json": "QQ==", "usage": ' + REAL + "}]}", None, 1),
        ('{"data": [{"revised_prompt": "the \\"usage\\": ' + REAL.replace('"', '\\"') + '"}]}', None, 1),
        ('{"data": [{"b64_json": "ends in a backslash \\\\"}], "usage": ' + REAL + "}", USAGE, 1),
        ('{"a": "\\\\\\"usage\\\\\\": {}", "usage": ' + REAL + "}", USAGE, 0),
        ('{"usage": null, "data": [{}, {}]}', None, 2),
        ('{"usage": 5}', None, 0),
        ('{"usage": [' + REAL + "]}", None, 0),
        ('{"us\\u0061ge": ' + REAL + "}", USAGE, 0),
        ('{"' + "k" * 100 + '": 1, "usage": ' + REAL + "}", USAGE, 0),
        ('{"usage": {"total_tokens": 1}, "usage": ' + REAL + "}", USAGE, 0),
        ('{"data": [{"a": [{}, {}], "b": {"c": {}}}, {}], "data2": [{}]}', None, 2),
        ('{"data": {"0": {}}, "x": [[{}]]}', None, 0),
        (' \r\n\t{ "data" : [ { } ] ,\n "usage" :\n' + json.dumps(USAGE, indent=4) + " }\n", USAGE, 1),
    ],
)
def test_json_adversarial_bodies_under_every_split(
    body: str, usage: dict[str, Any] | None, images: int
) -> None:
    assert expected(body.encode()) == (usage, images)  # the cases are themselves valid JSON
    for chunks in every_split(body.encode()):
        reader = read(chunks)
        assert (reader.usage, reader.images) == (usage, images), chunks


@pytest.mark.parametrize(
    "body",
    [b"", b"   ", b"<html>502 Bad Gateway</html>", b"[1, 2]", b"null", b"\x00\xff\xfe", b"}}]]", b'"usage"'],
)
def test_json_non_object_bodies_have_no_usage(body: bytes) -> None:
    for chunks in every_split(body):
        reader = read(chunks)
        assert (reader.usage, reader.images) == (None, 0)


def test_json_every_prefix_of_a_body_is_safe_and_only_the_whole_has_usage() -> None:
    body = ('{"data": [{"b64_json": "a\\"b\\\\"}], "usage": ' + REAL + "}").encode()
    for cut in range(len(body)):
        assert read([body[:cut]]).usage is None
    assert read([body]).usage == USAGE


def test_json_usage_over_the_cap_is_given_up_and_scanning_goes_on() -> None:
    huge = {"input_tokens": 1, "note": "x" * CAPTURE_CAP}
    body = orjson.dumps({"usage": huge, "data": [{}, {}, {}]})
    reader = read(split(body, list(range(0, len(body), 4096))))
    assert (reader.usage, reader.images) == (None, 3)


def test_json_reader_ignores_what_follows_the_top_level_object() -> None:
    reader = read([b'{"usage": ' + REAL.encode() + b'}\n{"usage": {"total_tokens": 1}}'])
    assert reader.usage == USAGE


# --- SSE streams -----------------------------------------------------------------------------------


def event(kind: str | None, payload: dict[str, Any] | str, end: str = "\n", pretty: bool = False) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, indent=1 if pretty else None)
    lines = ([f"event: {kind}"] if kind else []) + [f"data: {line}" for line in data.split("\n")]
    return "".join(line + end for line in lines) + end


def partial(index: int, prefix: str = "image_generation") -> dict[str, Any]:
    return {"type": f"{prefix}.partial_image", "b64_json": "QUJD" * 50, "partial_image_index": index}


def completed(usage: dict[str, Any] | None = USAGE, prefix: str = "image_generation") -> dict[str, Any]:
    return {"type": f"{prefix}.completed", "b64_json": "QUJD" * 50, "usage": usage}


def stream(end: str = "\n") -> bytes:
    events = [
        ": keep-alive" + end,
        event("image_generation.partial_image", partial(0), end),
        event("image_generation.completed", completed(), end),
        event("image_generation.partial_image", partial(1), end, pretty=True),  # final image may come first
    ]
    return "".join(events).encode()


@pytest.mark.parametrize("end", ["\n", "\r", "\r\n"])
def test_sse_usage_and_images_under_every_split(end: str) -> None:
    body = stream(end)
    for chunks in every_split(body):
        reader = read(chunks, SSE)
        assert (reader.usage, reader.images, reader.event_count, reader.error) == (USAGE, 1, 3, None)


def test_sse_type_in_data_without_event_line_and_edits() -> None:
    body = event(None, partial(0, "image_edit")) + event(None, completed(prefix="image_edit"))
    reader = read([body.encode()], SSE)
    assert (reader.usage, reader.images, reader.event_count) == (USAGE, 1, 2)


def test_sse_usage_is_the_last_one_seen() -> None:
    last = {**USAGE, "total_tokens": 9999}
    body = event(None, completed()) + event(None, completed(usage=None)) + event(None, completed(last))
    reader = read([body.encode()], SSE)
    assert (reader.usage, reader.images) == (last, 3)


def test_sse_done_sentinel_ends_the_stream_for_the_reader() -> None:
    body = event(None, completed()) + "data: [DONE]\n\n" + event(None, completed({"total_tokens": 1}))
    for chunks in every_split(body.encode()):
        reader = read(chunks, SSE)
        assert (reader.usage, reader.images, reader.event_count) == (USAGE, 1, 2)


def test_sse_error_event() -> None:
    error = {"message": "boom", "type": "server_error", "code": None}
    body = event(None, partial(0)) + event("error", {"type": "error", "error": error})
    for chunks in every_split(body.encode()):
        reader = read(chunks, SSE)
        assert (reader.error, reader.usage, reader.images, reader.event_count) == (error, None, 0, 2)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (event(None, {"error": {"message": "no event line"}}), {"message": "no event line"}),
        (event(None, {"error": "just text"}), {"message": "just text"}),
        (event(None, {"error": None, "type": "x"}), None),
        (event("error", {"message": "DO shape", "id": "1"}), {"message": "DO shape"}),
        (event("error", "not json"), {"message": "upstream sent an error event"}),
    ],
)
def test_sse_error_shapes(body: str, error: dict[str, Any] | None) -> None:
    assert read([body.encode()], SSE).error == error


def test_sse_truncated_stream_counts_only_dispatched_events() -> None:
    body = (event("image_generation.partial_image", partial(0)) + event(None, completed())).encode()
    cut_in_image = body.index(b"QUJD", body.index(b"completed"))
    for cut in (cut_in_image, len(body) - 2, len(body) - 1):
        reader = read([body[:cut]], SSE)
        assert (reader.usage, reader.images, reader.event_count) == (None, 0, 1)


def test_sse_data_that_is_not_an_object_is_ignored() -> None:
    body = event(None, "[1, 2]") + event("x.completed", "") + event(None, '"usage"')
    reader = read([body.encode()], SSE)
    assert (reader.usage, reader.images, reader.event_count, reader.error) == (None, 1, 3, None)


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    end = draw(st.sampled_from(["\n", "\r", "\r\n"]))
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        payload = draw(
            st.one_of(
                st.builds(partial, st.integers(0, 3), st.sampled_from(["image_generation", "image_edit"])),
                st.builds(completed, usages.filter(lambda u: u is None or isinstance(u, dict))),
                st.fixed_dictionaries({"type": st.just("error"), "error": json_values}),
                st.dictionaries(st.sampled_from(["type", "usage", "x"]), json_values, max_size=3),
            )
        )
        kind = draw(st.none() | st.sampled_from(["image_generation.completed", "error", "other"]))
        parts.append(event(kind, payload, end, pretty=draw(st.booleans())))
        parts.append(draw(st.sampled_from(["", ": ping" + end, "retry: 10" + end + end])))
    return "".join(parts).encode()


def reference_sse(body: bytes) -> tuple[Any, ...]:
    usage, images, error = None, 0, None
    events = list(iter_events([body]))
    for sse in events:
        data = orjson.loads(sse.data)
        kinds = [sse.event or "", data["type"] if isinstance(data.get("type"), str) else ""]
        images += any(kind.endswith(".completed") for kind in kinds)
        usage = data["usage"] if isinstance(data.get("usage"), dict) else usage
        if data.get("error"):
            error = data["error"] if isinstance(data["error"], dict) else {"message": str(data["error"])}
        elif sse.event == "error":
            error = {"message": data.get("message", "upstream sent an error event")}
    return usage, images, error, len(events)


@settings(max_examples=300, deadline=None)
@given(body=sse_streams(), data=st.data())
def test_sse_any_split_matches_a_whole_parse(body: bytes, data: st.DataObject) -> None:
    reader = read(split(body, data.draw(st.lists(st.integers(0, len(body)), max_size=20))), SSE)
    assert (reader.usage, reader.images, reader.error, reader.event_count) == reference_sse(body)


# --- factory, memory, speed ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("text/event-stream", SSEUsageReader),
        ("Text/Event-Stream; charset=utf-8", SSEUsageReader),
        ("application/json", JsonUsageReader),
        ("application/json; charset=utf-8", JsonUsageReader),
        ("text/html", JsonUsageReader),
        (None, JsonUsageReader),
    ],
)
def test_factory_picks_by_media_type(content_type: str | None, kind: type) -> None:
    assert isinstance(usage_reader(content_type), kind)


CHUNK = 64 * 1024
MB_40 = 40 * 1024 * 1024


@pytest.fixture(scope="module")
def big_bodies() -> dict[str, bytes]:
    image = base64.b64encode(os.urandom(MB_40 // 10 * 3 // 4)).decode()
    json_body = orjson.dumps({"created": 1, "data": [{"b64_json": image}] * 10, "usage": USAGE})
    events = [event("image_generation.partial_image", {**partial(i), "b64_json": image}) for i in range(9)]
    events.append(event("image_generation.completed", {**completed(), "b64_json": image}))
    return {"application/json": json_body, SSE: "".join(events).encode()}


@pytest.mark.parametrize("content_type", ["application/json", SSE])
def test_memory_is_bounded_whatever_the_body_size(big_bodies: dict[str, bytes], content_type: str) -> None:
    body = big_bodies[content_type]
    tracemalloc.start()
    reader = read((body[i : i + CHUNK] for i in range(0, len(body), CHUNK)), content_type)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (reader.usage, reader.images) == (USAGE, 10 if content_type != SSE else 1)
    assert peak < CHUNK + 256 * 1024, peak


@pytest.mark.parametrize("content_type", ["application/json", SSE])
def test_no_per_byte_python_loop(big_bodies: dict[str, bytes], content_type: str) -> None:
    body = big_bodies[content_type]
    chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
    start = time.perf_counter()
    reader = read(chunks, content_type)
    elapsed = time.perf_counter() - start
    assert reader.usage == USAGE
    # Measured ~3 ms (over 10 GB/s); a per-byte Python loop would take seconds.
    assert elapsed < 0.5, elapsed
