"""Requests by decision over the last hour, per process: a ring of per-minute counts.

Prometheus counters say how many requests there were since a process started, not when; the
usage page wants the last hour minute by minute without a Prometheus server. So the request
middleware hands each finished `/v1/` request's status to `Activity.count`, which adds it to the
current minute's bucket of a 60-slot ring (a slot is reused once its minute is an hour old).

Decisions, from the status the client got:

* `served`: 2xx (a stream that broke after its headers was still served; the ledger's `failed`
  column counts it)
* `policy_denied`: 403 (the tenant's policy refused the request)
* `rate_limited`: 429 (a per-minute or concurrency limit, or a day or month budget)
* `failed`: 5xx (the upstream failed or timed out, the store was unavailable, the gateway shed load)
* `rejected`: any other 4xx (a bad key, a malformed request, a model that cannot do it, a client
  that left before its body arrived: 499)

The counts belong to this process only: with `server.workers: N` each worker keeps its own, and
the admin API answers from whichever worker took the connection (its pid is in the answer).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

DECISIONS: tuple[str, ...] = ("served", "policy_denied", "rate_limited", "failed", "rejected")
MINUTES = 60


def decision(status: int) -> str:
    if 200 <= status < 300:
        return "served"
    if status == 403:
        return "policy_denied"
    if status == 429:
        return "rate_limited"
    if status >= 500:
        return "failed"
    return "rejected"


class Activity:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._minutes = [-1] * MINUTES  # the minute (since the epoch) each slot counts, -1: none yet
        self._counts = [dict.fromkeys(DECISIONS, 0) for _ in range(MINUTES)]

    def count(self, status: int) -> None:
        minute = int(self._clock() // 60)
        slot = minute % MINUTES
        if self._minutes[slot] != minute:
            self._minutes[slot] = minute
            self._counts[slot] = dict.fromkeys(DECISIONS, 0)
        self._counts[slot][decision(status)] += 1

    def last_hour(self) -> list[dict[str, Any]]:
        """The last 60 minutes, oldest first, the current (partial) minute last; each with its
        start as an ISO 8601 UTC time and a count per decision (zero for a quiet minute)."""
        now = int(self._clock() // 60)
        rows = []
        for minute in range(now - MINUTES + 1, now + 1):
            slot = minute % MINUTES
            counts = self._counts[slot] if self._minutes[slot] == minute else dict.fromkeys(DECISIONS, 0)
            start = time.strftime("%Y-%m-%dT%H:%M:00Z", time.gmtime(minute * 60))
            rows.append({"minute": start, **counts})
        return rows
