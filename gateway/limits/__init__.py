"""Rate limits, budgets and the usage ledger: the gateway's quota store.

`create_store(settings, metrics)` builds a `Store`: the `LimitStore` over an in-process engine
(`backend: memory`) or Redis (`backend: redis`, standalone or `cluster: true`). The pipeline
builds a `LimitPlan` for each request, `reserve`s its estimated cost in one atomic step before
forwarding, and `settle`s the actual cost exactly once afterwards.

Modules: `kinds` (the seven limits), `plan` (which apply), `keys` (Redis key names), `periods`
(UTC windows), `meters` (limiter arithmetic), `calls` (operations as data), `memory` /
`redis_engine` + `lua/` (where state lives), `decisions` + `headers` (what clients are told),
`ledger` (usage per day), `outbox` + `journal` (settlements owed, durable on disk), `limiter`
(the Store), `store` (its public types).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import StoreSettings
from gateway.limits.headers import merge_upstream_limit_headers
from gateway.limits.journal import Journal, JournalError
from gateway.limits.ledger import LedgerRow
from gateway.limits.limiter import LimitStore
from gateway.limits.memory import MemoryEngine
from gateway.limits.plan import LimitPlan
from gateway.limits.redis_engine import RedisEngine, connect, lean_connection
from gateway.limits.store import Admission, LimitStatus, Reservation, Store
from gateway.telemetry.metrics import Metrics

__all__ = [
    "Admission",
    "JournalError",
    "LedgerRow",
    "LimitPlan",
    "LimitStatus",
    "Reservation",
    "Store",
    "create_store",
    "merge_upstream_limit_headers",
]


def create_store(
    settings: StoreSettings,
    metrics: Metrics,
    *,
    clock: Callable[[], float] | None = None,
    redis_client: Any | None = None,
    worker: int = 0,
    workers: int = 1,
) -> Store:
    """The configured store. Nothing connects until `start()`; `redis_client` replaces the
    client built from `settings.url` (tests, or a client the caller configured itself).
    `worker` of `workers` names this process's durable outbox file under `store.outbox_path`."""
    now = clock or time.time
    if settings.backend == "memory":
        return LimitStore(MemoryEngine(now), settings, metrics, now)
    journal = Journal(Path(settings.outbox_path), worker, workers) if settings.outbox_path else None
    if redis_client is not None:  # the caller's client does everything, script calls included
        return LimitStore(RedisEngine(redis_client), settings, metrics, now, journal)
    engine = RedisEngine(connect(settings), lean_connection(settings))
    return LimitStore(engine, settings, metrics, now, journal)
