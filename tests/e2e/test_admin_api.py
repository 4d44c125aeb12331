"""The admin API additions the usage page reads, end to end on real sockets: every tenant's limits
in one answer, and the requests by decision of the last hour as the gateway finished them."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from tests.e2e.conftest import StartGateway, base_url
from tests.support.config import TENANT_KEY
from tests.support.processes import free_port

ADMIN_TOKEN = "page-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AUTH = {"Authorization": f"Bearer {TENANT_KEY}"}
LOW = {"prompt": "a lighthouse at dusk", "size": "1024x1024", "quality": "low"}


async def test_activity_counts_each_decision_and_tenants_show_what_is_left(
    start_gateway: StartGateway, mock_openai: TestServer
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: the DigitalOcean route fails
    gateway = await start_gateway(
        openai_url=base_url(mock_openai),
        do_url=dead,
        admin={"token": ADMIN_TOKEN},
        policy={"default_model": "gpt-image-1.5", "models": ["gpt-image-1.5", "gpt-image-1"]},
        limits={"requests_per_minute": 2, "usd_per_day": 10},
    )
    statuses: list[int] = []
    async with aiohttp.ClientSession() as http:

        async def generate(body: dict[str, Any], headers: dict[str, str] = AUTH) -> None:
            async with http.post(f"{gateway.v1}/images/generations", json=body, headers=headers) as r:
                await r.read()
                statuses.append(r.status)

        await generate({"model": "gpt-image-1.5", **LOW})  # served
        # failed: the upstream is down (a size DigitalOcean takes: the request is valid there)
        await generate({"model": "gpt-image-1", **LOW, "size": "1536x1024"})
        await generate({"model": "gpt-image-2", **LOW})  # the policy does not allow the model
        await generate({"model": "gpt-image-1.5", **LOW}, {"Authorization": "Bearer nope"})
        await generate({"model": "gpt-image-1.5", **LOW})  # the third request of the minute
        assert statuses == [200, 502, 403, 401, 429]

        async with http.get(f"{gateway.url}/admin/activity", headers=ADMIN) as r:
            activity = await r.json()
        assert activity["totals"] == {
            "served": 1,
            "policy_denied": 1,
            "rate_limited": 1,
            "failed": 1,
            "rejected": 1,
        }
        assert sum(m["served"] for m in activity["minutes"][-2:]) == 1  # counted in the current minute
        # The admin API's own requests are not counted.
        async with http.get(f"{gateway.url}/admin/activity", headers=ADMIN) as r:
            assert (await r.json())["totals"] == activity["totals"]

        async with http.get(f"{gateway.url}/admin/tenants", headers=ADMIN) as r:
            assert r.status == 200
            tenants = {t["tenant"]: t for t in (await r.json())["tenants"]}
    assert set(tenants) == {"team", "other"}
    team = {limit["limit"]: limit for limit in tenants["team"]["scopes"][0]["limits"]}
    assert team["requests_per_minute"]["remaining"] == 0
    spent = team["usd_per_day"]
    assert 0 < spent["used"] < 1 and spent["remaining"] == 10 - spent["used"]
    assert tenants["other"]["scopes"] == []
