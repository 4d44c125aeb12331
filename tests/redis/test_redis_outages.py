"""What only a real Redis can show: its clock decides the day, scripts come back after a flush,
a tenant's keys share one cluster slot, and on_unavailable when the server stops or stalls."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from structlog.testing import capture_logs

from gateway.errors import StoreUnavailable
from gateway.limits import create_store
from gateway.metrics import Metrics
from gateway.settings import StoreSettings
from policies.cost import Cost
from tests.redis.conftest import Backend, new_tenant, plan, tenant_settings
from tests.support.redis_servers import RedisClusterNodes, RedisServer, free_port

pytestmark = pytest.mark.redis

ESTIMATE = Cost(images=1, image_out_tokens=1000, nano_usd=40_000_000)
LIMITS = {"requests_per_minute": 100, "tokens_per_day": 100_000, "usd_per_month": 100}


async def test_day_and_month_keys_follow_redis_time_not_the_gateway_clock(redis_server: RedisServer) -> None:
    metrics = Metrics(CollectorRegistry())
    a_day_behind = create_store(
        StoreSettings(backend="redis", url=redis_server.url), metrics, clock=lambda: time.time() - 86_400
    )
    await a_day_behind.start()
    raw = Redis.from_url(redis_server.url)
    try:
        tenant = new_tenant()
        admission = await a_day_behind.reserve(
            plan(tenant, tenant_settings(LIMITS)), ESTIMATE, request_id="r", model="m"
        )
        seconds, _ = await raw.time()
        server_day = datetime.fromtimestamp(seconds, UTC).date()
        assert admission.reservation is not None and admission.reservation.day == server_day
        day_key = f"igw:{{{tenant}}}:window:tenant:tpd:{server_day.isoformat()}"
        month_key = f"igw:{{{tenant}}}:window:tenant:usd-month:{server_day.strftime('%Y-%m')}"
        assert await raw.get(day_key) == b"1000" and await raw.get(month_key) == b"40000000"
        # The counter outlives midnight (late settles) but not by more than a day.
        until_midnight = 86_400 - seconds % 86_400
        assert until_midnight < await raw.ttl(day_key) <= until_midnight + 86_400
        assert await a_day_behind.settle(admission.reservation, Cost(image_out_tokens=10), outcome="ok")
        assert await raw.hget(f"igw:{{{tenant}}}:ledger:{server_day}", "image_out_tokens:m") == b"10"
    finally:
        await raw.aclose()
        await a_day_behind.close()


async def test_scripts_are_registered_again_after_a_flush(redis_server: RedisServer) -> None:
    backend = Backend("redis", url=redis_server.url)
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings(LIMITS))
    first = await store.reserve(p, ESTIMATE, request_id="a", model="m")
    await backend.raw().script_flush()
    assert first.reservation is not None
    assert await store.settle(first.reservation, ESTIMATE, outcome="ok")
    assert (await store.reserve(p, ESTIMATE, request_id="b", model="m")).allowed
    await backend.close()


@pytest.mark.parametrize("tenant", ["plain", "odd}name{with:braces", "{tag}"])
async def test_a_tenants_keys_share_one_cluster_slot(redis_cluster: RedisClusterNodes, tenant: str) -> None:
    backend = Backend("cluster", url=redis_cluster.url)
    store = await backend.store()
    settings = tenant_settings(
        {**LIMITS, "concurrent_requests": 3},
        key_limits={"images_per_minute": 9},
        user_limits={"tokens_per_day": 10**6},
    )
    name = f"{tenant}-{new_tenant()}"
    admission = await store.reserve(plan(name, settings, user="u"), ESTIMATE, request_id="r", model="m")
    assert admission.allowed and admission.reservation is not None
    keys = list(await backend.keys(store, name))
    assert len(keys) == 7  # three windows, a lease, two scoped buckets, the reservation
    slots = {await backend.raw().cluster_keyslot(key) for key in keys}
    assert len(slots) == 1
    assert await store.settle(admission.reservation, ESTIMATE, outcome="ok")
    await backend.close()


def _value(metric: object) -> float:
    return metric._value.get()  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
async def test_a_stopped_redis_then_recovery(redis_server_factory, mode: str) -> None:
    server = redis_server_factory()
    metrics = Metrics(CollectorRegistry())
    settings = StoreSettings(backend="redis", url=server.url, on_unavailable=mode, timeout_ms=300)
    store = create_store(settings, metrics)
    await store.start()
    tenant = new_tenant()
    p = plan(tenant, tenant_settings(LIMITS))
    before = await store.reserve(p, ESTIMATE, request_id="before", model="m")
    assert before.allowed and before.reservation is not None and not before.reservation.degraded

    server.stop()
    with capture_logs() as logs:
        started = time.perf_counter()
        during = await store.reserve(p, ESTIMATE, request_id="during", model="m")
        assert time.perf_counter() - started < 1
        assert await store.settle(before.reservation, ESTIMATE, outcome="ok") is False  # never raises
    # One warning for the outage, one for the settlement it made impossible.
    assert [log["event"] for log in logs if log["log_level"] == "warning"] == [
        "store_unavailable",
        "settlement_failed",
    ]
    assert _value(metrics.store_up) == 0
    assert _value(metrics.degraded_decisions.labels(mode)) == 1
    assert not await store.healthy()
    assert during.headers["x-ratelimit-limit-requests"] == "100"
    assert "x-ratelimit-remaining-requests" not in during.headers  # nothing known, nothing claimed
    if mode == "fail_open":
        assert during.allowed and during.reservation is not None and during.reservation.degraded
    else:
        assert not during.allowed and isinstance(during.error, StoreUnavailable)
        assert during.error.status == 503

    server.start()  # empty, and without our scripts
    with capture_logs() as logs:
        after = await store.reserve(p, ESTIMATE, request_id="after", model="m")
    assert after.allowed and after.reservation is not None and not after.reservation.degraded
    assert [log["event"] for log in logs] == ["store_recovered"]
    assert _value(metrics.store_up) == 1 and await store.healthy()
    if mode == "fail_open":
        # What was served blind is charged once the store is back: money spent still counts.
        assert during.reservation is not None
        assert await store.settle(during.reservation, Cost(image_out_tokens=300), outcome="ok")
        status = {s.limit: s for s in await store.limit_status(p)}
        assert status["tokens_per_day"].used == 1000 + 300
    await store.close()


async def test_a_stalled_redis_times_out_within_the_budget(redis_server_factory) -> None:
    server = redis_server_factory()
    metrics = Metrics(CollectorRegistry())
    settings = StoreSettings(backend="redis", url=server.url, on_unavailable="fail_open", timeout_ms=100)
    store = create_store(settings, metrics)
    await store.start()
    tenant = new_tenant()
    p = plan(tenant, tenant_settings(LIMITS))
    assert (await store.reserve(p, ESTIMATE, request_id="warm", model="m")).allowed
    server.cli("CLIENT", "PAUSE", "800", "ALL")
    started = time.perf_counter()
    stalled = await store.reserve(p, ESTIMATE, request_id="stalled", model="m")
    assert time.perf_counter() - started < 0.5
    assert stalled.allowed and stalled.reservation is not None and stalled.reservation.degraded
    await asyncio.sleep(0.9)
    assert await store.settle(stalled.reservation, Cost(image_out_tokens=5), outcome="ok")
    status = {s.limit: s for s in await store.limit_status(p)}
    # Charged exactly once whether or not the stalled reserve ran once Redis resumed.
    assert status["tokens_per_day"].used == 1000 + 5
    await store.close()


async def test_settle_retries_a_transient_failure_and_charges_once(redis_server_factory) -> None:
    server = redis_server_factory()
    metrics = Metrics(CollectorRegistry())
    store = create_store(StoreSettings(backend="redis", url=server.url, timeout_ms=300), metrics)
    await store.start()
    tenant = new_tenant()
    p = plan(tenant, tenant_settings(LIMITS))
    admission = await store.reserve(p, ESTIMATE, request_id="r", model="m")
    assert admission.reservation is not None
    server.stop()

    async def come_back() -> None:
        await asyncio.sleep(0.02)
        await asyncio.to_thread(server.start)

    returning = asyncio.create_task(come_back())
    assert await store.settle(admission.reservation, Cost(image_out_tokens=70), outcome="ok")
    await returning
    assert _value(metrics.settlements_retried) == 1
    # The restarted server lost the reservation record: settle used the caller's copy, once.
    assert not await store.settle(admission.reservation, Cost(image_out_tokens=70), outcome="ok")
    status = {s.limit: s for s in await store.limit_status(p)}
    assert status["tokens_per_day"].used == 0  # the day counter was lost with the data; never negative
    await store.close()


@pytest.mark.parametrize("cluster", [False, True], ids=["standalone", "cluster"])
async def test_an_unreachable_store_at_start_is_not_fatal(cluster: bool) -> None:
    url = f"redis://127.0.0.1:{free_port()}"
    settings = StoreSettings(
        backend="redis", url=url, cluster=cluster, on_unavailable="fail_closed", timeout_ms=200
    )
    store = create_store(settings, Metrics(CollectorRegistry()))
    await store.start()
    admission = await store.reserve(
        plan(new_tenant(), tenant_settings(LIMITS)), ESTIMATE, request_id="r", model="m"
    )
    assert isinstance(admission.error, StoreUnavailable)
    assert not await store.healthy()
    await store.close()
