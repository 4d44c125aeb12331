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

from gateway.config import StoreSettings
from gateway.errors import StoreUnavailable
from gateway.limits import create_store, limiter
from gateway.limits.calls import RenewCall
from gateway.telemetry.metrics import Metrics
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


async def test_after_a_flush_settles_still_reach_redis_before_the_next_reserves(
    redis_server: RedisServer,
) -> None:
    """Every call answers NOSCRIPT and runs again: in the order made all the same
    (`settles_in_order`). Each tenant (one request at a time) settles its request and starts its
    next one in the same turn: that reserve would be refused if it ran before the settle."""
    backend = Backend("redis", url=redis_server.url)
    store = await backend.store()
    assert store.settles_in_order
    plans = [plan(new_tenant(), tenant_settings({**LIMITS, "concurrent_requests": 1})) for _ in range(20)]
    held = [(await store.reserve(p, ESTIMATE, request_id="a", model="m")).reservation for p in plans]
    await backend.raw().script_flush()
    calls = []
    for p, reservation in zip(plans, held, strict=True):
        assert reservation is not None
        calls.append(store.settle(reservation, ESTIMATE, outcome="ok"))
        calls.append(store.reserve(p, ESTIMATE, request_id="b", model="m"))
    results = await asyncio.gather(*calls)
    assert results[0::2] == [True] * len(plans)
    assert [admission.allowed for admission in results[1::2]] == [True] * len(plans)
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
    assert len(keys) == 8  # three windows, a lease, two scoped buckets, the reservation, the ledger
    slots = {await backend.raw().cluster_keyslot(key) for key in keys}
    assert len(slots) == 1
    assert await store.settle(admission.reservation, ESTIMATE, outcome="ok")
    await backend.close()


def _value(metric: object) -> float:
    return metric._value.get()  # type: ignore[attr-defined]


async def delivered(metrics: Metrics, within: float = 10.0) -> None:
    """Wait until the outbox has handed everything to the store."""
    deadline = time.monotonic() + within
    while _value(metrics.settlements_pending):
        assert time.monotonic() < deadline, "the outbox did not empty in time"
        await asyncio.sleep(0.02)


async def raw_keys(url: str, tenant: str) -> list[str]:
    raw = Redis.from_url(url)
    try:
        return [key.decode() async for key in raw.scan_iter(match=f"igw:{{{tenant}}}:*")]
    finally:
        await raw.aclose()


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
        started = time.perf_counter()
        assert await store.settle(before.reservation, ESTIMATE, outcome="ok") is False  # never raises
        assert time.perf_counter() - started < 0.05  # the store is known down: straight to the outbox
    # One warning for the outage; the settlement waits for the store, and says so.
    assert [log["event"] for log in logs if log["log_level"] == "warning"] == ["store_unavailable"]
    assert [log["event"] for log in logs if log["log_level"] == "info"] == ["settlement_deferred"]
    assert _value(metrics.store_up) == 0
    assert _value(metrics.degraded_decisions.labels(mode)) == 1
    # fail_closed also queued the release of the reserve it could not confirm.
    assert _value(metrics.settlements_pending) == (1 if mode == "fail_open" else 2)
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
        await delivered(metrics)
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
        # ... to the calendar budgets, not to a per-minute limit whose minute has passed.
        assert status["requests_per_minute"].used == 1
    await store.close()
    assert _value(metrics.settlements_lost.labels("settle")) == 0


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
    # The store is still believed down (nothing has reached it since): the outbox delivers.
    assert await store.settle(stalled.reservation, Cost(image_out_tokens=5), outcome="ok") is False
    await delivered(metrics)
    status = {s.limit: s for s in await store.limit_status(p)}
    # Charged exactly once whether or not the stalled reserve ran once Redis resumed.
    assert status["tokens_per_day"].used == 1000 + 5
    await store.close()


async def test_a_settle_the_store_does_not_take_is_delivered_later_and_charged_once(
    redis_server_factory,
) -> None:
    server = redis_server_factory()
    metrics = Metrics(CollectorRegistry())
    store = create_store(StoreSettings(backend="redis", url=server.url, timeout_ms=100), metrics)
    await store.start()
    tenant = new_tenant()
    p = plan(tenant, tenant_settings({**LIMITS, "concurrent_requests": 1}))
    admission = await store.reserve(p, ESTIMATE, request_id="r", model="m")
    assert admission.reservation is not None
    # Redis answers nothing for 0.6 s, a new connection's PING included: after timeout_ms (and the
    # health check's own) the settle is left to the outbox, and may or may not have run by the
    # time the outbox tries again.
    server.cli("CLIENT", "PAUSE", "600", "ALL")
    started = time.perf_counter()
    assert await store.settle(admission.reservation, Cost(image_out_tokens=70), outcome="ok") is False
    assert time.perf_counter() - started < 0.5  # the request is not held for the outage
    assert _value(metrics.settlements_retried) == 1 and _value(metrics.settlements_pending) == 1
    await delivered(metrics)
    assert not await store.settle(admission.reservation, Cost(image_out_tokens=70), outcome="ok")
    status = {s.limit: s for s in await store.limit_status(p)}
    assert status["tokens_per_day"].used == 70  # the estimate replaced once, never twice
    assert status["concurrent_requests"].used == 0
    [row] = await store.ledger(admission.reservation.day, admission.reservation.day, tenant)
    assert (row.requests, row.tokens) == (1, 70)
    await store.close()


@pytest.mark.parametrize("connection", ["lean", "redis-py"])
@pytest.mark.parametrize("how", ["reply_too_late", "cancelled_while_waiting"])
async def test_a_reserve_nobody_will_settle_is_released(
    redis_server_factory, how: str, connection: str
) -> None:
    """fail_closed answered 503, or the request was cancelled, while the reserve sat in a paused
    Redis: if Redis runs it, the lease and the estimate must not stay charged. On the lean
    connection a reply is too late once a health check gets no answer either (the connection is
    dropped); through redis-py (TLS, a cluster) once timeout_ms has passed, its reply read later."""
    server = redis_server_factory()
    metrics = Metrics(CollectorRegistry())
    mode = "fail_closed" if how == "reply_too_late" else "fail_open"
    settings = StoreSettings(backend="redis", url=server.url, timeout_ms=100, on_unavailable=mode)
    client = Redis.from_url(server.url, socket_timeout=2) if connection == "redis-py" else None
    store = create_store(settings, metrics, redis_client=client)
    await store.start()
    tenant = new_tenant()
    p = plan(tenant, tenant_settings({**LIMITS, "concurrent_requests": 1}))
    assert (await store.reserve(p, ESTIMATE, request_id="warm", model="m")).reservation is not None
    warm_status = {s.limit: s.used for s in await store.limit_status(p)}
    server.cli("CLIENT", "PAUSE", "500", "ALL" if connection == "lean" else "WRITE")
    if how == "reply_too_late":
        refused = await store.reserve(p, ESTIMATE, request_id="late", model="m")
        assert isinstance(refused.error, StoreUnavailable)
    else:
        waiting = asyncio.create_task(store.reserve(p, ESTIMATE, request_id="cancelled", model="m"))
        await asyncio.sleep(0.03)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    assert _value(metrics.settlements_pending) == 1
    await delivered(metrics)
    await asyncio.sleep(0.6)  # past the pause, whatever order Redis ran the two in
    status = {s.limit: s.used for s in await store.limit_status(p)}
    assert status["tokens_per_day"] == warm_status["tokens_per_day"]
    assert status["concurrent_requests"] == 1  # only the warm-up's lease
    [record] = [key for key in await raw_keys(server.url, tenant) if ":rsv:" in key]
    assert record.split(":rsv:")[1].startswith("warm.")  # the released one left nothing behind
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


async def test_a_degraded_reservation_whose_reserve_ran_late_settles_like_any_other(
    redis_server_factory,
) -> None:
    """fail_open admitted blind while the reserve sat in a paused Redis; the reserve then ran. Its
    settle must find the record and replace the estimate, counting the request once. (Through
    redis-py, whose calls time out while their replies are still read; the lean connection drops
    a connection it gives up on, so there the reserve may or may not run.)"""
    server = redis_server_factory()
    metrics = Metrics(CollectorRegistry())
    settings = StoreSettings(backend="redis", url=server.url, timeout_ms=100, on_unavailable="fail_open")
    store = create_store(settings, metrics, redis_client=Redis.from_url(server.url, socket_timeout=2))
    await store.start()
    tenant = new_tenant()
    p = plan(tenant, tenant_settings({**LIMITS, "requests_per_minute": 10}))  # drains 1 per 6 s
    assert (await store.reserve(p, ESTIMATE, request_id="warm", model="m")).allowed
    server.cli("CLIENT", "PAUSE", "400", "ALL")
    blind = await store.reserve(p, ESTIMATE, request_id="blind", model="m")
    assert blind.reservation is not None and blind.reservation.degraded
    await asyncio.sleep(0.6)  # the paused reserve has run by now, its reply read and dropped
    ran = {s.limit: s.used for s in await store.limit_status(p)}
    assert (ran["requests_per_minute"], ran["tokens_per_day"]) == (2, 2000)
    await store.settle(blind.reservation, Cost(image_out_tokens=5), outcome="ok")
    await delivered(metrics)
    after = {s.limit: s.used for s in await store.limit_status(p)}
    assert after["requests_per_minute"] == 2  # the request still counts
    assert after["tokens_per_day"] == 1000 + 5
    await store.close()


async def test_a_shadow_tenant_is_served_when_fail_closed_cannot_reach_the_store() -> None:
    url = f"redis://127.0.0.1:{free_port()}"
    store = create_store(
        StoreSettings(backend="redis", url=url, on_unavailable="fail_closed", timeout_ms=200),
        Metrics(CollectorRegistry()),
    )
    await store.start()
    tenant = new_tenant()
    shadow = await store.reserve(
        plan(tenant, tenant_settings(LIMITS, shadow=True)), ESTIMATE, request_id="s", model="m"
    )
    enforced = await store.reserve(plan(tenant, tenant_settings(LIMITS)), ESTIMATE, request_id="e", model="m")
    assert shadow.allowed and shadow.reservation is not None and shadow.reservation.degraded
    assert not enforced.allowed and isinstance(enforced.error, StoreUnavailable)
    await store.close()


async def test_a_settle_the_store_refuses_for_good_is_given_up_not_retried_forever(
    redis_server_factory,
) -> None:
    """A script error is an answer, not an outage: the store stays up, the settlement is logged with
    its amounts and counted lost at once, and nothing waits in the outbox behind it."""
    server = redis_server_factory()
    metrics = Metrics(CollectorRegistry())
    store = create_store(StoreSettings(backend="redis", url=server.url, timeout_ms=300), metrics)
    await store.start()
    tenant = new_tenant()
    p = plan(tenant, tenant_settings(LIMITS))
    admission = await store.reserve(p, ESTIMATE, request_id="r", model="m")
    assert admission.reservation is not None
    [day_key] = [c.key for c in admission.reservation.checks if c.kind.name == "tokens_per_day"]
    server.cli("DEL", day_key)
    server.cli("HSET", day_key, "not", "a counter")  # settle's INCRBY on it fails inside the script
    with capture_logs() as logs:
        assert await store.settle(admission.reservation, Cost(image_out_tokens=70), outcome="ok") is False
    [lost] = [line for line in logs if line["event"] == "settlement_lost"]
    assert (lost["reason"], lost["reservation"]) == ("rejected", admission.reservation.id)
    assert lost["ledger"]["image_out_tokens:m"] == 70
    assert "store_rejected" in [line["event"] for line in logs]
    assert _value(metrics.settlements_lost.labels("settle")) == 1
    assert _value(metrics.settlements_pending) == 0
    assert _value(metrics.store_up) == 1 and await store.healthy()
    await store.close()


async def test_a_client_of_the_callers_own_serves_script_calls_through_redis_py(
    redis_server: RedisServer,
) -> None:
    """TLS and unix-socket URLs (which the lean connection does not speak) and a caller's own client
    send script calls through redis-py, one pooled connection per batch: same answers."""
    raw = Redis.from_url(redis_server.url)
    store = create_store(
        StoreSettings(backend="redis", url=redis_server.url), Metrics(CollectorRegistry()), redis_client=raw
    )
    await store.start()
    tenant = new_tenant()
    p = plan(tenant, tenant_settings(LIMITS))
    first, second = await asyncio.gather(
        store.reserve(p, ESTIMATE, request_id="a", model="m"),
        store.reserve(p, ESTIMATE, request_id="b", model="m"),
    )  # one batch
    assert first.reservation is not None and second.reservation is not None
    await raw.script_flush()  # the next call finds no script and loads it again
    assert await store.settle(first.reservation, Cost(image_out_tokens=10), outcome="ok")
    assert await store.settle(second.reservation, Cost(image_out_tokens=20), outcome="ok")
    status = {s.limit: s.used for s in await store.limit_status(p)}
    assert status["tokens_per_day"] == 30
    await store.close()


async def test_a_held_reservation_keeps_its_lease_past_the_ttl_until_settled(
    redis_server: RedisServer,
) -> None:
    metrics = Metrics(CollectorRegistry())
    store = create_store(StoreSettings(backend="redis", url=redis_server.url, lease_ttl_seconds=1), metrics)
    await store.start()
    p = plan(new_tenant(), tenant_settings({"concurrent_requests": 1}))
    running = await store.reserve(p, ESTIMATE, request_id="running", model="m")
    assert running.reservation is not None
    store.hold(running.reservation)
    await asyncio.sleep(1.6)  # past the TTL: renewed meanwhile
    assert not (await store.reserve(p, ESTIMATE, request_id="second", model="m")).allowed
    assert await store.settle(running.reservation, ESTIMATE, outcome="ok")
    assert (await store.reserve(p, ESTIMATE, request_id="third", model="m")).allowed
    renewals = metrics.registry.get_sample_value(
        "gateway_store_latency_seconds_count", {"operation": "renew"}
    )
    assert renewals is not None and renewals >= 3
    await store.close()


async def test_held_leases_are_renewed_a_batch_at_a_time(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With many streams open, a renewal round goes to Redis in batches of RENEW_BATCH, so the event
    loop serves other requests between two batches; every lease is still renewed."""
    monkeypatch.setattr(limiter, "RENEW_BATCH", 2)
    metrics = Metrics(CollectorRegistry())
    store = create_store(StoreSettings(backend="redis", url=redis_server.url, lease_ttl_seconds=1), metrics)
    await store.start()
    engine = store.engine  # type: ignore[attr-defined]
    renew = engine.renew
    in_flight, most = 0, 0

    async def counted(call: RenewCall) -> int:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            return int(await renew(call))
        finally:
            in_flight -= 1

    monkeypatch.setattr(engine, "renew", counted)
    p = plan(new_tenant(), tenant_settings({"concurrent_requests": 5}))
    running = [await store.reserve(p, ESTIMATE, request_id=f"r{i}", model="m") for i in range(5)]
    for admission in running:
        assert admission.reservation is not None
        store.hold(admission.reservation)
    await asyncio.sleep(1.6)  # past the TTL: every lease renewed meanwhile, two at a time
    assert not (await store.reserve(p, ESTIMATE, request_id="sixth", model="m")).allowed
    assert most == 2
    renewals = metrics.registry.get_sample_value(
        "gateway_store_latency_seconds_count", {"operation": "renew"}
    )
    assert renewals is not None and renewals >= 10
    for admission in running:
        assert admission.reservation is not None
        assert await store.settle(admission.reservation, ESTIMATE, outcome="ok")
    await store.close()
