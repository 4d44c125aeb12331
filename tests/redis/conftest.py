"""Fixtures for the store suite: one test body, run on the memory store, a standalone Redis and
a local three-master Redis Cluster (real servers started by tests/support/redis_servers.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.config import KeySettings, Limits, StoreSettings, TenantSettings
from gateway.limits import LimitPlan, create_store
from gateway.limits.limiter import LimitStore
from gateway.telemetry.metrics import Metrics
from tests.support.redis_servers import redis_cluster, redis_server, redis_server_factory  # noqa: F401

KEY_HASH = "sha256:" + "ab" * 32
OTHER_KEY_HASH = "sha256:" + "cd" * 32


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tenant_settings(
    limits: dict[str, Any] | None = None,
    *,
    key_limits: dict[str, Any] | None = None,
    user_limits: dict[str, Any] | None = None,
    shadow: bool = False,
) -> TenantSettings:
    return TenantSettings(
        policy="p",
        keys=[
            KeySettings(hash=KEY_HASH, name="ops", limits=Limits(**key_limits) if key_limits else None),
            KeySettings(hash=OTHER_KEY_HASH),
        ],
        limits=Limits(**(limits or {})),
        user_limits=Limits(**user_limits) if user_limits else None,
        limits_mode="shadow" if shadow else "enforce",
    )


def new_tenant() -> str:
    return "t-" + uuid.uuid4().hex[:10]


@dataclass
class Backend:
    """One store backend for a test: builds stores, moves time, lists a tenant's raw keys."""

    name: str
    url: str = ""
    clock: FakeClock | None = None
    metrics: Metrics = field(default_factory=lambda: Metrics(CollectorRegistry()))
    stores: list[LimitStore] = field(default_factory=list)
    _raw: Any = None

    @property
    def is_redis(self) -> bool:
        return self.name != "memory"

    def settings(self, **overrides: Any) -> StoreSettings:
        base: dict[str, Any] = {"backend": "redis" if self.is_redis else "memory"}
        if self.is_redis:
            base.update(url=self.url, cluster=self.name == "cluster", timeout_ms=2000)
        return StoreSettings(**{**base, **overrides})

    async def store(self, **overrides: Any) -> LimitStore:
        store = create_store(self.settings(**overrides), self.metrics, clock=self.clock)
        assert isinstance(store, LimitStore)
        await store.start()
        self.stores.append(store)
        return store

    async def elsewhere(self, store: LimitStore, **overrides: Any) -> LimitStore:
        """Another process's store beside `store`, under these settings: a new one on Redis; on the
        memory store, which is one process, `store`'s own engine under them."""
        if self.is_redis:
            return await self.store(**overrides)
        assert self.clock is not None
        return LimitStore(store.engine, self.settings(**overrides), self.metrics, self.clock)

    async def advance(self, seconds: float) -> None:
        """Let time pass: the fake clock jumps; Redis's TIME needs a real wait."""
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)

    def raw(self) -> Any:
        if self._raw is None:
            self._raw = (
                RedisCluster.from_url(self.url) if self.name == "cluster" else Redis.from_url(self.url)
            )
        return self._raw

    async def keys(self, store: LimitStore, tenant: str) -> dict[str, float]:
        """Every live key of `tenant`, with its remaining TTL in seconds (-1: none)."""
        prefix = f"igw:{{{tenant}}}:"
        if not self.is_redis:
            engine: Any = store.engine
            assert self.clock is not None
            now = self.clock.now
            return {
                key: -1.0 if at is None else at / 1e6 - now
                for key, at in engine.live_keys().items()
                if key.startswith(prefix)
            }
        found = {}
        async for key in self.raw().scan_iter(match=prefix.replace("{", "\\{").replace("}", "\\}") + "*"):
            ttl_ms = await self.raw().pttl(key)
            found[key.decode()] = ttl_ms / 1000 if ttl_ms >= 0 else -1.0
        return found

    async def close(self) -> None:
        for store in self.stores:
            await store.close()
        if self._raw is not None:
            await self._raw.aclose()


BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("cluster", id="cluster", marks=pytest.mark.redis),
]


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    name = request.param
    if name == "memory":
        made = Backend(name, clock=FakeClock(time.time()))
    elif name == "redis":
        made = Backend(name, url=request.getfixturevalue("redis_server").url)
    else:
        made = Backend(name, url=request.getfixturevalue("redis_cluster").url)
    yield made
    await made.close()


def plan(tenant: str, settings: TenantSettings, *, key_index: int = 0, user: str | None = None) -> LimitPlan:
    return LimitPlan.build(tenant, settings, settings.keys[key_index], key_index, user)
