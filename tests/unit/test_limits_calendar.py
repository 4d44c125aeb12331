"""Calendar windows across UTC midnight and month ends, with an injected clock (memory store)."""

from __future__ import annotations

from datetime import UTC, date, datetime

from prometheus_client import CollectorRegistry

from gateway.config import KeySettings, Limits, StoreSettings, TenantSettings
from gateway.errors import QuotaExceeded
from gateway.limits import LimitPlan, create_store
from gateway.limits.limiter import LimitStore
from gateway.limits.memory import MemoryEngine
from gateway.telemetry.metrics import Metrics
from policies.cost import Cost

TENANT = TenantSettings(
    policy="p",
    keys=[KeySettings(hash="sha256:" + "e" * 64)],
    limits=Limits(tokens_per_day=1500, usd_per_month="0.1"),
)
PLAN = LimitPlan.build("team", TENANT, TENANT.keys[0], 0, None)
THOUSAND = Cost(image_out_tokens=1000, nano_usd=40_000_000)


class Clock:
    def __init__(self, when: datetime) -> None:
        self.now = when.timestamp()

    def __call__(self) -> float:
        return self.now


def _used(statuses: list, limit: str) -> int:
    return next(s.used for s in statuses if s.limit == limit)


async def test_day_and_month_windows_roll_over_at_utc_midnight() -> None:
    clock = Clock(datetime(2026, 3, 31, 23, 59, 59, 500_000, tzinfo=UTC))
    store = create_store(StoreSettings(), Metrics(CollectorRegistry()), clock=clock)
    await store.start()
    late = await store.reserve(PLAN, THOUSAND, request_id="late", model="m")
    assert late.reservation is not None and late.reservation.day == date(2026, 3, 31)
    refused = await store.reserve(PLAN, THOUSAND, request_id="refused", model="m")
    assert isinstance(refused.error, QuotaExceeded)
    assert "resets at 2026-04-01T00:00:00Z" in refused.error.message
    assert refused.headers["retry-after-ms"] == "500" and refused.headers["Retry-After"] == "1"

    clock.now += 1  # 00:00:00.5 on April 1st: a new day and a new month
    early = await store.reserve(PLAN, THOUSAND, request_id="early", model="m")
    assert early.allowed and early.reservation is not None and early.reservation.day == date(2026, 4, 1)
    # The March request settles against March's windows and ledger, not April's.
    assert await store.settle(late.reservation, Cost(image_out_tokens=200, nano_usd=1), outcome="ok")
    statuses = await store.limit_status(PLAN)
    assert _used(statuses, "tokens_per_day") == 1000
    assert _used(statuses, "usd_per_month") == 40_000_000
    [march, april] = await store.ledger(date(2026, 3, 31), date(2026, 4, 1))
    assert (march.day, march.tokens, march.rejected_quota) == (date(2026, 3, 31), 200, 1)
    assert (april.day, april.requests, april.tokens) == (date(2026, 4, 1), 1, 1000)  # in flight: its estimate


async def test_a_gateway_clock_on_another_day_defers_to_the_store_clock() -> None:
    store_clock = Clock(datetime(2026, 6, 1, 0, 0, 1, tzinfo=UTC))

    def gateway_clock() -> float:
        return store_clock.now - 5  # still May 31st here

    store = LimitStore(
        MemoryEngine(store_clock), StoreSettings(), Metrics(CollectorRegistry()), gateway_clock
    )
    admission = await store.reserve(PLAN, THOUSAND, request_id="r", model="m")
    assert admission.reservation is not None and admission.reservation.day == date(2026, 6, 1)
    assert all("2026-05" not in check.key for check in admission.reservation.checks)
