"""Each tenant's share of the front door's process-wide bounds (`server.max_tenant_share`): the
places of requests waiting for their admission, and the bytes of bodies being read. A tenant at its
share gets a 429 at once, while other tenants still find room; the whole bound keeps its 503s."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from gateway.config import ServerSettings, Settings
from gateway.errors import Overloaded, RateLimited
from gateway.front.admission import AdmissionQueue
from gateway.front.auth import hash_key
from gateway.front.body import BodyBudget
from gateway.telemetry.metrics import Metrics


def refused(metrics: Metrics, tenant: str, bound: str) -> float:
    value = metrics.registry.get_sample_value(
        "gateway_tenant_share_refused_total", {"tenant": tenant, "bound": bound}
    )
    return value or 0.0


def settings(tenants: int, **server: object) -> Settings:
    names = [f"team-{i}" for i in range(tenants)]
    tenants = {name: {"policy": "open", "keys": [hash_key(f"sk-{name}")]} for name in names}
    return Settings(server=server, policies={"open": {}}, tenants=tenants)


def test_the_shares_are_fractions_of_the_bounds_and_never_none() -> None:
    shared = settings(2, max_pending_admissions=10, max_buffered_body_bytes=2**20, max_tenant_share=0.25)
    assert (shared.tenant_pending_admissions, shared.tenant_buffered_body_bytes) == (2, 2**18)
    assert settings(2, max_pending_admissions=1, max_tenant_share=0.25).tenant_pending_admissions == 1
    for wrong in (0, 1.5):
        with pytest.raises(ValueError, match="max_tenant_share"):
            ServerSettings(max_tenant_share=wrong)


def test_by_default_tenants_share_half_and_a_tenant_alone_has_it_all() -> None:
    assert settings(2).tenant_share == settings(3).tenant_share == 0.5
    assert settings(1).tenant_share == settings(0).tenant_share == 1.0
    alone = settings(1, max_pending_admissions=10)
    assert alone.tenant_pending_admissions == 10
    assert alone.tenant_buffered_body_bytes == alone.server.max_buffered_body_bytes
    assert settings(1, max_tenant_share=0.5).tenant_share == 0.5  # set: as set, even alone


def test_a_tenant_at_its_share_of_places_is_429_while_another_enters() -> None:
    metrics = Metrics(CollectorRegistry())
    queue = AdmissionQueue(4, metrics)
    with queue.place("greedy", 2), queue.place("greedy", 2):
        with pytest.raises(RateLimited) as raised, queue.place("greedy", 2):
            pass
        assert raised.value.status == 429 and raised.value.error_code == "rate_limit_exceeded"
        assert "server.max_tenant_share of server.max_pending_admissions" in raised.value.message
        assert raised.value.headers["Retry-After"] == "1"
        assert refused(metrics, "greedy", "pending_admissions") == 1
        with queue.place("other", 2), queue.place("other", 2):
            with pytest.raises(Overloaded), queue.place("third", 2):  # the whole queue is full: 503
                pass
    assert queue.pending.value == 0 and queue.by_tenant == {}
    with queue.place("greedy", 2):  # its places were given back
        pass


async def test_a_tenant_at_its_share_of_the_body_budget_is_429_while_another_reads() -> None:
    metrics = Metrics(CollectorRegistry())
    budget = BodyBudget(1000, metrics)
    await budget.take(300, "greedy", 400)
    with pytest.raises(RateLimited) as raised:
        await budget.take(300, "greedy", 400)  # 600 would pass its 400: refused, not queued
    assert raised.value.error_code == "rate_limit_exceeded"
    assert "server.max_tenant_share of server.max_buffered_body_bytes" in raised.value.message
    assert refused(metrics, "greedy", "buffered_body_bytes") == 1
    await budget.take(100, "greedy", 400)  # within its share
    await budget.take(400, "other", 400)
    assert (budget.used, budget.by_tenant) == (800, {"greedy": 400, "other": 400})
    await budget.give_back(300, "greedy")
    await budget.give_back(100, "greedy")
    await budget.give_back(400, "other")
    assert (budget.used, budget.by_tenant) == (0, {})


async def test_a_tenant_reading_no_body_may_read_one_larger_than_its_share() -> None:
    """Its share may be smaller than one upload's: refusing it would refuse that tenant for ever."""
    budget = BodyBudget(1000, Metrics(CollectorRegistry()))
    await budget.take(600, "team", 100)
    with pytest.raises(RateLimited):
        await budget.take(1, "team", 100)
    await budget.give_back(600, "team")


async def test_within_its_share_a_tenant_waits_for_room_in_the_whole_budget() -> None:
    budget = BodyBudget(1000, Metrics(CollectorRegistry()))
    await budget.take(500, "a", 600)
    await budget.take(500, "b", 600)
    waiting = asyncio.create_task(budget.take(300, "c", 600))  # no room: it waits, it is not refused
    await asyncio.sleep(0.01)
    assert not waiting.done()
    await budget.give_back(500, "a")
    await asyncio.wait_for(waiting, 1)
    assert budget.by_tenant == {"b": 500, "c": 300}


async def test_a_tenants_bodies_waiting_for_room_count_in_its_share() -> None:
    """With the budget full, a tenant's first body waits for room and its second, which would pass its
    share with the first, is a 429 at once: not a wait for a share the first will take, ended by the
    body timeout with a 503 while it holds an admission place. A claim given up goes with its body."""
    metrics = Metrics(CollectorRegistry())
    budget = BodyBudget(1000, metrics)
    await budget.take(1000, "other", 1000)
    first = asyncio.create_task(budget.take(400, "greedy", 600))
    await asyncio.sleep(0)
    with pytest.raises(RateLimited):
        await asyncio.wait_for(budget.take(400, "greedy", 600), 5)
    assert refused(metrics, "greedy", "buffered_body_bytes") == 1
    leaving = asyncio.create_task(budget.take(100, "greedy", 600))  # within its share: it waits
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert budget.by_tenant == {"other": 1000, "greedy": 400}
    await budget.give_back(1000, "other")
    await asyncio.wait_for(first, 5)
    assert (budget.used, budget.by_tenant) == (400, {"greedy": 400})
