"""The garbage-collection policy (gateway/process/garbage.py): survivors frozen, pauses counted, cycles among
frozen objects reclaimed when idle, an old runtime still freed after a reload."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.config import load_settings
from gateway.process import garbage
from gateway.process.garbage import GarbageCollection
from gateway.reload import Reloader
from gateway.runtime import Runtime, RuntimeHolder
from gateway.telemetry.metrics import Metrics
from tests.support.config import config_dict


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def tracked(obj: object) -> bool:
    """Whether a collection would scan `obj` (not frozen)."""
    return any(candidate is obj for candidate in gc.get_objects())


def frozen_cycle() -> weakref.ref[Node]:
    """Two nodes in a cycle that live through a full collection (so are frozen), then are dropped."""
    first, second = Node(), Node()
    first.other, second.other = second, first
    gc.collect()
    assert not tracked(first)
    return weakref.ref(first)


class InFlight:
    """The requests in flight, as the test sets them (0: idle)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> int:
        return self.count


@pytest.fixture
async def collection() -> AsyncIterator[tuple[GarbageCollection, CollectorRegistry, InFlight]]:
    registry, in_flight = CollectorRegistry(), InFlight()
    thresholds = gc.get_threshold()
    policy = GarbageCollection(Metrics(registry), in_flight)
    policy.start()
    try:
        yield policy, registry, in_flight
    finally:
        await policy.close()
    assert gc.get_freeze_count() == 0  # close() leaves the process as it found it
    assert gc.get_threshold() == thresholds


async def test_a_policy_that_fails_gives_cpython_its_collections_back(
    collection: tuple[GarbageCollection, CollectorRegistry, InFlight],
) -> None:
    """With the policy's task gone, nothing would collect the older generations: CPython does again."""
    policy, _, _ = collection
    assert gc.get_threshold()[1] == garbage.NEVER
    policy._in_flight = _a_bug  # the next pass fails
    await asyncio.sleep(garbage.FREEZE_EVERY_SECONDS * 2)
    assert gc.get_threshold() == policy._thresholds
    assert gc.get_threshold()[1] != garbage.NEVER


def _a_bug() -> int:
    raise RuntimeError("a bug")


def pauses(registry: CollectorRegistry, generation: int) -> float:
    return registry.get_sample_value("gateway_gc_pause_seconds_count", {"generation": str(generation)}) or 0.0


async def test_what_startup_built_and_what_survives_a_full_collection_is_frozen(
    collection: tuple[GarbageCollection, CollectorRegistry, InFlight],
) -> None:
    _, registry, _ = collection
    assert gc.get_freeze_count() > 0
    kept = Node()
    assert tracked(kept)
    gc.collect()
    assert not tracked(kept)  # no later collection scans it ...
    dropped = weakref.ref(kept)
    del kept
    assert dropped() is None  # ... and reference counting still frees it
    assert pauses(registry, 2) >= 1


async def test_the_younger_generations_are_not_collected_for_every_few_hundred_new_objects(
    collection: tuple[GarbageCollection, CollectorRegistry, InFlight],
) -> None:
    """The policy's own collection does that work: CPython's waits for YOUNG_THRESHOLD new objects
    (by default it would have run several times for these), and never goes on to the middle
    generation (by default every tenth time)."""
    young, middle = (gc.get_stats()[generation]["collections"] for generation in (0, 1))
    kept = [Node() for _ in range(garbage.YOUNG_THRESHOLD // 2)]
    assert gc.get_stats()[0]["collections"] == young
    more = [Node() for _ in range(garbage.YOUNG_THRESHOLD * 15)]
    assert gc.get_stats()[0]["collections"] > young + 12  # still a bound on a burst
    assert gc.get_stats()[1]["collections"] == middle
    del kept, more


async def test_every_generations_pauses_are_counted(
    collection: tuple[GarbageCollection, CollectorRegistry, InFlight],
) -> None:
    _, registry, _ = collection
    for generation in (0, 1, 2):
        before = pauses(registry, generation)
        gc.collect(generation)
        assert pauses(registry, generation) >= before + 1
    assert registry.get_sample_value("gateway_gc_pause_seconds_sum", {"generation": "2"}) > 0


async def test_a_cycle_among_frozen_objects_is_freed_by_a_reclaim(
    collection: tuple[GarbageCollection, CollectorRegistry, InFlight],
) -> None:
    policy, _, _ = collection
    ref = frozen_cycle()
    gc.collect()
    assert ref() is not None  # frozen: no collection sees it
    assert policy.reclaim() >= 2
    assert ref() is None


async def eventually(condition: Callable[[], bool]) -> bool:
    for _ in range(500):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.fixture
async def busy(
    collection: tuple[GarbageCollection, CollectorRegistry, InFlight], monkeypatch: pytest.MonkeyPatch
) -> tuple[GarbageCollection, InFlight]:
    """The policy restarted with short intervals, the process busy (one request in flight) until told."""
    monkeypatch.setattr(garbage, "FREEZE_EVERY_SECONDS", 0.01)
    monkeypatch.setattr(garbage, "IDLE_SECONDS", 0.02)
    monkeypatch.setattr(garbage, "RECLAIM_INTERVAL_SECONDS", 0)
    monkeypatch.setattr(garbage, "RECLAIM_GROWTH", 0)
    policy, _, in_flight = collection
    in_flight.count = 1
    await policy.close()
    policy.start()
    return policy, in_flight


async def test_what_lives_on_is_frozen_by_the_regular_collection(
    busy: tuple[GarbageCollection, InFlight],
) -> None:
    """No automatic collection needs to come: the policy's own, every FREEZE_EVERY_SECONDS, does."""
    kept = Node()
    assert await eventually(lambda: not tracked(kept))


async def test_the_reclaim_waits_for_the_process_to_be_idle(busy: tuple[GarbageCollection, InFlight]) -> None:
    _, in_flight = busy
    ref = frozen_cycle()
    await asyncio.sleep(0.2)  # twenty collections, never idle
    assert ref() is not None
    in_flight.count = 0
    assert await eventually(lambda: ref() is None)


async def test_a_process_never_idle_reclaims_once_its_frozen_objects_have_grown_enough(
    busy: tuple[GarbageCollection, InFlight], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Otherwise whatever a library leaves in cycles would grow for ever in a gateway never idle."""
    ref = frozen_cycle()
    await asyncio.sleep(0.1)
    assert ref() is not None  # grown, but not BUSY_RECLAIM_FACTOR times
    monkeypatch.setattr(garbage, "BUSY_RECLAIM_FACTOR", 1.0)
    assert await eventually(lambda: ref() is None)


async def test_a_reload_frees_the_old_runtime_while_collections_freeze(
    collection: tuple[GarbageCollection, CollectorRegistry, InFlight], tmp_path: Path
) -> None:
    """The old runtime was frozen with the rest of startup: only reference counting can free it,
    so it must hold no reference cycle."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config_dict("http://127.0.0.1:1/v1")))
    holder = RuntimeHolder(Runtime.build(load_settings(path)))
    reloader = Reloader(holder, path, lambda _: None)
    gc.collect()
    old = weakref.ref(holder.current.settings)
    reloader.reload()
    assert old() is None


async def test_frozen_objects_that_the_requests_opened_since_explain_do_not_make_a_busy_reclaim(
    busy: tuple[GarbageCollection, InFlight], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of streams opening grow the frozen objects many times over, all of them live: a
    reclaim would scan them all for nothing. Growth beyond their allowance still reclaims."""
    _, in_flight = busy
    monkeypatch.setattr(garbage, "BUSY_RECLAIM_FACTOR", 1.0)
    in_flight.count = 1 + 10_000  # an allowance far beyond anything this test freezes
    ref = frozen_cycle()
    await asyncio.sleep(0.2)  # twenty checks, never idle
    assert ref() is not None
    in_flight.count = 1  # the requests ended: what is still frozen is no longer explained
    assert await eventually(lambda: ref() is None)
