"""The `upstreams` and `routes` sections: each upstream's address, key, pool and quota, and each
public model name's targets with their model ids and prices there."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.config.frozen import Frozen


class ProviderLimits(Frozen):
    """The organisation's own quota at one upstream (its per-minute limits there), shared by every
    tenant and every gateway process: a target whose quota is spent is skipped."""

    requests_per_minute: int | None = Field(default=None, ge=0, le=150_000_000)
    images_per_minute: int | None = Field(default=None, ge=0, le=150_000_000)
    tokens_per_minute: int | None = Field(default=None, ge=0, le=150_000_000)


class UpstreamSettings(Frozen):
    base_url: str
    api_key: SecretStr = SecretStr("")
    flavor: Literal["openai", "digitalocean"] | None = None
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    read_timeout_seconds: float = Field(default=600.0, gt=0)
    # Sized for the open streams expected at once across every tenant; each tenant may hold at
    # most `max_connections_per_tenant` of them (default: a quarter of the pool), so one tenant's
    # long streams cannot make another tenant wait.
    max_connections: int = Field(default=1024, ge=1)
    max_connections_per_tenant: int | None = Field(default=None, ge=1)
    limits: ProviderLimits | None = None
    eject_after_failures: int = Field(default=3, ge=1)
    eject_seconds: float = Field(default=30.0, gt=0)
    # The image operations the upstream's API has; None: its flavor's (DigitalOcean: generate only)
    operations: list[Literal["generate", "edit", "variation"]] | None = Field(default=None, min_length=1)

    @property
    def tenant_connections(self) -> int:
        """How many of the pool's connections one tenant may hold at once."""
        if self.max_connections_per_tenant is not None:
            return min(self.max_connections_per_tenant, self.max_connections)
        return max(1, self.max_connections // 4)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^/\s]+(?:/\S*)?", value):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")


class TargetPrices(Frozen):
    """USD per 1M tokens at one upstream, where it charges otherwise than the catalog says."""

    text_in: Decimal | None = Field(default=None, ge=0)
    image_in: Decimal | None = Field(default=None, ge=0)
    image_out: Decimal | None = Field(default=None, ge=0)


class TargetSettings(Frozen):
    """One upstream a route may be served by: its model id there and, when that upstream charges
    otherwise, its prices (`prices`, over the route's catalog entry, or a whole `catalog` entry)."""

    upstream: str
    model: str | None = None
    catalog: str | None = None
    prices: TargetPrices | None = None
    weight: int = Field(default=1, ge=1)


class RouteSettings(Frozen):
    """A public model name: one upstream (`upstream`, `model`), or several `targets` tried by
    `strategy`. `retry_on: [500]` lets a 500 fail over too (off by default: it may have billed)."""

    upstream: str | None = None
    model: str | None = None
    catalog: str | None = None
    targets: list[TargetSettings] | None = None
    strategy: Literal["failover", "weighted"] = "failover"
    retry_on: list[Literal[500]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_form(self) -> RouteSettings:
        if self.targets is None and self.upstream is None:
            raise ValueError("give `upstream` (one target) or `targets` (a list)")
        if self.targets is not None and (self.upstream is not None or self.model is not None):
            raise ValueError("give either `upstream`/`model` or `targets`, not both")
        if self.targets is not None and not self.targets:
            raise ValueError("targets: the list is empty")
        if self.strategy != "weighted" and any(t.weight != 1 for t in self.targets or []):
            raise ValueError("a target `weight` needs `strategy: weighted`")
        return self

    @property
    def all_targets(self) -> tuple[TargetSettings, ...]:
        """The targets in their configured order (the one-upstream form is a single target)."""
        if self.targets is not None:
            return tuple(self.targets)
        assert self.upstream is not None  # _one_form
        return (TargetSettings(upstream=self.upstream, model=self.model),)


def default_upstreams() -> dict[str, UpstreamSettings]:
    return {
        "openai": UpstreamSettings(base_url="https://api.openai.com/v1"),
        "digitalocean": UpstreamSettings(base_url="https://inference.do-ai.run/v1"),
    }
