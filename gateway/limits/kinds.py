"""The seven limits a scope can carry: what each one counts, how it is metered, how it is named.

Three mechanisms meter them:

* ``rate`` (requests, images and tokens per minute): a smooth limiter, see `meters`.
* ``day`` / ``month`` (tokens per day, USD per day and per month): calendar windows in UTC, one
  counter per period, named after it, expiring a grace period after the period ends.
* ``lease`` (concurrent requests): a sorted set of leases scored by their expiry.

This table is the only place a limit's name, unit and header category are chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from gateway.config import Limits
from policies.cost import NANO_PER_USD, Cost

Mechanism = Literal["rate", "day", "month", "lease"]
Unit = Literal["requests", "images", "tokens", "nano_usd"]

RATE_WINDOW_US = 60_000_000  # every smooth limit is "per minute"


@dataclass(frozen=True, slots=True)
class LimitKind:
    name: str  # the config key, e.g. requests_per_minute
    short: str  # in Redis keys and RateLimit-Policy names, e.g. rpm
    mechanism: Mechanism
    unit: Unit
    header: str | None  # x-ratelimit-*-<header>; None: not advertised (concurrency)

    @property
    def retryable(self) -> bool:
        """Whether a rejection clears within seconds (429 rate_limit_exceeded) or not (quota)."""
        return self.mechanism in ("rate", "lease")

    def amount(self, cost: Cost) -> int:
        """What one request with this cost counts against the limit.

        A request counts once against request and concurrency limits whatever its cost, so a
        refund (settling at `Cost()`) still counts the request.
        """
        if self.unit == "requests":
            return 1
        if self.unit == "images":
            return cost.images
        if self.unit == "tokens":
            return cost.tokens
        return cost.nano_usd


KINDS: tuple[LimitKind, ...] = (
    LimitKind("requests_per_minute", "rpm", "rate", "requests", "requests"),
    LimitKind("images_per_minute", "ipm", "rate", "images", "images"),
    LimitKind("tokens_per_minute", "tpm", "rate", "tokens", "tokens"),
    LimitKind("tokens_per_day", "tpd", "day", "tokens", "tokens"),
    LimitKind("usd_per_day", "usd-day", "day", "nano_usd", "usd"),
    LimitKind("usd_per_month", "usd-month", "month", "nano_usd", "usd"),
    LimitKind("concurrent_requests", "concurrency", "lease", "requests", None),
)
KIND_BY_NAME: dict[str, LimitKind] = {kind.name: kind for kind in KINDS}


def configured(limits: Limits) -> list[tuple[LimitKind, int]]:
    """The limits that are set, in table order, with USD converted to integer nano-USD."""
    out: list[tuple[LimitKind, int]] = []
    for kind in KINDS:
        value = getattr(limits, kind.name)
        if value is None:
            continue
        if kind.unit == "nano_usd":
            value = int(Decimal(value) * NANO_PER_USD)
        out.append((kind, int(value)))
    return out
