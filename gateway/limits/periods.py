"""UTC calendar periods for day and month windows: their names, bounds and key lifetimes.

A window's counter is named after its period (`2026-05-09`, `2026-05`), so a new period starts
from a fresh key and nothing ever has to reset a counter that concurrent requests are writing.
The counter outlives its period by `GRACE_SECONDS` so that a request admitted just before
midnight settles against the window it was charged to.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from gateway.limits.kinds import Mechanism

DAY_SECONDS = 86_400
GRACE_SECONDS = DAY_SECONDS
_EPOCH = date(1970, 1, 1)


@dataclass(frozen=True, slots=True)
class Period:
    label: str  # the key suffix
    start_s: int  # unix seconds, inclusive
    end_s: int  # unix seconds, exclusive

    @property
    def seconds(self) -> int:
        return self.end_s - self.start_s

    @property
    def expire_at(self) -> int:
        """When the period's counter may be dropped (unix seconds)."""
        return self.end_s + GRACE_SECONDS


def day_number(unix_seconds: float) -> int:
    """Days since 1970-01-01 in UTC: the same number `reserve.lua` computes from Redis TIME."""
    return int(unix_seconds // DAY_SECONDS)


def day_of(number: int) -> date:
    return _EPOCH + timedelta(days=number)


def _unix(day: date) -> int:
    return (day - _EPOCH).days * DAY_SECONDS


def _next_month(day: date) -> date:
    return date(day.year + 1, 1, 1) if day.month == 12 else date(day.year, day.month + 1, 1)


@functools.lru_cache(maxsize=64)  # a pure function of its arguments, asked twice per request
def period(mechanism: Mechanism, day: date) -> Period:
    """The day or month window containing `day`."""
    if mechanism == "day":
        start = _unix(day)
        return Period(day.isoformat(), start, start + DAY_SECONDS)
    if mechanism == "month":
        first = day.replace(day=1)
        return Period(first.strftime("%Y-%m"), _unix(first), _unix(_next_month(first)))
    raise ValueError(f"{mechanism} limits have no calendar period")


def iso_instant(unix_seconds: int) -> str:
    return datetime.fromtimestamp(unix_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def days_between(start: date, end: date) -> list[date]:
    """Every day from `start` to `end`, both included."""
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def day_index(day: date) -> int:
    """The inverse of `day_of`: days since 1970-01-01."""
    return (day - _EPOCH).days
