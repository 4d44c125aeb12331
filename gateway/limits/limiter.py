"""`LimitStore`: the one implementation of the `Store` protocol, over either engine.

It owns everything the two engines share: compiling plans into calls, turning readings into
admissions, the clock hint for calendar keys, timeouts, metrics, degraded decisions, the outbox
of settlements and the renewal of running requests' leases. Engines only hold state.

Time. The engine's clock decides (Redis `TIME`, shared by every replica). Day and month keys
are named before the call, from our clock plus the offset learned from the engine's last reply;
if the engine finds it is another UTC day, it changes nothing and says so, and the call is
compiled again for the engine's day.

Unavailability. A call that fails marks the store down (`store_up` 0, one `store_unavailable`
warning per outage, `store_errors`). What "Redis did not answer within `timeout_ms`" means is the
engine's to judge where it can (the lean connection times only Redis's part, proof against this
process's own lag); otherwise each call is bounded here by `timeout_ms`. A busy process is not an
outage: the pipeline sheds load before admission instead (`gateway/front/admission.py`). While the
store is down, `on_unavailable` decides per request: `fail_open` admits with a degraded
reservation and counts `degraded_decisions`; `fail_closed` answers `StoreUnavailable`. There is
no per-process fallback counter. The next successful call marks it up again (`store_recovered`).

Settlement is never lost to a store failure. A settle the store does not take at once (failed;
while the store is down it is not even tried) goes to the `Outbox`,
which retries it in the background until the store is back, so a finishing request never waits
on an outage. A degraded reservation settles by charging its actual cost after the fact to the
calendar budgets and the ledger, so money spent while the store was unreachable still counts.

A reserve whose reply never came may still have run, or may yet run: its lease and its estimate
would stay charged. So when nobody will settle it (fail_closed answered 503, or the request was
cancelled while waiting) its release goes to the outbox; `reserve` refuses an id already
released, whichever arrives first.

An error the store answers for good (raised inside a script) is `StoreRejected`: counted and
logged (`store_rejected`), it does not mark the store down, and a settlement it refuses is given
up at once rather than retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import date
from functools import partial
from typing import TypeVar

from gateway.config import StoreSettings
from gateway.errors import StoreUnavailable
from gateway.limits import headers
from gateway.limits.calls import (
    Engine,
    Mode,
    ReserveCall,
    ReserveReply,
    SettleCall,
    StoreFailure,
    StoreRejected,
    compile_release,
    compile_renew,
    compile_reserve,
    compile_settle,
)
from gateway.limits.decisions import DecisionMetrics, decide
from gateway.limits.journal import Journal
from gateway.limits.keys import PROVIDER_TENANT_PREFIX
from gateway.limits.ledger import LedgerRow, charge_fields, rows, sort_rows
from gateway.limits.outbox import Outbox
from gateway.limits.periods import day_number, day_of, days_between
from gateway.limits.plan import LimitPlan
from gateway.limits.store import Admission, LimitStatus, Reservation, new_reservation_id
from gateway.logs import get_logger
from gateway.telemetry.metrics import KeptHistogram, Metrics
from policies.cost import Cost

log = get_logger("gateway.limits")
T = TypeVar("T")

_MAX_DAY_MISMATCHES = 2
_OPERATIONS = ("start", "ping", "reserve", "status", "settle", "renew", "ledger")
LEDGER_TIMEOUT_SECONDS = 30.0
# Leases renewed in one batch. With 10,000 streams open, renewing every lease in one loop turn held
# the event loop for about 1.9 s (a new request waited that long); in batches of this size, other
# work runs between two of them.
RENEW_BATCH = 128
# The decision metrics a worker counted reach the shared metric files at least this often.
DECISION_METRICS_FLUSH_SECONDS = 1.0
_UNAVAILABLE = "The rate-limit store is unavailable, so the request could not be admitted. Retry shortly."


class LimitStore:
    def __init__(
        self,
        engine: Engine,
        settings: StoreSettings,
        metrics: Metrics,
        clock: Callable[[], float],
        journal: Journal | None = None,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._metrics = metrics
        self._decision_metrics = DecisionMetrics(metrics)
        self._latency = KeptHistogram(metrics, metrics.store_latency)
        self._clock = clock
        self._timeout = settings.timeout_ms / 1000
        self._offset = 0.0  # engine clock minus ours, in seconds
        self._day = (-1, day_of(0))  # the last day named: (day number, date)
        self._up = True
        self._up_exported = False  # whether store_up says 1 (until the first call, it is 0)
        self._outbox = Outbox(self._apply, metrics, journal=journal)
        self._held: dict[str, Reservation] = {}  # reservation id -> a running one holding leases
        for operation in _OPERATIONS:  # exported at 0 from the start, for rate() and alerts
            metrics.store_errors.labels(operation)
        metrics.degraded_decisions.labels(settings.on_unavailable)
        self._renewer: asyncio.Task[None] | None = None
        self._flusher: asyncio.Task[None] | None = None

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def settles_in_order(self) -> bool:
        return self._engine.calls_in_order

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        # What a previous process left owed goes out first, as soon as the store answers.
        for reservation in self._outbox.replay():
            log.warning(
                "reservation_interrupted",
                tenant=reservation.tenant,
                reservation=reservation.id,
                settled_at="estimate",
            )
            self._outbox.add(self._settle_call(reservation, reservation.estimate, "interrupted"), "settle")
        # A failure is already logged; every later call retries, on_unavailable decides meanwhile.
        with contextlib.suppress(StoreFailure):
            await self._guard("start", self._engine.start)
        self._flusher = asyncio.get_running_loop().create_task(self._apply_kept_metrics())

    async def _apply_kept_metrics(self) -> None:
        """Once a second, apply every metric update kept back in this process (`Metrics.apply_kept`:
        the decision metrics, the charges), as every read of this process's registry also does."""
        while True:
            await asyncio.sleep(DECISION_METRICS_FLUSH_SECONDS)
            self._metrics.apply_kept()

    async def close(self) -> int:
        """Deliver what the outbox holds (bounded), then close: the number given up."""
        if self._renewer is not None:
            self._renewer.cancel()
        if self._flusher is not None:
            self._flusher.cancel()
        self._metrics.apply_kept()
        lost = await self._outbox.close()
        await self._engine.close()
        return lost

    async def healthy(self) -> bool:
        try:
            await self._guard("ping", self._engine.ping)
        except StoreFailure:
            return False
        return True

    # --- admission -----------------------------------------------------------------------------

    async def reserve(self, plan: LimitPlan, cost: Cost, *, request_id: str, model: str) -> Admission:
        reservation_id = new_reservation_id(request_id)
        mode: Mode = "shadow" if plan.shadow else "enforce"
        try:
            call, reply = await self._run(plan, cost, reservation_id, model, mode)
        except StoreFailure:
            return self._degraded(plan, cost, reservation_id, request_id, model)
        reservation = Reservation(
            reservation_id, request_id, plan.tenant, model, call.day, cost, call.checks, plan.shadow
        )
        admission = decide(plan, call, reply, reservation, self._decision_metrics)
        if admission.reservation is not None:
            self._outbox.track(admission.reservation)
        return admission

    async def limit_status(self, plan: LimitPlan) -> list[LimitStatus]:
        try:
            call, reply = await self._run(plan, Cost(), "status", "", "peek")
        except StoreFailure as exc:
            raise StoreUnavailable(_UNAVAILABLE) from exc
        return [
            LimitStatus(
                check.scope,
                check.kind.name,
                check.kind.unit,
                check.limit,
                reading.used,
                max(0, check.limit - reading.used),
                reading.reset_us / 1e6,
                "shadow" if check.shadow else "enforce",
            )
            for check, reading in zip(call.checks, reply.readings, strict=True)
        ]

    async def _run(
        self, plan: LimitPlan, cost: Cost, reservation_id: str, model: str, mode: Mode
    ) -> tuple[ReserveCall, ReserveReply]:
        """One reserve call, compiled again for the engine's UTC day if ours was another."""
        for _ in range(_MAX_DAY_MISMATCHES + 1):
            call = self._compile(plan, cost, reservation_id, model, mode)
            if mode == "peek":
                reply = await self._guard("status", partial(self._engine.reserve, call))
            else:
                reply = await self._reserve_or_release(call)
            self._offset = reply.now_us / 1e6 - self._clock()
            if reply.status == "settled":
                raise StoreFailure("reservation already released")  # pragma: no cover (ids are new)
            if reply.status != "wrong_day":
                return call, reply
        raise StoreFailure("the store's clock keeps changing day")  # pragma: no cover

    async def _reserve_or_release(self, call: ReserveCall) -> ReserveReply:
        """Run a charging reserve; if its outcome is unknown and nobody will settle it, release it."""
        try:
            return await self._guard("reserve", partial(self._engine.reserve, call))
        except StoreFailure:
            # A degraded reservation (fail_open, or shadow mode) settles under the same id,
            # which does the same.
            if self._settings.on_unavailable == "fail_closed" and call.mode != "shadow":
                self._outbox.add(compile_release(call, self._settings), "release")
            raise
        except asyncio.CancelledError:
            self._outbox.add(compile_release(call, self._settings), "release")
            raise

    def _compile(
        self, plan: LimitPlan, cost: Cost, reservation_id: str, model: str, mode: Mode
    ) -> ReserveCall:
        """The reserve call for today (by the store's clock, as last seen)."""
        return compile_reserve(
            plan,
            cost,
            reservation_id=reservation_id,
            model=model,
            day=self._today(),
            mode=mode,
            settings=self._settings,
        )

    def _degraded(
        self, plan: LimitPlan, cost: Cost, reservation_id: str, request_id: str, model: str
    ) -> Admission:
        mode = self._settings.on_unavailable
        self._metrics.degraded_decisions.labels(mode).inc()
        call = self._compile(plan, cost, reservation_id, model, "peek")
        limit_headers = headers.limits_only(call.checks)
        if mode == "fail_closed" and not plan.shadow:  # shadow mode never refuses a request
            error = StoreUnavailable(_UNAVAILABLE, headers={**limit_headers, "Retry-After": "1"})
            return Admission(False, None, error, limit_headers)
        uncharged = tuple(replace(check, cost=0) for check in call.checks)
        reservation = Reservation(
            reservation_id,
            request_id,
            plan.tenant,
            model,
            call.day,
            cost,
            uncharged,
            plan.shadow,
            degraded=True,
        )
        self._outbox.track(reservation)
        return Admission(True, reservation, None, limit_headers)

    # --- settlement ----------------------------------------------------------------------------

    # --- leases of running requests -------------------------------------------------------------

    def hold(self, reservation: Reservation) -> None:
        """The reservation's request is running here: renew its concurrency leases until it is
        settled (see `_renew_held`). A process that dies stops renewing, and its leases expire.
        Its renewal is compiled when it is due: most requests end long before."""
        if not reservation.holds_leases:
            return
        self._held[reservation.id] = reservation
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_held())

    async def _renew_held(self) -> None:
        """Every third of `lease_ttl_seconds`, renew every held lease in one batch, so a request
        running longer than the TTL keeps its slot. A lease found gone (settled elsewhere,
        expired) stops being held; a failed renewal is tried again at the next turn."""
        try:
            while self._held:
                await asyncio.sleep(self._settings.lease_ttl_seconds / 3)
                held = list(self._held.items())
                for start in range(0, len(held), RENEW_BATCH):
                    await self._renew(held[start : start + RENEW_BATCH])
        finally:
            self._renewer = None

    async def _renew(self, held: list[tuple[str, Reservation]]) -> None:
        """Renew one batch of held leases; a lease found gone stops being held."""
        compiled = [compile_renew(r.tenant, r.id, r.checks, self._settings) for _, r in held]
        calls = [call for call in compiled if call is not None]  # each holds leases: none is None
        renewed = await asyncio.gather(
            *(self._guard("renew", partial(self._engine.renew, call)) for call in calls),
            return_exceptions=True,
        )
        for call, count in zip(calls, renewed, strict=True):
            if count == 0:
                self._held.pop(call.reservation_id, None)

    async def settle(self, reservation: Reservation, actual: Cost, *, outcome: str) -> bool:
        """Replace the reservation's estimate with `actual`: True if done now, False if it was
        settled already or is left to the outbox (the store did not take it)."""
        self._held.pop(reservation.id, None)
        call = self._settle_call(reservation, actual, outcome)
        if self._up:
            try:
                done = await self._apply(call)
            except StoreRejected:
                self._outbox.lose(call, "settle", reason="rejected")
                return False
            except StoreFailure:
                pass
            else:
                self._outbox.untrack(reservation.id)
                return done
        self._metrics.settlements_retried.inc()
        log.info(
            "settlement_deferred",
            tenant=reservation.tenant,
            reservation=reservation.id,
            tokens=actual.tokens,
            nano_usd=actual.nano_usd,
        )
        self._outbox.add(call, "settle")
        return False

    def _settle_call(self, reservation: Reservation, actual: Cost, outcome: str) -> SettleCall:
        return compile_settle(
            reservation.tenant,
            reservation.id,
            reservation.day,
            reservation.checks,
            actual=actual,
            ledger=charge_fields(reservation.model, actual, outcome),
            settings=self._settings,
            degraded=reservation.degraded,
            unledger=charge_fields(reservation.model, reservation.estimate),
        )

    async def _apply(self, call: SettleCall) -> bool:
        return await self._guard("settle", partial(self._engine.settle, call))

    # --- ledger --------------------------------------------------------------------------------

    async def ledger(self, start: date, end: date, tenant: str | None = None) -> list[LedgerRow]:
        days = days_between(start, end)
        if not days:
            return []
        # A report, not a request: it may scan the whole keyspace, so it has its own time limit,
        # and being slow says nothing about whether requests can be admitted.
        try:
            async with asyncio.timeout(LEDGER_TIMEOUT_SECONDS):
                hashes = await self._engine.ledger(days, tenant)
        except (StoreFailure, TimeoutError) as exc:
            self._metrics.store_errors.labels("ledger").inc()
            log.warning("ledger_read_failed", error=str(exc) or type(exc).__name__)
            raise StoreUnavailable(_UNAVAILABLE) from exc
        return sort_rows(
            row
            for name, day, counters in hashes
            if not name.startswith(PROVIDER_TENANT_PREFIX)  # the provider quotas' own accounting
            for row in rows(name, day, counters)
        )

    # --- plumbing ------------------------------------------------------------------------------

    def _today(self) -> date:
        number = day_number(self._clock() + self._offset)
        if number != self._day[0]:  # a new day (once a day, or when the clocks disagree)
            self._day = (number, day_of(number))
        return self._day[1]

    async def _guard(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run one engine call (under the timeout, unless the engine times its own), keeping
        store_up, latency and errors current."""
        started = time.perf_counter()
        try:
            if self._engine.times_its_calls:
                result = await call()
            else:
                async with asyncio.timeout(self._timeout):
                    result = await call()
        except StoreRejected as exc:
            self._metrics.store_errors.labels(operation).inc()
            log.error("store_rejected", operation=operation, error=str(exc))
            raise
        except (StoreFailure, TimeoutError) as exc:
            self._metrics.store_errors.labels(operation).inc()
            self._mark_down(operation, exc)
            raise StoreFailure(str(exc) or type(exc).__name__) from exc
        self._latency.observe((operation,), time.perf_counter() - started)
        self._mark_up()
        return result

    def _mark_down(self, operation: str, exc: BaseException) -> None:
        self._metrics.store_up.set(0)
        self._up_exported = False
        if self._up:
            self._up = False
            log.warning(
                "store_unavailable",
                operation=operation,
                error=str(exc) or type(exc).__name__,
                on_unavailable=self._settings.on_unavailable,
            )

    def _mark_up(self) -> None:
        if not self._up_exported:  # set once up, not again at every call (a lock, microseconds)
            self._metrics.store_up.set(1)
            self._up_exported = True
        if not self._up:
            self._up = True
            log.info("store_recovered")
            self._outbox.wake()
