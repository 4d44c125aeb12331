"""From the engine's readings to an `Admission`: the error, its message, headers and metrics.

Which error answers a rejection: a spent calendar budget, or a request larger than a limit
itself, is `QuotaExceeded` (429 insufficient_quota, `x-should-retry: false`): retrying cannot
help before the period ends. Otherwise the request waits on a per-minute or concurrency limit
and gets `RateLimited` (429 rate_limit_exceeded) with `Retry-After` / `retry-after-ms` set to the
longest wait among the limits that refused it. When both kinds refuse, quota wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from gateway.errors import GatewayError, QuotaExceeded, RateLimited
from gateway.limits import headers
from gateway.limits.calls import Check, ReserveCall, ReserveReply
from gateway.limits.meters import EXHAUSTED, OK, TOO_LARGE, Reading
from gateway.limits.periods import iso_instant
from gateway.limits.plan import LimitPlan
from gateway.limits.store import Admission, Reservation
from gateway.telemetry.metrics import KeptCounter, Metrics
from policies.cost import NANO_PER_USD

Observed = tuple[Check, Reading]

NEAR_LIMIT = 0.8  # share of a limit in use from which an admission counts as near_limit


def metric_label(check: Check) -> str:
    """A bounded `limit` label: the kind, prefixed by the scope class for key and user scopes."""
    scope = check.scope.split(":", 1)[0]
    return check.kind.name if scope == "tenant" else f"{scope}.{check.kind.name}"


def _amount(check: Check, amount: int) -> str:
    if check.kind.unit == "nano_usd":
        return "$" + headers.usd_text(amount)
    return f"{amount} {check.kind.unit}"


def _message(check: Check, reading: Reading, label: str) -> str:
    kind, needs = check.kind, _amount(check, check.cost)
    if reading.code == TOO_LARGE:
        return (
            f"This request needs {needs} but {kind.name} of {label} is {_amount(check, check.limit)}: "
            "it can never be admitted under this limit."
        )
    limit, used = _amount(check, check.limit), _amount(check, reading.used)
    state = f"limit {limit}, used {used}, this request needs {needs}"
    retry = headers.go_duration(reading.wait_us)
    if reading.code == EXHAUSTED:
        resets = iso_instant(check.end_us // 1_000_000)
        return f"Quota exceeded for {kind.name} of {label}: {state}. It resets at {resets}."
    if kind.mechanism == "lease":
        return (
            f"Concurrency limit reached for {kind.name} of {label}: {reading.used} requests are running, "
            f"the limit is {check.limit}. A slot frees when one of them ends; retry in {retry}."
        )
    return f"Rate limit reached for {kind.name} of {label}: {state}. Retry in {retry}."


def _error(refusing: Sequence[Observed], labels: dict[str, str], header_map: dict[str, str]) -> GatewayError:
    quota = [o for o in refusing if o[1].code in (EXHAUSTED, TOO_LARGE)]
    if quota:
        check, reading = max(quota, key=lambda o: (o[1].code, o[1].wait_us))
        return QuotaExceeded(_message(check, reading, labels[check.scope]), headers=header_map)
    check, reading = max(refusing, key=lambda o: o[1].wait_us)
    return RateLimited(_message(check, reading, labels[check.scope]), headers=header_map)


def _retry_after_us(refusing: Sequence[Observed]) -> int | None:
    if any(reading.code == TOO_LARGE for _, reading in refusing):
        return None  # no wait makes it fit
    return max(reading.wait_us for _, reading in refusing)


class DecisionMetrics:
    """`ratelimit_decisions` and `budget_remaining` for each admission's readings.

    Two series per limit per admission, with ten limits a tenth of the admission's CPU through
    prometheus_client (a label lookup, checks and a lock per update). So they are counted here in
    plain dicts and applied to the metrics whenever the registry is read (a scrape, in this
    process) and once a second (`flush`, from the store: with workers, a scrape reads every
    worker's metric files, not this process's registry)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._decisions = KeptCounter(metrics, metrics.ratelimit_decisions)
        # (tenant, limit) -> its last observation; what is left is worked out when applied
        self._remaining: dict[tuple[str, str], Observed] = {}
        metrics.before_collect(self.flush)

    def record(self, tenant: str, observed: Sequence[Observed], refused: str) -> None:
        """Count each limit's outcome: ok, near_limit (admitted at NEAR_LIMIT or more), or `refused`
        (over_limit, or shadow when a shadow-mode tenant would have been rejected)."""
        decisions, remaining = self._decisions, self._remaining
        for check, reading in observed:
            if reading.code != OK:
                outcome = "shadow" if check.shadow else refused
            elif check.limit and reading.used >= NEAR_LIMIT * check.limit:
                outcome = "near_limit"
            else:
                outcome = "ok"
            decisions.inc((tenant, metric_label(check), outcome))
            if check.scope == "tenant":
                remaining[tenant, check.kind.name] = (check, reading)

    def flush(self) -> None:
        """Apply the remaining amounts observed since the last flush (the decisions' counter
        applies itself, on the same occasions)."""
        remaining, self._remaining = self._remaining, {}
        for (tenant, limit), (check, reading) in remaining.items():
            self._metrics.budget_remaining.labels(tenant, limit).set(_left(check, reading))


def _left(check: Check, reading: Reading) -> float:
    left = max(0, check.limit - reading.used)
    return left / NANO_PER_USD if check.kind.unit == "nano_usd" else left


def decide(
    plan: LimitPlan,
    call: ReserveCall,
    reply: ReserveReply,
    reservation: Reservation,
    metrics: DecisionMetrics,
) -> Admission:
    """The admission for an engine's answer to `call` (admitted, or rejected with nothing charged)."""
    observed = list(zip(call.checks, reply.readings, strict=True))
    if reply.status == "admitted":
        metrics.record(plan.tenant, observed, "shadow")
        shadow = [f"{check.scope}.{check.kind.name}" for check, reading in observed if reading.code != OK]
        # rendered once the upstream request is out (see `Admission`)
        shared = call.shared.headers
        render = partial(headers.render, observed, plan=shared, rejected=False, retry_after_us=None)
        return Admission(True, reservation, None, render, shadow)
    # Rejected by the enforced limits; a shadowed limit that would refuse too is only counted.
    refusing = [o for o in observed if o[1].code != OK and not o[0].shadow]
    metrics.record(plan.tenant, observed, "over_limit")
    header_map = headers.render(
        observed, plan=call.shared.headers, rejected=True, retry_after_us=_retry_after_us(refusing)
    )
    labels = {scope.name: scope.label for scope in plan.scopes}
    return Admission(False, None, _error(refusing, labels, header_map), header_map)
