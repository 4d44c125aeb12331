"""A bug inside the pipeline after admission costs one request, never more: its client gets an
answer (never a hung connection), it is still settled (so its concurrency slot is released), and
the failure is logged. The answer goes out before the settlement; a shutdown that cuts the request
then still waits for that settlement."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from gateway.app import PIPELINE
from gateway.health import STORE
from gateway.pipeline import Pipeline
from gateway.process.shutdown import CUT_SETTLE_SECONDS
from tests.e2e.conftest import StartGateway, base_url
from tests.support.config import TENANT_KEY

AUTH = {"Authorization": f"Bearer {TENANT_KEY}"}
LOW = {"model": "gpt-image-1.5", "prompt": "a lighthouse", "size": "1024x1024", "quality": "low"}
ONE_AT_A_TIME = {"concurrent_requests": 1}


async def generate(session: aiohttp.ClientSession, url: str) -> int:
    async with session.post(f"{url}/v1/images/generations", json=LOW, headers=AUTH) as resp:
        await resp.read()
        return resp.status


async def test_a_settlement_that_cannot_read_the_usage_still_settles_and_frees_the_slot(
    start_gateway: StartGateway, mock_openai: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await start_gateway(openai_url=base_url(mock_openai), limits=ONE_AT_A_TIME)
    original = Pipeline.actual
    calls = 0

    def broken_once(self: Pipeline, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the usage reader")
        return original(self, *args)

    monkeypatch.setattr(Pipeline, "actual", broken_once)
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            statuses = [await asyncio.wait_for(generate(session, gw.url), 10) for _ in range(3)]
            await asyncio.sleep(0.1)  # the last settlement and its log line
    assert statuses == [200, 200, 200]  # the first answer was relayed; its slot was released
    assert [line["log_level"] for line in logs if line["event"] == "usage_unreadable"] == ["error"]
    finished = [line for line in logs if line["event"] == "request_finished"]
    assert [line["settled"] for line in finished] == ["estimate", "usage", "usage"]


async def test_a_bug_before_the_relay_answers_500_at_once_and_settles(
    start_gateway: StartGateway, mock_openai: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await start_gateway(openai_url=base_url(mock_openai), limits=ONE_AT_A_TIME)
    store = gw.app[PIPELINE].store
    original = type(store).hold
    calls = 0

    def broken_once(self: Any, reservation: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug holding the leases")
        original(self, reservation)

    monkeypatch.setattr(type(store), "hold", broken_once)
    async with aiohttp.ClientSession() as session:
        first = await asyncio.wait_for(generate(session, gw.url), 5)  # before: never answered
        second = await asyncio.wait_for(generate(session, gw.url), 5)
    assert (first, second) == (500, 200)


async def test_a_cut_request_that_answered_is_still_waited_for_while_it_settles(
    start_gateway: StartGateway, mock_openai: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown cuts what is still running at the end of its grace; a request that already answered
    and is only settling is waited for (up to CUT_SETTLE_SECONDS), not abandoned half-settled."""
    gw = await start_gateway(openai_url=base_url(mock_openai))
    pipeline = gw.app[PIPELINE]
    original = Pipeline.settle

    async def slow(self: Pipeline, *args: Any) -> None:
        await asyncio.sleep(CUT_SETTLE_SECONDS / 3)
        await original(self, *args)

    monkeypatch.setattr(Pipeline, "settle", slow)
    with capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            assert await generate(session, gw.url) == 200
        [work] = pipeline.tasks  # answered, still settling
        work.cancel()  # what the drain does at the end of its grace
        await asyncio.wait({work}, timeout=CUT_SETTLE_SECONDS)
    assert work.done()
    [finished] = [line for line in logs if line["event"] == "request_finished"]
    assert finished["settled"] == "usage"


async def test_a_cut_as_the_settlement_starts_still_waits_for_it(
    start_gateway: StartGateway, mock_openai: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shutdown's cut landing as the settlement starts: `serve` still ends after it is settled
    (it was once cut in a `sleep(0)` before answering, leaving the settlement unowned)."""
    gw = await start_gateway(openai_url=base_url(mock_openai), limits=ONE_AT_A_TIME)
    pipeline = gw.app[PIPELINE]
    original = Pipeline.settle
    order: list[str] = []
    works: list[asyncio.Task[None]] = []

    async def settle(self: Pipeline, *args: Any) -> None:
        [work] = self.tasks
        works.append(work)
        work.cancel()  # the drain's cut, in the turn the settlement starts
        await asyncio.sleep(0.05)
        await original(self, *args)
        order.append("settled")

    monkeypatch.setattr(Pipeline, "settle", settle)
    async with aiohttp.ClientSession() as session:
        await generate(session, gw.url)
    await asyncio.wait(works, timeout=2)
    order.append("serve ended")
    await asyncio.sleep(0.2)
    assert order[:2] == ["settled", "serve ended"]
    assert not pipeline.tasks


@pytest.mark.parametrize("in_order", [True, False], ids=["settles_in_order", "settles_unordered"])
async def test_a_client_finds_its_request_in_the_metrics_as_soon_as_it_is_answered(
    start_gateway: StartGateway,
    mock_openai: TestServer,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    in_order: bool,
) -> None:
    """The settlement goes on after the answer (made slow here); the request's metrics do not wait
    for it: the client's next read of /metrics counts its request, whether the handler returns at
    once (the store settles in order) or, holding a concurrency slot, once settled."""
    gw = await start_gateway(
        openai_url=base_url(mock_openai), store={"backend": "redis", "url": redis_url}, limits=ONE_AT_A_TIME
    )
    store = gw.app[STORE]
    original = type(store).settle

    async def slow(self: Any, *args: Any, **kwargs: Any) -> bool:
        await asyncio.sleep(1)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(type(store), "settle", slow)
    monkeypatch.setattr(type(store), "settles_in_order", property(lambda _: in_order))
    labels = {"tenant": "team", "model": "gpt-image-1.5"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gw.url}/v1/images/generations", json=LOW, headers=AUTH) as resp:
            assert resp.status == 200
            await resp.read()
            async with aiohttp.ClientSession() as scraper, scraper.get(f"{gw.ops_url}/metrics") as scrape:
                text = await scrape.text()
    settling = gw.app[PIPELINE].tasks
    assert settling  # still settling
    await asyncio.wait(settling, timeout=5)  # its concurrency slot freed: the server is shared
    samples = {
        (s.name, s.labels.get("status")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if labels.items() <= s.labels.items()
    }
    assert samples[("gateway_requests_total", "200")] == 1
    assert samples[("gateway_request_duration_seconds_count", None)] == 1
