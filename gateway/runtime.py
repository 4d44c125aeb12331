"""The runtime view of one configuration: everything a request needs, built once and immutable.

A reload builds a new Runtime and swaps the reference; a request takes the current one when it
starts and keeps it to the end, so in-flight requests finish on the configuration they began with.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.auth import Credential
from gateway.routing import load_world
from gateway.settings import RouteSettings, Settings, UpstreamSettings
from policies.catalog import Catalog
from policies.engine import RouteTarget
from policies.rules import Policy


@dataclass(frozen=True, slots=True)
class Route:
    """Where a public model name goes: the upstream's settings and the upstream's model id."""

    name: str
    upstream_name: str
    upstream: UpstreamSettings
    upstream_model: str


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    catalog: Catalog
    targets: dict[str, RouteTarget]
    routes: dict[str, Route]
    policies: dict[str, Policy]  # effective policy per tenant (its named policy plus overrides)
    credentials: dict[str, Credential]  # sha256:<hex> -> who

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        """Validate and index a configuration; raises ConfigError naming every problem."""
        catalog, targets = load_world(settings)
        return cls(
            settings=settings,
            catalog=catalog,
            targets=targets,
            routes={name: _route(name, r, settings) for name, r in settings.routes.items()},
            policies={name: settings.policy_for(name) for name in settings.tenants},
            credentials={
                key.hash: Credential(tenant=name, key=key, key_index=index)
                for name, tenant in settings.tenants.items()
                for index, key in enumerate(tenant.keys)
            },
        )


def _route(name: str, route: RouteSettings, settings: Settings) -> Route:
    return Route(
        name=name,
        upstream_name=route.upstream,
        upstream=settings.upstreams[route.upstream],
        upstream_model=route.model or name,
    )


class RuntimeHolder:
    """The current Runtime; `replace` is atomic for every request that starts afterwards."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime

    def replace(self, runtime: Runtime) -> None:
        self.current = runtime
