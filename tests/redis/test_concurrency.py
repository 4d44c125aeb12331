"""Exactness under concurrency: no check-then-increment race, in one process or across several.

500 reserves race for 100 concurrency slots; exactly 100 win. After every admitted request is
settled, the day's token counter equals the sum of the actual costs, no lease is held and no
reservation record is left.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.config import StoreSettings
from gateway.limits import Reservation, create_store
from gateway.telemetry.metrics import Metrics
from policies.cost import Cost
from tests.redis.conftest import Backend, new_tenant, plan, tenant_settings
from tests.support.redis_servers import RedisServer

LIMITS = {"concurrent_requests": 100, "tokens_per_day": 10**9, "usd_per_day": 10_000}
REQUESTS = 500


def _estimate(i: int) -> Cost:
    return Cost(images=1, text_in_tokens=20 + i % 7, image_out_tokens=1000 + i, nano_usd=40_000_000 + i)


def _actual(rng: random.Random) -> Cost:
    return Cost(
        images=1,
        text_in_tokens=rng.randint(0, 50),
        image_out_tokens=rng.randint(0, 3000),
        nano_usd=rng.randint(0, 90_000_000),
    )


async def _settle_all_and_check(
    backend: Backend, store: Any, tenant: str, reservations: list[Reservation]
) -> None:
    rng = random.Random(7)
    actuals = [_actual(rng) for _ in reservations]
    results = await asyncio.gather(
        *(store.settle(r, a, outcome="ok") for r, a in zip(reservations, actuals, strict=True))
    )
    assert all(results)
    statuses = {s.limit: s for s in await store.limit_status(plan(tenant, tenant_settings(LIMITS)))}
    assert statuses["tokens_per_day"].used == sum(a.tokens for a in actuals)
    assert statuses["usd_per_day"].used == sum(a.nano_usd for a in actuals)
    assert statuses["concurrent_requests"].used == 0
    keys = await backend.keys(store, tenant)
    assert not [k for k in keys if ":rsv:" in k or ":lease:" in k]
    day = reservations[0].day
    [row] = await store.ledger(day, day, tenant)
    assert row.requests == 100 and row.rejected_rate == REQUESTS - 100
    assert row.tokens == sum(a.tokens for a in actuals)


async def test_500_concurrent_reserves_admit_exactly_100(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings(LIMITS))
    admissions = await asyncio.gather(
        *(store.reserve(p, _estimate(i), request_id=f"r{i}", model="m") for i in range(REQUESTS))
    )
    admitted = [a.reservation for a in admissions if a.allowed and a.reservation is not None]
    assert len(admitted) == 100
    assert {type(a.error).__name__ for a in admissions if not a.allowed} == {"RateLimited"}
    await _settle_all_and_check(backend, store, tenant, admitted)


def _reserve_in_another_process(url: str, tenant: str, numbers: range, out: Any) -> None:
    async def run() -> list[dict[str, Any]]:
        settings = StoreSettings(backend="redis", url=url, timeout_ms=5000)
        store = create_store(settings, Metrics(CollectorRegistry()))
        await store.start()
        p = plan(tenant, tenant_settings(LIMITS))
        admissions = await asyncio.gather(
            *(store.reserve(p, _estimate(i), request_id=f"p{i}", model="m") for i in numbers)
        )
        await store.close()
        return [a.reservation.to_dict() for a in admissions if a.reservation is not None]

    out.put(asyncio.run(run()))


@pytest.mark.redis
async def test_three_processes_sharing_one_redis_admit_exactly_100(redis_server: RedisServer) -> None:
    backend = Backend("redis", url=redis_server.url)
    store, tenant = await backend.store(), new_tenant()
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    share = -(-REQUESTS // 3)
    workers = [
        context.Process(
            target=_reserve_in_another_process,
            args=(redis_server.url, tenant, range(n * share, min(REQUESTS, (n + 1) * share)), results),
        )
        for n in range(3)
    ]
    for worker in workers:
        worker.start()
    admitted = [
        Reservation.from_dict(d) for _ in workers for d in await asyncio.to_thread(results.get, True, 60)
    ]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    try:
        assert len(admitted) == 100
        await _settle_all_and_check(backend, store, tenant, admitted)  # settled here, reserved there
    finally:
        await backend.close()
