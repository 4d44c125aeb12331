"""Throughput and peak memory of gateway.relay.usage readers on 40 MB bodies fed in 64 KiB and 4 KiB chunks.

Run: PYTHONPATH=. .venv/bin/python bench/usage_reader_bench.py
"""

from __future__ import annotations

import base64
import os
import time
import tracemalloc
from collections.abc import Callable

import orjson

from gateway.relay.usage import UsageReader, usage_reader

CHUNK_SIZES = (64 * 1024, 4 * 1024)
N_IMAGES = 10
IMAGE_B64_BYTES = 4_000_000
USAGE = {
    "input_tokens": 50,
    "input_tokens_details": {"text_tokens": 50, "image_tokens": 0},
    "output_tokens": 62400,
    "total_tokens": 62450,
}


def _images(escape_slashes: bool) -> list[str]:
    image = base64.b64encode(os.urandom(IMAGE_B64_BYTES * 3 // 4)).decode()
    # Some JSON encoders write `/` as `\/`: ~1 in 64 base64 bytes becomes an escape.
    return [image.replace("/", "\\/") if escape_slashes else image] * N_IMAGES


def json_body(escape_slashes: bool = False) -> bytes:
    data = ",".join(f'{{"b64_json":"{image}","revised_prompt":"a cat"}}' for image in _images(escape_slashes))
    return b'{"created":1,"data":[' + data.encode() + b'],"usage":' + orjson.dumps(USAGE) + b"}"


def sse_body() -> bytes:
    events = []
    for index, image in enumerate(_images(False)):
        kind = "image_generation.completed" if index == N_IMAGES - 1 else "image_generation.partial_image"
        payload = {"type": kind, "b64_json": image, "partial_image_index": index}
        if index == N_IMAGES - 1:
            payload["usage"] = USAGE
        events.append(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n")
    return b"".join(events)


def sse_per_image_body() -> bytes:
    """A streamed n=10 without partials: ten completed events, each with its own image's usage."""
    events = []
    for image in _images(False):
        payload = {"type": "image_generation.completed", "b64_json": image, "usage": USAGE}
        events.append(b"event: image_generation.completed\ndata: " + orjson.dumps(payload) + b"\n\n")
    return b"".join(events)


def run(name: str, content_type: str, body: bytes, check: Callable[[UsageReader], None], size: int) -> None:
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        reader = usage_reader(content_type)
        for chunk in chunks:
            reader.feed(chunk)
        reader.close()
        best = min(best, time.perf_counter() - start)
        check(reader)
    tracemalloc.start()
    reader = usage_reader(content_type)
    for chunk in chunks:
        reader.feed(chunk)
    reader.close()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    mb = len(body) / 1e6
    where = f"{name:24} {size // 1024:3} KiB chunks {mb:6.1f} MB"
    print(f"{where}  {best * 1e3:7.2f} ms  {mb / best:9.0f} MB/s  peak {peak / 1024:6.1f} KiB")


def _check_json(reader: UsageReader) -> None:
    assert reader.usage == USAGE and reader.images == N_IMAGES


def _check_sse(reader: UsageReader) -> None:
    assert reader.usage == USAGE and reader.images == 1 and reader.event_count == N_IMAGES


def _check_sse_per_image(reader: UsageReader) -> None:
    summed = {
        "input_tokens": N_IMAGES * 50,
        "input_tokens_details": {"text_tokens": N_IMAGES * 50, "image_tokens": 0},
        "output_tokens": N_IMAGES * 62400,
        "total_tokens": N_IMAGES * 62450,
    }
    assert reader.usage == summed and reader.images == N_IMAGES and reader.event_count == N_IMAGES


if __name__ == "__main__":
    bodies = [
        ("json", "application/json", json_body(), _check_json),
        ("json, escaped slashes", "application/json", json_body(escape_slashes=True), _check_json),
        ("sse", "text/event-stream", sse_body(), _check_sse),
        ("sse, usage per image", "text/event-stream", sse_per_image_body(), _check_sse_per_image),
    ]
    for size in CHUNK_SIZES:
        for name, content_type, body, check in bodies:
            run(name, content_type, body, check, size)
