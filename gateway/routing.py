"""The bridge from Settings to the pure policy engine: the catalog and a RouteTarget per route.

Owns the start-up checks that need the catalog, the routes and the policies together. `load_world`
reports every problem at once as a ConfigError: catalog overrides that do not validate, a route
whose catalog entry does not exist, a policy (or a tenant's overrides of one) naming a model that
has no route or a default model it does not allow, and policy values no model it allows would
accept (a typo such as `qualities: [hight]` would otherwise deny every request).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from gateway.config import ConfigError, Settings, TargetSettings, UpstreamSettings
from policies.capabilities import size_problem
from policies.catalog import Catalog, CatalogError, ModelEntry, load_catalog
from policies.engine import Flavor, RouteTarget
from policies.findings import quoted
from policies.rules import Policy

_DO_HINTS = ("digitalocean", "do-ai.run")


def flavor_of(name: str, upstream: UpstreamSettings) -> Flavor:
    """The upstream's `flavor`, else DigitalOcean when its name or URL says so, else OpenAI."""
    if upstream.flavor is not None:
        return upstream.flavor
    hint = f"{name} {upstream.base_url}".lower()
    return "digitalocean" if any(h in hint for h in _DO_HINTS) else "openai"


def route_targets(settings: Settings) -> dict[str, RouteTarget]:
    """What the policy engine sees of each route: its catalog entry, the flavor of its first target
    (each other's is applied when it is tried, see `upstreams.targets`), and the operations any of
    its targets has (one without the request's operation is skipped when it comes to it)."""
    targets = {}
    for name, route in settings.routes.items():
        each = [
            RouteTarget(route.catalog or name, flavor_of(t.upstream, up), declared_operations(up))
            for t in route.all_targets
            for up in (settings.upstreams[t.upstream],)
        ]
        if len(each) > 1:
            each[0] = replace(each[0], declared_operations=frozenset().union(*(t.operations for t in each)))
        targets[name] = each[0]
    return targets


def declared_operations(upstream: UpstreamSettings) -> frozenset[str] | None:
    """The operations the operator declared for an upstream (None: its flavor's)."""
    return frozenset(upstream.operations) if upstream.operations is not None else None


def load_world(settings: Settings) -> tuple[Catalog, dict[str, RouteTarget]]:
    """The validated catalog and route targets; raises ConfigError listing every problem."""
    catalog, targets, errors = _world(settings)
    if errors:
        raise ConfigError("<config>", errors)
    return catalog, targets


def _target_problems(path: str, target: TargetSettings, route_entry: str, catalog: Catalog) -> list[str]:
    if target.catalog is not None and target.catalog not in catalog:
        return [f"{path}.catalog: no catalog entry {target.catalog!r}"]
    entry = catalog.get(target.catalog or route_entry)
    if target.prices is not None and entry is not None and entry.prices is None:
        return [f"{path}.prices: {entry.name!r} is priced per image (image_prices), not per token"]
    return []


def priced_entry(entry: ModelEntry, target: TargetSettings) -> ModelEntry:
    """`entry` with the target's own token prices, where it gives any."""
    if target.prices is None or entry.prices is None:
        return entry
    changed = target.prices.model_dump(exclude_none=True)
    return entry.model_copy(update={"prices": entry.prices.model_copy(update=changed)})


def world_problems(settings: Settings) -> list[str]:
    """Every problem `load_world` would raise, as a list (check-config prints them with the rest)."""
    return _world(settings)[2]


def _world(settings: Settings) -> tuple[Catalog, dict[str, RouteTarget], list[str]]:
    targets = route_targets(settings)
    errors: list[str] = []
    try:
        catalog = load_catalog(settings.catalog)
    except CatalogError as exc:
        # Routes and policies are still checked, against the shipped catalog; a model the broken
        # overrides define is not reported missing on top.
        errors += exc.errors
        catalog = load_catalog()
    errors += [
        f"routes.{name}{'.catalog' if settings.routes[name].catalog else ''}: no catalog entry"
        f" {target.catalog!r} (add it under catalog:, or name an existing one with catalog:)"
        for name, target in targets.items()
        if target.catalog not in catalog and target.catalog not in settings.catalog
    ]
    errors += [
        problem
        for name, route in settings.routes.items()
        for index, target in enumerate(route.targets or [])
        for problem in _target_problems(
            f"routes.{name}.targets.{index}", target, route.catalog or name, catalog
        )
    ]
    for path, policy in _effective_policies(settings):
        errors += policy_problems(path, policy, catalog, targets)
    return catalog, targets, errors


def _effective_policies(settings: Settings) -> Iterable[tuple[str, Policy]]:
    for name, policy in settings.policies.items():
        yield f"policies.{name}", policy
    for name, tenant in settings.tenants.items():
        if tenant.policy_overrides:
            yield f"tenants.{name}.policy_overrides", settings.policy_for(name)


def policy_problems(
    path: str, policy: Policy, catalog: Catalog, targets: dict[str, RouteTarget]
) -> list[str]:
    """What in `policy` cannot work with these routes and this catalog."""
    routed = sorted(targets)
    problems = [
        f"{path}.models: {model!r} has no route (routed: {quoted(routed)})"
        for model in policy.models or []
        if model not in targets
    ]
    default = policy.default_model
    if default is not None and default not in targets:
        problems.append(f"{path}.default_model: {default!r} has no route (routed: {quoted(routed)})")
    elif default is not None and policy.models is not None and default not in policy.models:
        problems.append(f"{path}.default_model: {default!r} is not one of the policy's models")
    names = [m for m in (policy.models if policy.models is not None else routed) if m in targets]
    entries = [catalog[targets[m].catalog] for m in names if targets[m].catalog in catalog]
    return problems + _unknown_values(path, policy, entries)


def _unknown_values(path: str, policy: Policy, entries: list[ModelEntry]) -> list[str]:
    if not entries:
        return []
    problems = []
    for field in ("qualities", "moderation", "output_formats", "backgrounds", "input_fidelities"):
        accepted = sorted({v for e in entries for v in getattr(e, field) or []})
        problems += [
            f"{path}.{field}: {value!r} is not accepted by any of the policy's models"
            f" (they accept {quoted(accepted)})"
            for value in getattr(policy, field) or []
            if value not in accepted
        ]
    problems += [
        f"{path}.sizes: {size!r} is not a size any of the policy's models makes"
        for size in policy.sizes or []
        if all(size_problem(e, size, e.name) for e in entries)
    ]
    return problems
