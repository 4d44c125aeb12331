"""The store's operations as plain data, compiled once from a plan and run by either engine.

`compile_reserve` turns a `LimitPlan` and a cost into the exact keys and amounts to check;
`compile_settle` turns a reservation and the actual cost into the exact adjustments, and
`compile_release` undoes a reserve whose outcome is unknown (its reply was lost). The memory
engine and the Redis engine (through `reserve.lua` / `settle.lua`) run these same calls, which
is what keeps the two stores' semantics identical without sharing an interpreter.

Checks, calls, replies, readings and reservations are made per request and never changed once
made (`dataclasses.replace` makes another). They are plain slots dataclasses, not frozen ones:
a frozen dataclass's `__init__` sets each field through `object.__setattr__`, about three times
the instructions, and a request makes a dozen of them.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import date
from typing import Any, Literal, Protocol

import orjson

from gateway.config import StoreSettings
from gateway.limits import keys
from gateway.limits.headers import HeaderPlan, header_plan
from gateway.limits.kinds import KIND_BY_NAME, RATE_WINDOW_US, LimitKind
from gateway.limits.ledger import charge_fields
from gateway.limits.meters import Reading
from gateway.limits.periods import DAY_SECONDS, Period, day_index, period
from gateway.limits.plan import LimitPlan, PlannedLimit
from policies.cost import Cost

Mode = Literal["enforce", "shadow", "peek"]
Status = Literal["admitted", "rejected", "peeked", "wrong_day", "settled"]

# A reservation record outlives its lease by an hour: a request that outlives its lease (the
# process died, or the generation ran very long) still settles against what it charged.
RECORD_GRACE_MS = 3_600_000
# The settled marker outlives the record by a day, so a retried settle can never charge twice.
SETTLED_GRACE_MS = DAY_SECONDS * 1000


@dataclass(slots=True)
class Check:
    """One limit of one scope, as charged: which key, what limit, how much."""

    scope: str
    kind: LimitKind
    key: str
    limit: int
    cost: int
    window_s: int  # the policy window advertised in RateLimit-Policy (0: none)
    end_us: int = 0  # calendar windows: when the period ends
    expire_at: int = 0  # calendar windows: when the counter may be dropped (unix seconds)
    shadow: bool = False  # dark-launched: its refusal is counted, never rejects the request

    def to_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "kind": self.kind.name,
            "key": self.key,
            "limit": self.limit,
            "cost": self.cost,
            "window_s": self.window_s,
            "end_us": self.end_us,
            "expire_at": self.expire_at,
            "shadow": self.shadow,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Check:
        return Check(**{**data, "kind": KIND_BY_NAME[data["kind"]]})


class _ReservationKeys:
    """The keys of one reservation of one tenant, named here for every call that touches them."""

    __slots__ = ()
    tenant: str
    reservation_id: str

    @property
    def record_key(self) -> str:
        return keys.reservation_key(self.tenant, self.reservation_id)

    @property
    def settled_key(self) -> str:
        """A reservation id already settled (or released) is never charged again."""
        return keys.settled_key(self.tenant, self.reservation_id)


class _DayKeys(_ReservationKeys):
    """... and of the UTC day whose ledger it is recorded in."""

    __slots__ = ()
    day: date

    @property
    def ledger_key(self) -> str:
        return keys.ledger_key(self.tenant, self.day)


# The scripts' checks travel as little-endian doubles (Lua's numbers, exact below 2**53), which a
# script unpacks in C (struct.unpack) where words would be split and converted in Lua; a check's
# mechanism is one of these codes there (day and month are both a calendar window).
MECHANISM_CODES = {"rate": 1, "day": 2, "month": 2, "lease": 3}
_COST, _TWO_DOUBLES, _THREE_DOUBLES = struct.Struct("<d"), struct.Struct("<2d"), struct.Struct("<3d")
_SETTLE_CHECK = struct.Struct("<5d")


def record(checks: Sequence[Check]) -> bytes:
    """The reservation record: the amount charged to each check, a JSON array (`[1,1,4200]`).
    reserve.lua stores it as it is given (ARGV[7]), and settle.lua is given it again (ARGV[8]) to
    compare with what it finds, decoding only a record that differs: written here, it costs Redis no
    formatting of its own."""
    return orjson.dumps([check.cost for check in checks])


@dataclass(slots=True)
class ReserveCall(_DayKeys):
    tenant: str
    reservation_id: str
    model: str
    day: date  # the UTC day the keys were named for; the engine verifies it against its clock
    mode: Mode
    checks: tuple[Check, ...]
    lease_ttl_us: int
    record_ttl_ms: int
    ledger_expire_at: int
    shared: PlanDay  # what every reserve of the plan shares that day; `checks` are its, costed
    ledger: tuple[tuple[str, int], ...] = ()  # the estimate, charged to the ledger if admitted

    @property
    def ledger_key(self) -> str:
        return self.shared.ledger_key

    def packed_numbers(self) -> bytes:
        """reserve.lua's ARGV[6]: the day number, lease TTL and limiter window, then each check's
        doubles, its cost between the plan's own."""
        head = _THREE_DOUBLES.pack(day_index(self.day), self.lease_ttl_us, RATE_WINDOW_US)
        return head + b"".join(
            [
                before + _COST.pack(check.cost) + after
                for (before, after), check in zip(self.shared.reserve_doubles, self.checks, strict=True)
            ]
        )


@dataclass(slots=True)
class ReserveReply:
    status: Status
    now_us: int
    readings: tuple[Reading, ...] = ()


@dataclass(slots=True)
class SettleCall(_DayKeys):
    tenant: str
    reservation_id: str
    day: date
    checks: tuple[Check, ...]  # as reserved; `cost` is the estimate charged
    actuals: tuple[int, ...]  # the actual amount for each check
    ledger: tuple[tuple[str, int], ...]  # ledger hash field -> increment: the actual cost
    ledger_expire_at: int
    settled_ttl_ms: int
    lease_ttl_us: int
    # Admitted while the store was unreachable: when no reservation record is found (the reserve
    # never ran), the per-minute limits are left alone (see compile_settle).
    degraded: bool = False
    # What the reserve charged to the ledger (its estimate), taken back here; only if the
    # reservation record is still there when the reserve may never have run (degraded, release).
    unledger: tuple[tuple[str, int], ...] = ()
    unledger_if_recorded: bool = False

    def packed_checks(self) -> bytes:
        """settle.lua's ARGV[5]: each check's mechanism code, limit, estimate, actual and counter
        EXPIREAT, as doubles."""
        return b"".join(
            [
                _SETTLE_CHECK.pack(MECHANISM_CODES[c.kind.mechanism], c.limit, c.cost, actual, c.expire_at)
                for c, actual in zip(self.checks, self.actuals, strict=True)
            ]
        )

    def ledger_moves(self) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
        """What the settle moves the ledger by, per field that changes (most of a request's fields,
        its count and images, do not): the same counters as adding `ledger` and taking `unledger`
        back, at a fraction of the increments. Two answers, for the reservation record found and
        not found: both the actual less the estimate, unless `unledger_if_recorded` (then the
        actual alone without the record)."""
        moved = _net(self.ledger, self.unledger)
        if not self.unledger_if_recorded:
            return moved, moved
        return moved, tuple([(name, amount) for name, amount in self.ledger if amount])


def _net(added: Sequence[tuple[str, int]], taken: Sequence[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    """`added` less `taken` per field, without the fields that do not move. The two are usually
    `charge_fields` of one model with the same fields in the same order: then pair by pair, at a
    third of the cost of a dict."""
    if len(added) == len(taken):
        moved = []
        for (name, amount), (other, back) in zip(added, taken, strict=True):
            if name != other:
                break
            if amount != back:
                moved.append((name, amount - back))
        else:
            return tuple(moved)
    net = dict(added)
    for name, amount in taken:
        net[name] = net.get(name, 0) - amount
    return tuple([(name, amount) for name, amount in net.items() if amount])


@dataclass(slots=True)
class RenewCall(_ReservationKeys):
    """Keep a running request's leases (and its record) alive for another lease TTL."""

    tenant: str
    reservation_id: str
    lease_keys: tuple[str, ...]
    lease_ttl_us: int
    record_ttl_ms: int


LedgerHash = tuple[str, date, dict[str, int]]  # tenant, day, field -> count


class Engine(Protocol):
    """Where the state lives: a dict in this process, or Redis. Failures raise; the caller decides."""

    @property
    def times_its_calls(self) -> bool:
        """True: a call the store does not answer fails by itself (the caller sets no timer)."""
        ...

    @property
    def calls_in_order(self) -> bool:
        """True: calls reach the store in the order they are made."""
        ...

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def reserve(self, call: ReserveCall) -> ReserveReply: ...
    async def settle(self, call: SettleCall) -> bool: ...
    async def renew(self, call: RenewCall) -> int: ...
    async def ledger(self, days: Sequence[date], tenant: str | None) -> list[LedgerHash]: ...


def _check(tenant: str, scope: str, planned: PlannedLimit, periods: dict[str, Period]) -> Check:
    """The check of one planned limit on `day`, costing nothing yet."""
    kind, limit, shadow = planned.kind, planned.value, planned.shadow
    if kind.mechanism == "rate":
        key = keys.rate_key(tenant, scope, kind.short)
        return Check(scope, kind, key, limit, 0, RATE_WINDOW_US // 1_000_000, shadow=shadow)
    if kind.mechanism == "lease":
        return Check(scope, kind, keys.lease_key(tenant, scope), limit, 0, 0, shadow=shadow)
    window = periods[kind.mechanism]
    key = keys.window_key(tenant, scope, kind.short, window.label)
    end_us = window.end_s * 1_000_000
    return Check(scope, kind, key, limit, 0, window.seconds, end_us, window.expire_at, shadow)


@dataclass(frozen=True, slots=True, eq=False)
class PlanDay:
    """What every reserve of a plan on one UTC day shares, named once (`plan_day`) and kept."""

    checks: tuple[Check, ...]  # without their costs
    check_keys: tuple[str, ...]
    ledger_key: str
    headers: HeaderPlan  # what their limit headers share
    # Each check's doubles in reserve.lua's ARGV[6] before and after its cost: mechanism, limit,
    # and period end µs, counter EXPIREAT, shadow.
    reserve_doubles: tuple[tuple[bytes, bytes], ...]


def _reserve_doubles(check: Check) -> tuple[bytes, bytes]:
    before = _TWO_DOUBLES.pack(MECHANISM_CODES[check.kind.mechanism], check.limit)
    return before, _THREE_DOUBLES.pack(check.end_us, check.expire_at, 1 if check.shadow else 0)


@functools.lru_cache(maxsize=4096)
def plan_day(plan: LimitPlan, day: date) -> PlanDay:
    """A plan's checks on `day` without their costs: the same for every request of a (tenant, key,
    end user) that day, so named once (key strings, period ends, the header plan) and kept. A
    reload builds new plans, hence new entries; a new day asks for another."""
    periods = {"day": period("day", day), "month": period("month", day)}
    checks = tuple(
        _check(plan.tenant, scope.name, limit, periods) for scope in plan.scopes for limit in scope.limits
    )
    return PlanDay(
        checks,
        tuple(check.key for check in checks),
        keys.ledger_key(plan.tenant, day),
        header_plan(checks),
        tuple(_reserve_doubles(check) for check in checks),
    )


def _costed(shared: PlanDay, cost: Cost) -> tuple[Check, ...]:
    return tuple(
        [
            Check(
                t.scope,
                t.kind,
                t.key,
                t.limit,
                t.kind.amount(cost),
                t.window_s,
                t.end_us,
                t.expire_at,
                t.shadow,
            )
            for t in shared.checks
        ]
    )


def compile_checks(plan: LimitPlan, cost: Cost, day: date) -> tuple[Check, ...]:
    return _costed(plan_day(plan, day), cost)


def ledger_expire_at(settings: StoreSettings, day: date) -> int:
    return period("day", day).end_s + settings.ledger_retention_days * DAY_SECONDS


def compile_reserve(
    plan: LimitPlan,
    cost: Cost,
    *,
    reservation_id: str,
    model: str,
    day: date,
    mode: Mode,
    settings: StoreSettings,
) -> ReserveCall:
    shared = plan_day(plan, day)
    return ReserveCall(
        tenant=plan.tenant,
        reservation_id=reservation_id,
        model=model,
        day=day,
        mode=mode,
        checks=_costed(shared, cost),
        lease_ttl_us=settings.lease_ttl_seconds * 1_000_000,
        record_ttl_ms=settings.lease_ttl_seconds * 1000 + RECORD_GRACE_MS,
        ledger_expire_at=ledger_expire_at(settings, day),
        ledger=() if mode == "peek" else charge_fields(model, cost),
        shared=shared,
    )


def compile_settle(
    tenant: str,
    reservation_id: str,
    day: date,
    checks: Sequence[Check],
    *,
    actual: Cost,
    ledger: Sequence[tuple[str, int]],
    settings: StoreSettings,
    degraded: bool = False,
    unledger: Sequence[tuple[str, int]] = (),
    unledger_if_recorded: bool = False,
) -> SettleCall:
    """The settle of a reservation. A `degraded` one (admitted while the store was unreachable,
    nothing charged) charges its actual cost to the calendar budgets after the fact, but not to
    the per-minute limits: that minute is over, and charging it now would throttle the tenant for
    requests already served. Unless its reserve did run after all (its record is there): then it
    settles like any other."""
    return SettleCall(
        tenant=tenant,
        reservation_id=reservation_id,
        day=day,
        checks=tuple(checks),
        actuals=tuple([check.kind.amount(actual) for check in checks]),
        ledger=tuple(ledger),
        ledger_expire_at=ledger_expire_at(settings, day),
        settled_ttl_ms=settings.lease_ttl_seconds * 1000 + RECORD_GRACE_MS + SETTLED_GRACE_MS,
        lease_ttl_us=settings.lease_ttl_seconds * 1_000_000,
        degraded=degraded,
        unledger=tuple(unledger),
        unledger_if_recorded=unledger_if_recorded or degraded,
    )


def compile_renew(
    tenant: str, reservation_id: str, checks: Sequence[Check], settings: StoreSettings
) -> RenewCall | None:
    """The renewal of a reservation's leases; None when it holds none (no concurrency limit)."""
    leases = tuple(check.key for check in checks if check.kind.mechanism == "lease")
    if not leases:
        return None
    return RenewCall(
        tenant=tenant,
        reservation_id=reservation_id,
        lease_keys=leases,
        lease_ttl_us=settings.lease_ttl_seconds * 1_000_000,
        record_ttl_ms=settings.lease_ttl_seconds * 1000 + RECORD_GRACE_MS,
    )


def compile_release(call: ReserveCall, settings: StoreSettings) -> SettleCall:
    """Undo `call`, whose reply never came: it may or may not have run, and may yet run.

    Settling at nothing: if the reserve ran, the record's amounts are refunded (the request
    itself still counts against per-minute limits, as for any refund), the lease freed and the
    estimate taken out of the ledger again; if it did not, the amounts given here equal the
    actuals and nothing changes. Either way the settled marker is written, and `reserve` refuses
    a settled id, so a reserve that arrives after its release charges nothing.
    """
    nothing = Cost()
    checks = tuple(replace(check, cost=check.kind.amount(nothing)) for check in call.checks)
    return compile_settle(
        call.tenant,
        call.reservation_id,
        call.day,
        checks,
        actual=nothing,
        ledger=(),
        settings=settings,
        unledger=call.ledger,
        unledger_if_recorded=True,
    )


class StoreFailure(Exception):
    """The engine could not answer (connection, timeout, server error): on_unavailable decides."""


class StoreRejected(StoreFailure):
    """The store answered, but refused the call for good (a script error, a key of the wrong type):
    repeating it cannot help, and the store is not down."""
