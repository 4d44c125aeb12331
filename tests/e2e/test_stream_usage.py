"""A streamed request for several images is billed the sum of its completed events' usage, end to end.

A real `gateway serve` process on a real Redis server, in front of an upstream on loopback, called
with the official openai SDK. A stream reports one `usage` per image, on that image's completed
event; the ledger (`GET /admin/usage`) must show the sum of the usages the client saw, and nothing
from a relay's closing summary event. The rule itself is in gateway/relay/usage.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.mock_upstream import RECEIVED, MockOptions, create_mock_app
from gateway.mock_upstream.models import usage as mock_usage
from tests.e2e.conftest import base_url
from tests.e2e.test_quotas import ADMIN_TOKEN, MODEL, eventually, ledger_rows, nano_usd, redis_store
from tests.support import redis_servers
from tests.support.config import TENANT_KEY, UPSTREAM_KEY, config_dict
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisServer
from tests.support.scripted_upstream import Script, ScriptedUpstream

pytestmark = pytest.mark.redis
redis_factory = redis_servers.redis_server_factory

StartServer = Callable[[web.Application], Awaitable[TestServer]]
MakeRedis = Callable[[], RedisServer]

PROMPT = "two paper boats on a pond"
REQUEST: dict[str, Any] = {
    "model": MODEL,
    "prompt": PROMPT,
    "n": 2,
    "size": "1024x1024",
    "quality": "low",
    "stream": True,
    "partial_images": 1,
}


def added(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """The usages summed count by count (each reports every count)."""
    return {
        "input_tokens": sum(u["input_tokens"] for u in usages),
        "input_tokens_details": {
            name: sum(u["input_tokens_details"][name] for u in usages)
            for name in ("text_tokens", "image_tokens")
        },
        "output_tokens": sum(u["output_tokens"] for u in usages),
        "total_tokens": sum(u["total_tokens"] for u in usages),
    }


async def stream_through_sdk(gateway: GatewayProcess) -> list[Any]:
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=TENANT_KEY, max_retries=0)
    try:
        stream = await client.images.generate(
            model=MODEL,
            prompt=PROMPT,
            n=2,
            size="1024x1024",
            quality="low",
            stream=True,
            partial_images=1,
        )
        return [event async for event in stream]
    finally:
        await client.close()


async def settled_row(gateway: GatewayProcess) -> dict[str, Any]:
    """The tenant's one ledger row, once the request was settled (settlement follows the last byte)."""
    async with aiohttp.ClientSession() as session:

        async def written() -> bool:
            return bool(await ledger_rows(session, gateway.url))

        await eventually(written, timeout=10.0)
        [row] = await ledger_rows(session, gateway.url)
    return row


def finished_lines(gateway: GatewayProcess) -> list[dict[str, Any]]:
    lines = (json.loads(line) for line in gateway.log_lines() if line.startswith("{"))
    return [line for line in lines if line.get("event") == "request_finished"]


def assert_billed(row: dict[str, Any], usages: list[dict[str, Any]], images: int) -> None:
    summed = added(usages)
    assert (row["model"], row["requests"], row["images"], row["failed"]) == (MODEL, 1, images, 0)
    assert row["text_in_tokens"] == summed["input_tokens_details"]["text_tokens"]
    assert row["image_in_tokens"] == summed["input_tokens_details"]["image_tokens"]
    assert row["image_out_tokens"] == summed["output_tokens"]
    assert row["tokens"] == summed["total_tokens"]
    assert row["nano_usd"] == nano_usd(summed) == sum(nano_usd(u) for u in usages)


async def stream_and_settle(
    upstream_url: str, redis: RedisServer, tmp_path: Path
) -> tuple[list[Any], dict[str, Any]]:
    """A real `gateway serve` on `redis` in front of `upstream_url`: one streamed n=2 through the SDK,
    then its ledger row; the gateway stopped cleanly (its log stays readable)."""
    config = config_dict(upstream_url, store=redis_store(redis), admin={"token": ADMIN_TOKEN})
    gateway = GatewayProcess(config, tmp_path)
    try:
        await gateway.start()
        events = await stream_through_sdk(gateway)
        row = await settled_row(gateway)
    finally:
        code = await asyncio.to_thread(gateway.stop)
    assert code == 0
    return gateway, events, row


async def test_streamed_n2_through_the_sdk_is_billed_the_sum_of_both_completed_events(
    start_server: StartServer, redis_factory: MakeRedis, tmp_path: Path
) -> None:
    mock_app = create_mock_app(MockOptions(api_key=UPSTREAM_KEY))
    mock = await start_server(mock_app)
    gateway, events, row = await stream_and_settle(base_url(mock), redis_factory(), tmp_path)

    types = [event.type for event in events]
    assert types == ["image_generation.partial_image", "image_generation.completed"] * 2
    usages = [event.usage.model_dump() for event in events if event.type == "image_generation.completed"]
    # Each completed event carries its own image's usage: the prompt's tokens on the first only.
    assert usages[0]["input_tokens"] > 0 and usages[1]["input_tokens"] == 0
    assert usages[0]["output_tokens"] == usages[1]["output_tokens"] == 272 + 100
    assert_billed(row, usages, images=2)
    # The same as the upstream's own accounting of the whole request.
    [received] = mock_app[RECEIVED]
    assert received.body == REQUEST
    whole = mock_usage("gpt-image-1", 1024, 1024, "low", n=2, prompt=PROMPT, partial_images=1)
    assert row["tokens"] == whole["total_tokens"]
    [finished] = finished_lines(gateway)
    assert (finished["status"], finished["stream"], finished["settled"], finished["images"]) == (
        200,
        True,
        "usage",
        2,
    )
    assert finished["tokens_image_out"] == 2 * (272 + 100)


def sse(name: str, **fields: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps({'type': name, **fields})}\n\n".encode()


def image_usage(text: int, output: int) -> dict[str, Any]:
    return {
        "input_tokens": text,
        "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
        "output_tokens": output,
        "total_tokens": text + output,
    }


COMPLETED_FIELDS = {
    "b64_json": "AA==",
    "created_at": 1,
    "size": "1024x1024",
    "quality": "low",
    "background": "opaque",
    "output_format": "png",
}


async def test_a_relays_summary_event_is_not_billed_on_top_of_the_completed_events(
    start_server: StartServer, redis_factory: MakeRedis, tmp_path: Path
) -> None:
    first, second = image_usage(text=6, output=372), image_usage(text=0, output=372)
    body = b"".join(
        [
            sse("image_generation.completed", **COMPLETED_FIELDS, usage=first),
            sse("image_generation.completed", **COMPLETED_FIELDS, usage=second),
            sse("response.completed", usage=added([first, second])),  # a relay's summary of the two
            b"data: [DONE]\n\n",
        ]
    )
    # Cut every 7 bytes: usage objects, event names and line ends all span relayed chunks.
    upstream = ScriptedUpstream(Script(chunks=[body[i : i + 7] for i in range(0, len(body), 7)]))
    server = await start_server(upstream.app())
    _, events, row = await stream_and_settle(base_url(server), redis_factory(), tmp_path)

    usages = [event.usage.model_dump() for event in events if event.type == "image_generation.completed"]
    assert usages == [first, second]
    assert_billed(row, usages, images=2)
