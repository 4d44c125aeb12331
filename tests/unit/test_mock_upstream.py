"""The mock upstream behaves like OpenAI's and DigitalOcean's image endpoint, byte shapes included."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from gateway.mock_upstream import RECEIVED, MockOptions, create_mock_app, run_mock_upstream
from gateway.mock_upstream.models import image_tokens, image_usages, text_tokens, usage
from gateway.relay.usage import usage_reader
from tests.support.images import noise_png

Client = TestClient[Any, Any]
MakeClient = Callable[..., Awaitable[Client]]
PATH = "/v1/images/generations"
KEY = "sk-upstream"
AUTH = {"Authorization": f"Bearer {KEY}"}
OK = {"model": "gpt-image-1.5", "prompt": "a cat"}
DO_OK = {"model": "openai-gpt-image-1", "prompt": "a cat", "n": 1, "size": "1536x1024"}


async def mock(aiohttp_client: MakeClient, **options: Any) -> Client:
    return await aiohttp_client(create_mock_app(MockOptions(api_key=KEY, **options)))


async def post(client: Client, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """Status and JSON answer (the raw bytes for a successful stream)."""
    resp = await client.post(PATH, json=body, headers={**AUTH, **(headers or {})})
    if resp.status == 200 and resp.content_type == "text/event-stream":
        return resp.status, await resp.read()
    assert resp.content_type == "application/json"
    return resp.status, await resp.json()


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    image.load()
    return image


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data object) per event; each `data:` line must be one complete JSON object."""
    events = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [line for line in block.split(b"\n") if line and not line.startswith(b":")]
        if not lines or lines == [b"data: [DONE]"]:
            continue
        assert len(lines) == 2 and lines[0].startswith(b"event: ") and lines[1].startswith(b"data: "), lines
        name, data = lines[0][7:].decode(), orjson.loads(lines[1][6:])
        assert data["type"] == name
        events.append((name, data))
    return events


# --- validation ---------------------------------------------------------------------------------

OPENAI_CASES: list[tuple[str, dict[str, Any], int, str | None, str | None]] = [
    ("valid", OK, 200, None, None),
    ("nulls count as absent", {**OK, "size": None, "response_format": None, "n": None}, 200, None, None),
    ("stream with 0 partials is fine", {**OK, "stream": True, "partial_images": 0}, 200, None, None),
    ("prompt at the limit", {**OK, "prompt": "p" * 32000}, 200, None, None),
    ("gpt-image-2 smallest", {**OK, "model": "gpt-image-2", "size": "1024x640"}, 200, None, None),
    ("gpt-image-2 largest", {**OK, "model": "gpt-image-2", "size": "3840x2160"}, 200, None, None),
    ("unknown field", {**OK, "colour": "red"}, 400, "colour", "unknown_parameter"),
    ("response_format", {**OK, "response_format": "b64_json"}, 400, "response_format", "unknown_parameter"),
    ("style", {**OK, "style": "vivid"}, 400, "style", "unknown_parameter"),
    ("no prompt", {"model": "gpt-image-1.5"}, 400, "prompt", "missing_required_parameter"),
    ("empty prompt", {**OK, "prompt": ""}, 400, "prompt", "empty_string"),
    ("prompt too long", {**OK, "prompt": "p" * 32001}, 400, "prompt", "string_above_max_length"),
    ("prompt not a string", {**OK, "prompt": 7}, 400, "prompt", "invalid_type"),
    ("unknown model", {**OK, "model": "gpt-image-9"}, 400, "model", "invalid_value"),
    ("n zero", {**OK, "n": 0}, 400, "n", "integer_below_min_value"),
    ("n eleven", {**OK, "n": 11}, 400, "n", "integer_above_max_value"),
    ("n string", {**OK, "n": "2"}, 400, "n", "invalid_type"),
    ("n boolean", {**OK, "n": True}, 400, "n", "invalid_type"),
    ("dall-e size", {**OK, "size": "512x512"}, 400, "size", "invalid_value"),
    ("arbitrary size on 1.5", {**OK, "size": "2048x1152"}, 400, "size", "invalid_value"),
    ("not divisible by 16", {**OK, "model": "gpt-image-2", "size": "1000x1000"}, 400, "size", "invalid_value"),
    ("ratio beyond 3:1", {**OK, "model": "gpt-image-2", "size": "3840x1024"}, 400, "size", "invalid_value"),
    ("edge beyond 3840", {**OK, "model": "gpt-image-2", "size": "4096x2048"}, 400, "size", "invalid_value"),
    ("too few pixels", {**OK, "model": "gpt-image-2", "size": "1024x624"}, 400, "size", "invalid_value"),
    ("quality hd", {**OK, "quality": "hd"}, 400, "quality", "invalid_value"),
    ("background", {**OK, "background": "clear"}, 400, "background", "invalid_value"),
    ("transparent jpeg", {**OK, "background": "transparent", "output_format": "jpeg"}, 400, "background", "invalid_value"),
    ("transparent gpt-image-2", {**OK, "model": "gpt-image-2", "background": "transparent"}, 400, "background", "invalid_value"),
    ("moderation", {**OK, "moderation": "high"}, 400, "moderation", "invalid_value"),
    ("output_format", {**OK, "output_format": "gif"}, 400, "output_format", "invalid_value"),
    ("compression with png", {**OK, "output_compression": 50}, 400, "output_compression", "invalid_value"),
    ("compression 101", {**OK, "output_format": "jpeg", "output_compression": 101}, 400, "output_compression", "integer_above_max_value"),
    ("partial_images 4", {**OK, "stream": True, "partial_images": 4}, 400, "partial_images", "integer_above_max_value"),
    ("stream not a bool", {**OK, "stream": "yes"}, 400, "stream", "invalid_type"),
    ("user too long", {**OK, "user": "u" * 257}, 400, "user", "string_above_max_length"),
    ("safety_identifier", {**OK, "safety_identifier": "s" * 256, "user": "u"}, 200, None, None),
    ("safety_identifier too long", {**OK, "safety_identifier": "s" * 257}, 400, "safety_identifier", "string_above_max_length"),
    ("retired gpt-image-1", {**OK, "model": "gpt-image-1"}, 404, None, "model_not_found"),
    ("retired dall-e-3", {**OK, "model": "dall-e-3"}, 404, None, "model_not_found"),
    ("default model is retired dall-e-2", {"prompt": "x"}, 404, None, "model_not_found"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "param", "code"), [c[1:] for c in OPENAI_CASES], ids=[c[0] for c in OPENAI_CASES]
)
async def test_openai_validation(
    aiohttp_client: MakeClient, body: dict[str, Any], status: int, param: str | None, code: str | None
) -> None:
    got, answer = await post(await mock(aiohttp_client), body)
    assert got == status, answer
    if status == 200:
        assert ("data" in answer) if isinstance(answer, dict) else sse_events(answer)
        return
    assert set(answer) == {"error"}
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


DO_CASES: list[tuple[str, dict[str, Any], int, str]] = [
    ("valid", DO_OK, 200, ""),
    ("1.5 prefix form", {**DO_OK, "model": "openai-gpt-image-1.5"}, 200, ""),
    ("streaming with partials", {**DO_OK, "stream": True, "partial_images": 1}, 200, ""),
    ("no n", {k: v for k, v in DO_OK.items() if k != "n"}, 400, "'n'"),
    ("no size", {k: v for k, v in DO_OK.items() if k != "size"}, 400, "'size'"),
    ("no model", {k: v for k, v in DO_OK.items() if k != "model"}, 400, "'model'"),
    ("no prompt", {k: v for k, v in DO_OK.items() if k != "prompt"}, 400, "'prompt'"),
    ("stream without partials", {**DO_OK, "stream": True}, 400, "partial_images"),
    ("stream with 0 partials", {**DO_OK, "stream": True, "partial_images": 0}, 400, "partial_images"),
    ("OpenAI model id", {**DO_OK, "model": "gpt-image-1.5"}, 400, "gpt-image-1.5"),
    ("unknown field", {**DO_OK, "colour": "red"}, 400, "colour"),
    ("transparent jpeg", {**DO_OK, "background": "transparent", "output_format": "jpeg"}, 400, "ransparent"),
    ("n eleven", {**DO_OK, "n": 11}, 400, "'n'"),
    # its API reference: "GPT-IMAGE-1 only supports n=1", sizes auto, 1536x1024 and 1024x1536
    ("n two", {**DO_OK, "n": 2}, 400, "'n'"),
    ("size 1024x1024", {**DO_OK, "size": "1024x1024"}, 400, "1024x1024"),
    ("size auto", {**DO_OK, "size": "auto"}, 200, ""),
]


@pytest.mark.parametrize(
    ("body", "status", "mentions"), [c[1:] for c in DO_CASES], ids=[c[0] for c in DO_CASES]
)
async def test_digitalocean_validation(
    aiohttp_client: MakeClient, body: dict[str, Any], status: int, mentions: str
) -> None:
    got, answer = await post(await mock(aiohttp_client, flavor="digitalocean"), body)
    assert got == status, answer
    if status == 200:
        return
    assert set(answer) == {"id", "message", "request_id"}
    assert answer["id"] == "bad_request" and mentions in answer["message"] and answer["request_id"]


@pytest.mark.parametrize("flavor", ["openai", "digitalocean"])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
async def test_bad_key_is_401_in_the_flavors_shape(
    aiohttp_client: MakeClient, flavor: str, headers: dict[str, str]
) -> None:
    client = await mock(aiohttp_client, flavor=flavor)
    resp = await client.post(PATH, json=DO_OK, headers=headers)
    answer = await resp.json()
    assert resp.status == 401
    if flavor == "openai":
        assert answer["error"]["code"] == "invalid_api_key"
    else:
        assert answer["id"] == "unauthorized" and answer["request_id"] == resp.headers["x-request-id"]


async def test_no_key_configured_accepts_any_caller(aiohttp_client: MakeClient) -> None:
    client = await aiohttp_client(create_mock_app())
    resp = await client.post(PATH, json=OK)
    assert resp.status == 200


async def test_body_that_is_not_a_json_object_is_400(aiohttp_client: MakeClient) -> None:
    client = await mock(aiohttp_client)
    for raw in (b"{not json", b"[1, 2]"):
        resp = await client.post(PATH, data=raw, headers={**AUTH, "Content-Type": "application/json"})
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("flavor", "ids"),
    [
        ("openai", ["gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2", "gpt-image-2-2026-04-21", "chatgpt-image-latest"]),
        ("digitalocean", ["openai-gpt-image-1", "openai-gpt-image-1.5"]),
    ],
)  # fmt: skip
async def test_models_and_unknown_routes(aiohttp_client: MakeClient, flavor: str, ids: list[str]) -> None:
    client = await mock(aiohttp_client, flavor=flavor)
    resp = await client.get("/v1/models", headers=AUTH)
    assert resp.status == 200
    assert [m["id"] for m in (await resp.json())["data"]] == ids
    # DigitalOcean's image API has generations only: no edits, no variations
    no_edits = [("POST", "/v1/images/edits"), ("POST", "/v1/images/variations")] if flavor != "openai" else []
    for method, path in [("GET", "/v1/nothing"), ("GET", PATH), *no_edits]:
        resp = await client.request(method, path, headers=AUTH)
        assert resp.status == 404 and resp.content_type == "application/json"
        answer = await resp.json()
        assert ("error" in answer) if flavor == "openai" else (answer["id"] == "not_found")


# --- images and usage ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "size", "fmt", "alpha"),
    [
        ({}, (1024, 1024), "PNG", False),
        (
            {"size": "1536x1024", "output_format": "jpeg", "output_compression": 60},
            (1536, 1024),
            "JPEG",
            False,
        ),
        ({"size": "1024x1536", "output_format": "webp"}, (1024, 1536), "WEBP", False),
        ({"background": "transparent"}, (1024, 1024), "PNG", True),
        ({"background": "transparent", "output_format": "webp"}, (1024, 1024), "WEBP", True),
        ({"model": "gpt-image-2", "size": "1536x864"}, (1536, 864), "PNG", False),
    ],
)
async def test_images_decode_at_requested_size_and_format(
    aiohttp_client: MakeClient, body: dict[str, Any], size: tuple[int, int], fmt: str, alpha: bool
) -> None:
    status, answer = await post(await mock(aiohttp_client), {**OK, "n": 2, **body})
    assert status == 200
    assert len(answer["data"]) == 2
    for item in answer["data"]:
        image = decode(item["b64_json"])
        assert (image.size, image.format) == (size, fmt)
        assert (image.mode == "RGBA" and image.getpixel((0, 0))[3] == 0) if alpha else image.mode == "RGB"
    assert answer["size"] == f"{size[0]}x{size[1]}"
    assert answer["output_format"] == fmt.lower()
    assert answer["background"] == ("transparent" if alpha else "opaque")


@pytest.mark.parametrize(
    "case",
    [
        ("gpt-image-1.5", "1024x1024", "low", 1, 272),
        ("gpt-image-1-mini", "1024x1536", "medium", 2, 2 * 1584),
        ("chatgpt-image-latest", "1536x1024", "high", 3, 3 * 6208),
        ("gpt-image-1.5", "auto", "auto", 1, 1056),
        ("gpt-image-2", "1024x1024", "low", 1, 196),
        ("gpt-image-2", "1024x1024", "high", 2, 2 * 7024),
        ("gpt-image-2", "1536x1024", "high", 1, 5488),
        ("gpt-image-2-2026-04-21", "3840x2160", "high", 1, 13342),
    ],
)
async def test_usage_follows_the_token_table(
    aiohttp_client: MakeClient, case: tuple[str, str, str, int, int]
) -> None:
    model, size, quality, n, output_tokens = case
    body = {"model": model, "prompt": "a" * 10, "size": size, "quality": quality, "n": n}
    status, answer = await post(await mock(aiohttp_client), body)
    assert status == 200
    assert answer["usage"] == {
        "input_tokens": 3,
        "input_tokens_details": {"text_tokens": 3, "image_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"image_tokens": output_tokens, "text_tokens": 0},
        "total_tokens": 3 + output_tokens,
    }
    assert answer["quality"] == ("medium" if quality == "auto" else quality)
    assert answer["size"] == ("1024x1024" if size == "auto" else size)


async def test_digitalocean_usage_uses_the_gpt_image_1_table(aiohttp_client: MakeClient) -> None:
    status, answer = await post(
        await mock(aiohttp_client, flavor="digitalocean"), {**DO_OK, "quality": "high"}
    )
    assert status == 200
    assert answer["usage"]["output_tokens"] == 6208  # 1536x1024 high


def test_gpt_image_2_tokens_never_exceed_the_readings() -> None:
    readings = {(1024, 1024, "low"): 196, (1024, 1024, "high"): 7024, (1536, 1024, "high"): 5488}
    for (w, h, quality), tokens in readings.items():
        assert image_tokens("gpt-image-2", w, h, quality) == tokens
    for w in range(640, 3841, 64):
        for h in range(640, 3841, 64):
            if max(w, h) > 3 * min(w, h) or not 655_360 <= w * h <= 8_294_400:
                continue
            low, medium, high = (image_tokens("gpt-image-2", w, h, q) for q in ("low", "medium", "high"))
            assert 0 < low <= medium <= high <= 13342, (w, h)


@given(st.text(min_size=1, max_size=200))
def test_text_tokens_are_realistic_and_bounded_by_utf8_bytes(prompt: str) -> None:
    tokens = text_tokens(prompt)
    assert 1 <= tokens <= len(prompt.encode("utf-8"))
    assert tokens == -(-len(prompt) // 4)


async def test_usage_sits_after_data_unless_asked_first(aiohttp_client: MakeClient) -> None:
    client = await mock(aiohttp_client)
    bodies = {}
    for first in (False, True):
        resp = await client.post(
            PATH, json=OK, headers={**AUTH, **({"x-mock-usage-first": "1"} if first else {})}
        )
        raw = await resp.read()
        assert int(resp.headers["Content-Length"]) == len(raw)
        assert (raw.index(b'"usage"') < raw.index(b'"data"')) is first
        bodies[first] = orjson.loads(raw)
    assert bodies[True]["usage"] == bodies[False]["usage"]
    assert list(bodies[False]) == [
        "created",
        "data",
        "background",
        "output_format",
        "quality",
        "size",
        "usage",
    ]


# --- streaming ----------------------------------------------------------------------------------


async def stream(client: Client, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    resp = await client.post(PATH, json={**OK, "stream": True, **body}, headers={**AUTH, **(headers or {})})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    return await resp.read()


async def test_stream_sequence_images_and_a_usage_on_each_completed_event(aiohttp_client: MakeClient) -> None:
    body = {"n": 2, "partial_images": 2, "quality": "low", "prompt": "a" * 8}
    raw = await stream(await mock(aiohttp_client), body)
    assert b"\r" not in raw and raw.endswith(b"\n\n")
    events = sse_events(raw)
    partial, completed = "image_generation.partial_image", "image_generation.completed"
    assert [name for name, _ in events] == [partial, partial, completed] * 2
    assert [data["partial_image_index"] for name, data in events if name == partial] == [0, 1, 0, 1]
    for _, data in events:
        assert decode(data["b64_json"]).size == (1024, 1024)
        assert (data["size"], data["quality"], data["background"], data["output_format"]) == (
            "1024x1024",
            "low",
            "opaque",
            "png",
        )
        assert isinstance(data["created_at"], int)
    assert ["usage" in data for _, data in events] == [False, False, True] * 2
    output = 272 + 2 * 100  # each image's own tokens, its two partials included
    first, second = (data["usage"] for name, data in events if name == completed)
    assert first == {
        "input_tokens": 2,
        "input_tokens_details": {"text_tokens": 2, "image_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
        "total_tokens": 2 + output,
    }
    assert second == {
        "input_tokens": 0,  # the prompt is read once: its tokens are on the first image only
        "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
        "total_tokens": output,
    }


def add_usages(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """Count by count, as gateway.relay.usage sums a stream."""
    total: dict[str, Any] = {}
    for usage_ in usages:
        for key, value in usage_.items():
            if isinstance(value, dict):
                for detail, count in value.items():
                    total.setdefault(key, {}).setdefault(detail, 0)
                    total[key][detail] += count
            else:
                total[key] = total.get(key, 0) + value
    return total


@pytest.mark.parametrize("n", [1, 2, 3, 10])
@pytest.mark.parametrize("partial_images", [0, 1, 3])
async def test_a_streams_usages_add_up_to_the_json_usage_of_the_same_request(
    aiohttp_client: MakeClient, n: int, partial_images: int
) -> None:
    client = await mock(aiohttp_client)
    prompt = "a quiet harbour at dawn"
    request: dict[str, Any] = {**OK, "n": n, "quality": "medium", "size": "1536x1024", "prompt": prompt}
    raw = await stream(client, {**request, "partial_images": partial_images})
    events = sse_events(raw)
    usages = [data["usage"] for name, data in events if name == "image_generation.completed"]
    assert (
        len(usages) == n and sum(name.endswith("partial_image") for name, _ in events) == n * partial_images
    )
    status, answer = await post(client, request)
    assert status == 200
    partial_tokens = n * partial_images * 100  # only a stream has partial images to pay for
    whole = answer["usage"]
    expected = {
        **whole,
        "output_tokens": whole["output_tokens"] + partial_tokens,
        "output_tokens_details": {"image_tokens": whole["output_tokens"] + partial_tokens, "text_tokens": 0},
        "total_tokens": whole["total_tokens"] + partial_tokens,
    }
    assert add_usages(usages) == expected
    reader = usage_reader("text/event-stream")  # what the gateway settles a relayed stream with
    reader.feed(raw)
    reader.close()
    assert (reader.usage, reader.images) == (expected, n)
    assert add_usages(usages) == usage(
        "gpt-image-1", 1536, 1024, "medium", n=n, prompt=prompt, partial_images=partial_images
    )


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 10),
    partial_images=st.integers(0, 3),
    prompt=st.text(min_size=1, max_size=200),
    quality=st.sampled_from(["low", "medium", "high"]),
    size=st.sampled_from([(1024, 1024), (1536, 1024), (1024, 1536)]),
)
def test_image_usages_add_up_to_the_whole_request(
    n: int, partial_images: int, prompt: str, quality: str, size: tuple[int, int]
) -> None:
    for family in ("gpt-image-1", "gpt-image-2"):
        per_image = image_usages(family, *size, quality, n=n, prompt=prompt, partial_images=partial_images)
        assert len(per_image) == n
        whole = usage(family, *size, quality, n=n, prompt=prompt, partial_images=partial_images)
        assert add_usages(per_image) == whole
        assert all(u["total_tokens"] == u["input_tokens"] + u["output_tokens"] for u in per_image)


async def test_stream_without_partials_is_one_completed_event(aiohttp_client: MakeClient) -> None:
    events = sse_events(await stream(await mock(aiohttp_client), {"quality": "high"}))
    assert [name for name, _ in events] == ["image_generation.completed"]
    assert events[0][1]["usage"]["output_tokens"] == 4160


async def test_stream_crlf_comments_and_done(aiohttp_client: MakeClient) -> None:
    client = await mock(aiohttp_client)
    headers = {"x-mock-sse-crlf": "1", "x-mock-sse-comments": "1", "x-mock-sse-done": "1"}
    raw = await stream(client, {"partial_images": 1}, headers)
    assert raw.count(b"\n") == raw.count(b"\r\n") > 0
    assert raw.count(b": keep-alive\r\n\r\n") == 3  # before each of 2 events and before [DONE]
    assert raw.endswith(b"data: [DONE]\r\n\r\n")
    plain = await stream(client, {"partial_images": 1})
    assert [n for n, _ in sse_events(raw)] == [n for n, _ in sse_events(plain)]
    assert b"[DONE]" not in plain and b"keep-alive" not in plain


async def test_stream_events_arrive_incrementally(aiohttp_client: MakeClient) -> None:
    client = await mock(aiohttp_client, partial_interval_ms=150)
    resp = await client.post(PATH, json={**OK, "stream": True, "partial_images": 2}, headers=AUTH)
    arrivals = []
    for _ in range(3):
        await resp.content.readuntil(b"\n\n")
        arrivals.append(time.monotonic())
    assert await resp.read() == b""
    assert arrivals[1] - arrivals[0] > 0.1 and arrivals[2] - arrivals[1] > 0.1


@pytest.mark.parametrize("fail_after", [0, 1, 2])
async def test_stream_fail_after_events_drops_the_connection(
    aiohttp_client: MakeClient, fail_after: int
) -> None:
    client = await mock(aiohttp_client)
    body = {**OK, "stream": True, "partial_images": 3}
    resp = await client.post(PATH, json=body, headers={**AUTH, "x-mock-fail-after-events": str(fail_after)})
    assert resp.status == 200
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in resp.content.iter_any():
            received += chunk
    assert len(sse_events(received)) == fail_after
    assert received == b"" or received.endswith(b"\n\n")


async def test_fail_after_beyond_the_last_event_completes(aiohttp_client: MakeClient) -> None:
    raw = await stream(await mock(aiohttp_client), {"partial_images": 1}, {"x-mock-fail-after-events": "2"})
    assert len(sse_events(raw)) == 2


@pytest.mark.parametrize(("error_after", "before"), [(0, []), (1, ["image_generation.partial_image"])])
async def test_stream_error_after_events_then_done(
    aiohttp_client: MakeClient, error_after: int, before: list[str]
) -> None:
    """A generation that fails once the stream began: an `error` event in FACTS §4's shape instead
    of the rest, then `[DONE]` as some relays send it; by header, or for every stream by option."""
    knobs = {"x-mock-sse-error-after-events": str(error_after), "x-mock-sse-done": "1"}
    by_header = await stream(await mock(aiohttp_client), {"partial_images": 2}, knobs)
    options = await mock(aiohttp_client, sse_error_after_events=error_after, sse_done=True)
    for raw in (by_header, await stream(options, {"partial_images": 2})):
        events = sse_events(raw)
        assert [name for name, _ in events] == [*before, "error"]
        error = events[-1][1]["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
        assert raw.endswith(b"}\n\ndata: [DONE]\n\n")


async def test_stream_error_after_the_last_event_is_no_error(aiohttp_client: MakeClient) -> None:
    raw = await stream(
        await mock(aiohttp_client), {"partial_images": 1}, {"x-mock-sse-error-after-events": "2"}
    )
    assert [name for name, _ in sse_events(raw)] == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]


async def test_json_body_fail_after_images_is_truncated(aiohttp_client: MakeClient) -> None:
    client = await mock(aiohttp_client)
    resp = await client.post(PATH, json={**OK, "n": 3}, headers={**AUTH, "x-mock-fail-after-events": "1"})
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


# --- test knobs, latency, recording -------------------------------------------------------------


@pytest.mark.parametrize(
    ("flavor", "status", "expected"),
    [
        ("openai", 503, {"type": "service_unavailable_error", "code": None}),
        ("openai", 429, {"type": "requests", "code": "rate_limit_exceeded"}),
        ("openai", 500, {"type": "server_error", "code": None}),
        ("digitalocean", 500, {"id": "server_error"}),
        ("digitalocean", 429, {"id": "too_many_requests"}),
    ],
)
async def test_forced_status_uses_the_flavors_error_shape(
    aiohttp_client: MakeClient, flavor: str, status: int, expected: dict[str, Any]
) -> None:
    client = await mock(aiohttp_client, flavor=flavor)
    got, answer = await post(client, DO_OK, {"x-mock-status": str(status)})
    assert got == status
    shown = answer["error"] if flavor == "openai" else answer
    assert {k: shown[k] for k in expected} == expected and shown["message"]


async def test_bad_knob_value_is_a_400(aiohttp_client: MakeClient) -> None:
    client = await mock(aiohttp_client)
    for name, value in [
        ("x-mock-status", "200"),
        ("x-mock-latency-ms", "soon"),
        ("x-mock-latency-ms", "nan"),
        ("x-mock-fail-after-events", "-1"),
        ("x-mock-fail-after-events", "inf"),
    ]:
        status, answer = await post(client, OK, {name: value})
        assert status == 400 and answer["error"]["param"] == name


async def test_latency_and_its_per_request_override(aiohttp_client: MakeClient) -> None:
    client = await mock(aiohttp_client, latency_ms=300)
    await post(client, OK, {"x-mock-latency-ms": "0"})  # warm the image cache
    started = time.monotonic()
    await post(client, OK, {"x-mock-latency-ms": "0"})
    assert time.monotonic() - started < 0.2
    started = time.monotonic()
    status, _ = await post(client, OK)
    assert status == 200 and time.monotonic() - started >= 0.29


async def test_latency_does_not_block_the_loop(aiohttp_client: MakeClient) -> None:
    client = await mock(aiohttp_client, latency_ms=300)
    started = time.monotonic()
    results = await asyncio.gather(*(post(client, OK) for _ in range(5)))
    assert [status for status, _ in results] == [200] * 5
    assert time.monotonic() - started < 1.0


async def test_every_request_is_recorded(aiohttp_client: MakeClient) -> None:
    client = await mock(aiohttp_client)
    await post(client, {**OK, "n": 1}, {"X-Custom": "a"})
    await client.post(PATH, data=b"{broken", headers={"Content-Type": "application/json"})
    first, second = client.app[RECEIVED]
    assert first.body == {**OK, "n": 1} and orjson.loads(first.raw) == first.body
    assert first.headers["Authorization"] == first.headers["authorization"] == f"Bearer {KEY}"
    assert "x-custom" in first.headers and first.headers.get("X-CUSTOM") == "a"
    assert "Authorization" not in second.headers  # rejected (401) but still recorded
    assert (second.body, second.raw, second.path) == ({}, b"{broken", PATH)


async def test_record_keeps_the_most_recent_requests(
    aiohttp_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.mock_upstream.app._RECORD_LIMIT", 2)
    client = await aiohttp_client(create_mock_app())
    for index in range(5):
        await client.get("/v1/models", headers={"x-index": str(index)})
    assert [r.headers["x-index"] for r in client.app[RECEIVED]] == ["2", "3", "4"]


# --- big responses ------------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
async def test_image_bytes_pads_every_format_and_still_decodes(
    aiohttp_client: MakeClient, output_format: str
) -> None:
    target = 300_000
    status, answer = await post(
        await mock(aiohttp_client, image_bytes=target), {**OK, "output_format": output_format}
    )
    assert status == 200
    b64 = answer["data"][0]["b64_json"]
    assert abs(len(b64) - target) < target * 0.01
    assert decode(b64).size == (1024, 1024)


async def test_image_bytes_padding_applies_to_streamed_partials(aiohttp_client: MakeClient) -> None:
    raw = await stream(await mock(aiohttp_client, image_bytes=200_000), {"partial_images": 1})
    for _, data in sse_events(raw):
        assert abs(len(data["b64_json"]) - 200_000) < 2_000
        decode(data["b64_json"])


async def test_forty_megabyte_response(aiohttp_client: MakeClient) -> None:
    target = 4 * 2**20
    client = await mock(aiohttp_client, image_bytes=target)
    resp = await client.post(PATH, json={**OK, "n": 10, "quality": "low"}, headers=AUTH)
    chunks = [chunk async for chunk in resp.content.iter_chunked(2**20)]
    raw = b"".join(chunks)
    assert len(raw) == int(resp.headers["Content-Length"]) > 40 * 2**20
    answer = orjson.loads(raw)
    assert [abs(len(item["b64_json"]) - target) < target * 0.01 for item in answer["data"]] == [True] * 10
    assert decode(answer["data"][9]["b64_json"]).size == (1024, 1024)
    assert answer["usage"]["output_tokens"] == 2720


# --- serving ------------------------------------------------------------------------------------


async def test_run_mock_upstream_serves_until_cancelled() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    task = asyncio.create_task(run_mock_upstream("127.0.0.1", port, MockOptions(flavor="digitalocean")))
    url = f"http://127.0.0.1:{port}/v1/models"
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with session.get(url) as resp:
                    assert (await resp.json())["data"][0]["id"] == "openai-gpt-image-1"
                    break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("mock upstream never answered")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(url)


# --- edits and variations -------------------------------------------------------------------------


def _png(width: int, height: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, fmt)
    return buffer.getvalue()


def _form(fields: dict[str, str], files: list[tuple[str, bytes]]) -> aiohttp.FormData:
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        form.add_field(name, value)
    for name, data in files:
        form.add_field(name, data, filename="f.png", content_type="image/png")
    return form


EDIT = {"model": "gpt-image-1.5", "prompt": "a hat"}
EDIT_REFUSED: list[tuple[dict[str, str], list[tuple[str, bytes]], str]] = [
    ({**EDIT, "moderation": "low"}, [("image", _png(64, 64))], "moderation"),
    (
        {**EDIT, "model": "gpt-image-1-mini", "input_fidelity": "high"},
        [("image", _png(64, 64))],
        "input_fidelity",
    ),
    ({**EDIT, "model": "gpt-image-2", "input_fidelity": "low"}, [("image", _png(64, 64))], "input_fidelity"),
    (EDIT, [], "image"),
    (EDIT, [("image[]", _png(64, 64))] * 17, "image"),
    (EDIT, [("image", b"not an image")], "image"),
    (EDIT, [("image", _png(64, 64, "GIF"))], "image"),
    (EDIT, [("image", _png(64, 64)), ("mask", _png(32, 32))], "mask"),
    (EDIT, [("image", _png(64, 64)), ("mask", _png(64, 64, "JPEG"))], "mask"),
    (EDIT, [("image", _png(1100, 1100)), ("mask", noise_png(1100, 1100))], "mask"),  # over 4 MiB
]


@pytest.mark.parametrize(("fields", "files", "param"), EDIT_REFUSED)
async def test_edits_are_validated_as_the_api_reference_says(
    aiohttp_client: MakeClient, fields: dict[str, str], files: list[tuple[str, bytes]], param: str
) -> None:
    client = await mock(aiohttp_client)
    resp = await client.post("/v1/images/edits", data=_form(fields, files), headers=AUTH)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == param


async def test_an_edit_bills_its_input_images_and_streams_image_edit_events(
    aiohttp_client: MakeClient,
) -> None:
    client = await mock(aiohttp_client)
    fields = {**EDIT, "quality": "low", "input_fidelity": "high", "stream": "true", "partial_images": "1"}
    files = [("image[]", _png(1024, 1024)), ("image[]", _png(1536, 1024))]
    resp = await client.post("/v1/images/edits", data=_form(fields, files), headers=AUTH)
    assert resp.status == 200
    text = (await resp.read()).decode()
    assert (
        text.count("event: image_edit.partial_image") == 1 and text.count("event: image_edit.completed") == 1
    )
    assert '"image_tokens":' + str(194 + 323 + 4160) in text  # two tiles' worth for 1536x1024 (768x512)


async def test_variations_need_dall_e_2(aiohttp_client: MakeClient) -> None:
    retired = await mock(aiohttp_client)
    resp = await retired.post(
        "/v1/images/variations", data=_form({}, [("image", _png(64, 64))]), headers=AUTH
    )
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
    legacy = await mock(aiohttp_client, serve_dall_e_2=True)
    fields = {"n": "2", "size": "256x256", "response_format": "url"}
    resp = await legacy.post(
        "/v1/images/variations", data=_form(fields, [("image", _png(64, 64))]), headers=AUTH
    )
    assert resp.status == 200
    assert [set(item) for item in (await resp.json())["data"]] == [{"url"}, {"url"}]
    resp = await legacy.post("/v1/images/variations", data=_form({}, [("image", _png(64, 32))]), headers=AUTH)
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "image"
