"""Several upstreams per route, end to end through real sockets with the real SDK: the next target is
tried only when no image can have been made, never otherwise (counted at the upstreams)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.mock_upstream import RECEIVED, MockOptions, create_mock_app
from tests.e2e.conftest import Running, StartGateway, base_url
from tests.e2e.test_edits import image_bytes
from tests.e2e.test_quotas import generate
from tests.support.config import DO_UPSTREAM_KEY, TENANT_KEY, UPSTREAM_KEY
from tests.support.scripted_upstream import Script, ScriptedUpstream

StartServer = Callable[[web.Application], Awaitable[TestServer]]
ROUTE = "gpt-image-1.5"
PROMPT = "a lighthouse at dusk"


def two_targets(**route: Any) -> dict[str, Any]:
    """gpt-image-1.5 at OpenAI first, then at DigitalOcean under its own model id."""
    return {
        ROUTE: {
            "targets": [
                {"upstream": "openai"},
                {"upstream": "digitalocean", "model": "openai-gpt-image-1.5"},
            ],
            **route,
        }
    }


def upstream_config(openai_url: str, do_url: str, **openai_settings: Any) -> dict[str, Any]:
    return {
        "openai": {"base_url": openai_url, "api_key": UPSTREAM_KEY, **openai_settings},
        "digitalocean": {"base_url": do_url, "api_key": DO_UPSTREAM_KEY},
    }


async def mock(start_server: StartServer, flavor: str = "openai", **options: Any) -> TestServer:
    key = UPSTREAM_KEY if flavor == "openai" else DO_UPSTREAM_KEY
    return await start_server(create_mock_app(MockOptions(flavor=flavor, api_key=key, **options)))  # type: ignore[arg-type]


def generations(server: TestServer) -> int:
    return sum(1 for r in server.app[RECEIVED] if r.path.endswith("/images/generations"))


def sdk(gw: Running) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0)


async def sdk_generate(gw: Running) -> tuple[str, Any]:
    """One generation through the SDK: the upstream that answered and the parsed result."""
    async with sdk(gw) as client:  # closed each time: unclosed clients pile up connections
        raw = await client.images.with_raw_response.generate(
            model=ROUTE, prompt=PROMPT, size="1536x1024", quality="low"
        )
    return raw.headers["x-gateway-upstream"], raw.parse()


async def test_refused_connection_fails_over_to_the_next_target(
    start_server: StartServer, start_gateway: StartGateway, refusing_url: str
) -> None:
    do = await mock(start_server, "digitalocean")
    closed = f"{refusing_url}/v1"
    gw = await start_gateway(
        openai_url=closed, upstreams=upstream_config(closed, base_url(do)), routes=two_targets()
    )
    upstream, result = await sdk_generate(gw)
    assert upstream == "digitalocean"
    assert result.data[0].b64_json
    assert generations(do) == 1
    assert do.app[RECEIVED][-1].body["model"] == "openai-gpt-image-1.5"
    assert do.app[RECEIVED][-1].body["n"] == 1  # DigitalOcean's required fields, filled for it
    assert (
        gw.metric("gateway_failovers_total", route=ROUTE, from_upstream="openai", to_upstream="digitalocean")
        == 1
    )
    assert (
        gw.metric("gateway_upstream_attempts_total", upstream="openai", outcome="upstream_unavailable") == 1
    )


async def test_503_fails_over_and_the_request_counts_once(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    sick = await mock(start_server, fail_status=503)
    do = await mock(start_server, "digitalocean")
    gw = await start_gateway(
        openai_url=base_url(sick),
        upstreams=upstream_config(base_url(sick), base_url(do)),
        routes=two_targets(),
        limits={"requests_per_minute": 2},
    )
    for _ in range(2):
        upstream, _ = await sdk_generate(gw)
        assert upstream == "digitalocean"
    with pytest.raises(openai.RateLimitError):  # two requests, however many attempts each made
        await sdk_generate(gw)
    assert (generations(sick), generations(do)) == (2, 2)


async def test_429_fails_over_and_cools_the_upstream_down(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    limited = await mock(start_server, fail_status=429, retry_after=30)
    do = await mock(start_server, "digitalocean")
    gw = await start_gateway(
        openai_url=base_url(limited),
        upstreams=upstream_config(base_url(limited), base_url(do)),
        routes=two_targets(),
    )
    for _ in range(3):
        upstream, _ = await sdk_generate(gw)
        assert upstream == "digitalocean"
    assert generations(limited) == 1  # cooling for 30 s: never sent another
    assert gw.metric("gateway_upstream_attempts_total", upstream="openai", outcome="skipped_cooling") == 2


async def test_no_second_attempt_after_a_read_timeout(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    hanging = await mock(start_server, hang_ms=3000)
    do = await mock(start_server, "digitalocean")
    gw = await start_gateway(
        openai_url=base_url(hanging),
        upstreams=upstream_config(base_url(hanging), base_url(do), read_timeout_seconds=0.3),
        routes=two_targets(),
        limits={"tokens_per_day": 1_000_000},
    )
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk_generate(gw)
    assert caught.value.status_code == 504
    assert (generations(hanging), generations(do)) == (1, 0)  # it may be generating: never twice


async def test_no_second_attempt_on_a_400(start_server: StartServer, start_gateway: StartGateway) -> None:
    refusing = await mock(start_server, fail_status=400)
    do = await mock(start_server, "digitalocean")
    gw = await start_gateway(
        openai_url=base_url(refusing),
        upstreams=upstream_config(base_url(refusing), base_url(do)),
        routes=two_targets(),
    )
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk_generate(gw)
    assert "as asked" in caught.value.message  # the upstream's own error, relayed
    assert (generations(refusing), generations(do)) == (1, 0)


async def test_500_is_relayed_unless_the_route_retries_on_it(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    failing = await mock(start_server, fail_status=500)
    do = await mock(start_server, "digitalocean")
    config = {"upstreams": upstream_config(base_url(failing), base_url(do)), "openai_url": base_url(failing)}
    gw = await start_gateway(routes=two_targets(), **config)
    with pytest.raises(openai.InternalServerError):
        await sdk_generate(gw)
    assert (generations(failing), generations(do)) == (1, 0)
    gw = await start_gateway(routes=two_targets(retry_on=[500]), **config)
    assert (await sdk_generate(gw))[0] == "digitalocean"


async def test_a_stream_fails_over_before_its_first_byte_and_is_relayed_byte_exact(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    sick = await mock(start_server, fail_status=503)
    events = [
        b'event: image_generation.partial_image\ndata: {"type":"image_generation.partial_image","b64_json":"AA==","partial_image_index":0}\n\n',
        b'event: image_generation.completed\ndata: {"type":"image_generation.completed","b64_json":"AA==",'
        b'"usage":{"input_tokens":9,"input_tokens_details":{"text_tokens":9,"image_tokens":0},"output_tokens":272,"total_tokens":281}}\n\n',
    ]
    second = ScriptedUpstream(Script(chunks=events, chunk_delay=0.01))
    second_server = await start_server(second.app())
    gw = await start_gateway(
        openai_url=base_url(sick),
        upstreams=upstream_config(base_url(sick), base_url(second_server)),
        routes=two_targets(),
    )
    payload = {"model": ROUTE, "prompt": PROMPT, "stream": True, "partial_images": 1, "quality": "low"}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{gw.url}/v1/images/generations", json=payload, headers={"Authorization": f"Bearer {TENANT_KEY}"}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["x-gateway-upstream"] == "digitalocean"
            body = await resp.read()
    assert body == b"".join(events)
    assert (generations(sick), len(second.received)) == (1, 1)


async def test_every_target_failing_gives_the_last_failure(
    start_server: StartServer, start_gateway: StartGateway, refusing_url: str
) -> None:
    first = await mock(start_server, fail_status=503)
    last = await mock(start_server, "digitalocean", fail_status=503)
    gw = await start_gateway(
        openai_url=base_url(first),
        upstreams=upstream_config(base_url(first), base_url(last)),
        routes=two_targets(),
    )
    async with aiohttp.ClientSession() as session:
        status, body, headers = await generate(session, gw.url, {"model": ROUTE, "prompt": PROMPT})
    assert status == 503
    assert headers["x-gateway-upstream"] == "digitalocean"
    # DigitalOcean's own error (its message, its id as the code), in OpenAI's shape
    assert "as asked" in body["error"]["message"] and body["error"]["code"] == "service_unavailable"
    assert (generations(first), generations(last)) == (1, 1)

    closed = f"{refusing_url}/v1"
    gw = await start_gateway(
        openai_url=closed, upstreams=upstream_config(closed, closed), routes=two_targets()
    )
    async with aiohttp.ClientSession() as session:
        status, body, _ = await generate(session, gw.url, {"model": ROUTE, "prompt": PROMPT})
    assert status == 502
    assert body["error"]["code"] == "upstream_unavailable"
    assert UPSTREAM_KEY not in str(body) and DO_UPSTREAM_KEY not in str(body)


async def test_a_target_whose_flavor_cannot_take_the_request_is_skipped_unsent(
    start_server: StartServer, start_gateway: StartGateway, refusing_url: str
) -> None:
    """gpt-image-1 at DigitalOcean takes neither 1024x1024 nor n=2 (the catalog's flavor overlay):
    when OpenAI cannot be reached, such a request is not sent there to be refused, and the client
    gets OpenAI's failure; a request DigitalOcean does take fails over as usual."""
    do = await mock(start_server, "digitalocean")
    closed = f"{refusing_url}/v1"
    routes = {
        "gpt-image-1": {
            "targets": [{"upstream": "openai"}, {"upstream": "digitalocean", "model": "openai-gpt-image-1"}]
        },
        **two_targets(),
    }
    gw = await start_gateway(
        openai_url=closed, upstreams=upstream_config(closed, base_url(do)), routes=routes
    )
    request = {"model": "gpt-image-1", "prompt": PROMPT, "quality": "low"}
    async with aiohttp.ClientSession() as session:
        status, body, _ = await generate(session, gw.url, {**request, "size": "1024x1024"})
        assert (status, body["error"]["code"]) == (502, "upstream_unavailable")
        assert generations(do) == 0
        assert (
            gw.metric("gateway_upstream_attempts_total", upstream="digitalocean", outcome="skipped_flavor")
            == 1
        )
        status, _, headers = await generate(session, gw.url, {**request, "size": "1536x1024"})
    assert (status, headers["x-gateway-upstream"]) == (200, "digitalocean")
    assert generations(do) == 1


async def test_a_sick_upstream_is_ejected_and_probed(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    sick = await mock(start_server, fail_status=503)
    do = await mock(start_server, "digitalocean")

    async def gateway(eject_seconds: float) -> Running:
        upstreams = upstream_config(
            base_url(sick), base_url(do), eject_after_failures=3, eject_seconds=eject_seconds
        )
        return await start_gateway(openai_url=base_url(sick), upstreams=upstreams, routes=two_targets())

    gw = await gateway(eject_seconds=60)
    for _ in range(12):
        assert (await sdk_generate(gw))[0] == "digitalocean"
    assert generations(sick) == 3  # then out of rotation: skipped without a connection
    assert gw.metric("gateway_upstream_up", upstream="openai") == 0
    assert gw.metric("gateway_upstream_attempts_total", upstream="openai", outcome="skipped_ejected") == 9

    gw = await gateway(eject_seconds=2)
    for _ in range(3):
        await sdk_generate(gw)
    assert generations(sick) == 6
    await asyncio.sleep(2.2)  # the ejection is over: one request probes it, fails, and ejects it again
    for _ in range(3):
        assert (await sdk_generate(gw))[0] == "digitalocean"
    assert generations(sick) == 7


async def test_weighted_spread_over_1000_requests(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    body = b'{"created":1,"data":[{"b64_json":"AA=="}],"usage":{"input_tokens":5,"input_tokens_details":{"text_tokens":5,"image_tokens":0},"output_tokens":272,"total_tokens":277}}'
    heavy, light = (
        ScriptedUpstream(Script(content_type="application/json", chunks=[body])) for _ in range(2)
    )
    heavy_url, light_url = [base_url(await start_server(u.app())) for u in (heavy, light)]
    route = {
        "strategy": "weighted",
        "targets": [{"upstream": "openai", "weight": 3}, {"upstream": "second", "model": "gpt-image-1.5"}],
    }
    upstreams = {
        "openai": {"base_url": heavy_url},
        "second": {"base_url": light_url, "flavor": "openai"},
        "digitalocean": {"base_url": light_url},
    }
    gw = await start_gateway(openai_url=heavy_url, upstreams=upstreams, routes={ROUTE: route})
    payload = {"model": ROUTE, "prompt": PROMPT, "quality": "low"}
    statuses: list[int] = []
    async with aiohttp.ClientSession() as session:

        async def worker(count: int) -> None:
            for _ in range(count):
                statuses.append((await generate(session, gw.url, payload))[0])

        await asyncio.gather(*(worker(50) for _ in range(20)))
    assert statuses == [200] * 1000
    assert len(heavy.received) + len(light.received) == 1000
    assert 680 <= len(heavy.received) <= 820  # 750 expected; 820 is more than 5 standard deviations


async def test_an_edit_skips_a_target_without_edits_and_fails_over_with_the_upload_resent(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    sick = await mock(start_server, fail_status=503)
    healthy = await mock(start_server)
    do = await mock(start_server, "digitalocean")
    upstreams = upstream_config(base_url(sick), base_url(do))
    upstreams["second"] = {"base_url": base_url(healthy), "api_key": UPSTREAM_KEY, "flavor": "openai"}
    route = {
        "targets": [
            {"upstream": "digitalocean", "model": "openai-gpt-image-1.5"},
            {"upstream": "openai"},
            {"upstream": "second"},
        ]
    }
    gw = await start_gateway(openai_url=base_url(sick), upstreams=upstreams, routes={ROUTE: route})
    png = image_bytes(256, 256)
    async with sdk(gw) as client:
        raw = await client.images.with_raw_response.edit(
            model=ROUTE, image=("room.png", png, "image/png"), prompt="the same room, in blue", quality="low"
        )
    assert raw.headers["x-gateway-upstream"] == "second"
    assert generations(do) == 0 and len(do.app[RECEIVED]) == 0  # DigitalOcean has no edits: never sent
    sent = [r for server in (sick, healthy) for r in server.app[RECEIVED]]
    assert [r.path for r in sent] == ["/v1/images/edits", "/v1/images/edits"]
    assert all([f.data for f in r.files] == [png] for r in sent)  # the same upload, re-sent whole
    assert (
        gw.metric("gateway_upstream_attempts_total", upstream="digitalocean", outcome="skipped_operation")
        == 1
    )
