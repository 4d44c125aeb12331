"""The limiter arithmetic, in pure integers: the reference that `lua/reserve.lua` mirrors.

Smooth per-minute limits are a leaky bucket used as a meter (the same decisions as GCRA). We
chose it over a refilling token bucket and over GCRA's single timestamp for three reasons:

* settle must replace an estimate with the actual cost. On a bucket level that is "add the
  difference, never below empty"; on a GCRA timestamp the same thing is harder to state and to
  clamp, and a token count can be refunded above its capacity.
* it is exact in integers. The level is kept in "unit-microseconds": a unit of cost adds
  `window_us` (60e6) and the level drains by `limit` per microsecond. A limit of N therefore
  holds exactly N units (a burst of N) and frees one every 60/N seconds, with no float rounding
  at the boundary (N=7 admits 7, never 6). Lua numbers are doubles, exact below 2**53, which
  bounds per-minute limits at ~1.5e8 units: far above any image tenant's tokens per minute.
* used, remaining and reset read straight off the level, for headers and the admin API.

Calendar windows are plain counters, leases are counted after purging the expired ones. Every
reading says what the limit looks like *after* the decision: charged if admitted, untouched if not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

OK = 0  # fits
WAIT = 1  # does not fit now, will within seconds (RateLimited)
EXHAUSTED = 2  # the calendar window is spent until it ends (QuotaExceeded)
TOO_LARGE = 3  # can never fit: the cost is above the limit itself (QuotaExceeded)

# A concurrency slot frees when any running request ends, which no limiter can foresee; the
# earliest lease expiry is only an upper bound. Clients are told to retry after at most this.
LEASE_RETRY_US = 1_000_000


@dataclass(slots=True)
class Reading:
    """One limit's state: the decision for this request and what a client may be told."""

    code: int
    used: int  # units used (rounded up for the smooth limiter)
    reset_us: int  # until fully replenished
    wait_us: int  # until this request's cost would fit (0 when it fits or never will)
    more_us: int  # until one more unit frees (0 when nothing is used)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --- smooth per-minute limits (leaky bucket meter) ----------------------------------------------


# The most a bucket holds, in unit-microseconds: the largest count a double (Lua's number) holds
# exactly, so both engines compute the same numbers from it (and `%d`, which wrapped past 2**63,
# prints it). A shadow limit is charged even when full and stops here. An enforced bucket gets here
# only by an absurd settle: a reserve fills it to its capacity at most (9e15 at the largest limit,
# MAX_PER_MINUTE), a settle adds the actual's excess over the estimate (119,987 units more still fit).
LEVEL_CAP = 2**53 - 1


def rate_level(level: int, stamp_us: int, now_us: int, limit: int) -> int:
    """The level at `now_us`, drained since `stamp_us` (a clock that stepped back drains nothing)."""
    return max(0, level - max(0, now_us - stamp_us) * limit)


def rate_decide(level: int, limit: int, cost: int, window_us: int) -> tuple[int, int]:
    """(code, wait_us) for charging `cost` units on a bucket at `level`."""
    if cost == 0:
        return OK, 0
    capacity, need = limit * window_us, cost * window_us
    if need > capacity:
        return TOO_LARGE, 0
    over = level - (capacity - need)  # level + need - capacity, in reserve.lua's exact order
    if over > 0:
        return WAIT, ceil_div(over, limit)
    return OK, 0


def rate_charged(level: int, units: int, window_us: int) -> int:
    """The level once `units` more are charged (fewer, if negative: a settle's refund), between
    empty and LEVEL_CAP."""
    return min(LEVEL_CAP, max(0, level + units * window_us))


def rate_reading(code: int, wait_us: int, level: int, limit: int, window_us: int) -> Reading:
    used = ceil_div(level, window_us)
    if limit == 0 or level == 0:
        return Reading(code, used, 0, wait_us, 0)
    more = ceil_div(level - (used - 1) * window_us, limit)
    return Reading(code, used, ceil_div(level, limit), wait_us, more)


def rate_ttl_ms(level: int, limit: int, window_us: int) -> int:
    """How long a bucket key must live: until it has drained, plus a second of slack."""
    drain_us = window_us if limit == 0 else ceil_div(level, limit)
    return ceil_div(drain_us, 1000) + 1000


# --- calendar windows ----------------------------------------------------------------------------


def window_decide(used: int, limit: int, cost: int, end_us: int, now_us: int) -> tuple[int, int]:
    if cost == 0:
        return OK, 0
    if cost > limit:
        return TOO_LARGE, 0
    if used + cost > limit:
        return EXHAUSTED, end_us - now_us
    return OK, 0


def window_reading(code: int, wait_us: int, used: int, end_us: int, now_us: int) -> Reading:
    left = end_us - now_us if used > 0 else 0
    return Reading(code, used, left, wait_us, left)


# --- concurrency leases ---------------------------------------------------------------------------


def lease_decide(count: int, limit: int, earliest_us: int, now_us: int) -> tuple[int, int]:
    """(code, wait_us) for taking one more lease when `count` live leases exist."""
    if limit == 0:
        return TOO_LARGE, 0
    if count + 1 > limit:
        return WAIT, min(LEASE_RETRY_US, earliest_us - now_us)
    return OK, 0


def lease_reading(code: int, wait_us: int, expiries: Sequence[int], limit: int, now_us: int) -> Reading:
    """The reading for the live leases' expiry times (µs)."""
    count = len(expiries)
    if count == 0:
        return Reading(code, 0, 0, wait_us, 0)
    more = min(expiries) - now_us if count >= limit else 0
    return Reading(code, count, max(expiries) - now_us, wait_us, more)
