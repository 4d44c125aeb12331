"""Header rendering and merging: Go durations, USD text, and never more permissive than upstream."""

from __future__ import annotations

import pytest

from gateway.limits.calls import Check
from gateway.limits.headers import (
    go_duration,
    header_plan,
    merge_upstream_limit_headers,
    parse_duration_us,
    render,
    usd_text,
)
from gateway.limits.kinds import KIND_BY_NAME
from gateway.limits.meters import OK, Reading


@pytest.mark.parametrize(
    ("us", "text"),
    [
        (-5, "0s"),
        (0, "0s"),
        (1, "1ms"),  # rounded up: never earlier than the real reset
        (20_000, "20ms"),
        (999_001, "1s"),
        (1_000_000, "1s"),
        (1_500_000, "1.5s"),
        (8_640_000, "8.64s"),
        (60_000_000, "1m0s"),
        (360_000_000, "6m0s"),
        (61_001_000, "1m1.001s"),
        (3_600_000_000, "1h0m0s"),
        (90_061_000_000, "25h1m1s"),
    ],
)
def test_go_durations(us: int, text: str) -> None:
    assert go_duration(us) == text
    parsed = parse_duration_us(text)
    assert parsed is not None and parsed >= us


@pytest.mark.parametrize("text", ["", "abc", "1x", "1m s"])
def test_unparseable_durations(text: str) -> None:
    assert parse_duration_us(text) is None


def test_plain_seconds_parse_as_durations() -> None:
    assert parse_duration_us("60") == 60_000_000


@pytest.mark.parametrize(
    ("nano", "text"),
    [
        (0, "0"),
        (50_000_000_000, "50"),
        (170_000_000, "0.17"),
        (12_000_000_001, "12.000000001"),
        (-500_000_000, "-0.5"),
        (-2_000_000_000, "-2"),
    ],
)
def test_usd_text_is_exact(nano: int, text: str) -> None:
    assert usd_text(nano) == text


OURS = {
    "x-ratelimit-limit-requests": "60",
    "x-ratelimit-remaining-requests": "59",
    "x-ratelimit-reset-requests": "1s",
    "x-ratelimit-limit-tokens": "200000",
    "x-ratelimit-remaining-tokens": "190000",
    "x-ratelimit-reset-tokens": "3s",
    "RateLimit-Policy": '"rpm";q=60;w=60',
    "RateLimit": '"rpm";r=59;t=1',
}


def test_merge_keeps_the_lower_remaining_and_the_later_reset() -> None:
    upstream = {
        "X-RateLimit-Limit-Requests": "5",
        "X-RateLimit-Remaining-Requests": "4",
        "X-RateLimit-Reset-Requests": "12s",
        "x-ratelimit-limit-tokens": "1000000",
        "x-ratelimit-remaining-tokens": "999000",
        "x-ratelimit-reset-tokens": "20ms",
    }
    merged = merge_upstream_limit_headers(OURS, upstream)
    assert merged["x-ratelimit-limit-requests"] == "5"
    assert merged["x-ratelimit-remaining-requests"] == "4"
    assert merged["x-ratelimit-reset-requests"] == "12s"
    assert merged["x-ratelimit-limit-tokens"] == "200000"  # ours is tighter
    assert merged["x-ratelimit-remaining-tokens"] == "190000"
    assert merged["x-ratelimit-reset-tokens"] == "3s"


def test_merge_adds_categories_only_the_upstream_reports() -> None:
    merged = merge_upstream_limit_headers(
        OURS, {"x-ratelimit-remaining-images": "3", "x-ratelimit-limit-images": "5"}
    )
    assert merged["x-ratelimit-remaining-images"] == "3" and merged["x-ratelimit-limit-images"] == "5"
    assert merged["x-ratelimit-remaining-requests"] == "59"


def test_merge_with_no_upstream_headers_is_ours() -> None:
    assert merge_upstream_limit_headers(OURS, {"content-type": "application/json"}) == OURS


def test_merge_concatenates_ietf_lists_and_passes_digitalocean_through() -> None:
    upstream = {
        "RateLimit-Policy": '"default";q=100;w=10',
        "ratelimit": '"default";r=7;t=3',
        "ratelimit-limit": "5000",
        "ratelimit-remaining": "4999",
        "ratelimit-reset": "1718000000",
    }
    merged = merge_upstream_limit_headers(OURS, upstream)
    assert merged["RateLimit-Policy"] == '"rpm";q=60;w=60, "default";q=100;w=10'
    assert merged["RateLimit"] == '"rpm";r=59;t=1, "default";r=7;t=3'
    assert (merged["ratelimit-limit"], merged["ratelimit-remaining"], merged["ratelimit-reset"]) == (
        "5000",
        "4999",
        "1718000000",
    )


def test_unparseable_upstream_values_never_loosen_ours() -> None:
    upstream = {"x-ratelimit-remaining-requests": "lots", "x-ratelimit-reset-requests": "soon"}
    merged = merge_upstream_limit_headers(OURS, upstream)
    assert merged["x-ratelimit-remaining-requests"] == "59"
    assert merged["x-ratelimit-reset-requests"] == "1s"


@pytest.mark.parametrize("value", ["NaN", "sNaN", "Infinity", "-1", "1e999999999", "garbage"])
def test_merge_never_trusts_or_trips_on_an_upstream_number_that_is_not_one(value: str) -> None:
    merged = merge_upstream_limit_headers(
        OURS, {"x-ratelimit-remaining-requests": value, "x-ratelimit-limit-requests": value}
    )
    assert merged["x-ratelimit-remaining-requests"] == "59"
    assert merged["x-ratelimit-limit-requests"] == OURS["x-ratelimit-limit-requests"]


def test_merge_keeps_our_order_and_adds_categories_only_the_upstream_reports_after_it() -> None:
    upstream = {
        "Content-Type": "application/json",
        "X-RateLimit-Reset-Images": "2s",
        "X-RateLimit-Limit-Images": "5",
        "x-ratelimit-reset-requests": "1m0s",
        "RateLimit-Reset": "9",
    }
    merged = merge_upstream_limit_headers(OURS, upstream)
    assert list(merged.items()) == [
        *{**OURS, "x-ratelimit-reset-requests": "1m0s"}.items(),
        ("x-ratelimit-limit-images", "5"),
        ("x-ratelimit-reset-images", "2s"),
        ("ratelimit-reset", "9"),
    ]


def _check(scope: str, kind: str, limit: int, window_s: int) -> Check:
    return Check(scope, KIND_BY_NAME[kind], f"k:{scope}:{kind}", limit, 1, window_s)


def test_each_category_shows_its_limit_with_least_remaining_the_later_reset_among_equals() -> None:
    checks = (
        _check("tenant", "requests_per_minute", 100, 60),
        _check("tenant", "tokens_per_minute", 100, 60),
        _check("tenant", "tokens_per_day", 1000, 86_400),
        _check("key:ops", "tokens_per_minute", 500, 60),
        _check("tenant", "usd_per_day", 50_000_000_000, 86_400),
        _check("tenant", "concurrent_requests", 10, 0),
        _check("key:ops", "usd_per_month", 2_500_000_000, 2_678_400),
    )
    readings = (
        Reading(OK, 1, 600_000, 0, 600_000),
        Reading(OK, 40, 5_000_000, 0, 1),  # 60 left
        Reading(OK, 940, 36_000_000_000, 0, 1),  # 60 left too, later reset: shown
        Reading(OK, 450, 1_000_000, 0, 1),  # 50 left: the tightest tokens limit
        Reading(OK, 40_000_000_000, 7_000_000, 0, 1),  # $10 left
        Reading(OK, 9, 1, 0, 0),  # concurrency: no x-ratelimit category
        Reading(OK, 2_000_000_000, 9_000_000, 0, 1),  # $0.5 left: the tighter usd limit
    )
    headers = render(
        list(zip(checks, readings, strict=True)),
        plan=header_plan(checks),
        rejected=False,
        retry_after_us=None,
    )
    assert {name: value for name, value in headers.items() if name.startswith("x-ratelimit")} == {
        "x-ratelimit-limit-requests": "100",
        "x-ratelimit-remaining-requests": "99",
        "x-ratelimit-reset-requests": "600ms",
        "x-ratelimit-limit-tokens": "500",
        "x-ratelimit-remaining-tokens": "50",
        "x-ratelimit-reset-tokens": "1s",
        "x-ratelimit-limit-usd": "2.5",
        "x-ratelimit-remaining-usd": "0.5",
        "x-ratelimit-reset-usd": "9s",
    }
    assert list(headers)[:3] == [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ]
    assert headers["RateLimit-Policy"] == (
        '"rpm";q=100;w=60, "tpm";q=100;w=60, "tpd";q=1000;w=86400, "key-tpm";q=500;w=60, '
        '"usd-day";q=50000000;w=86400, "key-usd-month";q=2500000;w=2678400'
    )


def test_among_equal_remaining_the_later_reset_is_shown() -> None:
    checks = (
        _check("tenant", "tokens_per_minute", 100, 60),
        _check("tenant", "tokens_per_day", 1000, 86_400),
    )
    readings = (Reading(OK, 40, 5_000_000, 0, 1), Reading(OK, 940, 36_000_000_000, 0, 1))
    for order in (slice(None), slice(None, None, -1)):
        observed = list(zip(checks[order], readings[order], strict=True))
        headers = render(observed, plan=header_plan(checks[order]), rejected=False, retry_after_us=None)
        assert headers["x-ratelimit-limit-tokens"] == "1000"
        assert headers["x-ratelimit-remaining-tokens"] == "60"
        assert headers["x-ratelimit-reset-tokens"] == "10h0m0s"
