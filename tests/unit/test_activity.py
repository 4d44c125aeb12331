"""The per-minute ring of requests by decision behind the usage page's last-hour chart."""

from __future__ import annotations

import pytest

from gateway.telemetry.activity import DECISIONS, MINUTES, Activity, decision

T0 = 1_800_000_000.0  # a minute boundary (divisible by 60)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, "served"),
        (206, "served"),
        (403, "policy_denied"),
        (429, "rate_limited"),
        (500, "failed"),
        (502, "failed"),
        (503, "failed"),
        (504, "failed"),
        (400, "rejected"),
        (401, "rejected"),
        (413, "rejected"),
        (499, "rejected"),  # the client left before its body arrived
        (0, "rejected"),  # the client went away before any answer
    ],
)
def test_decision_of_a_status(status: int, expected: str) -> None:
    assert decision(status) == expected


def test_counts_land_in_their_minute_and_quiet_minutes_are_zero() -> None:
    clock = Clock()
    activity = Activity(clock)
    for status in (200, 200, 429):
        activity.count(status)
    clock.now += 125  # two minutes later
    activity.count(403)
    activity.count(502)

    minutes = activity.last_hour()
    assert len(minutes) == MINUTES
    assert minutes[-1]["minute"] == "2027-01-15T08:02:00Z"
    assert {d: minutes[-1][d] for d in DECISIONS} == {
        "served": 0,
        "policy_denied": 1,
        "rate_limited": 0,
        "failed": 1,
        "rejected": 0,
    }
    assert minutes[-2] == {"minute": "2027-01-15T08:01:00Z", **dict.fromkeys(DECISIONS, 0)}
    assert (minutes[-3]["served"], minutes[-3]["rate_limited"]) == (2, 1)


def test_a_minute_leaves_the_hour_and_its_slot_starts_again() -> None:
    clock = Clock()
    activity = Activity(clock)
    activity.count(200)
    clock.now += 59 * 60  # the first minute is still the oldest of the hour
    assert activity.last_hour()[0]["served"] == 1
    clock.now += 60  # now it is an hour old: gone
    assert sum(m["served"] for m in activity.last_hour()) == 0
    activity.count(500)  # reuses the slot of the first minute, counting from zero
    last = activity.last_hour()[-1]
    assert (last["served"], last["failed"]) == (0, 1)
