"""Rate-limit response headers: OpenAI's `x-ratelimit-*`, the IETF `RateLimit-Policy` / `RateLimit`
pair, `Retry-After`, and the merge with an upstream's own limit headers.

* `x-ratelimit-{limit,remaining,reset}-{requests,tokens,images,usd}`: for each category, the
  limit (of any scope) with the least remaining; resets are Go durations (`20ms`, `1.5s`, `6m0s`),
  the time until that limit is fully replenished, rounded up to the millisecond.
* `RateLimit-Policy`: every windowed limit, `"rpm";q=60;w=60`; key and user scopes are prefixed
  (`"key-rpm"`, `"user-rpm"`). USD policies count micro-USD, as structured-field integers must.
* `RateLimit`: one policy: the one that rejected the request, else the one closest to its limit,
  with `t` the seconds until more quota. `Retry-After` (seconds) and `retry-after-ms` are never
  earlier than the limiter's own answer, nor than `t`. Concurrency has no IETF policy, so a
  request refused only for concurrency carries no `RateLimit`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING

from gateway.limits.meters import OK, Reading, ceil_div
from policies.cost import NANO_PER_USD

if TYPE_CHECKING:  # calls.py works out each plan's `header_plan` once
    from gateway.limits.calls import Check

Observed = tuple["Check", Reading]
_CATEGORIES = ("requests", "tokens", "images", "usd")


def go_duration(us: int) -> str:
    """A Go `time.Duration` string at millisecond precision, rounded up: 0s, 20ms, 1.5s, 6m0s, 1h0m0s."""
    ms = -(-us // 1000) if us > 0 else 0
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    seconds, fraction = divmod(ms, 1000)
    text = f"{seconds % 60}.{fraction:03d}".rstrip("0") + "s" if fraction else f"{seconds % 60}s"
    if seconds < 60:
        return text
    minutes = seconds // 60
    return f"{minutes}m{text}" if minutes < 60 else f"{minutes // 60}h{minutes % 60}m{text}"


def usd_text(nano: int) -> str:
    """Exact decimal USD for a nano-USD amount: 50, 0.17, 12.000000001, -0.5."""
    whole, fraction = divmod(abs(nano), NANO_PER_USD)
    sign = "-" if nano < 0 else ""
    return f"{sign}{whole}.{fraction:09d}".rstrip("0") if fraction else f"{sign}{whole}"


def _policy_name(check: Check) -> str:
    scope = check.scope.split(":", 1)[0]
    return check.kind.short if scope == "tenant" else f"{scope}-{check.kind.short}"


def _quota_unit(check: Check) -> int:
    """What a policy's amounts are divided by: USD policies count micro-USD, not nano-USD."""
    return 1000 if check.kind.unit == "nano_usd" else 1


@dataclass(frozen=True, slots=True)
class _Category:
    """One `x-ratelimit-*` category of a plan: its header names, and its checks (by position) with
    their limits as header text."""

    names: tuple[str, str, str]  # x-ratelimit-{limit,remaining,reset}-<category>
    members: tuple[int, ...]
    limits: tuple[str, ...]
    text: Callable[[int], str]  # how its amounts are written


@dataclass(frozen=True, slots=True)
class HeaderPlan:
    """What the limit headers of every request of a plan share, worked out once per plan and day
    (`calls` keeps it with the plan's checks): the `RateLimit-Policy` header, the categories, and
    the windowed checks `RateLimit` may show, named, so a render only compares readings."""

    policy: str
    categories: tuple[_Category, ...]
    windowed: tuple[tuple[int, str, int], ...]  # (position, policy name, `_quota_unit`)


def header_plan(checks: Sequence[Check]) -> HeaderPlan:
    categories = []
    for category in _CATEGORIES:
        members = tuple(i for i, check in enumerate(checks) if check.kind.header == category)
        if members:
            text = usd_text if category == "usd" else str
            names = (
                f"x-ratelimit-limit-{category}",
                f"x-ratelimit-remaining-{category}",
                f"x-ratelimit-reset-{category}",
            )
            categories.append(_Category(names, members, tuple(text(checks[i].limit) for i in members), text))
    windowed = tuple((i, _policy_name(c), _quota_unit(c)) for i, c in enumerate(checks) if c.window_s)
    return HeaderPlan(policy_header(checks), tuple(categories), windowed)


def _openai_headers(
    observed: Sequence[Observed], categories: Sequence[_Category], headers: dict[str, str]
) -> None:
    # Per category, the limit with the least remaining (the later reset among equals, else the
    # first); compared field by field, as this runs for every admitted request.
    for category in categories:
        members = category.members
        check, reading = observed[members[0]]
        chosen, best_reset = 0, reading.reset_us
        best_left = check.limit - reading.used if reading.used < check.limit else 0
        for position in range(1, len(members)):
            check, reading = observed[members[position]]
            left = check.limit - reading.used if reading.used < check.limit else 0
            if left < best_left or (left == best_left and reading.reset_us > best_reset):
                chosen, best_left, best_reset = position, left, reading.reset_us
        limit_name, remaining_name, reset_name = category.names
        headers[limit_name] = category.limits[chosen]
        headers[remaining_name] = category.text(best_left)
        headers[reset_name] = go_duration(best_reset)


def policy_header(checks: Sequence[Check]) -> str:
    return ", ".join(
        f'"{_policy_name(c)}";q={c.limit // _quota_unit(c)};w={c.window_s}' for c in checks if c.window_s
    )


def _rate_limit(observed: Sequence[Observed], plan: HeaderPlan, rejected: bool) -> tuple[str, int] | None:
    """The `RateLimit` header and its `t` in seconds: of the windowed limits, the one that refused
    with the longest wait, else the one with the smallest share left (the longer wait for more
    among equals; the first among full equals)."""
    chosen: tuple[int, str, int] | None = None
    best_left, best_wait = 0.0, 0
    for policy in plan.windowed:
        check, reading = observed[policy[0]]
        if rejected:
            if reading.code == OK:
                continue
            left, wait = 0.0, reading.wait_us
        else:
            remaining = check.limit - reading.used
            left = (remaining if remaining > 0 else 0) / check.limit if check.limit else 0.0
            wait = reading.more_us
        if chosen is None or left < best_left or (left == best_left and wait > best_wait):
            chosen, best_left, best_wait = policy, left, wait
    if chosen is None:
        return None
    position, name, unit = chosen
    check, reading = observed[position]
    t = ceil_div((reading.wait_us or reading.more_us) if rejected else reading.more_us, 1_000_000)
    return f'"{name}";r={max(0, check.limit - reading.used) // unit};t={t}', t


def render(
    observed: Sequence[Observed], *, plan: HeaderPlan, rejected: bool, retry_after_us: int | None
) -> dict[str, str]:
    """All rate-limit headers for one decision; `plan` is `header_plan` of the checks observed;
    `retry_after_us` only for a retryable rejection."""
    headers: dict[str, str] = {}
    _openai_headers(observed, plan.categories, headers)
    if plan.policy:
        headers["RateLimit-Policy"] = plan.policy
    rate_limit = _rate_limit(observed, plan, rejected)
    t = 0
    if rate_limit is not None:
        headers["RateLimit"], t = rate_limit
    if retry_after_us is not None:
        ms = ceil_div(retry_after_us, 1000)
        headers["retry-after-ms"] = str(ms)
        headers["Retry-After"] = str(max(ceil_div(ms, 1000), t))
    return headers


def limits_only(checks: Sequence[Check]) -> dict[str, str]:
    """What can be said without the store (degraded mode): the limits, not their state."""
    headers: dict[str, str] = {}
    for category in _CATEGORIES:
        values = [c for c in checks if c.kind.header == category]
        if values:
            lowest = min(values, key=lambda c: c.limit)
            headers[f"x-ratelimit-limit-{category}"] = (usd_text if category == "usd" else str)(lowest.limit)
    policies = policy_header(checks)
    if policies:
        headers["RateLimit-Policy"] = policies
    return headers


# --- merging with an upstream's own headers ------------------------------------------------------

_LIMIT_PREFIXES = ("x-ratelimit-", "ratelimit")  # every upstream header the merge reads
_X_RATELIMIT = re.compile(r"x-ratelimit-(?:limit|remaining|reset)-(.+)")
_GO_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_GO_UNIT_US = {"h": 3.6e9, "m": 6e7, "s": 1e6, "ms": 1e3, "us": 1.0, "µs": 1.0, "ns": 1e-3}


def parse_duration_us(text: str) -> float | None:
    """Microseconds in a Go duration (`6m0s`) or a plain number of seconds (`60`); None if neither."""
    text = text.strip()
    try:
        return float(text) * 1e6
    except ValueError:
        pass
    parts = _GO_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _GO_UNIT_US[u] for n, u in parts)


def _number(text: str | None) -> Decimal | None:
    """A finite, non-negative header value, or None (absent, malformed, NaN, Infinity...)."""
    try:
        value = Decimal(text) if text is not None else None
    except ArithmeticError:
        return None
    return value if value is not None and value.is_finite() and value >= 0 else None


def _merge_category(merged: dict[str, str], upstream: Mapping[str, str], category: str) -> None:
    names = [f"x-ratelimit-{part}-{category}" for part in ("limit", "remaining", "reset")]
    theirs = [upstream.get(name) for name in names]
    if all(value is None for value in theirs):
        return
    ours_remaining, their_remaining = _number(merged.get(names[1])), _number(theirs[1])
    if ours_remaining is None or (their_remaining is not None and their_remaining < ours_remaining):
        for name, value in zip(names[:2], theirs[:2], strict=True):
            if value is not None:
                merged[name] = value
    ours_reset, their_reset = merged.get(names[2]), theirs[2]
    if their_reset is not None:
        ours_us = parse_duration_us(ours_reset) if ours_reset is not None else None
        their_us = parse_duration_us(their_reset)
        if ours_us is None or (their_us is not None and their_us > ours_us):
            merged[names[2]] = their_reset


def merge_upstream_limit_headers(ours: Mapping[str, str], upstream: Mapping[str, str]) -> dict[str, str]:
    """Our limit headers combined with the upstream's, never more permissive than either.

    For each `x-ratelimit-*` category both sides report, the lower remaining (with its limit) and
    the later reset win. IETF `RateLimit` / `RateLimit-Policy` lists are concatenated; other
    `ratelimit-*` headers (DigitalOcean's) pass through unchanged.
    """
    merged = dict(ours)
    # Only the upstream's limit headers take part (most upstream answers have none): a category
    # only we report is ours unchanged.
    lowered = {
        lower: value
        for name, value in upstream.items()
        if (lower := name.lower()).startswith(_LIMIT_PREFIXES)
    }
    if not lowered:
        return merged
    categories = {match.group(1) for name in lowered if (match := _X_RATELIMIT.fullmatch(name))}
    for category in sorted(categories):
        _merge_category(merged, lowered, category)
    for ietf in ("RateLimit-Policy", "RateLimit"):
        theirs = lowered.get(ietf.lower())
        if theirs is not None:
            merged[ietf] = f"{merged[ietf]}, {theirs}" if ietf in merged else theirs
    for name, value in lowered.items():
        if name.startswith("ratelimit-") and name != "ratelimit-policy":
            merged[name] = value
    return merged
