"""The organisation's own quota at each upstream (`upstreams.<name>.limits`), shared by every tenant
and every gateway process.

It lives in the same store as the tenants' limits, with the same reserve/settle exactness: each
attempt at an upstream that has limits reserves the request's estimate against them (an atomic
reserve of the store, under the pseudo-tenant `upstream:<name>`, so its keys carry their own
Redis Cluster hash tag), and the request settles it once: with the actual usage at the upstream
that got the request's body, at nothing for one that failed before it could generate. A target
whose quota would be exceeded is skipped (spillover to the next target) without being sent.

Its ledger rows (`upstream:<name>`) are the provider's own accounting, kept out of the tenants'
ledger report. Decisions are counted in `gateway_ratelimit_decisions` under that tenant label and
what is left in `gateway_upstream_budget_remaining`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gateway.config import Limits, ProviderLimits
from gateway.limits import Admission, Reservation, Store
from gateway.limits.keys import PROVIDER_TENANT_PREFIX
from gateway.limits.kinds import configured
from gateway.limits.plan import LimitPlan, PlannedLimit, ScopePlan
from gateway.runtime import Target
from gateway.telemetry.metrics import Metrics
from policies.cost import Cost

_REMAINING = {
    "x-ratelimit-remaining-requests": "requests_per_minute",
    "x-ratelimit-remaining-images": "images_per_minute",
    "x-ratelimit-remaining-tokens": "tokens_per_minute",
}


def provider_plan(name: str, limits: ProviderLimits) -> LimitPlan | None:
    """The limit plan of upstream `name`'s quota; None when it has none."""
    planned = tuple(PlannedLimit(kind, value) for kind, value in configured(Limits(**limits.model_dump())))
    if not planned:
        return None
    return LimitPlan(PROVIDER_TENANT_PREFIX + name, (ScopePlan("provider", f"upstream '{name}'", planned),))


@dataclass(slots=True)
class Held:
    """A provider reservation taken for one attempt of a request."""

    upstream: str
    reservation: Reservation


class ProviderQuota:
    def __init__(self, store: Store, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._plans: dict[tuple[str, ProviderLimits], LimitPlan | None] = {}

    def _plan(self, target: Target) -> LimitPlan | None:
        limits = target.upstream.limits
        if limits is None:
            return None
        key = (target.upstream_name, limits)
        if key not in self._plans:
            self._plans[key] = provider_plan(target.upstream_name, limits)
        return self._plans[key]

    async def reserve(self, target: Target, cost: Cost, *, request_id: str, model: str) -> Admission | None:
        """Reserve `cost` against `target`'s upstream quota; None when it has no quota. A refused
        admission charged nothing; a store that cannot answer decides as for tenants."""
        plan = self._plan(target)
        if plan is None:
            return None
        admission = await self._store.reserve(plan, cost, request_id=request_id, model=model)
        for header, limit in _REMAINING.items():
            if header in admission.headers:
                self._metrics.upstream_budget_remaining.labels(target.upstream_name, limit).set(
                    float(admission.headers[header])
                )
        return admission

    async def settle(self, held: list[Held], last: str | None, actual: Cost, *, outcome: str) -> None:
        """Settle every provider reservation of a request: the one of `last` (the upstream tried
        last, which got the body) at `actual`, the others (attempts that failed before any image)
        at nothing."""
        await asyncio.gather(
            *(
                self._store.settle(one.reservation, actual, outcome=outcome)
                if one.upstream == last
                else self._store.settle(one.reservation, Cost(), outcome="failed")
                for one in held
            )
        )
