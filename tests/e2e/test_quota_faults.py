"""Quota faults end to end, through a gateway on a real Redis server each test starts: an upstream
error refunds, a dropped stream and a departed client are settled exactly once and billed from what is
known, a settle whose reply is lost is charged once, and a stopped Redis in both `on_unavailable`
modes, then recovery without restarting the gateway. Also: what is billed when the upstream was
never reached, timed out, broke a JSON answer or a stream, or was cut off by shutdown; and a stream
that outlives its lease TTL keeping its concurrency slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from gateway.app import PIPELINE, create_app
from gateway.front.connections import FrontRunner
from gateway.health import STORE
from gateway.mock_upstream import RECEIVED, MockOptions, create_mock_app
from gateway.process.shutdown import drain
from tests.e2e.conftest import Running, StartGateway, base_url
from tests.e2e.test_quotas import (
    ADMIN_TOKEN,
    AUTH,
    LOW,
    LOW_ESTIMATE_TOKENS,
    MODEL,
    NANO_PER_IMAGE_OUT,
    NANO_PER_TEXT_IN,
    eventually,
    generate,
    held_leases,
    json_body,
    ledger_rows,
    nano_usd,
    redis_store,
    sse_event,
    store_keys,
    tenant_limits,
    usage_body,
)
from tests.support import redis_servers
from tests.support.config import TENANT_KEY, UPSTREAM_KEY, make_settings
from tests.support.redis_servers import RedisServer, free_port
from tests.support.scripted_upstream import Script, ScriptedUpstream

pytestmark = pytest.mark.redis
redis_factory = redis_servers.redis_server_factory  # servers this module's tests stop and restart

StartServer = Callable[[web.Application], Awaitable[TestServer]]
MakeRedis = Callable[[], RedisServer]

LIMITS = {
    "requests_per_minute": 10,
    "tokens_per_day": 1_000_000,
    "usd_per_day": 100,
    "concurrent_requests": 5,
}
LOW_ESTIMATE_NANO_USD = 20 * 5_000 + 272 * 32_000  # $0.008804
UPSTREAM_500 = b'{"error":{"message":"boom","type":"server_error","param":null,"code":null}}'
PARTIAL = sse_event("image_generation.partial_image", partial_image_index=0)
LOW_USAGE = usage_body(text=5, image_in=0, output=272)


async def gateway_on(
    start_server: StartServer,
    start_gateway: StartGateway,
    redis: RedisServer,
    upstream: ScriptedUpstream | web.Application,
) -> Running:
    server = await start_server(upstream if isinstance(upstream, web.Application) else upstream.app())
    return await start_gateway(
        openai_url=base_url(server),
        store=redis_store(redis),
        limits=LIMITS,
        admin={"token": ADMIN_TOKEN},
    )


async def reached_upstream(upstream: ScriptedUpstream) -> None:
    """The request was admitted (reserved) and forwarded."""
    for _ in range(250):
        if upstream.received:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the request never reached the upstream")


async def settled_once(session: aiohttp.ClientSession, gw: Running, redis: RedisServer) -> dict[str, Any]:
    """Wait for the one settlement, then check it happened exactly once and left nothing behind."""

    async def settled() -> bool:
        return bool((await store_keys(redis)).get("settled"))

    await eventually(settled)
    await asyncio.sleep(0.1)  # room for a second settlement, were there one
    keys = await store_keys(redis)
    assert len(keys["settled"]) == 1
    assert "rsv" not in keys
    assert await held_leases(redis) == 0
    [row] = await ledger_rows(session, gw.url)
    assert (row["model"], row["requests"]) == (MODEL, 1)
    return row


def finished_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in logs if line["event"] == "request_finished"]


# --- 2. upstream and client faults ----------------------------------------------------------------


async def test_upstream_500_refunds_tokens_and_usd_but_counts_the_request(
    start_server: StartServer, start_gateway: StartGateway, redis_factory: MakeRedis
) -> None:
    redis = redis_factory()
    upstream = ScriptedUpstream(
        Script(status=500, content_type="application/json", chunks=[UPSTREAM_500], delay_before_headers=0.3)
    )
    gw = await gateway_on(start_server, start_gateway, redis, upstream)
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(generate(session, gw.url))
        await reached_upstream(upstream)
        during = await tenant_limits(session, gw.url)
        status, body, headers = await request
        row = await settled_once(session, gw, redis)
        after = await tenant_limits(session, gw.url)
    assert status == 500 and json.dumps(body, separators=(",", ":")).encode() == UPSTREAM_500
    assert headers["x-ratelimit-remaining-requests"] == "9"
    # While the upstream worked, the estimate was reserved ...
    assert during["tenant.tokens_per_day"]["used"] == LOW_ESTIMATE_TOKENS
    assert during["tenant.usd_per_day"]["used"] == LOW_ESTIMATE_NANO_USD / 1e9
    assert during["tenant.concurrent_requests"]["used"] == 1
    # ... and the error refunded all of it but the request itself.
    assert after["tenant.tokens_per_day"]["used"] == 0
    assert after["tenant.usd_per_day"]["used"] == 0
    assert after["tenant.concurrent_requests"]["used"] == 0
    assert after["tenant.requests_per_minute"]["used"] == 1
    assert after["tenant.requests_per_minute"]["remaining"] == 9
    assert (row["failed"], row["tokens"], row["nano_usd"], row["images"]) == (1, 0, 0, 0)


@pytest.mark.parametrize("failure", ["unreachable", "read_timeout"])
async def test_an_upstream_never_reached_is_refunded_one_that_took_the_body_is_billed(
    start_server: StartServer, start_gateway: StartGateway, redis_factory: MakeRedis, failure: str
) -> None:
    """No connection: nothing can have been made, refunded. The body sent and then silence past
    the read timeout: the upstream may have generated (and billed), so the estimate stands."""
    redis = redis_factory()
    upstream = ScriptedUpstream(
        Script(content_type="application/json", chunks=[json_body(LOW_USAGE)], delay_before_headers=2)
    )
    url = base_url(await start_server(upstream.app()))
    if failure == "unreachable":
        url = f"http://127.0.0.1:{free_port()}/v1"
    gw = await start_gateway(
        openai_url=url,
        upstreams={
            "openai": {"base_url": url, "api_key": "sk-test", "read_timeout_seconds": 0.3},
            "digitalocean": {"base_url": url, "api_key": "do-test"},
        },
        store=redis_store(redis),
        limits=LIMITS,
        admin={"token": ADMIN_TOKEN},
    )
    async with aiohttp.ClientSession() as session:
        status, body, _ = await generate(session, gw.url)
        row = await settled_once(session, gw, redis)
    if failure == "unreachable":
        assert (status, body["error"]["code"]) == (502, "upstream_unavailable")
        assert (row["failed"], row["tokens"], row["nano_usd"]) == (1, 0, 0)
    else:
        assert (status, body["error"]["code"]) == (504, "upstream_read_timeout")
        assert (row["failed"], row["tokens"], row["nano_usd"]) == (
            1,
            LOW_ESTIMATE_TOKENS,
            LOW_ESTIMATE_NANO_USD,
        )


async def test_upstream_dropped_mid_stream_is_settled_once_at_the_estimate(
    start_server: StartServer, start_gateway: StartGateway, redis_factory: MakeRedis
) -> None:
    redis = redis_factory()
    # A partial image, then 0.3 s of silence, then the connection drops: no usage ever arrives.
    upstream = ScriptedUpstream(Script(chunks=[PARTIAL], chunk_delay=0.3, abort_after_chunks=True))
    gw = await gateway_on(start_server, start_gateway, redis, upstream)
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{gw.v1}/images/generations", json={**LOW, "stream": True}, headers=AUTH
            ) as resp:
                assert resp.status == 200
                assert await resp.content.readuntil(b"\n\n") == PARTIAL
                during = await tenant_limits(session, gw.url)
                tail = await resp.read()
            row = await settled_once(session, gw, redis)
            after = await tenant_limits(session, gw.url)
    assert tail.startswith(b"event: error\n") and b'"code":"upstream_unavailable"' in tail
    assert during["tenant.tokens_per_day"]["used"] == LOW_ESTIMATE_TOKENS
    # Pipeline.actual: an image was under way and no usage came, so the estimate stands.
    assert (row["failed"], row["tokens"], row["nano_usd"]) == (1, LOW_ESTIMATE_TOKENS, LOW_ESTIMATE_NANO_USD)
    assert after["tenant.tokens_per_day"]["used"] == LOW_ESTIMATE_TOKENS
    assert after["tenant.usd_per_day"]["used"] == LOW_ESTIMATE_NANO_USD / 1e9
    assert gw.metric("gateway_usage_missing_total", tenant="team", model=MODEL) == 1
    assert gw.metric("gateway_settlements_retried_total") == 0
    [line] = finished_lines(logs)
    assert (line["settled"], line["status"]) == ("estimate", 200)


async def test_a_stream_cut_between_two_images_is_billed_at_the_estimate(
    start_server: StartServer, start_gateway: StartGateway, redis_factory: MakeRedis
) -> None:
    """n=2: the first image's usage came, then the connection dropped. The second image may have
    been made and billed upstream: the part reported is not the whole, so the estimate stands."""
    redis = redis_factory()
    first = sse_event("image_generation.completed", usage=usage_body(text=5, image_in=0, output=272))
    upstream = ScriptedUpstream(Script(chunks=[first], chunk_delay=0.3, abort_after_chunks=True))
    gw = await gateway_on(start_server, start_gateway, redis, upstream)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{gw.v1}/images/generations", json={**LOW, "n": 2, "stream": True}, headers=AUTH
        ) as resp:
            assert await resp.content.readuntil(b"\n\n") == first
            reserved = (await tenant_limits(session, gw.url))["tenant.tokens_per_day"]["used"]
            await resp.read()
        row = await settled_once(session, gw, redis)
    assert reserved == 20 + 2 * 272  # the prompt's bytes, and two low 1024x1024 images
    assert (row["failed"], row["tokens"]) == (1, reserved)


async def test_a_stream_longer_than_the_lease_ttl_keeps_its_concurrency_slot(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    """Leases expire so a crashed gateway frees its slots; a running request renews its own."""
    completed = sse_event("image_generation.completed", usage=LOW_USAGE)
    upstream = ScriptedUpstream(Script(chunks=[PARTIAL, PARTIAL, PARTIAL, completed], chunk_delay=0.8))
    server = await start_server(upstream.app())
    gw = await start_gateway(
        openai_url=base_url(server),
        store={"backend": "memory", "lease_ttl_seconds": 1},
        limits={"concurrent_requests": 1},
    )
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{gw.v1}/images/generations", json={**LOW, "stream": True}, headers=AUTH
        ) as resp:
            assert resp.status == 200
            await asyncio.sleep(2.0)  # twice the lease TTL into the stream
            status, body, _ = await generate(session, gw.url)
            assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded")
            assert "concurrent_requests" in body["error"]["message"]
            await resp.read()
        await asyncio.sleep(0.05)
        async with session.post(f"{gw.v1}/images/generations", json=LOW, headers=AUTH) as again:
            assert again.status == 200  # freed at settlement


STREAM_ERROR = (
    b'event: error\ndata: {"type":"error","error":{"type":"server_error","code":"generation_failed",'
    b'"message":"The image could not be generated.","param":null}}\n\n'
)


DONE = b"data: [DONE]\n\n"
IN_PROGRESS = b'event: image_generation.in_progress\ndata: {"type":"image_generation.in_progress"}\n\n'


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ([], []),
        ([], [DONE]),  # as some relays end every stream (FACTS §3)
        ([b": keep-alive\n\n", IN_PROGRESS], [DONE]),
        ([PARTIAL], []),
        ([PARTIAL], [DONE]),
    ],
    ids=[
        "error_only",
        "error_then_done",
        "unknown_event_then_error",
        "partial_then_error",
        "partial_error_done",
    ],
)
async def test_an_error_event_inside_a_200_stream_is_a_failure(
    start_server: StartServer,
    start_gateway: StartGateway,
    redis_factory: MakeRedis,
    before: list[bytes],
    after: list[bytes],
) -> None:
    redis = redis_factory()
    upstream = ScriptedUpstream(Script(chunks=[*before, STREAM_ERROR, *after]))
    gw = await gateway_on(start_server, start_gateway, redis, upstream)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{gw.v1}/images/generations", json={**LOW, "stream": True}, headers=AUTH
        ) as resp:
            assert resp.status == 200
            body = await resp.read()
        row = await settled_once(session, gw, redis)
    assert body.endswith(STREAM_ERROR + b"".join(after))  # relayed as it came
    assert gw.metric("gateway_upstream_errors_total", upstream="openai", kind="stream_error") == 1
    assert row["failed"] == 1
    if PARTIAL in before:  # an image was under way and no usage came: the estimate stands
        assert (row["tokens"], row["nano_usd"]) == (LOW_ESTIMATE_TOKENS, LOW_ESTIMATE_NANO_USD)
    else:  # the upstream failed before it sent any image: nothing was generated, refunded
        assert (row["tokens"], row["nano_usd"], row["images"]) == (0, 0, 0)


@pytest.mark.parametrize("error_after", [0, 1], ids=["error_first", "after_a_partial"])
async def test_the_mock_upstreams_error_then_done_through_the_sdk(
    start_server: StartServer, start_gateway: StartGateway, redis_factory: MakeRedis, error_after: int
) -> None:
    """The mock's stream that fails with an `error` event then ends with `data: [DONE]`, read by
    openai-python: it raises on the error; the gateway refunds it unless an image event came first."""
    redis = redis_factory()
    mock = create_mock_app(
        MockOptions(api_key=UPSTREAM_KEY, sse_error_after_events=error_after, sse_done=True)
    )
    gw = await gateway_on(start_server, start_gateway, redis, mock)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0)
    seen: list[str] = []
    try:
        stream = await client.images.generate(
            model=MODEL, prompt=LOW["prompt"], size="1024x1024", quality="low", stream=True, partial_images=1
        )
        with pytest.raises(openai.APIError, match="failing the stream as asked"):
            async for event in stream:
                seen.append(event.type)
    finally:
        await client.close()
    assert seen == ["image_generation.partial_image"] * error_after
    async with aiohttp.ClientSession() as session:
        row = await settled_once(session, gw, redis)
    assert row["failed"] == 1
    if error_after:  # an image was under way and no usage came: the estimate stands
        assert (row["tokens"], row["nano_usd"]) == (
            LOW_ESTIMATE_TOKENS + 100,
            LOW_ESTIMATE_NANO_USD + 100 * 32_000,
        )
    else:
        assert (row["tokens"], row["nano_usd"], row["images"]) == (0, 0, 0)


@pytest.mark.parametrize("cut", ["before_the_first_event", "inside_the_first_event"])
async def test_a_200_stream_dropped_before_any_whole_event_is_billed_like_a_json_answer(
    start_server: StartServer, start_gateway: StartGateway, redis_factory: MakeRedis, cut: str
) -> None:
    """The upstream answered 200: it took the work, and may have generated (and billed) the image.
    A connection dropped then is billed at the estimate, as it is for a JSON answer, never refunded."""
    redis = redis_factory()
    chunks = [] if cut == "before_the_first_event" else [PARTIAL[:30]]
    upstream = ScriptedUpstream(Script(chunks=chunks, abort_after_chunks=True))
    gw = await gateway_on(start_server, start_gateway, redis, upstream)
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{gw.v1}/images/generations", json={**LOW, "stream": True}, headers=AUTH
            ) as resp:
                assert resp.status == 200
                with contextlib.suppress(aiohttp.ClientPayloadError):
                    await resp.read()
            row = await settled_once(session, gw, redis)
    assert (row["failed"], row["tokens"], row["nano_usd"]) == (1, LOW_ESTIMATE_TOKENS, LOW_ESTIMATE_NANO_USD)
    [line] = finished_lines(logs)
    assert line["settled"] == "estimate"


async def test_client_leaving_mid_stream_is_billed_from_the_drained_usage(
    start_server: StartServer, start_gateway: StartGateway, redis_factory: MakeRedis
) -> None:
    redis = redis_factory()
    usage = usage_body(text=3, image_in=0, output=372)  # 375 tokens: more than the 292 reserved
    completed = sse_event("image_generation.completed", usage=usage)
    upstream = ScriptedUpstream(Script(chunks=[PARTIAL, completed], chunk_delay=0.3))
    gw = await gateway_on(start_server, start_gateway, redis, upstream)
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            resp = await session.post(
                f"{gw.v1}/images/generations", json={**LOW, "stream": True}, headers=AUTH
            )
            assert await resp.content.readuntil(b"\n\n") == PARTIAL
            resp.close()  # the client leaves before the completed event
            await asyncio.wait_for(upstream.finished.wait(), 5)
            row = await settled_once(session, gw, redis)
            after = await tenant_limits(session, gw.url)
    assert (row["failed"], row["tokens"], row["nano_usd"]) == (0, 375, nano_usd(usage))
    assert (row["text_in_tokens"], row["image_out_tokens"]) == (3, 372)
    assert after["tenant.tokens_per_day"]["used"] == 375
    assert after["tenant.usd_per_day"]["used"] == nano_usd(usage) / 1e9
    [line] = finished_lines(logs)
    assert (line["settled"], line["client_gone"]) == ("usage", True)


async def test_a_json_answer_broken_after_the_client_left_is_billed_not_refunded(
    start_server: StartServer, start_gateway: StartGateway, redis_factory: MakeRedis
) -> None:
    """A 200 JSON answer comes once the image is made: broken midway, it cannot tell its usage,
    but the image was made (and billed upstream). Nothing was sent to the client, who had left."""
    redis = redis_factory()
    whole = json_body(usage_body(text=5, image_in=0, output=272))
    upstream = ScriptedUpstream(
        Script(
            content_type="application/json",
            chunks=[whole[: len(whole) // 2]],
            delay_before_headers=0.3,
            abort_after_chunks=True,
        )
    )
    gw = await gateway_on(start_server, start_gateway, redis, upstream)
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            request = asyncio.create_task(generate(session, gw.url))
            await reached_upstream(upstream)
            request.cancel()  # the client leaves while the image is generated
            await asyncio.wait_for(upstream.finished.wait(), 5)
            row = await settled_once(session, gw, redis)
    assert (row["failed"], row["tokens"], row["nano_usd"]) == (1, LOW_ESTIMATE_TOKENS, LOW_ESTIMATE_NANO_USD)
    [line] = finished_lines(logs)
    assert line["settled"] == "estimate"


async def test_a_json_answer_broken_before_its_first_body_byte_is_a_502_billed_at_the_estimate(
    start_server: StartServer, start_gateway: StartGateway, redis_factory: MakeRedis
) -> None:
    """The upstream sent a 200 head, then dropped the connection before any body byte. A JSON
    answer's head goes out with its first body bytes, so nothing was sent yet: the client gets a
    502 as for any dropped upstream, not a reset, and the access log and metrics say 502. The 200
    meant the image was made (and billed upstream): settled once, at the estimate."""
    redis = redis_factory()
    upstream = ScriptedUpstream(Script(content_type="application/json", chunks=[], abort_after_chunks=True))
    gw = await gateway_on(start_server, start_gateway, redis, upstream)
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            status, body, headers = await generate(session, gw.url)
            row = await settled_once(session, gw, redis)
    assert (status, body["error"]["type"], body["error"]["code"]) == (
        502,
        "upstream_error",
        "upstream_unavailable",
    )
    assert headers["x-ratelimit-remaining-requests"] == "9"  # as on the other upstream failures
    assert (row["failed"], row["tokens"], row["nano_usd"]) == (1, LOW_ESTIMATE_TOKENS, LOW_ESTIMATE_NANO_USD)
    [line] = finished_lines(logs)
    assert (line["status"], line["settled"]) == (502, "estimate")
    labels = {"tenant": "team", "model": MODEL, "route": "openai", "operation": "generate"}
    assert gw.metric("gateway_requests_total", **labels, status="502") == 1
    assert gw.metric("gateway_requests_total", **labels, status="200") == 0
    assert gw.metric("gateway_upstream_errors_total", upstream="openai", kind="upstream_unavailable") == 1


async def test_a_json_answer_broken_inside_its_body_is_cut_off_and_logged_as_failed(
    start_server: StartServer, start_gateway: StartGateway, redis_factory: MakeRedis
) -> None:
    """Once body bytes were relayed the status cannot change: the client's connection is cut (no
    final chunk), and the access log says so beside the 200 that was sent (`upstream_failure`), as
    for a stream the upstream cut."""
    redis = redis_factory()
    whole = json_body(LOW_USAGE)
    upstream = ScriptedUpstream(
        Script(content_type="application/json", chunks=[whole[: len(whole) // 2]], abort_after_chunks=True)
    )
    gw = await gateway_on(start_server, start_gateway, redis, upstream)
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{gw.v1}/images/generations", json=LOW, headers=AUTH) as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
            row = await settled_once(session, gw, redis)
    assert (row["failed"], row["tokens"], row["nano_usd"]) == (1, LOW_ESTIMATE_TOKENS, LOW_ESTIMATE_NANO_USD)
    [line] = finished_lines(logs)
    assert (line["status"], line["upstream_failure"], line["settled"]) == (
        200,
        "upstream_unavailable",
        "estimate",
    )


async def test_a_settle_whose_reply_is_lost_is_retried_and_charged_once(
    start_server: StartServer, start_gateway: StartGateway, redis_factory: MakeRedis
) -> None:
    redis = redis_factory()
    usage = usage_body(text=6, image_in=0, output=272)
    answer = asyncio.Event()
    upstream = ScriptedUpstream(
        Script(content_type="application/json", chunks=[json_body(usage)], hold=answer)
    )
    server = await start_server(upstream.app())
    gw = await start_gateway(
        openai_url=base_url(server),
        store=redis_store(redis, timeout_ms=100),
        limits=LIMITS,
        admin={"token": ADMIN_TOKEN},
    )
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            request = asyncio.create_task(generate(session, gw.url))
            await reached_upstream(upstream)
            # Redis answers nothing for 0.45 s from just before the upstream answers, a health check's
            # PING included: the first settle attempt (and perhaps the second) is given up after
            # timeout_ms and the health check's, a later one gets through. The upstream answers only
            # once the pause is in force: on a busy machine starting redis-cli can take longer than
            # any fixed delay.
            await asyncio.to_thread(redis.cli, "CLIENT", "PAUSE", "450", "ALL")
            answer.set()
            status, _, _ = await request
            assert status == 200
            await asyncio.sleep(0.5)
            row = await settled_once(session, gw, redis)
            after = await tenant_limits(session, gw.url)
    assert gw.metric("gateway_settlements_retried_total") == 1
    assert gw.metric("gateway_store_errors_total", operation="settle") >= 1
    assert (row["failed"], row["tokens"], row["nano_usd"]) == (0, usage["total_tokens"], nano_usd(usage))
    assert after["tenant.tokens_per_day"]["used"] == usage["total_tokens"]
    assert after["tenant.usd_per_day"]["used"] == nano_usd(usage) / 1e9
    warnings = [line["event"] for line in logs if line["log_level"] == "warning"]
    assert warnings == ["store_unavailable"]  # and no settlement_lost: the outbox delivered it


# --- 3. Redis stopped mid-run, then back ----------------------------------------------------------


async def readiness(session: aiohttp.ClientSession, gw: Running) -> tuple[int, dict[str, Any]]:
    async with session.get(f"{gw.url}/readyz") as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
async def test_redis_stopped_mid_run_then_restarted_on_the_same_port(
    start_gateway: StartGateway, mock_openai: TestServer, redis_factory: MakeRedis, mode: str
) -> None:
    redis = redis_factory()
    gw = await start_gateway(
        openai_url=base_url(mock_openai),
        store=redis_store(redis, on_unavailable=mode, timeout_ms=100),
        limits={"requests_per_minute": 3},
        admin={"token": ADMIN_TOKEN},
    )
    async with aiohttp.ClientSession() as session:
        status, _, headers = await generate(session, gw.url)
        assert (status, headers["x-ratelimit-remaining-requests"]) == (200, "2")
        assert await readiness(session, gw) == (200, {"status": "ready", "store": "up"})

        await asyncio.to_thread(redis.stop)
        with capture_logs() as logs:
            started = time.perf_counter()
            during = [await generate(session, gw.url) for _ in range(4)]  # more than the limit's 2 left
            outage_took = time.perf_counter() - started
            ready_during = await readiness(session, gw)
        degraded = gw.metric("gateway_store_degraded_decisions_total", mode=mode)
        store_up_during = gw.metric("gateway_store_up")

        await asyncio.to_thread(redis.start)  # the same port, and empty
        after = [await generate(session, gw.url) for _ in range(4)]
        ready_after = await readiness(session, gw)

        async def outbox_empty() -> bool:
            return gw.metric("gateway_settlements_pending") == 0

        await eventually(outbox_empty)
        rows = await ledger_rows(session, gw.url)

    assert degraded == 4 and store_up_during == 0
    assert outage_took < 4 * 0.5  # each decided within about timeout_ms, not a client timeout
    # One warning per outage, not one per request; nothing lost.
    assert [line["event"] for line in logs if line["log_level"] == "warning"] == ["store_unavailable"]
    deferred = [line for line in logs if line["event"] == "settlement_deferred"]
    for status, body, headers in during:
        assert headers["x-ratelimit-limit-requests"] == "3"  # the limits are known, their state is not
        assert "x-ratelimit-remaining-requests" not in headers
        if mode == "fail_open":
            assert status == 200 and body["usage"]["total_tokens"] > 0
        else:
            assert status == 503
            assert (body["error"]["type"], body["error"]["code"]) == (
                "service_unavailable_error",
                "service_unavailable",
            )
            assert headers["Retry-After"] == "1"
    if mode == "fail_open":
        assert ready_during == (200, {"status": "ready", "store": "degraded"})
        # Served blind: each settlement waited in the outbox, said so with its amounts, and reached
        # the ledger once Redis was back.
        assert [line["tokens"] for line in deferred] == [
            body["usage"]["total_tokens"] for _, body, _ in during
        ]
        [row] = rows
        assert row["requests"] == 4 + 3
        assert row["tokens"] == sum(body["usage"]["total_tokens"] for _, body, _ in during + after[:3])
    else:
        assert ready_during == (503, {"status": "store_unavailable"})
        assert deferred == []
        [row] = rows
        assert row["requests"] == 3  # the four 503s were released, never recorded as served
    assert gw.metric("gateway_settlements_lost_total", kind="settle") == 0

    # Enforced again without a restart: the new server starts from nothing, so 3 are admitted.
    assert [status for status, _, _ in after] == [200, 200, 200, 429]
    assert [headers.get("x-ratelimit-remaining-requests") for _, _, headers in after] == ["2", "1", "0", "0"]
    assert after[-1][1]["error"]["code"] == "rate_limit_exceeded"
    assert ready_after == (200, {"status": "ready", "store": "up"})
    assert gw.metric("gateway_store_degraded_decisions_total", mode=mode) == 4
    assert gw.metric("gateway_store_up") == 1
    served = 1 + (4 if mode == "fail_open" else 0) + 3
    assert len(mock_openai.app[RECEIVED]) == served


# --- 4. shutdown while the upstream generates -------------------------------------------------------


async def test_a_request_cut_off_by_shutdown_while_the_upstream_generates_is_billed(
    start_server: StartServer,
) -> None:
    """A JSON generation answers only when it is done: a request still waiting on it when the
    gateway stops was accepted by the upstream, which bills it. So must we: at the estimate."""
    usage = usage_body(text=5, image_in=0, output=272)
    upstream = ScriptedUpstream(
        Script(content_type="application/json", chunks=[json_body(usage)], delay_before_headers=5)
    )
    server = await start_server(upstream.app())
    settings = make_settings(base_url(server), limits=LIMITS, server={"shutdown_grace_seconds": 0.2})
    app = create_app(settings)
    runner = FrontRunner(app, handle_signals=False, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            request = asyncio.create_task(generate(session, url))
            await reached_upstream(upstream)
            # What `serve` does on SIGTERM: the grace period passes and the request is cut off.
            await drain(app, runner, settings.server, app[PIPELINE].tasks)
            await runner.cleanup()
            with pytest.raises(aiohttp.ClientError):
                await request
    [line] = finished_lines(logs)
    assert line["settled"] == "estimate"
    day = datetime.now(UTC).date()
    [row] = [r.to_dict() for r in await app[STORE].ledger(day, day, "team")]
    assert (row["requests"], row["tokens"], row["nano_usd"]) == (
        1,
        LOW_ESTIMATE_TOKENS,
        LOW_ESTIMATE_NANO_USD,
    )


# --- 5. metrics agree with the ledger --------------------------------------------------------------


async def test_prometheus_counts_what_the_ledger_charges_dropped_streams_included(
    start_server: StartServer, start_gateway: StartGateway, redis_factory: MakeRedis
) -> None:
    """A mixed run: answers with usage, streams the upstream drops after a partial image (billed at
    the estimate) and upstream errors (refunded). Tokens, images and USD in Prometheus equal the
    ledger's, labelled by how they were settled, and USD is exact to the nano-dollar."""
    redis = redis_factory()
    usage = usage_body(text=7, image_in=0, output=272)
    completed = sse_event("image_generation.completed", usage=usage)

    async def images(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        kind = body["prompt"].split()[0]
        if kind == "fail":
            return web.Response(status=500, body=UPSTREAM_500, content_type="application/json")
        if kind == "ok":
            return web.Response(body=json_body(usage), content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(PARTIAL)
        if kind == "streamed":
            await response.write(completed)
            return response
        assert request.transport is not None
        request.transport.abort()  # "drop": the upstream is gone after a partial image
        return response

    app = web.Application()
    app.router.add_post("/v1/images/generations", images)
    server = await start_server(app)
    gw = await start_gateway(
        openai_url=base_url(server), store=redis_store(redis), limits=LIMITS, admin={"token": ADMIN_TOKEN}
    )
    plan = ["ok"] * 3 + ["streamed"] * 2 + ["drop"] * 3 + ["fail"] * 2
    async with aiohttp.ClientSession() as session:
        for kind in plan:
            payload = {**LOW, "prompt": f"{kind} a lighthouse", "stream": kind in ("streamed", "drop")}
            async with session.post(f"{gw.v1}/images/generations", json=payload, headers=AUTH) as resp:
                with contextlib.suppress(aiohttp.ClientPayloadError):
                    await resp.read()

        async def all_settled() -> bool:
            return len((await store_keys(redis)).get("settled", [])) == len(plan)

        await eventually(all_settled)
        [row] = await ledger_rows(session, gw.url)

    def total(name: str, **labels: str) -> float:
        return sum(
            sample.value
            for family in gw.registry.collect()
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    # A dropped request's estimate: its prompt's bytes ("drop a lighthouse") and 272 image tokens.
    estimate_tokens, estimate_nano = 17 + 272, 17 * NANO_PER_TEXT_IN + 272 * NANO_PER_IMAGE_OUT
    assert row["requests"] == len(plan) and row["failed"] == 5  # 3 dropped, 2 errors
    for settled, count in (("usage", 5), ("estimate", 3)):
        assert total("gateway_images_total", settled=settled) == count
    assert total("gateway_tokens_total") == row["tokens"] == 5 * usage["total_tokens"] + 3 * estimate_tokens
    assert total("gateway_tokens_total", settled="estimate") == 3 * estimate_tokens
    assert row["nano_usd"] == 5 * nano_usd(usage) + 3 * estimate_nano
    spend = {s: total("gateway_spend_usd_total", settled=s) for s in ("usage", "estimate")}
    assert spend == {"usage": 5 * nano_usd(usage) / 1e9, "estimate": 3 * estimate_nano / 1e9}
    assert total("gateway_images_total") == row["images"] == 8
