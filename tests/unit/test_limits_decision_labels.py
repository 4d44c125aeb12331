"""Rate-limit decision metrics use the operators' vocabulary: ok, near_limit, over_limit, shadow."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from gateway.config import KeySettings, Limits, StoreSettings, TenantSettings
from gateway.limits import LimitPlan, create_store
from gateway.telemetry.metrics import Metrics
from policies.cost import Cost

KEY = KeySettings(hash="sha256:" + "ef" * 32)


async def decisions_after(requests: int, mode: str) -> dict[str, float]:
    metrics = Metrics(CollectorRegistry())
    store = create_store(StoreSettings(), metrics, clock=lambda: 1_800_000_000.0)
    await store.start()
    tenant = TenantSettings(policy="p", keys=[KEY], limits=Limits(requests_per_minute=5), limits_mode=mode)
    plan = LimitPlan.build("team", tenant, KEY, 0, None)
    for i in range(requests):
        await store.reserve(plan, Cost(images=1), request_id=f"r{i}", model="m")
    await store.close()
    return {
        outcome: metrics.registry.get_sample_value(
            "gateway_ratelimit_decisions_total",
            {"tenant": "team", "limit": "requests_per_minute", "decision": outcome},
        )
        or 0.0
        for outcome in ("ok", "near_limit", "over_limit", "shadow")
    }


async def test_ok_then_near_limit_then_over_limit() -> None:
    assert await decisions_after(7, "enforce") == {"ok": 3, "near_limit": 2, "over_limit": 2, "shadow": 0}


async def test_shadow_mode_counts_would_be_rejections() -> None:
    counts = await decisions_after(7, "shadow")
    assert counts["shadow"] == 2 and counts["over_limit"] == 0
