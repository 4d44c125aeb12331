"""The connection pool toward each upstream: `max_connections` caps it, and a request that cannot get
a connection in time is answered 504 and refunded rather than left waiting. Plus the bounded `size`
label of `gateway_images_total`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.e2e.conftest import StartGateway, base_url
from tests.e2e.test_quotas import generate, json_body, usage_body
from tests.support.config import OTHER_KEY, TENANT_KEY, UPSTREAM_KEY

StartServer = Callable[[web.Application], Awaitable[TestServer]]


class SlowUpstream:
    """Answers every generation after `delay` seconds, counting how many it holds at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.open = 0
        self.peak = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/images/generations", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.open -= 1
        body = json_body(usage_body(text=5, image_in=0, output=272))
        return web.Response(body=body, content_type="application/json")


def upstreams(url: str, **openai: object) -> dict[str, object]:
    return {
        "openai": {"base_url": url, "api_key": UPSTREAM_KEY, **openai},
        "digitalocean": {"base_url": url, "api_key": "do-key"},
    }


async def test_max_connections_caps_what_the_upstream_sees_at_once(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    upstream = SlowUpstream(delay=0.2)
    url = base_url(await start_server(upstream.app()))
    gw = await start_gateway(
        openai_url=url, upstreams=upstreams(url, max_connections=2, max_connections_per_tenant=2)
    )
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(generate(session, gw.url) for _ in range(6)))
    assert [status for status, _, _ in results] == [200] * 6
    assert upstream.peak == 2


async def test_waiting_for_a_busy_pool_is_bounded_by_the_connect_timeout(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    upstream = SlowUpstream(delay=1.0)
    url = base_url(await start_server(upstream.app()))
    gw = await start_gateway(
        openai_url=url,
        upstreams=upstreams(url, max_connections=1, connect_timeout_seconds=0.3),
        limits={"tokens_per_day": 100_000},
    )
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(generate(session, gw.url))
        await asyncio.sleep(0.05)
        status, body, _ = await generate(session, gw.url)
        assert (await first)[0] == 200
    assert status == 504
    assert body["error"]["code"] == "upstream_connect_timeout"
    assert "connections stayed busy" in body["error"]["message"]
    assert upstream.peak == 1
    assert (
        gw.metric(
            "gateway_tokens_total", tenant="team", model="gpt-image-1.5", bucket="image_out", settled="usage"
        )
        == 272
    )


async def test_free_sizes_share_one_images_label(
    start_gateway: StartGateway, mock_openai: TestServer
) -> None:
    gw = await start_gateway(openai_url=base_url(mock_openai))
    async with aiohttp.ClientSession() as session:
        for size in ("1280x720", "1296x736", "1024x1024"):
            payload = {"model": "gpt-image-2", "prompt": "a fox", "size": size, "quality": "low"}
            status, _, _ = await generate(session, gw.url, payload)
            assert status == 200
    labels = {"tenant": "team", "model": "gpt-image-2", "quality": "low", "settled": "usage"}
    assert gw.metric("gateway_images_total", size="custom", **labels) == 2
    assert gw.metric("gateway_images_total", size="1024x1024", **labels) == 1
    assert gw.metric("gateway_images_total", size="1280x720", **labels) == 0


class PerPromptUpstream:
    """Streams slowly for a prompt that says so, answers JSON at once otherwise."""

    def __init__(self, slow_seconds: float) -> None:
        self.slow_seconds = slow_seconds

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/images/generations", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if "slow" not in body["prompt"]:
            return web.Response(body=json_body(usage_body(5, 0, 272)), content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(self.slow_seconds)
        await response.write(
            b'event: image_generation.completed\ndata: {"type":"image_generation.completed"}\n\n'
        )
        return response


async def test_one_tenants_long_streams_do_not_make_another_tenant_wait(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    """A pool of 2 with the default share (a quarter, at least one): `team` holds one connection
    with a long stream and its second stream waits for it, so `other`'s JSON finds the second."""
    url = base_url(await start_server(PerPromptUpstream(slow_seconds=4.0).app()))
    gw = await start_gateway(
        openai_url=url, upstreams=upstreams(url, max_connections=2, connect_timeout_seconds=10)
    )
    slow = {"model": "gpt-image-1.5", "prompt": "slow fox", "stream": True, "partial_images": 0}
    async with aiohttp.ClientSession() as session:
        streams = [asyncio.create_task(generate_raw(session, gw.url, slow, TENANT_KEY)) for _ in range(2)]
        await asyncio.sleep(0.5)
        started = asyncio.get_running_loop().time()
        status = await generate_raw(session, gw.url, {"model": "gpt-image-1.5", "prompt": "fast"}, OTHER_KEY)
        waited = asyncio.get_running_loop().time() - started
        assert [await s for s in streams] == [200, 200]
    assert status == 200
    assert waited < 2.0  # without shares it waits for a stream to end (4 s)


async def generate_raw(session: aiohttp.ClientSession, url: str, payload: dict[str, object], key: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    async with session.post(f"{url}/v1/images/generations", json=payload, headers=headers) as resp:
        await resp.read()
        return resp.status
