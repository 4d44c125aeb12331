"""The organisation's quota at each upstream (`upstreams.*.limits`), shared by every gateway process
on one Redis: a target without room is skipped for the next, and with none left the client gets 429
with nothing sent upstream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from tests.e2e.conftest import StartGateway, base_url
from tests.e2e.test_failover import ROUTE, generations, mock, two_targets, upstream_config
from tests.e2e.test_quotas import ADMIN_TOKEN, admin_json, eventually, generate, redis_store
from tests.support import redis_servers
from tests.support.config import config_dict
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.redis
redis_factory = redis_servers.redis_server_factory
StartServer = Callable[[web.Application], Awaitable[TestServer]]


async def test_provider_quota_spills_over_then_refuses_across_two_processes(
    start_server: StartServer, redis_factory: Callable[[], RedisServer], tmp_path: Path
) -> None:
    openai_mock = await mock(start_server)
    do_mock = await mock(start_server, "digitalocean")
    redis = redis_factory()
    upstreams = upstream_config(base_url(openai_mock), base_url(do_mock))
    upstreams["openai"]["limits"] = {"requests_per_minute": 3}
    upstreams["digitalocean"]["limits"] = {"requests_per_minute": 2, "tokens_per_minute": 100_000}
    config: dict[str, Any] = config_dict(
        base_url(openai_mock),
        store=redis_store(redis),
        admin={"token": ADMIN_TOKEN},
        upstreams=upstreams,
        routes=two_targets(),
    )
    gateways = [GatewayProcess(config, tmp_path), GatewayProcess(config, tmp_path)]
    await asyncio.gather(*(g.start() for g in gateways))
    try:
        answers = []
        async with aiohttp.ClientSession() as session:
            for i in range(7):
                status, body, headers = await generate(
                    session, gateways[i % 2].url, {"model": ROUTE, "prompt": "a fox"}
                )
                answers.append((status, headers.get("x-gateway-upstream"), body))
                retry_after = headers.get("Retry-After")
            assert [(s, u) for s, u, _ in answers] == [
                (200, "openai"),
                (200, "openai"),
                (200, "openai"),
                (200, "digitalocean"),
                (200, "digitalocean"),
                (429, None),
                (429, None),
            ]
            refused = answers[-1][2]["error"]
            assert refused["code"] == "rate_limit_exceeded"
            assert retry_after is not None and 1 <= int(retry_after) <= 60  # the earliest to free up
            assert ROUTE in refused["message"]
            assert (generations(openai_mock), generations(do_mock)) == (3, 2)  # nothing sent for the 429s

            async def settled() -> bool:
                rows = (await admin_json(session, gateways[0].url, "/usage"))["rows"]
                return sum(row["requests"] for row in rows) == 7

            await eventually(settled)
            rows = (await admin_json(session, gateways[0].url, "/usage"))["rows"]
            assert {row["tenant"] for row in rows} == {"team"}  # the provider rows stay out of it
            quotas = (await admin_json(session, gateways[1].url, "/upstreams"))["upstreams"]
            openai_rpm = quotas["openai"]["limits"][0]
            assert (openai_rpm["limit"], openai_rpm["value"], openai_rpm["used"]) == (
                "requests_per_minute",
                3,
                3,
            )
            assert [q["limit"] for q in quotas["digitalocean"]["limits"]] == [
                "requests_per_minute",
                "tokens_per_minute",
            ]
            assert quotas["digitalocean"]["limits"][0]["used"] == 2
        client = Redis.from_url(redis.url)
        try:
            provider_keys = [key async for key in client.scan_iter(match="igw:{upstream:*")]
        finally:
            await client.aclose()
        assert any(b"{upstream:openai}:rate:provider:rpm" in key for key in provider_keys)
    finally:
        for gateway in gateways:
            await asyncio.to_thread(gateway.stop)


async def test_an_attempt_that_made_no_image_is_settled_at_nothing(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    """openai (with a quota) answers 503, digitalocean (without one) serves: openai's quota keeps
    the request but none of the tokens, which digitalocean spent."""
    sick = await mock(start_server, fail_status=503)
    do_mock = await mock(start_server, "digitalocean")
    upstreams = upstream_config(base_url(sick), base_url(do_mock))
    upstreams["openai"]["limits"] = {"requests_per_minute": 10, "tokens_per_minute": 100_000}
    gw = await start_gateway(
        openai_url=base_url(sick), upstreams=upstreams, routes=two_targets(), admin={"token": ADMIN_TOKEN}
    )
    async with aiohttp.ClientSession() as session:
        status, _, headers = await generate(
            session, gw.url, {"model": ROUTE, "prompt": "a fox", "quality": "low"}
        )
        assert (status, headers["x-gateway-upstream"]) == (200, "digitalocean")
        quotas = (await admin_json(session, gw.url, "/upstreams"))["upstreams"]
    used = {q["limit"]: q["used"] for q in quotas["openai"]["limits"]}
    assert used == {"requests_per_minute": 1, "tokens_per_minute": 0}
    assert quotas["digitalocean"]["limits"] == []
