"""Connection pools toward the upstreams, and each tenant's share of them.

One pooled ClientSession per upstream holds at most its `max_connections` connections. A tenant
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

import aiohttp

from gateway.errors import UpstreamTimeout
from gateway.runtime import Target


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
        self._sessions: dict[tuple[str, int], aiohttp.ClientSession] = {}
        self._shares: dict[tuple[str, str, int], asyncio.Semaphore] = {}

    def session(self, target: Target) -> aiohttp.ClientSession:
        key = (target.upstream_name, target.upstream.max_connections)
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = _session(target.upstream.max_connections)
        return session

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
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()


def _session(max_connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=max_connections, limit_per_host=0, ttl_dns_cache=300, enable_cleanup_closed=True
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # and `transport` asks for `Accept-Encoding: identity`
        cookie_jar=aiohttp.DummyCookieJar(),  # an upstream's cookies are nobody's: never sent back
        timeout=aiohttp.ClientTimeout(total=None),
    )
