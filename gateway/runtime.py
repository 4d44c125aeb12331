"""The runtime view of one configuration: everything a request needs, built once and immutable.

A reload builds a new Runtime and swaps the reference; a request takes the current one when it
starts and keeps it to the end, so in-flight requests finish on the configuration they began with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gateway.config import RouteSettings, Settings, UpstreamSettings
from gateway.front.auth import Credential, Keys
from gateway.limits.plan import LimitPlan
from gateway.routing import declared_operations, flavor_of, load_world, priced_entry
from policies.catalog import Catalog, ModelEntry
from policies.engine import Flavor, RouteTarget
from policies.rules import Policy

_MAX_PLANS = 10_000


@dataclass(frozen=True, slots=True)
class Target:
    """One upstream that may serve a route: its settings, its model id there, its flavor, and the
    catalog entry of the prices it charges."""

    upstream_name: str
    upstream: UpstreamSettings
    upstream_model: str
    flavor: Flavor = "openai"
    entry: ModelEntry | None = None  # None only where no price is needed (tests of the relay)
    weight: int = 1
    operations: frozenset[str] = frozenset({"generate"})  # what its API has (edit, variation)


@dataclass(frozen=True, slots=True)
class Route:
    """Where a public model name goes: its targets, in order, and how to pick among them."""

    name: str
    targets: tuple[Target, ...]
    strategy: Literal["failover", "weighted"] = "failover"
    retry_on: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    catalog: Catalog
    targets: dict[str, RouteTarget]
    routes: dict[str, Route]
    policies: dict[str, Policy]  # effective policy per tenant (its named policy plus overrides)
    credentials: Keys  # sha256:<hex> -> who, and the keys that verified
    # Each tenant's share of the front door's bounds (`Settings.tenant_share`): of this
    # configuration, whose tenants a reload may change, worked out once, not per request.
    tenant_pending_admissions: int  # its share of the pending admissions
    tenant_buffered_body_bytes: int  # its share of the body budget
    # (tenant, key index, end user) -> its limits: built once per configuration, not per request
    _plans: dict[tuple[str, int, str | None], LimitPlan] = field(
        default_factory=dict, compare=False, repr=False
    )

    def limit_plan(self, credential: Credential, user: str | None) -> LimitPlan:
        """The limits for a request by `credential` on behalf of end user `user`."""
        key = (credential.tenant, credential.key_index, user)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:  # end users are unbounded: start over, rarely
                self._plans.clear()
            tenant = self.settings.tenants[credential.tenant]
            plan = self._plans[key] = LimitPlan.build(
                credential.tenant, tenant, credential.key, credential.key_index, user
            )
        return plan

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        """Validate and index a configuration; raises ConfigError naming every problem."""
        catalog, targets = load_world(settings)
        return cls(
            settings=settings,
            catalog=catalog,
            targets=targets,
            routes={name: _route(name, r, settings, catalog) for name, r in settings.routes.items()},
            policies={name: settings.policy_for(name) for name in settings.tenants},
            credentials=Keys(
                {
                    key.hash: Credential(tenant=name, key=key, key_index=index)
                    for name, tenant in settings.tenants.items()
                    for index, key in enumerate(tenant.keys)
                }
            ),
            tenant_pending_admissions=settings.tenant_pending_admissions,
            tenant_buffered_body_bytes=settings.tenant_buffered_body_bytes,
        )


def _route(name: str, route: RouteSettings, settings: Settings, catalog: Catalog) -> Route:
    entry_name = route.catalog or name
    targets = tuple(
        Target(
            upstream_name=target.upstream,
            upstream=settings.upstreams[target.upstream],
            upstream_model=target.model or name,
            flavor=flavor_of(target.upstream, settings.upstreams[target.upstream]),
            entry=priced_entry(catalog[target.catalog or entry_name], target),
            weight=target.weight,
            operations=RouteTarget(
                entry_name,
                flavor_of(target.upstream, settings.upstreams[target.upstream]),
                declared_operations(settings.upstreams[target.upstream]),
            ).operations,
        )
        for target in route.all_targets
    )
    return Route(name, targets, route.strategy, frozenset(route.retry_on))


class RuntimeHolder:
    """The current Runtime; `replace` is atomic for every request that starts afterwards."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime

    def replace(self, runtime: Runtime) -> None:
        self.current = runtime
