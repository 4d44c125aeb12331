"""The limiter suite: every test runs on the memory store, a standalone Redis and a Redis Cluster.

Time-dependent steps use `backend.advance`, which moves the memory store's fake clock and
really waits on Redis (whose TIME is the only clock the scripts trust), so waits stay short.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from gateway.errors import QuotaExceeded, RateLimited
from gateway.limits import Reservation, meters
from gateway.limits.calls import compile_release, compile_renew
from gateway.limits.headers import parse_duration_us
from gateway.limits.kinds import RATE_WINDOW_US
from gateway.limits.limiter import DECISION_METRICS_FLUSH_SECONDS
from policies.cost import MAX_REPORTED_TOKENS, NANO_PER_USD, Cost
from tests.redis.conftest import Backend, new_tenant, plan, tenant_settings

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ONE = Cost(images=1, image_out_tokens=1000, nano_usd=40_000_000)


def used(statuses: list, scope: str, limit: str) -> int:
    return next(s.used for s in statuses if s.scope == scope and s.limit == limit)


def decisions(backend: Backend, tenant: str, limit: str, decision: str) -> float | None:
    """`gateway_ratelimit_decisions_total` as a scrape reads it (the store counts in batches)."""
    labels = {"tenant": tenant, "limit": limit, "decision": decision}
    return backend.metrics.registry.get_sample_value("gateway_ratelimit_decisions_total", labels)


async def reserve(store, limit_plan, cost=ONE, model="gpt-image-1.5"):
    return await store.reserve(limit_plan, cost, request_id="req", model=model)


async def test_a_limit_of_n_admits_a_burst_of_n_then_rejects_with_headers(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings({"requests_per_minute": 3}))
    admitted = [await reserve(store, p) for _ in range(3)]
    assert all(a.allowed for a in admitted)
    assert [a.headers["x-ratelimit-remaining-requests"] for a in admitted] == ["2", "1", "0"]
    rejected = await reserve(store, p)
    assert not rejected.allowed and rejected.reservation is None
    assert isinstance(rejected.error, RateLimited)
    assert "requests_per_minute" in rejected.error.message and "limit 3" in rejected.error.message
    headers = rejected.headers
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["RateLimit-Policy"] == '"rpm";q=3;w=60'
    # One request frees every 20 s: the reply may not send the client back any earlier.
    retry_ms = int(headers["retry-after-ms"])
    assert 19_900 <= retry_ms <= 20_000
    assert headers["Retry-After"] == "20"
    assert headers["RateLimit"] == '"rpm";r=0;t=20'
    assert rejected.error.headers["Retry-After"] == "20"


async def test_a_rejected_request_consumes_nothing_and_is_counted(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    settings = tenant_settings({"requests_per_minute": 10, "tokens_per_day": 1500, "concurrent_requests": 5})
    p = plan(tenant, settings)
    assert (await reserve(store, p)).allowed
    refused = await reserve(store, p)  # 1000 more tokens would pass 1500
    assert isinstance(refused.error, QuotaExceeded)
    assert refused.error.headers["x-should-retry"] == "false"
    assert "tokens_per_day" in refused.error.message and "resets at" in refused.error.message
    statuses = await store.limit_status(p)
    assert used(statuses, "tenant", "requests_per_minute") == 1
    assert used(statuses, "tenant", "tokens_per_day") == 1000
    assert used(statuses, "tenant", "concurrent_requests") == 1
    today = (
        datetime.now(UTC).date()
        if backend.clock is None
        else datetime.fromtimestamp(backend.clock.now, UTC).date()
    )
    [row] = await store.ledger(today, today, tenant)
    assert row.rejected_quota == 1 and row.rejected_rate == 0


async def test_all_scopes_pass_or_none_is_charged(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    settings = tenant_settings({"requests_per_minute": 5}, key_limits={"requests_per_minute": 1})
    by_ops, by_other = plan(tenant, settings), plan(tenant, settings, key_index=1)
    assert (await reserve(store, by_ops)).allowed
    refused = await reserve(store, by_ops)
    assert isinstance(refused.error, RateLimited) and "key 'ops'" in refused.error.message
    assert used(await store.limit_status(by_ops), "tenant", "requests_per_minute") == 1
    assert (await reserve(store, by_other)).allowed  # the other key has no limit of its own
    assert 'key-rpm";q=1;w=60' in refused.headers["RateLimit-Policy"]


async def test_end_users_are_limited_apart_and_never_named_in_keys(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    settings = tenant_settings(user_limits={"requests_per_minute": 1})
    assert (await reserve(store, plan(tenant, settings, user="alice@example.com"))).allowed
    assert not (await reserve(store, plan(tenant, settings, user="alice@example.com"))).allowed
    assert (await reserve(store, plan(tenant, settings, user="bob@example.com"))).allowed
    assert (await reserve(store, plan(tenant, settings))).allowed  # no user: no user limit
    keys = await backend.keys(store, tenant)
    assert not any("alice" in key or "bob" in key for key in keys)
    digest = hashlib.sha256(b"alice@example.com").hexdigest()[:24]
    assert any(f"user:{digest}" in key for key in keys)


async def test_settle_replaces_the_estimate_with_the_actual(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings({"tokens_per_day": 10_000, "usd_per_day": 10, "images_per_minute": 100}))
    lower = await reserve(store, p, Cost(images=2, image_out_tokens=1000, nano_usd=50_000_000))
    higher = await reserve(store, p, Cost(images=1, image_out_tokens=1000, nano_usd=50_000_000))
    assert lower.reservation and higher.reservation
    assert await store.settle(
        lower.reservation, Cost(images=1, image_out_tokens=400, nano_usd=20_000_000), outcome="ok"
    )
    # An estimate below the actual charges the difference: the only way to go over a budget.
    assert await store.settle(
        higher.reservation, Cost(images=1, image_out_tokens=1500, nano_usd=70_000_000), outcome="ok"
    )
    statuses = await store.limit_status(p)
    assert used(statuses, "tenant", "tokens_per_day") == 1900
    assert used(statuses, "tenant", "usd_per_day") == 90_000_000
    assert used(statuses, "tenant", "images_per_minute") == 2


async def test_settle_retried_charges_once(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings({"tokens_per_day": 10_000}))
    admission = await reserve(store, p)
    assert admission.reservation is not None
    actual = Cost(images=1, image_out_tokens=700, nano_usd=1)
    assert await store.settle(admission.reservation, actual, outcome="ok") is True
    assert await store.settle(admission.reservation, actual, outcome="ok") is False
    assert await store.settle(admission.reservation, Cost(), outcome="ok") is False
    assert used(await store.limit_status(p), "tenant", "tokens_per_day") == 700
    [row] = await store.ledger(admission.reservation.day, admission.reservation.day, tenant)
    assert (row.requests, row.images, row.image_out_tokens, row.nano_usd) == (1, 1, 700, 1)


async def test_a_refund_still_counts_the_request(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    p = plan(
        tenant, tenant_settings({"requests_per_minute": 5, "tokens_per_day": 10_000, "usd_per_month": 1})
    )
    admission = await reserve(store, p)
    assert admission.reservation is not None
    assert await store.settle(admission.reservation, Cost(), outcome="failed")
    statuses = await store.limit_status(p)
    assert used(statuses, "tenant", "requests_per_minute") == 1
    assert used(statuses, "tenant", "tokens_per_day") == 0
    assert used(statuses, "tenant", "usd_per_month") == 0
    [row] = await store.ledger(admission.reservation.day, admission.reservation.day, tenant)
    assert (row.requests, row.failed, row.tokens, row.nano_usd) == (1, 1, 0, 0)


async def test_settle_releases_the_lease_and_expiry_frees_a_lost_one(backend: Backend) -> None:
    store, tenant = await backend.store(lease_ttl_seconds=1), new_tenant()
    p = plan(tenant, tenant_settings({"concurrent_requests": 1}))
    first = await reserve(store, p)
    assert first.allowed and first.reservation
    refused = await reserve(store, p)
    assert isinstance(refused.error, RateLimited) and "concurrent_requests" in refused.error.message
    assert 0 < int(refused.headers["retry-after-ms"]) <= 1000
    await store.settle(first.reservation, ONE, outcome="ok")
    lost = await reserve(store, p)  # this one's process "crashes": never settled
    assert lost.allowed
    assert not (await reserve(store, p)).allowed
    await backend.advance(1.05)
    assert (await reserve(store, p)).allowed


async def test_a_running_request_keeps_its_lease_and_an_expired_one_is_not_taken_back(
    backend: Backend,
) -> None:
    store, tenant = await backend.store(lease_ttl_seconds=1), new_tenant()
    p = plan(tenant, tenant_settings({"concurrent_requests": 1}))
    running = await reserve(store, p)
    assert running.reservation is not None and running.reservation.holds_leases
    call = compile_renew(tenant, running.reservation.id, running.reservation.checks, store._settings)
    assert call is not None
    for _ in range(3):  # well past one lease TTL, renewed every 0.6 s
        await backend.advance(0.6)
        assert await store.engine.renew(call) == 1
        assert not (await reserve(store, p)).allowed
    await backend.advance(1.05)  # not renewed: expired, as a crashed gateway's would
    assert await store.engine.renew(call) == 0
    assert (await reserve(store, p)).allowed
    keys = await backend.keys(store, tenant)
    assert all(ttl > 0 for ttl in keys.values()), keys


async def test_per_minute_limits_refill_smoothly(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings({"images_per_minute": 600}))  # one image per 100 ms
    assert (await reserve(store, p, Cost(images=600))).allowed
    refused = await reserve(store, p, Cost(images=1))
    assert isinstance(refused.error, RateLimited)
    assert 1 <= int(refused.headers["retry-after-ms"]) <= 100
    await backend.advance(0.25)
    assert (await reserve(store, p, Cost(images=2))).allowed
    assert not (await reserve(store, p, Cost(images=2))).allowed


async def test_retry_after_agrees_with_the_limiter(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings({"images_per_minute": 60}))
    assert (await reserve(store, p, Cost(images=60))).allowed
    refused = await reserve(store, p, Cost(images=30))
    retry_ms = int(refused.headers["retry-after-ms"])
    assert 29_900 <= retry_ms <= 30_000  # 30 images at one per second
    assert int(refused.headers["Retry-After"]) * 1000 >= retry_ms
    t = int(refused.headers["RateLimit"].rsplit("t=", 1)[1])
    assert int(refused.headers["Retry-After"]) >= t
    reset_us = parse_duration_us(refused.headers["x-ratelimit-reset-images"])  # until all 60 are back
    assert reset_us is not None and 59_000_000 <= reset_us <= 60_000_000
    await backend.advance(0.2)
    again = await reserve(store, p, Cost(images=30))
    assert int(again.headers["retry-after-ms"]) <= retry_ms - 150


async def test_a_request_larger_than_a_limit_is_not_retryable(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings({"tokens_per_minute": 500}))
    refused = await reserve(store, p)
    assert isinstance(refused.error, QuotaExceeded) and "can never be admitted" in refused.error.message
    assert "Retry-After" not in refused.headers
    zero = plan(tenant, tenant_settings({"concurrent_requests": 0}))
    assert isinstance((await reserve(store, zero)).error, QuotaExceeded)


async def test_shadow_mode_serves_counts_and_charges(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings({"requests_per_minute": 1, "usd_per_day": 0.05}, shadow=True))
    first, second = await reserve(store, p), await reserve(store, p)
    assert first.allowed and second.allowed and second.error is None
    assert first.shadow_rejections == []
    assert sorted(second.shadow_rejections) == ["tenant.requests_per_minute", "tenant.usd_per_day"]
    assert used(await store.limit_status(p), "tenant", "requests_per_minute") == 2
    assert second.reservation is not None
    [row] = await store.ledger(second.reservation.day, second.reservation.day, tenant)
    assert row.shadow_rejected == 1 and row.rejected_rate == row.rejected_quota == 0
    assert decisions(backend, tenant, "requests_per_minute", "shadow") == 1


async def test_one_shadowed_limit_is_counted_while_the_others_are_enforced(backend: Backend) -> None:
    """`usd_per_day: {value, mode: shadow}` dark-launches that budget alone (as envoyproxy/ratelimit
    does per rule): over it, requests are served and counted; the enforced limit still rejects."""
    store, tenant = await backend.store(), new_tenant()
    limits = {"requests_per_minute": 3, "usd_per_day": {"value": 0.05, "mode": "shadow"}}
    p = plan(tenant, tenant_settings(limits))
    first, second, third = [await reserve(store, p) for _ in range(3)]
    assert first.allowed and first.shadow_rejections == []
    assert second.allowed and second.shadow_rejections == ["tenant.usd_per_day"]  # over $0.05: served
    assert third.allowed and third.shadow_rejections == ["tenant.usd_per_day"]
    fourth = await reserve(store, p)  # the enforced per-minute limit still binds
    assert isinstance(fourth.error, RateLimited) and "requests_per_minute" in fourth.error.message
    assert first.reservation is not None
    [row] = await store.ledger(first.reservation.day, first.reservation.day, tenant)
    assert (row.shadow_rejected, row.rejected_rate, row.rejected_quota) == (2, 1, 0)
    assert decisions(backend, tenant, "usd_per_day", "shadow") == 3  # the fourth's reading too
    assert decisions(backend, tenant, "requests_per_minute", "over_limit") == 1


async def test_decision_metrics_reach_the_metric_values_without_a_scrape(backend: Backend) -> None:
    """With workers, a scrape reads every worker's metric files, not this process's registry: the
    counts kept back get there by themselves within DECISION_METRICS_FLUSH_SECONDS."""
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings({"requests_per_minute": 10, "tokens_per_day": 10**9}))
    for _ in range(3):
        assert (await reserve(store, p)).allowed
    child = backend.metrics.ratelimit_decisions.labels(tenant, "requests_per_minute", "ok")
    left = backend.metrics.budget_remaining.labels(tenant, "requests_per_minute")
    assert child._value.get() == 0  # not yet: counted in the store's own dict
    await asyncio.sleep(DECISION_METRICS_FLUSH_SECONDS + 0.5)
    assert child._value.get() == 3 and left._value.get() == 7


async def test_headers_on_every_answer_name_every_policy(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    limits = {
        "requests_per_minute": 60,
        "tokens_per_minute": 100_000,
        "tokens_per_day": 5_000_000,
        "images_per_minute": 30,
        "usd_per_day": 50,
        "usd_per_month": 500,
        "concurrent_requests": 4,
    }
    admission = await reserve(store, plan(tenant, tenant_settings(limits)))
    h = admission.headers
    assert h["x-ratelimit-remaining-tokens"] == "99000"  # the per-minute limit is the tighter one
    assert (h["x-ratelimit-limit-usd"], h["x-ratelimit-remaining-usd"]) == ("50", "49.96")
    assert h["x-ratelimit-limit-images"] == "30" and h["x-ratelimit-remaining-images"] == "29"
    reset_us = parse_duration_us(h["x-ratelimit-reset-requests"])  # one request frees in a second
    assert reset_us is not None and 900_000 <= reset_us <= 1_000_000
    policy = h["RateLimit-Policy"]
    for item in (
        '"rpm";q=60;w=60',
        '"tpd";q=5000000;w=86400',
        '"usd-day";q=50000000;w=86400',
        '"ipm";q=30;w=60',
    ):
        assert item in policy
    assert "concurrency" not in policy
    assert h["RateLimit"].startswith('"ipm";r=29;t=')


async def test_every_key_expires_and_settling_leaves_no_reservation(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    limits = {
        "requests_per_minute": 60,
        "tokens_per_day": 5_000_000,
        "usd_per_month": 500,
        "concurrent_requests": 4,
    }
    p = plan(tenant, tenant_settings(limits, user_limits={"images_per_minute": 5}), user="u1")
    admissions = [await reserve(store, p) for _ in range(3)]
    keys = await backend.keys(store, tenant)
    assert sum(":rsv:" in key for key in keys) == 3
    assert all(ttl > 0 for ttl in keys.values()), keys
    for admission in admissions:
        assert admission.reservation is not None
        await store.settle(admission.reservation, ONE, outcome="ok")
    keys = await backend.keys(store, tenant)
    assert not any(":rsv:" in key or ":lease:" in key for key in keys), keys
    assert all(ttl > 0 for ttl in keys.values()), keys


async def test_ledger_rows_per_model_and_day(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings({"requests_per_minute": 2}))
    days = set()
    for model in ("gpt-image-1.5", "gpt-image-2", "gpt-image-1.5"):
        admission = await reserve(store, p, model=model)
        if admission.reservation:
            days.add(admission.reservation.day)
            actual = Cost(images=1, text_in_tokens=10, image_out_tokens=100, nano_usd=5)
            await store.settle(admission.reservation, actual, outcome="ok")
    [day] = days
    rows = {r.model: r for r in await store.ledger(day, day, tenant)}
    assert rows["gpt-image-1.5"].requests == 1 and rows["gpt-image-1.5"].rejected_rate == 1
    assert rows["gpt-image-2"].requests == 1 and rows["gpt-image-2"].tokens == 110
    everyone = await store.ledger(day, day)
    assert {r.tenant for r in everyone} >= {tenant}


async def test_a_reservation_settles_from_another_process(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings({"tokens_per_day": 10_000, "concurrent_requests": 1}))
    admission = await reserve(store, p)
    assert admission.reservation is not None
    # Another process's store, given only the serialised reservation (the memory store is one process).
    elsewhere = await backend.elsewhere(store)
    copy = Reservation.from_dict(admission.reservation.to_dict())
    assert copy == admission.reservation
    assert await elsewhere.settle(copy, Cost(image_out_tokens=250), outcome="ok")
    statuses = await store.limit_status(p)
    assert used(statuses, "tenant", "tokens_per_day") == 250
    assert used(statuses, "tenant", "concurrent_requests") == 0


async def test_a_settle_that_moves_no_ledger_field_still_sets_the_ledgers_expiry(backend: Backend) -> None:
    """Settled at exactly its estimate, a request moves no ledger field; the ledger's expiry is still
    set from the settling process's retention (settle.lua's EXPIREAT; the memory engine alike), as
    when a reload changed `ledger_retention_days` between the reserve and the settle."""
    store, tenant = await backend.store(ledger_retention_days=1), new_tenant()
    p = plan(tenant, tenant_settings({"tokens_per_day": 10_000}))
    admission = await reserve(store, p)
    assert admission.reservation is not None
    later = await backend.elsewhere(store, ledger_retention_days=5)
    assert await later.settle(admission.reservation, ONE, outcome="ok")
    [ttl] = [ttl for key, ttl in (await backend.keys(store, tenant)).items() if ":ledger:" in key]
    assert ttl > 4 * 86400  # five days past today's end, not one


async def test_reused_request_ids_keep_their_own_reservations(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings({"tokens_per_day": 10_000}))
    a, b = await reserve(store, p), await reserve(store, p)  # both "req": ids may come from clients
    assert a.reservation and b.reservation and a.reservation.id != b.reservation.id
    assert await store.settle(a.reservation, Cost(image_out_tokens=100), outcome="ok")
    assert await store.settle(b.reservation, Cost(image_out_tokens=200), outcome="ok")
    assert used(await store.limit_status(p), "tenant", "tokens_per_day") == 300


async def test_usd_limits_are_exact_in_nano_usd(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings({"usd_per_day": "0.3"}))
    tenth = Cost(nano_usd=NANO_PER_USD // 10)
    assert all([(await reserve(store, p, tenth)).allowed for _ in range(3)])
    refused = await reserve(store, p, tenth)
    assert isinstance(refused.error, QuotaExceeded) and "$0.3" in refused.error.message


async def test_a_tenant_without_limits_is_admitted_and_still_recorded(backend: Backend) -> None:
    store, tenant = await backend.store(), new_tenant()
    admission = await reserve(store, plan(tenant, tenant_settings()))
    assert admission.allowed and admission.reservation is not None and admission.headers == {}
    assert await store.settle(admission.reservation, ONE, outcome="ok")
    [row] = await store.ledger(admission.reservation.day, admission.reservation.day, tenant)
    assert (row.requests, row.images, row.nano_usd) == (1, 1, 40_000_000)
    assert not [
        key for key in await backend.keys(store, tenant) if ":ledger:" not in key and ":settled:" not in key
    ]


async def test_a_release_undoes_a_reserve_whichever_arrives_first(backend: Backend) -> None:
    """A reserve whose reply was lost is released: if it ran, its charges are refunded (the request
    itself still counts) and its lease freed; if it arrives after its release, it charges nothing."""
    store, tenant = await backend.store(), new_tenant()
    limits = {"requests_per_minute": 10, "tokens_per_day": 10_000, "concurrent_requests": 1}
    p = plan(tenant, tenant_settings(limits))
    ran = store._compile(p, ONE, "ran.1", "gpt-image-1.5", "enforce")
    assert (await store.engine.reserve(ran)).status == "admitted"
    assert await store.engine.settle(compile_release(ran, store._settings))
    late = store._compile(p, ONE, "late.1", "gpt-image-1.5", "enforce")
    assert await store.engine.settle(compile_release(late, store._settings))
    assert (await store.engine.reserve(late)).status == "settled"
    statuses = await store.limit_status(p)
    assert used(statuses, "tenant", "tokens_per_day") == 0
    assert used(statuses, "tenant", "concurrent_requests") == 0
    assert used(statuses, "tenant", "requests_per_minute") == 1  # the one that ran
    keys = await backend.keys(store, tenant)
    assert not any(":rsv:" in key or ":lease:" in key or ":ledger:" in key for key in keys), keys
    assert (await reserve(store, p)).allowed


async def test_a_reserve_named_for_another_day_changes_nothing_and_says_when_it_ran(backend: Backend) -> None:
    """The keys of a reserve are named for a UTC day; if the store's clock is on another, the call
    does nothing and answers with that clock, so the caller names its keys again."""
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings({"requests_per_minute": 10, "tokens_per_day": 10_000}))
    call = store._compile(p, ONE, "yesterday.1", "gpt-image-1.5", "enforce")
    call = replace(call, day=call.day - timedelta(days=1))
    reply = await store.engine.reserve(call)
    assert (reply.status, reply.readings) == ("wrong_day", ())
    assert reply.now_us > 0
    assert await backend.keys(store, tenant) == {}


async def test_the_ledger_charges_as_the_budgets_do_so_a_dead_gateways_work_stays_at_its_estimate(
    backend: Backend,
) -> None:
    """The ledger takes an admitted request's estimate at reserve and its actual cost at settle,
    like the budgets. A gateway killed before settling leaves its request at the estimate in
    both, after its reservation record has expired too: the two always agree."""
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings({"tokens_per_day": 100_000, "usd_per_day": 100}))
    settled, orphan = await reserve(store, p), await reserve(store, p)
    assert settled.reservation is not None and orphan.reservation is not None
    actual = Cost(images=1, image_out_tokens=700, nano_usd=28_000_000)
    assert await store.settle(settled.reservation, actual, outcome="ok")

    async def ledger_and_budgets() -> tuple[tuple[int, int, int, int], tuple[int, int]]:
        day = orphan.reservation.day
        [row] = await store.ledger(day, day, tenant)
        statuses = await store.limit_status(p)
        return (row.requests, row.images, row.tokens, row.nano_usd), (
            used(statuses, "tenant", "tokens_per_day"),
            used(statuses, "tenant", "usd_per_day"),
        )

    in_flight = await ledger_and_budgets()
    assert in_flight == ((2, 2, 700 + 1000, 68_000_000), (700 + 1000, 68_000_000))
    # The orphan's gateway is gone: its record expires (here: is removed), nobody settles it.
    record = orphan.reservation.id
    record_key = next(key for key in await backend.keys(store, tenant) if key.endswith(f":rsv:{record}"))
    if backend.is_redis:
        await backend.raw().delete(record_key)
    else:
        store.engine._delete(record_key)  # type: ignore[attr-defined]
    assert await ledger_and_budgets() == in_flight
    # A settle that does come late (a request longer than its record) still replaces it once.
    assert await store.settle(orphan.reservation, actual, outcome="ok")
    assert await ledger_and_budgets() == ((2, 2, 1400, 56_000_000), (1400, 56_000_000))


@pytest.mark.parametrize("written", ["400 20000000", "[400,20000000]"])
async def test_a_record_settles_by_its_own_amounts_not_the_callers_copy(
    backend: Backend, written: str
) -> None:
    """reserve.lua writes the amounts it charged as a JSON array; before, as space-separated words.
    A reservation made by the earlier script (a journal replayed after an upgrade, a rolling
    deploy) settles against the amounts in its record, read in that format, not the caller's copy;
    so does one whose record is not the one its caller expects (settle.lua reads the caller's copy
    only when the record is exactly what it would have written)."""
    if not backend.is_redis:
        pytest.skip("the record's format is the scripts' own")
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings({"tokens_per_day": 100_000, "usd_per_day": 100}))
    admission = await reserve(store, p)
    assert admission.reservation is not None
    record_key = next(key for key in await backend.keys(store, tenant) if ":rsv:" in key)
    assert await backend.raw().get(record_key) == b"[1000,40000000]"
    await backend.raw().set(record_key, written, px=60_000)
    assert await store.settle(
        admission.reservation, Cost(images=1, image_out_tokens=700, nano_usd=28_000_000), outcome="ok"
    )
    statuses = await store.limit_status(p)
    assert used(statuses, "tenant", "tokens_per_day") == 1000 - 400 + 700
    assert used(statuses, "tenant", "usd_per_day") == 40_000_000 - 20_000_000 + 28_000_000


async def test_a_budget_a_settle_takes_below_zero_restarts_at_zero_and_still_expires(
    backend: Backend,
) -> None:
    """settle.lua sets a period counter's expiry only when it makes the key or resets it to zero
    (the key holds it otherwise): the reset, which drops it, must set it again."""
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings({"tokens_per_day": 100_000}))
    admission = await reserve(store, p)
    assert admission.reservation is not None
    counter = next(key for key in await backend.keys(store, tenant) if ":window:" in key)
    if backend.is_redis:  # the counter went lower meanwhile (here: by hand), below this estimate
        await backend.raw().set(counter, 300, keepttl=True)
    else:
        store.engine._data[counter] = 300  # type: ignore[attr-defined]
    assert await store.settle(admission.reservation, Cost(), outcome="ok")
    assert used(await store.limit_status(p), "tenant", "tokens_per_day") == 0
    keys = await backend.keys(store, tenant)
    assert keys[counter] > 0, keys


@pytest.mark.parametrize("seeded", [2**60, -(2**63)])
async def test_a_bucket_an_earlier_script_left_past_the_cap_still_answers(
    backend: Backend, seeded: int
) -> None:
    """An earlier reserve.lua charged a shadow limit without bound, so a bucket it wrote may hold a
    level past 2^53, where a double no longer moves by one (the scripts' exact ceiling division
    stepped forever there, and Redis stayed busy for every tenant), or one its %d wrapped past 2^63
    to a negative number (settle.lua failed on it, and the settlement was lost). Both scripts answer
    on either, and write the level back within the cap."""
    if not backend.is_redis:
        pytest.skip("only the scripts of an earlier version wrote such levels")
    store, tenant = await backend.store(), new_tenant()
    p = plan(tenant, tenant_settings({"tokens_per_minute": 1}, shadow=True))
    assert (await reserve(store, p)).allowed
    bucket = next(key for key in await backend.keys(store, tenant) if ":rate:" in key)

    async def seed() -> None:
        seconds, micros = await backend.raw().time()
        await backend.raw().set(bucket, f"{seeded} {seconds * 1_000_000 + micros}", px=60_000)

    async def level() -> int:
        return int((await backend.raw().get(bucket)).split()[0])

    await seed()
    admission = await asyncio.wait_for(reserve(store, p), 5)
    assert admission.allowed and admission.reservation is not None and not admission.reservation.degraded
    assert admission.shadow_rejections == ["tenant.tokens_per_minute"]
    assert 0 < await level() <= meters.LEVEL_CAP
    await seed()
    more = Cost(images=1, image_out_tokens=2000, nano_usd=80_000_000)  # charges 1000 tokens more
    assert await asyncio.wait_for(store.settle(admission.reservation, more, outcome="ok"), 5)
    assert 0 < await level() <= meters.LEVEL_CAP


@pytest.mark.parametrize("dark", ["tenant", "limit"])
async def test_a_shadow_bucket_stops_at_its_cap_and_every_engine_reads_the_same_numbers(
    backend: Backend, dark: str
) -> None:
    """A shadow limit (the tenant's mode, or the limit's own) is charged even when it refuses, so
    under sustained overage its bucket keeps filling. It stops at meters.LEVEL_CAP, where the
    scripts' doubles are still exact: reserve.lua wrote a level with %d, which past 2**63 wrapped to
    a negative number, read back as an empty bucket (and settle.lua failed on it), while the memory
    engine kept counting. Here both answer the reference arithmetic's numbers, to the microsecond."""
    store, tenant = await backend.store(), new_tenant()
    limit = {"value": 1, "mode": "shadow"} if dark == "limit" else 1
    p = plan(tenant, tenant_settings({"tokens_per_minute": limit}, shadow=dark == "tenant"))
    mode = "shadow" if p.shadow else "enforce"
    full = meters.rate_reading(meters.TOO_LARGE, 0, meters.LEVEL_CAP, 1, RATE_WINDOW_US)
    # The most usage the gateway believes (a billion tokens) charges 6e16: 154 of them passed 2**63.
    huge = Cost(image_out_tokens=MAX_REPORTED_TOKENS)
    for i in range(160):
        reply = await store.engine.reserve(store._compile(p, huge, f"huge.{i}", "gpt-image-1.5", mode))
        assert (reply.status, reply.readings) == ("admitted", (full,)), i
    # A cost the limit can hold waits as long as the level, drained since the last charge, says:
    # level + cost passes 2**53, so the script must not add them before it takes the capacity off.
    for i in range(8):
        stamp = reply.now_us
        call = store._compile(p, Cost(image_out_tokens=1), f"one.{i}", "gpt-image-1.5", mode)
        reply = await store.engine.reserve(call)
        level = meters.rate_level(meters.LEVEL_CAP, stamp, reply.now_us, 1)
        code, wait = meters.rate_decide(level, 1, 1, RATE_WINDOW_US)
        assert reply.readings == (replace(full, code=code, wait_us=wait),), i
    # A settle that charges the actual's excess stops at the cap too.
    admission = await reserve(store, p, Cost(image_out_tokens=1))
    assert admission.allowed and admission.reservation is not None
    assert await store.settle(admission.reservation, huge, outcome="ok")
    [status] = await store.limit_status(p)
    assert (status.used, status.remaining) == (full.used, 0)
    assert status.reset_seconds <= meters.LEVEL_CAP / 1e6
