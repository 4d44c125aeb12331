"""The usage ledger: per tenant, per UTC day, per model, what was served and what was refused.

Stored as one hash per tenant and day (`igw:{tenant}:ledger:<YYYY-MM-DD>`) whose fields are
`<counter>:<model>`; counter names hold no colon, so a model name may. The ledger charges as the
budgets do: an admitted request's estimate at reserve (or a rejection), replaced by its actual
usage at settle, in the same atomic steps. So the ledger and the budgets always agree, a request
in flight included, and one whose gateway died before settling stays at its estimate in both.
The hash lives `ledger_retention_days` past its day.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from datetime import date
from typing import Any

from policies.cost import NANO_PER_USD, Cost

REJECTED_RATE = "rejected_rate"  # 429 rate_limit_exceeded: per-minute or concurrency limits
REJECTED_QUOTA = "rejected_quota"  # 429 insufficient_quota: day and month budgets, oversize requests
SHADOW_REJECTED = "shadow_rejected"  # would have been rejected, served in shadow mode


@dataclass(frozen=True, slots=True)
class LedgerRow:
    day: date
    tenant: str
    model: str
    requests: int = 0  # admitted requests (refunds included), in flight ones at their estimate
    images: int = 0
    text_in_tokens: int = 0
    image_in_tokens: int = 0
    image_out_tokens: int = 0
    nano_usd: int = 0
    failed: int = 0  # settled with an outcome other than "ok"
    rejected_rate: int = 0
    rejected_quota: int = 0
    shadow_rejected: int = 0

    @property
    def tokens(self) -> int:
        return self.text_in_tokens + self.image_in_tokens + self.image_out_tokens

    @property
    def usd(self) -> float:
        return self.nano_usd / NANO_PER_USD

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["day"] = self.day.isoformat()
        data["tokens"] = self.tokens
        data["usd"] = self.usd
        return data


COUNTERS: tuple[str, ...] = tuple(
    f.name for f in fields(LedgerRow) if f.name not in ("day", "tenant", "model")
)
CSV_COLUMNS: tuple[str, ...] = ("day", "tenant", "model", *COUNTERS, "tokens", "usd")


def field(counter: str, model: str) -> str:
    return f"{counter}:{model}"


_CHARGED = (
    "requests",
    "images",
    "text_in_tokens",
    "image_in_tokens",
    "image_out_tokens",
    "nano_usd",
    "failed",
)


@functools.lru_cache(maxsize=1024)  # a few per model of the catalog
def _charged_fields(model: str) -> tuple[str, ...]:
    return tuple(field(counter, model) for counter in _CHARGED)


def charge_fields(model: str, cost: Cost, outcome: str = "ok") -> tuple[tuple[str, int], ...]:
    """The increments that charge one request at `cost` (zero counters are left out): its estimate
    at reserve, its actual cost at settle."""
    counts = (
        1,
        cost.images,
        cost.text_in_tokens,
        cost.image_in_tokens,
        cost.image_out_tokens,
        cost.nano_usd,
        0 if outcome == "ok" else 1,
    )
    return tuple([(name, count) for name, count in zip(_charged_fields(model), counts, strict=True) if count])


def rows(tenant: str, day: date, counters: dict[str, int]) -> list[LedgerRow]:
    """One row per model found in a day's hash, sorted by model."""
    by_model: dict[str, dict[str, int]] = {}
    for name, value in counters.items():
        counter, sep, model = name.partition(":")
        if sep and counter in COUNTERS:
            by_model.setdefault(model, {})[counter] = int(value)
    return [LedgerRow(day, tenant, model, **by_model[model]) for model in sorted(by_model)]


def sort_rows(all_rows: Iterable[LedgerRow]) -> list[LedgerRow]:
    return sorted(all_rows, key=lambda r: (r.day, r.tenant, r.model))
