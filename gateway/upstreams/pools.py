"""Connection pools toward the upstreams, and each tenant's share of them.

One connection `Pool` per upstream holds at most its `max_connections` connections. A tenant
may hold at most `tenant_connections` of them at once (`max_connections_per_tenant`, by default a
quarter of the pool): its request beyond that waits for one of its own to end, within the
upstream's connect timeout, so one tenant's long streams exhaust only its own slice and another
tenant's fast request still finds a connection. The share is held from sending the request until
the response has been relayed (that is when the connection goes back to the pool).

A reload that changes `max_connections` gets a new pool; the old one serves what it started and
closes with the gateway. Bodies are relayed as received, so nothing is decompressed.
"""

from __future__ import annotations

import asyncio

from gateway.errors import UpstreamTimeout
from gateway.runtime import Target
from gateway.upstreams.client import Pool


class TenantShareBusy(UpstreamTimeout):
    """Every connection of the tenant's share of an upstream stayed busy for the connect timeout.
    Nothing was sent: the next target may be tried."""


class Share:
    """One held connection of a tenant's share; `release` (or leaving `with`) gives it back once."""

    __slots__ = ("_slots",)

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots: asyncio.Semaphore | None = slots

    def release(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.release()

    def __enter__(self) -> Share:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class Pools:
    def __init__(self) -> None:
        self._pools: dict[tuple[str, int], Pool] = {}
        self._shares: dict[tuple[str, str, int], asyncio.Semaphore] = {}

    def pool(self, target: Target) -> Pool:
        key = (target.upstream_name, target.upstream.max_connections)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = Pool(target.upstream.base_url, target.upstream.max_connections)
        return pool

    async def share(self, target: Target, tenant: str) -> Share:
        """One connection of `tenant`'s share of `target`'s upstream, held until released."""
        size = target.upstream.tenant_connections
        key = (target.upstream_name, tenant, size)
        slots = self._shares.get(key)
        if slots is None:
            slots = self._shares[key] = asyncio.Semaphore(size)
        if slots.locked():  # the share is busy: wait for one of the tenant's own to end, bounded
            try:
                async with asyncio.timeout(target.upstream.connect_timeout_seconds):
                    await slots.acquire()
            except TimeoutError:
                raise TenantShareBusy(
                    f"Upstream {target.upstream_name!r} had no free connection for this tenant within"
                    f" {target.upstream.connect_timeout_seconds:g} s"
                    f" (its share of {size} connections stayed busy).",
                    code="upstream_connect_timeout",
                ) from None
        else:  # a free slot is taken at once: no timer to arm and cancel
            await slots.acquire()
        return Share(slots)

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
