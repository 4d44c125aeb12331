"""Settlements the store could not take yet: kept in order, retried in the background, applied once.

A settle that fails (the store is down, or did not answer within `timeout_ms`) is not lost: it waits here,
and one background task delivers the oldest first, in batches, backing off from 50 ms to 5 s
while the store keeps failing, and trying again at once when another call finds the store back
(`wake`). The request that produced it has long been answered. So do the releases of reserves
whose reply never came (`calls.compile_release`). Repeating a delivery is safe: settle.lua's
settled marker makes a second one change nothing, and a reserve refuses an id already settled,
so a release that overtakes its own late reserve still wins.

A call the store refuses for good (a script error, not an outage: `StoreRejected`) is given up at
once, as lost, rather than retried forever at the head of the queue.

Bounded: at most `MAX_PENDING` settlements and as many releases wait. Beyond that the oldest is
dropped and counted in `gateway_settlements_lost_total`; a dropped settlement is also logged as
`settlement_lost` with its amounts, so spend can be reconciled by hand. A dropped release only
leaves a lease to expire and an estimate charged: the conservative side.

Durable with a `Journal` (`store.outbox_path`): every call waiting here, and every admitted
reservation not settled yet (`track` / `untrack`), is also on local disk, so a process killed
at any moment leaves nothing unaccounted: the next one `replay`s it at start-up, and `close`
leaves what it could not deliver on disk (`settlements_kept`) instead of losing it. Without a
journal the queue lives in this process only: `close` keeps delivering for a few seconds, then
logs each settlement it could not deliver as lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from gateway.limits.calls import SettleCall, StoreFailure, StoreRejected
from gateway.limits.journal import Journal
from gateway.limits.store import Reservation
from gateway.logs import get_logger
from gateway.telemetry.metrics import Metrics

log = get_logger("gateway.limits")

Kind = Literal["settle", "release"]
Deliver = Callable[[SettleCall], Awaitable[bool]]

MAX_PENDING = 10_000  # per kind; a SettleCall is well under 1 KiB
BATCH = 64
FIRST_DELAY, MAX_DELAY = 0.05, 5.0
CLOSE_DEADLINE = 3.0


class Outbox:
    def __init__(
        self,
        deliver: Deliver,
        metrics: Metrics,
        max_pending: int = MAX_PENDING,
        journal: Journal | None = None,
    ) -> None:
        self._deliver = deliver
        self._journal = journal
        self._metrics = metrics
        self._max = max_pending
        # Settlements (money) go before releases (leases and estimates), oldest first.
        self._queues: dict[Kind, dict[int, SettleCall]] = {"settle": {}, "release": {}}
        self._ids = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    @property
    def durable(self) -> bool:
        return self._journal is not None

    def replay(self) -> list[Reservation]:
        """Start-up: queue the calls a previous process left in the journal; return the
        reservations it admitted and never settled (the caller settles them at their estimate)."""
        if self._journal is None:
            return []
        orphans = []
        for owed in self._journal.read():
            if owed.call is not None:
                kind: Kind = "release" if owed.state == "release" else "settle"
                self._queue(owed.call, kind)
            elif owed.reservation is not None:
                orphans.append(owed.reservation)
        if len(self) or orphans:
            log.warning("outbox_replayed", calls=len(self), interrupted=len(orphans))
        return orphans

    def track(self, reservation: Reservation) -> None:
        """An admitted request is running: journalled, so a process killed before its settlement
        still settles it (at the estimate) from the next one."""
        if self._journal is not None:
            self._journal.open(reservation)

    def untrack(self, reservation_id: str) -> None:
        """The store took the reservation's settlement: nothing is owed for it any more."""
        if self._journal is not None:
            self._journal.drop(reservation_id)

    def add(self, call: SettleCall, kind: Kind) -> None:
        """Keep `call` until the store takes it; start delivering if nobody is."""
        if self._closed:  # nothing will deliver it any more: said now, not lost silently
            self.lose(call, kind, reason="shutdown")
            return
        if self._journal is not None:
            self._journal.put(call, kind)
        self._queue(call, kind)

    def _queue(self, call: SettleCall, kind: Kind) -> None:
        queue = self._queues[kind]
        if len(queue) >= self._max:
            self.lose(queue.pop(next(iter(queue))), kind, reason="outbox_full")
        queue[next(self._ids)] = call
        self._metrics.settlements_pending.set(len(self))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def wake(self) -> None:
        """The store answers again: stop backing off."""
        self._wake.set()

    async def _run(self) -> None:
        delay = FIRST_DELAY
        try:
            while len(self):
                self._wake.clear()
                try:
                    if await self._deliver_batch():
                        delay = FIRST_DELAY
                        continue
                except Exception:  # a bug, not an outage: said, and tried again like one
                    log.exception("outbox_delivery_failed")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                delay = FIRST_DELAY if self._wake.is_set() else min(delay * 2, MAX_DELAY)
        finally:
            self._task = None

    async def _deliver_batch(self) -> bool:
        """Deliver up to BATCH calls at once (they share one pipeline); False if any failed."""
        batch = [
            (kind, queue, key, call)
            for kind, queue in self._queues.items()
            for key, call in itertools.islice(queue.items(), BATCH)
        ][:BATCH]
        results = await asyncio.gather(*(self._deliver(item[3]) for item in batch), return_exceptions=True)
        delivered = True
        for (kind, queue, key, call), result in zip(batch, results, strict=True):
            if isinstance(result, StoreRejected):  # for good: retrying would only block the queue
                if queue.pop(key, None) is not None:
                    self.lose(call, kind, reason="rejected")
            elif isinstance(result, StoreFailure):
                delivered = False
            elif isinstance(result, BaseException):
                raise result
            elif queue.pop(key, None) is not None:
                self.untrack(call.reservation_id)
        self._metrics.settlements_pending.set(len(self))
        return delivered

    async def close(self, deadline: float = CLOSE_DEADLINE) -> int:
        """Stop the background task; go on delivering until empty or `deadline` seconds passed
        (a batch still in flight then is not waited for); leave what is left in the journal for
        the next start, or without one log it as lost; return how many were lost. Anything added
        afterwards is lost at once."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        ends, delay = time.monotonic() + deadline, FIRST_DELAY
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline):
                while len(self):
                    if not await self._deliver_batch():
                        await asyncio.sleep(min(delay, max(0.0, ends - time.monotonic())))
                        delay = min(delay * 2, MAX_DELAY)
        if self._journal is not None:
            if len(self):
                log.warning("settlements_kept", pending=len(self), journal=str(self._journal.path))
            for queue in self._queues.values():
                queue.clear()
            await self._journal.close()
        lost = len(self)
        for kind, queue in self._queues.items():
            for call in queue.values():
                self.lose(call, kind, reason="shutdown")
            queue.clear()
        self._metrics.settlements_pending.set(0)
        return lost

    def lose(self, call: SettleCall, kind: Kind, *, reason: str) -> None:
        """Give `call` up: counted, and a settlement logged with its amounts for reconciliation."""
        self.untrack(call.reservation_id)
        self._metrics.settlements_lost.labels(kind).inc()
        if kind == "settle":
            log.error(
                "settlement_lost",
                reason=reason,
                tenant=call.tenant,
                reservation=call.reservation_id,
                day=call.day.isoformat(),
                ledger=dict(call.ledger),
            )
