"""The process's garbage collection: what is frozen, when a full collection may scan everything,
and what each collection costs (`gateway_gc_pause_seconds{generation}`).

CPython (3.11) collects its old generation once the objects promoted into it since the last full
collection reach a quarter of those that survived it, and a full collection scans every tracked
object of the process (about 0.55 us each). An open stream holds about 180 of them (connections,
tasks, parsers, records), so with thousands open each full collection stopped the process for as
long as they took to scan (1.1-1.4 s of CPU with 9,868 open), and they came as streams opened, and
as they ended and new ones started. Scanning them finds nothing to free: a request's objects are
freed by reference counting the moment it ends, since its paths leave no reference cycles
(tests/e2e/test_garbage.py: a stream that ends whole, a client that leaves, an upstream that dies
mid-stream or cannot be reached, a refused key).

So every survivor of a collection is frozen (`gc.freeze`): after startup, and after each full
collection. A frozen object is never scanned again, yet freed by reference counting when it dies.
A full collection then scans only what was allocated since the previous one and still lives. One
runs every FREEZE_EVERY_SECONDS (besides CPython's own): left to CPython's counts, a collection
waits while old objects die as fast as new ones are made (streams ending and others starting),
and then scans everything made meanwhile (0.2 s with 200 streams replaced a second). So a pause
follows how much was allocated in the last quarter of a second, not how many streams are open.

CPython's own collections of the youngest generation come every 700 net new objects by default:
under load, several a second (the peer bench: 141 in 900 requests 32 at once, 0.26 ms each, 40 us
a request; one per wave of 16 streams, 0.33 ms on its first events' way out), and each scans the
requests in flight, alive, which the next one scans again. The policy's own collection scans all
they would, so theirs wait for YOUNG_THRESHOLD net new objects: a bound on a burst that makes more
than that between two of the policy's own, never reached under the peer bench's loads. The middle
generation is never collected on its own: what it holds is scanned by the policy's next collection
anyway (in bench/streams_bench.py's opening of 4,000 streams, CPython's own would have scanned up
to 10 x YOUNG_THRESHOLD objects at once: a 69 ms pause).

The price is that a frozen object that ends in a reference cycle is not freed by any automatic
collection. The gateway's own paths make none; for anything else (a library's cycle: an exporter's
failed export keeps its exception's traceback), every RECLAIM_INTERVAL_SECONDS it counts its frozen
objects, and if they have grown by more than RECLAIM_GROWTH since the last reclaim, unfreezes and
collects everything: once the process has been idle (no request in flight) for IDLE_SECONDS, a pass
over the idle process only (50 ms of CPU for a freshly started one's 89,000 objects). A process
that is never idle does so too once its frozen objects have grown BUSY_RECLAIM_FACTOR times beyond
what its open requests explain, pausing as CPython's own collection would have, so that whatever a
library leaks in cycles stays bounded rather than grows for ever. What the open requests explain is
the frozen count at the last reclaim plus OBJECTS_PER_REQUEST for each request in flight beyond
those then: a gateway opening 10,000 streams grows its frozen objects twentyfold, all of them live,
and a reclaim then would scan 1.5 million objects for nothing (0.65 s of CPU, the process stopped;
seen with bench/streams_bench.py before this allowance).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable

from gateway.logs import get_logger
from gateway.telemetry.metrics import Metrics

log = get_logger("gateway.garbage")

FREEZE_EVERY_SECONDS = 0.25
IDLE_SECONDS = 2.0
RECLAIM_INTERVAL_SECONDS = 60.0
RECLAIM_GROWTH = 10_000  # frozen objects
BUSY_RECLAIM_FACTOR = 2.0
OBJECTS_PER_REQUEST = 400  # tracked objects an open request may hold (an open stream: about 180)
YOUNG_THRESHOLD = 10_000  # CPython's own collections of the youngest generation (its default: 700)
# CPython's own collections of the middle generation: none (its default: every 10th young one), and
# so none of its full ones either, which follow the middle generation's: `_collect_often` does both
NEVER = 2**31 - 1


class GarbageCollection:
    """The policy above, for one serving process: `start()` once it serves, `close()` at the end.

    Pauses go to `metrics.gc_pause` (a histogram labelled by generation); `in_flight` counts the
    requests in flight (0: idle)."""

    def __init__(self, metrics: Metrics, in_flight: Callable[[], int]) -> None:
        self._pauses = [metrics.gc_pause.labels(str(generation)) for generation in range(3)]
        metrics.before_collect(self._observe_noted)  # a scrape sees every pause noted so far
        self._in_flight = in_flight
        self._started_at = 0.0
        self._noted: list[tuple[int, float]] = []  # (generation, pause) not yet observed
        self._frozen = 0  # frozen objects after the last reclaim
        self._frozen_in_flight = 0  # requests in flight then
        self._reclaim_checked_at = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._thresholds = gc.get_threshold()  # CPython's, given back by close() (or a failure)

    def start(self) -> None:
        """Freeze what startup built (after one full collection), then watch every collection."""
        gc.collect()
        gc.freeze()
        self._frozen, self._frozen_in_flight = gc.get_freeze_count(), self._in_flight()
        gc.callbacks.append(self._on_collection)
        gc.set_threshold(YOUNG_THRESHOLD, NEVER, self._thresholds[2])
        self._task = asyncio.get_running_loop().create_task(self._collect_often())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # (one that failed: logged)
                await self._task
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_collection)
        gc.set_threshold(*self._thresholds)
        self._observe_noted()
        gc.unfreeze()

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        """Called by the interpreter before and after every collection: times it; after a full
        one, freezes its survivors (the younger generations are empty then).

        A collection can start anywhere an object is allocated, in any thread, prometheus_client's
        own code included, while it holds its lock (one lock for every value, with workers): so the
        pause is only noted here, and observed by `_collect_often`."""
        now = time.perf_counter()
        if phase == "start":
            self._started_at = now
            return
        generation = info["generation"]
        self._noted.append((generation, now - self._started_at))
        if generation == 2:
            gc.freeze()

    def _observe_noted(self) -> None:
        noted, self._noted = self._noted, []
        for generation, seconds in noted:
            self._pauses[generation].observe(seconds)

    def reclaim(self) -> int:
        """Unfreeze, collect everything, freeze the survivors again; the objects freed."""
        gc.unfreeze()
        freed = gc.collect()  # its callback freezes the survivors
        self._frozen, self._frozen_in_flight = gc.get_freeze_count(), self._in_flight()
        return freed

    def _explained(self, in_flight: int) -> int:
        """The frozen objects that the requests in flight account for: the count at the last
        reclaim, and an allowance for each request opened beyond those then."""
        return self._frozen + OBJECTS_PER_REQUEST * max(0, in_flight - self._frozen_in_flight)

    async def _collect_often(self) -> None:
        """Every FREEZE_EVERY_SECONDS, a collection; now and then a reclaim. CPython collects
        nothing older than the young generation on its own meanwhile: should this end other than
        cancelled (a bug), its thresholds are given back."""
        try:
            await self._collect_forever()
        except asyncio.CancelledError:
            raise
        except BaseException:
            gc.set_threshold(*self._thresholds)
            log.exception("garbage_collection_stopped")
            raise

    async def _collect_forever(self) -> None:
        idle_for = 0.0
        while True:
            await asyncio.sleep(FREEZE_EVERY_SECONDS)
            gc.collect()  # what was made since the last one; its callback freezes what lives on
            self._observe_noted()
            in_flight = self._in_flight()
            idle_for = idle_for + FREEZE_EVERY_SECONDS if not in_flight else 0.0
            if time.monotonic() - self._reclaim_checked_at < RECLAIM_INTERVAL_SECONDS:
                continue
            idle = idle_for >= IDLE_SECONDS
            frozen = gc.get_freeze_count()  # a walk over the frozen objects: once an interval
            self._reclaim_checked_at = time.monotonic()
            if frozen > self._frozen + RECLAIM_GROWTH and (
                idle or frozen > BUSY_RECLAIM_FACTOR * self._explained(in_flight)
            ):
                started = time.perf_counter()
                freed = self.reclaim()
                log.info(
                    "garbage_reclaimed",
                    freed=freed,
                    seconds=round(time.perf_counter() - started, 4),
                    idle=idle,
                )
