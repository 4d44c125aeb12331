"""`render` against the straightforward rendering it replaced, over many random readings: the
restructured one (names worked out per plan, readings compared field by field) must not change
one byte of any header, ties and rejections included."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from gateway.limits.calls import Check
from gateway.limits.headers import Observed, go_duration, header_plan, policy_header, render, usd_text
from gateway.limits.kinds import KINDS
from gateway.limits.meters import OK, TOO_LARGE, WAIT, Reading, ceil_div

# --- the rendering before it was restructured (6c82d7f), written plainly as the reference ---------


def _old_remaining(check: Check, reading: Reading) -> int:
    return max(0, check.limit - reading.used)


def _old_policy_name(check: Check) -> str:
    scope = check.scope.split(":", 1)[0]
    return check.kind.short if scope == "tenant" else f"{scope}-{check.kind.short}"


def _old_quota(check: Check, amount: int) -> int:
    return amount // 1000 if check.kind.unit == "nano_usd" else amount


def _old_render(observed: Sequence[Observed], rejected: bool, retry_after_us: int | None) -> dict[str, str]:
    headers: dict[str, str] = {}
    for category in ("requests", "tokens", "images", "usd"):
        text = usd_text if category == "usd" else str
        best: tuple[tuple[int, int], Check] | None = None
        for check, reading in observed:
            if check.kind.header != category:
                continue
            rank = (_old_remaining(check, reading), -reading.reset_us)
            if best is None or rank < best[0]:
                best = rank, check
        if best is not None:
            headers[f"x-ratelimit-limit-{category}"] = text(best[1].limit)
            headers[f"x-ratelimit-remaining-{category}"] = text(best[0][0])
            headers[f"x-ratelimit-reset-{category}"] = go_duration(-best[0][1])
    policies = policy_header([check for check, _ in observed])
    if policies:
        headers["RateLimit-Policy"] = policies
    chosen: Observed | None = None
    best_rank: tuple[float, int] | None = None
    for check, reading in observed:
        if not check.window_s or (rejected and reading.code == OK):
            continue
        if rejected:
            rank2: tuple[float, int] = (-reading.wait_us, 0)
        else:
            left = _old_remaining(check, reading) / check.limit if check.limit else 0.0
            rank2 = (left, -reading.more_us)
        if best_rank is None or rank2 < best_rank:
            best_rank, chosen = rank2, (check, reading)
    t = 0
    if chosen is not None:
        check, reading = chosen
        t = ceil_div((reading.wait_us or reading.more_us) if rejected else reading.more_us, 1_000_000)
        headers["RateLimit"] = (
            f'"{_old_policy_name(check)}";r={_old_quota(check, _old_remaining(check, reading))};t={t}'
        )
    if retry_after_us is not None:
        ms = ceil_div(retry_after_us, 1000)
        headers["retry-after-ms"] = str(ms)
        headers["Retry-After"] = str(max(ceil_div(ms, 1000), t))
    return headers


# --- the comparison --------------------------------------------------------------------------------

_WINDOWS = {"rate": 60, "day": 86_400, "month": 2_678_400, "lease": 0}


def _checks(rng: random.Random) -> list[Check]:
    checks = []
    for scope in ("tenant", "key:ops", "user:u1"):
        for kind in KINDS:
            if rng.random() < 0.5:
                limit = rng.choice((0, 1, 3, 10, 10, 1000, 2_500_000_000, 50_000_000_001))
                checks.append(
                    Check(scope, kind, f"k:{scope}:{kind.name}", limit, 1, _WINDOWS[kind.mechanism])
                )
    return checks


def _reading(rng: random.Random, check: Check, rejected: bool) -> Reading:
    # Small ranges, so equal remaining amounts, shares and waits (the tie-breaks) come up often.
    code = rng.choice((OK, OK, WAIT, TOO_LARGE)) if rejected else OK
    used = rng.choice((0, 1, check.limit // 2, check.limit, check.limit + 7))
    return Reading(
        code,
        used,
        rng.choice((0, 1, 999, 1_000_000, 60_000_000)),
        rng.choice((0, 0, 1500, 2_000_000)),
        rng.choice((0, 1, 1_000_000, 1_000_001)),
    )


@pytest.mark.parametrize("seed", range(8))
def test_render_matches_the_old_rendering_byte_for_byte(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(500):
        checks = _checks(rng)
        plan = header_plan(checks)
        for rejected in (False, True):
            observed = [(check, _reading(rng, check, rejected)) for check in checks]
            retry_after_us = rng.choice((None, 0, 1, 1_500_000)) if rejected else None
            new = render(observed, plan=plan, rejected=rejected, retry_after_us=retry_after_us)
            old = _old_render(observed, rejected, retry_after_us)
            assert list(new.items()) == list(old.items())
