"""The `tenants` section: each tenant's policy, its keys (hashes only) and the limits of the
tenant, of each key and of each end user."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gateway.config.frozen import Frozen

_KEY_HASH = re.compile(r"sha256:[0-9a-f]{64}")

# The store does its arithmetic in Lua numbers (doubles): every amount stays below 2^53 to be exact.
# A per-minute level is the limit times 60e6 µs; USD is counted in nano-USD.
MAX_PER_MINUTE = 150_000_000
MAX_TOKENS_PER_DAY = 10**15
MAX_USD = Decimal(8_000_000)


LimitName = Literal[
    "requests_per_minute",
    "images_per_minute",
    "tokens_per_minute",
    "tokens_per_day",
    "usd_per_day",
    "usd_per_month",
    "concurrent_requests",
]


class Limits(Frozen):
    """Per-scope limits. Per-minute limits are smooth (a limit of N admits a burst of N).

    A limit is a number, or `{value: N, mode: shadow}` to dark-launch it alone: checked, charged
    and counted (`shadow`), never rejecting, while the scope's other limits are enforced. `modes`
    holds what those objects said (it may also be written directly)."""

    requests_per_minute: int | None = Field(default=None, ge=0, le=MAX_PER_MINUTE)
    images_per_minute: int | None = Field(default=None, ge=0, le=MAX_PER_MINUTE)
    tokens_per_minute: int | None = Field(default=None, ge=0, le=MAX_PER_MINUTE)
    tokens_per_day: int | None = Field(default=None, ge=0, le=MAX_TOKENS_PER_DAY)
    usd_per_day: Decimal | None = Field(default=None, ge=0, le=MAX_USD)
    usd_per_month: Decimal | None = Field(default=None, ge=0, le=MAX_USD)
    concurrent_requests: int | None = Field(default=None, ge=0, le=1_000_000)
    modes: dict[LimitName, Literal["enforce", "shadow"]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _limit_objects(cls, data: Any) -> Any:
        """`usd_per_day: {value: 50, mode: shadow}` -> `usd_per_day: 50` and `modes.usd_per_day`."""
        if not isinstance(data, dict):
            return data
        data, modes = dict(data), dict(data.get("modes") or {})
        for name, value in list(data.items()):
            if name == "modes" or not isinstance(value, dict):
                continue
            unknown = set(value) - {"value", "mode"}
            if unknown or "value" not in value:
                raise ValueError(
                    f"{name}: a limit is a number or {{value: N, mode: enforce | shadow}}"
                    f" (got keys {', '.join(sorted(map(str, value)))})"
                )
            data[name] = value["value"]
            modes[name] = value.get("mode", "enforce")
        if modes:
            data["modes"] = modes
        return data

    def shadowed(self, name: str) -> bool:
        return self.modes.get(name) == "shadow"  # type: ignore[call-overload,no-any-return]


class KeySettings(Frozen):
    """A tenant key given as an object: its hash, a name for logs, and limits of its own."""

    hash: str
    name: str | None = None
    limits: Limits | None = None

    @field_validator("hash")
    @classmethod
    def _is_hash(cls, value: str) -> str:
        if not _KEY_HASH.fullmatch(value):
            raise ValueError(
                "must be sha256:<64 lowercase hex digits>, never a plaintext key"
                " (`gateway hash-key` prints it)"
            )
        return value


class TenantSettings(Frozen):
    policy: str
    policy_overrides: dict[str, Any] = Field(default_factory=dict)
    keys: list[KeySettings] = Field(min_length=1)
    limits: Limits = Limits()
    limits_mode: Literal["enforce", "shadow"] = "enforce"
    user_limits: Limits | None = None

    @field_validator("keys", mode="before")
    @classmethod
    def _plain_hashes(cls, keys: Any) -> Any:
        """`keys: [sha256:...]` is shorthand for `keys: [{hash: sha256:...}]`."""
        if isinstance(keys, list):
            return [{"hash": k} if isinstance(k, str) else k for k in keys]
        return keys
