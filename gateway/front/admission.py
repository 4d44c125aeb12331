"""Load shedding: a bound on the requests this process is deciding at once, and on each tenant's share.

A request counts from the moment its key is verified until its admission is decided (refused,
admitted, or failed on the way), its body's arrival included. Under a burst larger than the process
can decide promptly, the work waiting for the event loop grows without bound and every request gets
slower, including the ones that will be refused. Beyond `server.max_pending_admissions`, a new
request is refused at once, before its body is read, with 503 `overloaded` and `Retry-After`,
counted in `gateway_load_shed_total`: an explicit, cheap answer that clients retry, never mistaken
for a store outage (the store's own timeouts exclude this process's lag; see limits/resp.py).

One tenant may hold at most `server.max_tenant_share` of those places: a tenant with many slow
bodies in flight (or a burst of its own) would otherwise take them all, and every other tenant
would be shed with it. Beyond its share, its next request is a 429 `rate_limit_exceeded` that names
the bound, at once and before its body is read, while other tenants are served; 503 `overloaded`
keeps meaning that the whole process is. Its own limits (`concurrent_requests`...) cannot do this:
the store is asked only once the body has arrived. The bounds are this process's (per worker); a
tenant's share is its request's configuration's (`Settings.tenant_pending_admissions`), so by
default it follows the number of tenants at a reload.
"""

from __future__ import annotations

from types import TracebackType

from gateway.errors import Overloaded, RateLimited
from gateway.telemetry.metrics import KeptGauge, Metrics

RETRY_AFTER_SECONDS = 1


def hold(by_tenant: dict[str, int], tenant: str, change: int) -> None:
    """What `tenant` holds of a shared bound, changed by `change`; a tenant holding nothing is absent."""
    held = by_tenant.get(tenant, 0) + change
    if held:
        by_tenant[tenant] = held
    else:
        del by_tenant[tenant]


def over_share(metrics: Metrics, tenant: str, bound: str, message: str) -> RateLimited:
    """The 429 of a tenant past its share of `bound`, counted."""
    metrics.tenant_share_refused.labels(tenant, bound).inc()
    return RateLimited(message, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


class AdmissionQueue:
    """`with queue.place(tenant, share):` holds a place for the block's duration; entering a full
    queue raises Overloaded, entering it beyond the tenant's `share` (places) RateLimited."""

    def __init__(self, max_pending: int, metrics: Metrics) -> None:
        self.max_pending = max_pending
        self.pending = KeptGauge(metrics, metrics.pending_admissions)
        self.by_tenant: dict[str, int] = {}  # tenants holding places, and how many (none: absent)
        self._metrics = metrics

    def place(self, tenant: str, share: int) -> Place:
        return Place(self, tenant, share)

    def enter(self, tenant: str, share: int) -> None:
        pending, held = self.pending, self.by_tenant.get(tenant, 0)
        if pending.value >= self.max_pending:
            self._metrics.load_shed.inc()
            raise Overloaded(
                "The gateway is overloaded and could not take the request. Retry shortly.",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        if held >= share:
            raise over_share(
                self._metrics,
                tenant,
                "pending_admissions",
                f"Tenant {tenant!r} has {held} requests waiting for their admission (their bodies"
                " arriving, or being decided) in this gateway process: its share,"
                f" {share}, is server.max_tenant_share of"
                " server.max_pending_admissions. Retry once some of them are decided.",
            )
        pending.value += 1
        hold(self.by_tenant, tenant, 1)

    def leave(self, tenant: str) -> None:
        self.pending.value -= 1
        hold(self.by_tenant, tenant, -1)


class Place:
    """One request's place in the queue, as a context manager."""

    __slots__ = ("queue", "share", "tenant")

    def __init__(self, queue: AdmissionQueue, tenant: str, share: int) -> None:
        self.queue = queue
        self.tenant = tenant
        self.share = share

    def __enter__(self) -> None:
        self.queue.enter(self.tenant, self.share)

    def __exit__(
        self, _type: type[BaseException] | None, _exc: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.queue.leave(self.tenant)
