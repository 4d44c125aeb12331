"""What each settled request charged, in the metrics: `gateway_tokens_total`, `gateway_images_total`,
`gateway_spend_usd_total`, `gateway_reservation_drift_tokens`, `gateway_usage_missing_total`.

Eight metric updates per request through prometheus_client (a label lookup, checks and a lock each)
are counted here in plain dicts instead, and applied as the limits' decision metrics are
(`gateway/limits/decisions.py`): whenever this process's registry is read, and once a second
(`Metrics.apply_kept`), for a scrape that reads every worker's metric files instead. The values
exported are the same: integer counts summed before they are added; the drift histogram is a
`KeptHistogram` (gateway/telemetry/metrics.py).
"""

from __future__ import annotations

from gateway.telemetry.metrics import KeptHistogram, Metrics
from policies.cost import Cost

# tenant, model, settled (usage | estimate), size, quality
_Labels = tuple[str, str, str, str, str]


class ChargeMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # per label set: text_in, image_in and image_out tokens, images, nano-USD, requests
        self._charged: dict[_Labels, list[int]] = {}
        self._drift = KeptHistogram(metrics, metrics.reservation_drift)
        metrics.before_collect(self.flush)

    def record(self, labels: _Labels, actual: Cost, estimated_tokens: int) -> None:
        """Count a request charged `actual` (settled from its usage, or at its estimate)."""
        totals = self._charged.get(labels)
        if totals is None:
            totals = self._charged[labels] = [0, 0, 0, 0, 0, 0]
        totals[0] += actual.text_in_tokens
        totals[1] += actual.image_in_tokens
        totals[2] += actual.image_out_tokens
        totals[3] += actual.images
        totals[4] += actual.nano_usd
        totals[5] += 1
        if labels[2] == "usage":
            self._drift.observe(labels[:2], estimated_tokens - actual.tokens)

    def flush(self) -> None:
        """Apply what was counted since the last flush."""
        charged, self._charged = self._charged, {}
        m = self._metrics
        for (tenant, model, how, size, quality), totals in charged.items():
            if how == "estimate":
                m.usage_missing.labels(tenant, model).inc(totals[5])
            m.tokens.labels(tenant, model, "text_in", how).inc(totals[0])
            m.tokens.labels(tenant, model, "image_in", how).inc(totals[1])
            m.tokens.labels(tenant, model, "image_out", how).inc(totals[2])
            m.images.labels(tenant, model, size, quality, how).inc(totals[3])
            m.spend.add(tenant, model, how, nano_usd=totals[4])
