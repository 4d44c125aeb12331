"""gateway.relay.usage: the usage readers agree with a whole-body parse under any chunking, in bounded memory."""

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
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.relay.json_scan import JsonScanner
from gateway.relay.sse import iter_events
from gateway.relay.usage import CAPTURE_CAP, JsonUsageReader, SSEUsageReader, UsageReader, usage_reader
from policies.cost import _usage_tokens
from tests.unit.test_sse import split

SSE = "text/event-stream"
USAGE = {
    "input_tokens": 50,
    "input_tokens_details": {"text_tokens": 40, "image_tokens": 10},
    "output_tokens": 4160,
    "total_tokens": 4210,
}


def read(
    chunks: list[bytes] | Iterator[bytes],
    content_type: str = "application/json",
    small_body: int | None = None,
) -> UsageReader:
    """Read a body; `small_body`: what size of JSON document (the body, or an event's data) is kept
    and parsed whole rather than scanned (default: the readers' own)."""
    if small_body is None:
        reader = usage_reader(content_type)
    elif content_type == SSE:
        reader = SSEUsageReader(small_event=small_body)
    else:
        reader = JsonUsageReader(small_body)
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

# Every way a JSON document (a body, an event's data) is read: scanned as it streams (one past
# CAPTURE_CAP), kept and parsed whole (a small one), or kept past a limit of 100 bytes with its
# images cut out, or scanned from its start when what is left outgrows it; they must agree.
EVERY_PATH = pytest.mark.parametrize(
    "small_body", [0, CAPTURE_CAP, 100], ids=["scanned", "whole", "past-100-bytes"]
)

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


@EVERY_PATH
@settings(max_examples=300, deadline=None)
@given(body=json_bodies(), data=st.data())
def test_json_any_split_matches_a_whole_parse(small_body: int, body: bytes, data: st.DataObject) -> None:
    chunks = split(body, data.draw(st.lists(st.integers(0, len(body)), max_size=20)))
    reader = read(chunks, small_body=small_body)
    assert (reader.usage, reader.images) == expected(body)
    assert reader.error is None and reader.image_events == 0


@EVERY_PATH
@settings(max_examples=100, deadline=None)
@given(body=json_bodies())
def test_json_one_byte_chunks_match_a_whole_parse(small_body: int, body: bytes) -> None:
    reader = read((body[i : i + 1] for i in range(len(body))), small_body=small_body)
    assert (reader.usage, reader.images) == expected(body)


@EVERY_PATH
@settings(max_examples=100, deadline=None)
@given(body=json_bodies(), data=st.data())
def test_json_truncated_body_has_no_usage(small_body: int, body: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(body.rstrip()) - 1))
    chunks = split(body[:cut], data.draw(st.lists(st.integers(0, cut), max_size=5)))
    assert read(chunks, small_body=small_body).usage is None


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
@EVERY_PATH
def test_json_adversarial_bodies_under_every_split(
    small_body: int, body: str, usage: dict[str, Any] | None, images: int
) -> None:
    assert expected(body.encode()) == (usage, images)  # the cases are themselves valid JSON
    for chunks in every_split(body.encode()):
        reader = read(chunks, small_body=small_body)
        assert (reader.usage, reader.images) == (usage, images), chunks


@pytest.mark.parametrize(
    "body",
    [b"", b"   ", b"<html>502 Bad Gateway</html>", b"[1, 2]", b"null", b"\x00\xff\xfe", b"}}]]", b'"usage"'],
)
@EVERY_PATH
def test_json_non_object_bodies_have_no_usage(small_body: int, body: bytes) -> None:
    for chunks in every_split(body):
        reader = read(chunks, small_body=small_body)
        assert (reader.usage, reader.images) == (None, 0)


@EVERY_PATH
def test_json_every_prefix_of_a_body_is_safe_and_only_the_whole_has_usage(small_body: int) -> None:
    body = ('{"data": [{"b64_json": "a\\"b\\\\"}], "usage": ' + REAL + "}").encode()
    for cut in range(len(body)):
        assert read([body[:cut]], small_body=small_body).usage is None
    assert read([body], small_body=small_body).usage == USAGE


def test_json_usage_over_the_cap_is_given_up_and_scanning_goes_on() -> None:
    huge = {"input_tokens": 1, "note": "x" * CAPTURE_CAP}
    body = orjson.dumps({"usage": huge, "data": [{}, {}, {}]})
    reader = read(split(body, list(range(0, len(body), 4096))))
    assert (reader.usage, reader.images) == (None, 3)


@EVERY_PATH
def test_json_reader_ignores_what_follows_the_top_level_object(small_body: int) -> None:
    reader = read(
        [b'{"usage": ' + REAL.encode() + b'}\n{"usage": {"total_tokens": 1}}'], small_body=small_body
    )
    assert reader.usage == USAGE


# --- SSE streams -----------------------------------------------------------------------------------


def event(kind: str | None, payload: dict[str, Any] | str, end: str = "\n", pretty: bool = False) -> str:
    # Compact, as OpenAI writes it (the images cut out of what is kept are found that way), or pretty.
    if isinstance(payload, str):
        data = payload
    else:
        data = json.dumps(payload, indent=1) if pretty else json.dumps(payload, separators=(",", ":"))
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
@EVERY_PATH
def test_sse_usage_and_images_under_every_split(small_body: int, end: str) -> None:
    body = stream(end)
    for chunks in every_split(body):
        reader = read(chunks, SSE, small_body)
        assert (reader.usage, reader.images, reader.image_events, reader.error) == (USAGE, 1, 3, None)


def test_sse_type_in_data_without_event_line_and_edits() -> None:
    body = event(None, partial(0, "image_edit")) + event(None, completed(prefix="image_edit"))
    reader = read([body.encode()], SSE)
    assert (reader.usage, reader.images, reader.image_events) == (USAGE, 1, 2)


def no_scanning(*args: object) -> None:
    raise AssertionError("scanned")


def test_sse_small_events_are_parsed_whole_not_scanned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Data of up to CAPTURE_CAP bytes (a small image, an error, a usage) is kept and parsed whole by
    orjson at dispatch: scanning it in Python cost the relay far more (issue 14)."""
    monkeypatch.setattr(JsonScanner, "feed", no_scanning)
    for chunks in every_split(stream("\r\n")):
        reader = read(chunks, SSE)
        assert (reader.usage, reader.images, reader.image_events, reader.error) == (USAGE, 1, 3, None)


@pytest.mark.parametrize("content_type", [SSE, "application/json"])
def test_multi_mb_images_are_cut_out_not_scanned(monkeypatch: pytest.MonkeyPatch, content_type: str) -> None:
    """What is kept of a document stays small without its images, so it too is parsed whole."""
    image = base64.b64encode(os.urandom(1_500_000)).decode()
    if content_type == SSE:
        body = event(None, {**partial(0), "b64_json": image}) + event(
            None, {**completed(), "b64_json": image}
        )
        expected_images = 1
    else:
        body = orjson.dumps({"created": 1, "data": [{"b64_json": image}] * 3, "usage": USAGE}).decode()
        expected_images = 3
    monkeypatch.setattr(JsonScanner, "feed", no_scanning)
    encoded = body.encode()
    for size in (CHUNK, 4096, 999_999):
        reader = read([encoded[i : i + size] for i in range(0, len(encoded), size)], content_type)
        assert (reader.usage, reader.images) == (USAGE, expected_images)


# Escaped quotes and backslashes in an image (one at its end), and what looks like an image member.
ESCAPED_IMAGE = "A" * 80 + '"b64_json":"x\\' + "B" * 80 + "\\"


@EVERY_PATH
def test_sse_an_image_with_escapes_is_cut_out_under_every_split(small_body: int) -> None:
    body = event(None, {**partial(0), "b64_json": ESCAPED_IMAGE}) + event(
        None, {**completed(), "b64_json": ESCAPED_IMAGE}
    )
    for chunks in every_split(body.encode()):
        reader = read(chunks, SSE, small_body)
        assert (reader.usage, reader.images, reader.image_events) == (USAGE, 1, 2), chunks


@pytest.mark.parametrize("content_type", [SSE, "application/json"])
def test_an_image_with_escapes_is_cut_out_not_scanned(
    monkeypatch: pytest.MonkeyPatch, content_type: str
) -> None:
    """A backslash inside an image (`\\/` from some encoders, an escaped quote) is skipped like the
    rest of it: only one outside the images makes a document be scanned."""
    image = ESCAPED_IMAGE * 100
    if content_type == SSE:
        body = (
            event(None, {**partial(0), "b64_json": image}) + event(None, {**completed(), "b64_json": image})
        ).encode()
    else:
        body = orjson.dumps({"data": [{"b64_json": image}, {"b64_json": image}], "usage": USAGE})
    monkeypatch.setattr(JsonScanner, "feed", no_scanning)
    for size in (len(body), 4096, 1000):
        reader = read([body[i : i + size] for i in range(0, len(body), size)], content_type)
        assert (reader.usage, reader.images) == (USAGE, 1 if content_type == SSE else 2), size


@pytest.mark.parametrize("content_type", [SSE, "application/json"])
def test_an_image_in_pieces_ending_in_a_backslash_is_cut_out_exactly(
    monkeypatch: pytest.MonkeyPatch, content_type: str
) -> None:
    """A piece inside an image that holds no quote is dropped after one memchr, unless it ends in a
    backslash: the next piece then opens escaped (its `"` does not end the image)."""
    image = ESCAPED_IMAGE * 100  # past what is kept whole: cut out as it comes
    if content_type == SSE:
        body = (event(None, {**partial(0), "b64_json": image}) + event(None, completed())).encode()
    else:
        body = orjson.dumps({"data": [{"b64_json": image}], "usage": USAGE})
    cuts = [at + 1 for at in range(len(body)) if body[at] == ord("\\")]
    monkeypatch.setattr(JsonScanner, "feed", no_scanning)
    for chunks in (split(body, cuts), split(body, cuts + [at + 1 for at in cuts])):
        reader = read(chunks, content_type)
        assert (reader.usage, reader.images) == (USAGE, 1), chunks


@EVERY_PATH
def test_json_an_image_with_escapes_is_cut_out_under_every_split(small_body: int) -> None:
    body = orjson.dumps({"data": [{"b64_json": ESCAPED_IMAGE}, {"b64_json": "QUJD" * 40}], "usage": USAGE})
    for chunks in every_split(body):
        reader = read(chunks, small_body=small_body)
        assert (reader.usage, reader.images) == (USAGE, 2), chunks


@pytest.mark.parametrize("content_type", [SSE, "application/json"])
def test_an_image_is_cut_out_before_a_small_document_is_parsed(
    monkeypatch: pytest.MonkeyPatch, content_type: str
) -> None:
    """orjson would build the `b64_json` string (~6 instructions a byte) that nothing reads."""
    image = base64.b64encode(os.urandom(3000)).decode()
    if content_type == SSE:
        body = event("image_generation.completed", {**completed(), "b64_json": image}).encode()
    else:
        body = orjson.dumps({"created": 1, "data": [{"b64_json": image}] * 2, "usage": USAGE})
    parsed: list[bytes] = []
    loads = orjson.loads

    def recorded(document: bytes) -> Any:
        parsed.append(document)
        return loads(document)

    monkeypatch.setattr(orjson, "loads", recorded)
    reader = read([body], content_type)
    assert (reader.usage, reader.images) == (USAGE, 1 if content_type == SSE else 2)
    assert parsed and not any(image.encode() in document for document in parsed)


def per_image(text: int, output: int, image_in: int = 0) -> dict[str, Any]:
    """One image's usage, every count reported, as OpenAI shapes it."""
    return {
        "input_tokens": text + image_in,
        "input_tokens_details": {"text_tokens": text, "image_tokens": image_in},
        "output_tokens": output,
        "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
        "total_tokens": text + image_in + output,
    }


def sse_usage(*events: str) -> dict[str, Any] | None:
    """The usage the reader settles on for these events, the same under every split of the stream
    and whether each event is kept whole or scanned."""
    body = "".join(events).encode()
    usages = {
        repr(read(chunks, SSE, small_body).usage)
        for small_body in (0, CAPTURE_CAP, 100)
        for chunks in every_split(body)
    }
    assert len(usages) == 1, usages
    return read([body], SSE).usage


def test_sse_usage_of_two_completed_events_is_their_sum() -> None:
    first, second = per_image(text=12, output=272), per_image(text=0, output=272)
    usage = sse_usage(
        event("image_generation.partial_image", partial(0)),
        event("image_generation.completed", completed(first)),
        event("image_generation.partial_image", partial(0)),
        event("image_generation.completed", completed(second)),
    )
    assert usage == per_image(text=12, output=544)


def test_sse_usage_on_the_last_completed_event_only_is_taken_as_it_is() -> None:
    whole = {**per_image(text=12, output=544), "note": "kept"}
    usage = sse_usage(event(None, completed(None)), event(None, completed(whole)))
    assert usage == whole


def test_sse_a_summary_event_is_ignored_when_completed_events_carry_usage() -> None:
    each = per_image(text=5, output=100)
    summary = {"type": "response.completed", "usage": per_image(text=10, output=200)}
    usage = sse_usage(
        event(None, completed(each)),
        event(None, completed(each)),
        event("response.completed", summary),  # a relay's closing summary: counting it would bill twice
    )
    assert usage == per_image(text=10, output=200)
    reader = read([(event(None, completed(each)) + event("response.completed", summary)).encode()], SSE)
    assert (reader.usage, reader.images) == (each, 1)


def test_sse_without_usage_on_completed_events_the_last_other_usage_counts() -> None:
    early, summary = per_image(text=1, output=1), per_image(text=10, output=544)
    usage = sse_usage(
        event("progress", {"type": "progress", "usage": early}),
        event(None, completed(None)),
        event(None, {"type": "image_generation.completed", "b64_json": "QQ=="}),
        event("usage", {"type": "usage", "usage": summary}),
    )
    assert usage == summary


def test_sse_edit_streams_are_summed_too() -> None:
    usage = sse_usage(
        event(None, completed(per_image(7, 100, image_in=300), prefix="image_edit")),
        event("image_edit.completed", completed(per_image(0, 100), prefix="image_edit")),
    )
    assert usage == per_image(7, 200, image_in=300)


def test_sse_a_count_one_event_lacks_is_left_out_not_invented() -> None:
    full = per_image(text=12, output=272, image_in=8)
    bare = {"input_tokens": 0, "output_tokens": 272, "total_tokens": 272}  # no details at all
    usage = sse_usage(event(None, completed(full)), event(None, completed(bare)))
    assert usage == {"input_tokens": 20, "output_tokens": 544, "total_tokens": 564}
    # The cost module derives what is left out, as for one usage: all 20 input tokens count as text.
    assert _usage_tokens(usage, {}) == (20, 0, 544)


def test_sse_a_missing_output_count_is_derived_from_the_total() -> None:
    no_output = {"input_tokens": 0, "input_tokens_details": {"text_tokens": 0}, "total_tokens": 400}
    usage = sse_usage(event(None, completed(per_image(12, 272))), event(None, completed(no_output)))
    assert usage == {"input_tokens": 12, "input_tokens_details": {"text_tokens": 12}, "total_tokens": 684}
    assert _usage_tokens(usage, {}) == (12, 0, 672)


@pytest.mark.parametrize("bad", [None, -1, 1.5, "272", True, [272]])
def test_sse_a_count_that_is_not_a_non_negative_integer_is_not_summed(bad: object) -> None:
    odd = {**per_image(0, 272), "output_tokens": bad}
    usage = sse_usage(event(None, completed(per_image(12, 272))), event(None, completed(odd)))
    assert usage is not None and "output_tokens" not in usage
    assert usage["total_tokens"] == 12 + 544 and _usage_tokens(usage, {}) == (12, 0, 544)


def test_sse_sum_over_many_images_equals_the_whole_request() -> None:
    images = [per_image(text=40 if i == 0 else 0, output=1056 + 200) for i in range(10)]
    usage = sse_usage(*(event("image_generation.completed", completed(u)) for u in images))
    assert usage == per_image(text=40, output=10 * 1256)


@EVERY_PATH
def test_sse_done_sentinel_ends_the_stream_for_the_reader(small_body: int) -> None:
    body = event(None, completed()) + "data: [DONE]\n\n" + event(None, completed({"total_tokens": 1}))
    for chunks in every_split(body.encode()):
        reader = read(chunks, SSE, small_body)
        assert (reader.usage, reader.images, reader.image_events) == (USAGE, 1, 1)


@EVERY_PATH
def test_sse_error_event(small_body: int) -> None:
    error = {"message": "boom", "type": "server_error", "code": None}
    body = event(None, partial(0)) + event("error", {"type": "error", "error": error})
    for chunks in every_split(body.encode()):
        reader = read(chunks, SSE, small_body)
        assert (reader.error, reader.usage, reader.images, reader.image_events) == (error, None, 0, 1)


@pytest.mark.parametrize(
    "before",
    [
        "",
        ": keep-alive\n\n",
        event("image_generation.in_progress", {"type": "image_generation.in_progress"}),
        event(None, {"type": "x.partial_image", "b64_json": "QQ=="}),
    ],
    ids=["nothing", "a_comment", "an_unknown_event", "an_unknown_partial"],
)
@pytest.mark.parametrize("after", ["", "data: [DONE]\n\n"], ids=["end", "done"])
@EVERY_PATH
def test_sse_an_error_before_any_image_event_counts_no_image_event(
    small_body: int, before: str, after: str
) -> None:
    """What tells the pipeline that nothing was generated (a refund): neither `[DONE]` nor a comment
    nor an event that carries no image counts, wherever the stream is cut."""
    error = {"message": "boom", "type": "server_error", "code": None}
    body = before + event("error", {"type": "error", "error": error}) + after
    for chunks in every_split(body.encode()):
        reader = read(chunks, SSE, small_body)
        assert (reader.error, reader.images, reader.image_events) == (error, 0, 0)
        assert reader.done == bool(after)


@EVERY_PATH
def test_sse_image_events_are_partials_and_completed_of_both_families(small_body: int) -> None:
    body = "".join(
        [
            event(None, partial(0)),
            event("image_edit.partial_image", {"b64_json": "QQ=="}),  # named by its `event` field only
            event("error", {"type": "error", "error": {"message": "late"}}),
            event(None, completed(None, prefix="image_edit")),  # an image after the error was still made
            "data: [DONE]\n\n",
            event(None, partial(1)),  # after [DONE]: never read
        ]
    )
    for chunks in every_split(body.encode()):
        reader = read(chunks, SSE, small_body)
        assert (reader.images, reader.image_events, reader.done) == (1, 3, True)


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
@EVERY_PATH
def test_sse_error_shapes(small_body: int, body: str, error: dict[str, Any] | None) -> None:
    assert read([body.encode()], SSE, small_body).error == error


@EVERY_PATH
def test_sse_the_first_error_is_the_one_kept(small_body: int) -> None:
    first, second = {"message": "first", "type": "server_error"}, {"message": "second"}
    body = event("error", {"type": "error", "error": first}) + event(
        "error", {"type": "error", "error": second}
    )
    for chunks in every_split(body.encode()):
        assert read(chunks, SSE, small_body).error == first


@EVERY_PATH
def test_sse_truncated_stream_counts_only_dispatched_events(small_body: int) -> None:
    body = (event("image_generation.partial_image", partial(0)) + event(None, completed())).encode()
    cut_in_image = body.index(b"QUJD", body.index(b"completed"))
    for cut in (cut_in_image, len(body) - 2, len(body) - 1):
        reader = read([body[:cut]], SSE, small_body)
        assert (reader.usage, reader.images, reader.image_events) == (None, 0, 1)


@EVERY_PATH
def test_sse_data_that_is_not_an_object_is_ignored(small_body: int) -> None:
    body = event(None, "[1, 2]") + event("image_generation.completed", "") + event(None, '"usage"')
    reader = read([body.encode()], SSE, small_body)
    assert (reader.usage, reader.images, reader.image_events, reader.error) == (None, 1, 1, None)


@pytest.mark.parametrize("kind", ["response.completed", "x.completed", "image_generation.completed.v2", ""])
@EVERY_PATH
def test_sse_only_image_completed_events_are_images(small_body: int, kind: str) -> None:
    body = event(kind or None, {"type": kind, "usage": USAGE}) + event(None, {"type": ["not", "a", "str"]})
    reader = read([body.encode()], SSE, small_body)
    assert (reader.usage, reader.images, reader.image_events) == (USAGE, 0, 0)


COMPLETED = ["image_generation.completed", "image_edit.completed"]
IMAGE_EVENTS = [*COMPLETED, "image_generation.partial_image", "image_edit.partial_image"]
counts = st.integers(0, 10**6) | st.sampled_from([-1, 1.5, True, "7", None])
# Per-image usages: OpenAI's counts, each possibly missing or not a count; details possibly absent.
image_usages = st.fixed_dictionaries(
    {},
    optional={
        "input_tokens": counts,
        "input_tokens_details": st.fixed_dictionaries(
            {}, optional={"text_tokens": counts, "image_tokens": counts}
        )
        | st.none(),
        "output_tokens": counts,
        "output_tokens_details": st.fixed_dictionaries(
            {}, optional={"image_tokens": counts, "text_tokens": counts}
        ),
        "total_tokens": counts,
        "other": json_values,
    },
)


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    end = draw(st.sampled_from(["\n", "\r", "\r\n"]))
    parts = []
    for _ in range(draw(st.integers(0, 6))):
        payload = draw(
            st.one_of(
                st.builds(partial, st.integers(0, 3), st.sampled_from(["image_generation", "image_edit"])),
                st.builds(
                    completed,
                    usages.filter(lambda u: u is None or isinstance(u, dict)) | image_usages,
                    st.sampled_from(["image_generation", "image_edit", "x"]),
                ),
                st.fixed_dictionaries({"type": st.just("error"), "error": json_values}),
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["usage", "response.completed"]), "usage": image_usages}
                ),
                st.dictionaries(st.sampled_from(["type", "usage", "x"]), json_values, max_size=3),
            )
        )
        kind = draw(st.none() | st.sampled_from([*IMAGE_EVENTS, "error", "other", "x.completed"]))
        parts.append(event(kind, payload, end, pretty=draw(st.booleans())))
        parts.append(draw(st.sampled_from(["", ": ping" + end, "retry: 10" + end + end])))
    return "".join(parts).encode()


PATHS = [
    ("input_tokens",),
    ("input_tokens_details", "text_tokens"),
    ("input_tokens_details", "image_tokens"),
    ("output_tokens",),
    ("output_tokens_details", "image_tokens"),
    ("output_tokens_details", "text_tokens"),
    ("total_tokens",),
]


def reference_sum(usages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The module docstring's rule, written for clarity: one usage as it is; more, count by count."""
    if len(usages) <= 1:
        return usages[0] if usages else None

    def count(usage: dict[str, Any], path: tuple[str, ...]) -> int | None:
        value: Any = usage
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return value if ok else None

    summed: dict[str, Any] = {}
    for path in PATHS:
        values = [count(usage, path) for usage in usages]
        if all(value is not None for value in values):
            where = summed if len(path) == 1 else summed.setdefault(path[0], {})
            where[path[-1]] = sum(value or 0 for value in values)
    return summed


def reference_sse(body: bytes) -> tuple[Any, ...]:
    completed_usages, other_usage, images, image_events, error = [], None, 0, 0, None
    for sse in iter_events([body]):
        data = orjson.loads(sse.data)
        is_image = sse.event in COMPLETED or data.get("type") in COMPLETED
        images += is_image
        image_events += sse.event in IMAGE_EVENTS or data.get("type") in IMAGE_EVENTS
        if isinstance(data.get("usage"), dict):
            if is_image:
                completed_usages.append(data["usage"])
            else:
                other_usage = data["usage"]
        if error is not None:
            continue
        if data.get("error"):
            error = data["error"] if isinstance(data["error"], dict) else {"message": str(data["error"])}
        elif sse.event == "error":
            error = {"message": data.get("message", "upstream sent an error event")}
    usage = reference_sum(completed_usages) if completed_usages else other_usage
    return usage, images, error, image_events


def shaped(shape: frozenset[tuple[str, ...]], text: int, image_in: int, output: int) -> dict[str, Any]:
    """A consistent usage reporting only the counts in `shape`."""
    values = {
        ("input_tokens",): text + image_in,
        ("input_tokens_details", "text_tokens"): text,
        ("input_tokens_details", "image_tokens"): image_in,
        ("output_tokens",): output,
        ("output_tokens_details", "image_tokens"): output,
        ("output_tokens_details", "text_tokens"): 0,
        ("total_tokens",): text + image_in + output,
    }
    usage: dict[str, Any] = {}
    for path in PATHS:
        if path in shape:
            where = usage if len(path) == 1 else usage.setdefault(path[0], {})
            where[path[-1]] = values[path]
    return usage


@settings(max_examples=300, deadline=None)
@given(
    shape=st.frozensets(st.sampled_from(PATHS)),
    images=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 10**5)), min_size=1),
)
def test_sse_the_cost_of_the_sum_is_the_sum_of_the_costs(
    shape: frozenset[tuple[str, ...]], images: list[tuple[int, int, int]]
) -> None:
    """An upstream that reports the same counts on every image is billed as if each were settled alone."""
    usages = [shaped(shape, *image) for image in images]
    each = [_usage_tokens(usage, {"prompt": "p"}) for usage in usages]
    input_known = shape - {("output_tokens",), *(p for p in PATHS if p[0] == "output_tokens_details")}
    assume(None not in each and (input_known or len(images) == 1))  # else the prompt stands in, once
    body = "".join(event("image_generation.completed", completed(usage)) for usage in usages).encode()
    summed = read([body], SSE).usage
    assert _usage_tokens(summed, {"prompt": "p"}) == tuple(map(sum, zip(*each, strict=True)))


@EVERY_PATH
@settings(max_examples=300, deadline=None)
@given(body=sse_streams(), data=st.data())
def test_sse_any_split_matches_a_whole_parse(small_body: int, body: bytes, data: st.DataObject) -> None:
    reader = read(split(body, data.draw(st.lists(st.integers(0, len(body)), max_size=20))), SSE, small_body)
    assert (reader.usage, reader.images, reader.error, reader.image_events) == reference_sse(body)


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
def big_bodies() -> dict[str, tuple[str, bytes]]:
    """40 MB bodies: JSON with n=10; a stream of 9 partials and a completed; a stream of 10 completed."""
    image = base64.b64encode(os.urandom(MB_40 // 10 * 3 // 4)).decode()
    json_body = orjson.dumps({"created": 1, "data": [{"b64_json": image}] * 10, "usage": USAGE})
    events = [event("image_generation.partial_image", {**partial(i), "b64_json": image}) for i in range(9)]
    events.append(event("image_generation.completed", {**completed(), "b64_json": image}))
    per_image = [event("image_generation.completed", {**completed(), "b64_json": image}) for _ in range(10)]
    return {
        "json": ("application/json", json_body),
        "sse": (SSE, "".join(events).encode()),
        "sse, usage per image": (SSE, "".join(per_image).encode()),
    }


TEN_TIMES = {
    "input_tokens": 500,
    "input_tokens_details": {"text_tokens": 400, "image_tokens": 100},
    "output_tokens": 41600,
    "total_tokens": 42100,
}
EXPECTED = {"json": (USAGE, 10), "sse": (USAGE, 1), "sse, usage per image": (TEN_TIMES, 10)}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_memory_is_bounded_whatever_the_body_size(
    big_bodies: dict[str, tuple[str, bytes]], name: str
) -> None:
    content_type, body = big_bodies[name]
    tracemalloc.start()
    reader = read((body[i : i + CHUNK] for i in range(0, len(body), CHUNK)), content_type)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (reader.usage, reader.images) == EXPECTED[name]
    # Little more than the chunks in hand (this one and the last): what a reader keeps to parse
    # whole is at most twice KEPT_CAP (8 KiB), however big the images. (With 64 KiB kept: 199 KB.)
    assert peak < 2 * CHUNK + 24 * 1024, peak


@pytest.mark.parametrize("name", list(EXPECTED))
def test_no_per_byte_python_loop(big_bodies: dict[str, tuple[str, bytes]], name: str) -> None:
    content_type, body = big_bodies[name]
    chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)]
    start = time.perf_counter()
    reader = read(chunks, content_type)
    elapsed = time.perf_counter() - start
    assert reader.usage == EXPECTED[name][0]
    # Measured ~3 ms (over 10 GB/s); a per-byte Python loop would take seconds.
    assert elapsed < 0.5, elapsed
