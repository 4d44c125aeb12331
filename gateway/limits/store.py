"""The store's public face: the `Store` protocol the pipeline and the admin API call, and its data.

A `Reservation` is everything settle needs, and it serialises (`to_dict` / `from_dict`), so a
request admitted by one process can be settled by another. Its id is the request id plus a
suffix unique to this reservation: request ids may come from clients (`x-request-id`), and two
requests reusing one id must never share, or cancel, each other's reservation. The suffix is a
random prefix drawn once per process (48 bits: new at every start, and in a forked child) and a
counter, so ids stay unique across processes and restarts without a system call per request.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any, Protocol

from gateway.errors import GatewayError
from gateway.limits.calls import Check
from gateway.limits.ledger import LedgerRow
from gateway.limits.plan import LimitPlan
from policies.cost import Cost


class _IdSuffixes:
    """`<process prefix>-<counter>`: the prefix random per process, the counter in hex."""

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self.prefix = secrets.token_hex(6) + "-"
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


_suffixes = _IdSuffixes()


def new_reservation_id(request_id: str) -> str:
    return f"{request_id}.{_suffixes.next()}"


@dataclass(slots=True)
class Reservation:
    id: str
    request_id: str
    tenant: str
    model: str
    day: date  # the UTC day of admission: the ledger day the request is recorded under
    estimate: Cost
    checks: tuple[Check, ...]  # what was charged, key by key
    shadow: bool = False
    degraded: bool = False  # admitted without the store (fail_open): settle charges after the fact

    @property
    def holds_leases(self) -> bool:
        """Whether it took concurrency leases, which the store renews until it is settled."""
        return not self.degraded and any(check.kind.mechanism == "lease" for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "request_id": self.request_id,
            "tenant": self.tenant,
            "model": self.model,
            "day": self.day.isoformat(),
            "estimate": asdict(self.estimate),
            "checks": [check.to_dict() for check in self.checks],
            "shadow": self.shadow,
            "degraded": self.degraded,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Reservation:
        return Reservation(
            id=data["id"],
            request_id=data["request_id"],
            tenant=data["tenant"],
            model=data["model"],
            day=date.fromisoformat(data["day"]),
            estimate=Cost(**data["estimate"]),
            checks=tuple(Check.from_dict(c) for c in data["checks"]),
            shadow=data["shadow"],
            degraded=data["degraded"],
        )


class Admission:
    """The store's decision on one request, and the rate-limit headers for its response.

    An admitted request's headers are rendered when first asked for, not when the store answers:
    they are first needed once the upstream has answered, so the pipeline has them rendered while
    the upstream works (`render`) and the upstream request goes out a little sooner."""

    __slots__ = ("_headers", "_render", "allowed", "error", "reservation", "shadow_rejections")

    def __init__(
        self,
        allowed: bool,
        reservation: Reservation | None,  # None when rejected
        error: GatewayError | None,  # RateLimited, QuotaExceeded or StoreUnavailable when rejected
        headers: dict[str, str] | Callable[[], dict[str, str]],  # or what renders them, once
        shadow_rejections: list[str] | None = None,  # `<scope>.<limit>` that would reject
    ) -> None:
        self.allowed = allowed
        self.reservation = reservation
        self.error = error
        self.shadow_rejections = shadow_rejections if shadow_rejections is not None else []
        self._headers: dict[str, str] | None = None
        self._render: Callable[[], dict[str, str]] | None = None
        if callable(headers):
            self._render = headers
        else:
            self._headers = headers

    @property
    def headers(self) -> dict[str, str]:
        """The rate-limit headers for the response, allowed or not."""
        if self._headers is None:
            self.render()
        assert self._headers is not None
        return self._headers

    def render(self) -> None:
        """Render the headers now, if they are not yet."""
        if self._render is not None:
            self._headers, self._render = self._render(), None


@dataclass(frozen=True, slots=True)
class LimitStatus:
    scope: str  # tenant | key:<name> | user:<digest>
    limit: str  # requests_per_minute, ...
    unit: str  # requests | images | tokens | nano_usd
    value: int
    used: int
    remaining: int
    reset_seconds: float  # until fully replenished (0 when nothing is used)
    mode: str = "enforce"  # shadow: this limit alone is dark-launched (counted, never rejecting)


class Store(Protocol):
    @property
    def settles_in_order(self) -> bool:
        """Whether its calls reach the store in the order they are made (a settle queued before
        the next reserve is applied before it)."""
        ...

    async def start(self) -> None: ...
    async def close(self) -> int: ...  # how many settlements and releases it had to give up
    async def reserve(self, plan: LimitPlan, cost: Cost, *, request_id: str, model: str) -> Admission: ...
    def hold(self, reservation: Reservation) -> None: ...
    async def settle(self, reservation: Reservation, actual: Cost, *, outcome: str) -> bool: ...
    async def limit_status(self, plan: LimitPlan) -> list[LimitStatus]: ...
    async def ledger(self, start: date, end: date, tenant: str | None = None) -> list[LedgerRow]: ...
    async def healthy(self) -> bool: ...
