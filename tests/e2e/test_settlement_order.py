"""When a request's settlement reaches the store: its store call is made before the handler
resumes (`Pipeline.serve` answers in the turn the settlement starts), so a sequential client's next
request reaches the store after it.

Turn-exact: unlike test_quotas.py's sequential-client test, the order check does not lean on the
loop turns aiohttp happens to take before the connection's next handler (it fails when the answer
is given before the settlement task is created, or when the tenant's settle is wrapped in a task of
its own, as `gather` with a provider quota's settle did; that test does not)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.front.access_log import RECORD
from gateway.health import STORE
from gateway.pipeline import Pipeline
from tests.e2e.conftest import StartGateway, base_url
from tests.e2e.test_tracing import telemetry
from tests.support.config import DO_UPSTREAM_KEY, TENANT_KEY, UPSTREAM_KEY
from tests.support.otlp_receiver import OtlpReceiver

AUTH = {"Authorization": f"Bearer {TENANT_KEY}"}
LOW = {"model": "gpt-image-1.5", "prompt": "a lighthouse", "size": "1024x1024", "quality": "low"}


@pytest.mark.parametrize(
    "setup", ["memory", "redis_lean", "tracing", "upstream_refused", "provider_quota", "provider_quota_redis"]
)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_the_settle_store_call_is_made_before_the_handler_resumes(
    *,
    start_gateway: StartGateway,
    mock_openai: TestServer,
    monkeypatch: pytest.MonkeyPatch,
    redis_url: str,
    request: pytest.FixtureRequest,
    receiver: tuple[OtlpReceiver, str],
    setup: str,
    stream: bool,
) -> None:
    url = base_url(mock_openai)
    extra: dict[str, Any] = {}
    expected = 200
    if setup.startswith("provider_quota"):  # the organisation's quota at OpenAI: two settles
        extra["upstreams"] = {
            "openai": {"base_url": url, "api_key": UPSTREAM_KEY, "limits": {"requests_per_minute": 1000}},
            "digitalocean": {"base_url": url, "api_key": DO_UPSTREAM_KEY},
        }
    if "redis" in setup:
        extra["store"] = {"backend": "redis", "url": redis_url}
    if setup == "tracing":
        extra["telemetry"] = telemetry(receiver[1])
    if setup == "upstream_refused":
        url, expected = f"{request.getfixturevalue('refusing_url')}/v1", 502
    gw = await start_gateway(openai_url=url, limits={"concurrent_requests": 1}, **extra)
    store = gw.app[STORE]
    assert store.settles_in_order
    events: list[tuple[str, str]] = []
    settle, handle = type(store).settle, Pipeline.handle

    async def probed_settle(self: Any, reservation: Any, *args: Any, **kwargs: Any) -> bool:
        if reservation.tenant == "team":  # not the provider quota's own reservation
            events.append(("store settle called", reservation.request_id))
        return await settle(self, reservation, *args, **kwargs)

    async def probed_handle(self: Pipeline, web_request: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await handle(self, web_request, *args, **kwargs)
        finally:
            events.append(("handler resumed", web_request[RECORD].request_id))

    monkeypatch.setattr(type(store), "settle", probed_settle)
    monkeypatch.setattr(Pipeline, "handle", probed_handle)
    body = {**LOW, "stream": True, "partial_images": 1} if stream else LOW
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for _ in range(5):
            async with session.post(f"{gw.url}/v1/images/generations", json=body, headers=AUTH) as resp:
                assert resp.status == expected, await resp.text()
                await resp.read()
    resumed = [rid for what, rid in events if what == "handler resumed"]
    assert len(resumed) == 5
    for rid in resumed:
        assert events.index(("store settle called", rid)) < events.index(("handler resumed", rid)), events
