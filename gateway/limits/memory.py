"""The in-process engine: the same keys and the same semantics as the Redis scripts, in a dict.

For one process only (tests, the demo, a single-worker deployment): `Settings` refuses several
workers on the memory backend. Time comes from the injected clock, which is what lets tests
cross a UTC midnight or expire a lease without waiting. Keys expire as they would in Redis:
lazily on access, and in a sweep at most every few seconds of clock time.

This engine is the readable reference for `lua/reserve.lua` and `lua/settle.lua`: both follow the
same steps in the same order, on the arithmetic in `meters`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date
from typing import Any

from gateway.limits import meters
from gateway.limits.calls import Check, LedgerHash, RenewCall, ReserveCall, ReserveReply, SettleCall
from gateway.limits.keys import parse_ledger_key
from gateway.limits.kinds import RATE_WINDOW_US
from gateway.limits.ledger import REJECTED_QUOTA, REJECTED_RATE, SHADOW_REJECTED, field
from gateway.limits.meters import OK, Reading
from gateway.limits.periods import day_number, day_of

_SWEEP_EVERY_US = 10_000_000
_REFUSED_FOR_QUOTA = (meters.EXHAUSTED, meters.TOO_LARGE)


class MemoryEngine:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._data: dict[str, Any] = {}
        self._expiry: dict[str, int] = {}  # key -> µs
        self._swept_at = 0

    times_its_calls = True  # nothing to wait for
    calls_in_order = True  # applied as they are made

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    # --- keyspace ------------------------------------------------------------------------------

    def _now(self) -> int:
        now = round(self._clock() * 1_000_000)
        if now - self._swept_at >= _SWEEP_EVERY_US:
            self._swept_at = now
            for key in [k for k, at in self._expiry.items() if at <= now]:
                self._delete(key)
        return now

    def _get(self, key: str, now: int) -> Any:
        at = self._expiry.get(key)
        if at is not None and at <= now:
            self._delete(key)
        return self._data.get(key)

    def _set(self, key: str, value: Any, expire_at_us: int, now: int) -> None:
        if expire_at_us <= now:
            self._delete(key)
            return
        self._data[key] = value
        self._expiry[key] = expire_at_us

    def _delete(self, key: str) -> None:
        self._data.pop(key, None)
        self._expiry.pop(key, None)

    def _hincr(self, key: str, counts: Sequence[tuple[str, int]], expire_at_s: int, now: int) -> None:
        current: dict[str, int] = self._get(key, now) or {}
        if not counts:  # EXPIREAT alone (a settle that moves nothing): a missing key is not created
            if current:
                self._set(key, current, expire_at_s * 1_000_000, now)
            return
        for name, amount in counts:
            current[name] = current.get(name, 0) + amount
            if amount < 0 and current[name] == 0:  # taken back to nothing (settle.lua's HDEL)
                del current[name]
        if current:
            self._set(key, current, expire_at_s * 1_000_000, now)
        else:
            self._delete(key)

    # --- reserve -------------------------------------------------------------------------------

    async def reserve(self, call: ReserveCall) -> ReserveReply:
        now = self._now()
        if day_of(day_number(now / 1e6)) != call.day:
            return ReserveReply("wrong_day", now)
        if call.mode != "peek" and self._get(call.settled_key, now) is not None:
            return ReserveReply("settled", now)
        decisions = [self._decide(check, call, now) for check in call.checks]
        codes = [(code, check.shadow) for (code, _), check in zip(decisions, call.checks, strict=True)]
        refused = [code for code, shadow in codes if code != OK and not shadow]
        shadowed = any(code != OK and shadow for code, shadow in codes)
        if call.mode == "peek" or (refused and call.mode == "enforce"):
            if call.mode == "enforce":
                counter = REJECTED_QUOTA if set(refused) & set(_REFUSED_FOR_QUOTA) else REJECTED_RATE
                self._hincr(call.ledger_key, [(field(counter, call.model), 1)], call.ledger_expire_at, now)
            readings = [self._read(c, call, d, now) for c, d in zip(call.checks, decisions, strict=True)]
            return ReserveReply("peeked" if call.mode == "peek" else "rejected", now, tuple(readings))
        readings = []
        for check, decision in zip(call.checks, decisions, strict=True):
            self._charge(check, call, now)
            readings.append(self._read(check, call, decision, now))
        record = tuple(check.cost for check in call.checks)
        self._set(call.record_key, record, now + call.record_ttl_ms * 1000, now)
        self._hincr(call.ledger_key, call.ledger, call.ledger_expire_at, now)
        if refused or shadowed:
            self._hincr(
                call.ledger_key, [(field(SHADOW_REJECTED, call.model), 1)], call.ledger_expire_at, now
            )
        return ReserveReply("admitted", now, tuple(readings))

    def _level(self, check: Check, now: int) -> int:
        state = self._get(check.key, now)
        return 0 if state is None else meters.rate_level(state[0], state[1], now, check.limit)

    def _leases(self, check: Check, now: int) -> dict[str, int]:
        leases: dict[str, int] = self._get(check.key, now) or {}
        for member in [m for m, at in leases.items() if at <= now]:
            del leases[member]  # a crashed process's lease frees itself here
        return leases

    def _decide(self, check: Check, call: ReserveCall, now: int) -> tuple[int, int]:
        mechanism = check.kind.mechanism
        if mechanism == "rate":
            return meters.rate_decide(self._level(check, now), check.limit, check.cost, RATE_WINDOW_US)
        if mechanism == "lease":
            leases = self._leases(check, now)
            earliest = min(leases.values(), default=now)
            return meters.lease_decide(len(leases), check.limit, earliest, now)
        used = self._get(check.key, now) or 0
        return meters.window_decide(used, check.limit, check.cost, check.end_us, now)

    def _charge(self, check: Check, call: ReserveCall, now: int) -> None:
        mechanism = check.kind.mechanism
        if mechanism == "rate":
            self._charge_level(check, check.cost, now)
        elif mechanism == "lease":
            leases = self._leases(check, now)
            leases[call.reservation_id] = now + call.lease_ttl_us
            self._set(check.key, leases, now + call.lease_ttl_us, now)
        elif check.cost:
            used = (self._get(check.key, now) or 0) + check.cost
            self._set(check.key, used, check.expire_at * 1_000_000, now)

    def _charge_level(self, check: Check, units: int, now: int) -> None:
        """Charge a bucket `units` (a settle's difference may be negative): see `meters.rate_charged`."""
        level = meters.rate_charged(self._level(check, now), units, RATE_WINDOW_US)
        if level == 0:
            self._delete(check.key)
            return
        ttl_ms = meters.rate_ttl_ms(level, check.limit, RATE_WINDOW_US)
        self._set(check.key, (level, now), now + ttl_ms * 1000, now)

    def _read(self, check: Check, call: ReserveCall, decision: tuple[int, int], now: int) -> Reading:
        code, wait = decision
        mechanism = check.kind.mechanism
        if mechanism == "rate":
            return meters.rate_reading(code, wait, self._level(check, now), check.limit, RATE_WINDOW_US)
        if mechanism == "lease":
            return meters.lease_reading(code, wait, list(self._leases(check, now).values()), check.limit, now)
        return meters.window_reading(code, wait, self._get(check.key, now) or 0, check.end_us, now)

    # --- settle --------------------------------------------------------------------------------

    async def settle(self, call: SettleCall) -> bool:
        now = self._now()
        if self._get(call.settled_key, now) is not None:
            return False
        record = self._get(call.record_key, now)
        estimates = record if record is not None else tuple(check.cost for check in call.checks)
        for check, estimate, actual in zip(call.checks, estimates, call.actuals, strict=True):
            unreserved_rate = check.kind.mechanism == "rate" and call.degraded and record is None
            self._adjust(check, call, 0 if unreserved_rate else actual - estimate, now)
        recorded, unrecorded = call.ledger_moves()
        self._hincr(
            call.ledger_key, recorded if record is not None else unrecorded, call.ledger_expire_at, now
        )
        self._delete(call.record_key)
        self._set(call.settled_key, True, now + call.settled_ttl_ms * 1000, now)
        return True

    def _adjust(self, check: Check, call: SettleCall, diff: int, now: int) -> None:
        mechanism = check.kind.mechanism
        if mechanism == "lease":
            leases = self._leases(check, now)
            leases.pop(call.reservation_id, None)
            if not leases:
                self._delete(check.key)
        elif diff == 0:
            return
        elif mechanism == "rate":
            self._charge_level(check, diff, now)
        else:
            used = max(0, (self._get(check.key, now) or 0) + diff)
            self._set(check.key, used, check.expire_at * 1_000_000, now)

    # --- renew ---------------------------------------------------------------------------------

    async def renew(self, call: RenewCall) -> int:
        now = self._now()
        renewed = 0
        for key in call.lease_keys:
            leases: dict[str, int] = self._get(key, now) or {}
            if leases.get(call.reservation_id, 0) > now:
                leases[call.reservation_id] = now + call.lease_ttl_us
                self._set(key, leases, now + call.lease_ttl_us, now)
                renewed += 1
        record = self._get(call.record_key, now)
        if renewed and record is not None:
            self._set(call.record_key, record, now + call.record_ttl_ms * 1000, now)
        return renewed

    # --- ledger --------------------------------------------------------------------------------

    async def ledger(self, days: Sequence[date], tenant: str | None) -> list[LedgerHash]:
        now, wanted = self._now(), set(days)
        found: list[LedgerHash] = []
        for key in list(self._data):
            parsed = parse_ledger_key(key)
            if parsed is None or parsed[1] not in wanted or (tenant is not None and parsed[0] != tenant):
                continue
            counters = self._get(key, now)
            if counters:
                found.append((parsed[0], parsed[1], dict(counters)))
        return found

    # --- for tests -------------------------------------------------------------------------------

    def live_keys(self) -> dict[str, int | None]:
        """Every live key and when it expires (µs; None: never), for tests that assert nothing leaks."""
        now = self._now()
        return {key: self._expiry.get(key) for key in list(self._data) if self._get(key, now) is not None}
