"""Load shedding: a bound on the requests this process is deciding at once.

A request counts from the moment its handler starts until its admission is decided (refused,
admitted, or failed on the way). Under a burst larger than the process can decide promptly, the
work waiting for the event loop grows without bound and every request gets slower, including
the ones that will be refused. Beyond `server.max_pending_admissions`, a new request is refused
at once, before its body is read, with 503 `overloaded` and `Retry-After`, counted in
`gateway_load_shed_total`: an explicit, cheap answer that clients retry, never mistaken for a
store outage (the store's own timeouts exclude this process's lag; see limits/resp.py).
"""

from __future__ import annotations

from types import TracebackType

from gateway.errors import Overloaded
from gateway.telemetry.metrics import KeptGauge, Metrics

RETRY_AFTER_SECONDS = 1


class AdmissionQueue:
    """`with queue:` holds a place for the block's duration; entering a full queue raises Overloaded."""

    def __init__(self, max_pending: int, metrics: Metrics) -> None:
        self.max_pending = max_pending
        self.pending = KeptGauge(metrics, metrics.pending_admissions)
        self._metrics = metrics

    def __enter__(self) -> None:
        pending = self.pending
        if pending.value >= self.max_pending:
            self._metrics.load_shed.inc()
            raise Overloaded(
                "The gateway is overloaded and could not take the request. Retry shortly.",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        pending.value += 1

    def __exit__(
        self, _type: type[BaseException] | None, _exc: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.pending.value -= 1
