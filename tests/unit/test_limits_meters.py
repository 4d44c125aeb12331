"""The limiter arithmetic: bursts, smooth refill, waits that are never early, periods."""

from __future__ import annotations

from datetime import date

from hypothesis import given
from hypothesis import strategies as st

from gateway.config.tenants import MAX_PER_MINUTE
from gateway.limits import meters
from gateway.limits.kinds import RATE_WINDOW_US as W
from gateway.limits.periods import day_number, day_of, period
from policies.cost import MAX_REPORTED_TOKENS


def _admit(level: int, limit: int, cost: int) -> tuple[bool, int]:
    code, _ = meters.rate_decide(level, limit, cost, W)
    return code == meters.OK, level + cost * W if code == meters.OK else level


@given(st.integers(min_value=1, max_value=10_000))
def test_a_limit_of_n_admits_exactly_a_burst_of_n(limit: int) -> None:
    level = 0
    for _ in range(limit):
        ok, level = _admit(level, limit, 1)
        assert ok
    assert not _admit(level, limit, 1)[0]


@given(st.integers(min_value=1, max_value=10**8), st.integers(min_value=1, max_value=10**6))
def test_the_wait_is_exactly_when_the_cost_fits(limit: int, cost: int) -> None:
    if cost > limit:
        assert meters.rate_decide(0, limit, cost, W)[0] == meters.TOO_LARGE
        return
    full = limit * W
    code, wait = meters.rate_decide(full, limit, cost, W)
    assert code == meters.WAIT
    assert meters.rate_decide(meters.rate_level(full, 0, wait, limit), limit, cost, W)[0] == meters.OK
    assert meters.rate_decide(meters.rate_level(full, 0, wait - 1, limit), limit, cost, W)[0] == meters.WAIT


@given(st.integers(min_value=1, max_value=10**6), st.integers(min_value=0, max_value=10**6))
def test_readings_agree_with_the_level(limit: int, units: int) -> None:
    level = min(units, limit) * W
    reading = meters.rate_reading(meters.OK, 0, level, limit, W)
    assert reading.used == min(units, limit)
    if level:
        # after `more_us` one more unit is free, and not a microsecond before
        assert meters.ceil_div(meters.rate_level(level, 0, reading.more_us, limit), W) == reading.used - 1
        assert meters.ceil_div(meters.rate_level(level, 0, reading.more_us - 1, limit), W) == reading.used
        assert meters.rate_level(level, 0, reading.reset_us, limit) == 0


def test_the_level_cap_leaves_every_enforced_bucket_alone_and_stops_a_shadow_one() -> None:
    full = MAX_PER_MINUTE * W  # the most a reserve leaves in an enforced bucket, at the largest limit
    assert meters.rate_charged(full - W, 1, W) == full
    assert meters.rate_charged(full, 119_987, W) == full + 119_987 * W  # a settle's excess beyond it
    assert meters.rate_charged(full, 119_988, W) == meters.LEVEL_CAP
    # A shadow bucket charged the most usage the gateway believes, over and over, stays exact.
    assert meters.rate_charged(meters.LEVEL_CAP, MAX_REPORTED_TOKENS, W) == meters.LEVEL_CAP == 2**53 - 1
    assert meters.rate_charged(5 * W, -10, W) == 0  # a settle's refund stops at empty


def test_a_clock_that_steps_back_drains_nothing() -> None:
    assert meters.rate_level(5 * W, 1_000, 500, 10) == 5 * W


def test_calendar_windows() -> None:
    assert meters.window_decide(90, 100, 10, 5_000, 1_000) == (meters.OK, 0)
    assert meters.window_decide(91, 100, 10, 5_000, 1_000) == (meters.EXHAUSTED, 4_000)
    assert meters.window_decide(0, 100, 101, 5_000, 1_000) == (meters.TOO_LARGE, 0)
    assert meters.window_reading(meters.OK, 0, 0, 5_000, 1_000).reset_us == 0


def test_leases() -> None:
    assert meters.lease_decide(3, 4, 10_000_000, 0) == (meters.OK, 0)
    assert meters.lease_decide(4, 4, 10_000_000, 0) == (meters.WAIT, meters.LEASE_RETRY_US)
    assert meters.lease_decide(4, 4, 300, 0) == (meters.WAIT, 300)  # that lease expires sooner
    assert meters.lease_decide(0, 0, 0, 0) == (meters.TOO_LARGE, 0)
    reading = meters.lease_reading(meters.OK, 0, [50, 90], 2, 10)
    assert (reading.used, reading.reset_us, reading.more_us) == (2, 80, 40)


def test_periods() -> None:
    assert day_of(day_number(1_772_323_199.9)) == date(2026, 2, 28)
    assert day_of(day_number(1_772_323_200)) == date(2026, 3, 1)
    december = period("month", date(2025, 12, 31))
    assert (december.label, december.seconds) == ("2025-12", 31 * 86_400)
    assert period("month", date(2024, 2, 10)).seconds == 29 * 86_400
    assert period("day", date(2026, 3, 1)).label == "2026-03-01"
