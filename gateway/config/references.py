"""What the sections say of each other: names that point nowhere (a route's upstream, a tenant's
policy), checked on the validated settings and on a file whose fields did not validate (so all
errors show at once), and a routed upstream whose key is empty at a host that needs one."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from gateway.config.env import ENV_REF
from gateway.config.upstreams import default_upstreams

# Hosts that answer every request without a key with 401. An upstream elsewhere (a mock, a proxy
# that adds its own credentials) may have no key: the gateway then sends no Authorization header.
_KEYED_HOSTS = ("api.openai.com", "do-ai.run")


def reference_problems(
    *, upstreams: set[str], routes: dict[str, Any], policies: set[str], tenants: dict[str, Any]
) -> list[str]:
    """Names that point nowhere: a route's upstream, a tenant's policy."""
    problems = []
    for name, upstream in routes.items():
        if isinstance(upstream, str) and upstream not in upstreams:
            problems.append(
                f"routes.{name}.upstream: unknown upstream {upstream!r}"
                f" (defined: {', '.join(sorted(upstreams)) or 'none'})"
            )
    for name, policy in tenants.items():
        if isinstance(policy, str) and policy not in policies:
            defined = ", ".join(sorted(policies)) or "none"
            problems.append(f"tenants.{name}.policy: unknown policy {policy!r} (defined: {defined})")
    return problems


def missing_key_problems(raw: dict[str, Any], expanded: dict[str, Any]) -> list[str]:
    """A routed upstream at a host that needs a key whose `api_key` is empty (once `${VAR}` expanded).

    `raw` is the file as written, to name the variables; `expanded` is the same tree after expansion.
    """
    upstreams: Any = expanded.get("upstreams")
    if "upstreams" not in expanded:
        upstreams = {name: {"base_url": up.base_url} for name, up in default_upstreams().items()}
    routes = expanded.get("routes")
    if not isinstance(upstreams, dict) or not isinstance(routes, dict):
        return []
    used = {u for u in _raw_route_upstreams(routes).values() if isinstance(u, str)}
    problems = []
    for name, entry in upstreams.items():
        if name not in used or not isinstance(entry, dict) or entry.get("api_key"):
            continue
        host = _host(entry.get("base_url"))
        if host is None or not any(host == h or host.endswith(f".{h}") for h in _KEYED_HOSTS):
            continue
        written = (raw.get("upstreams") or {}).get(name)
        names = ENV_REF.findall(str(written.get("api_key", ""))) if isinstance(written, dict) else []
        unset = [var for var, _default in names]
        why = f" ({' / '.join(unset)} unset or empty in the environment)" if unset else ""
        problems.append(f"upstreams.{name}.api_key: empty{why}; {host} refuses every request without a key")
    return problems


def _host(url: Any) -> str | None:
    try:
        return urlsplit(url).hostname if isinstance(url, str) else None
    except ValueError:
        return None


def _raw_route_upstreams(routes: dict[str, Any]) -> dict[str, Any]:
    """`<route>` or `<route>.targets.<i>` -> the upstream it names, in a file not yet validated."""
    found: dict[str, Any] = {}
    for name, route in routes.items():
        if not isinstance(route, dict):
            continue
        targets = route.get("targets")
        if isinstance(targets, list):
            for i, target in enumerate(targets):
                found[f"{name}.targets.{i}"] = target.get("upstream") if isinstance(target, dict) else None
        else:
            found[name] = route.get("upstream")
    return found


def raw_reference_problems(raw: dict[str, Any]) -> list[str]:
    """The same reference checks on a file whose fields did not validate, so all errors show at once."""

    def section(name: str) -> dict[str, Any]:
        value = raw.get(name)
        return value if isinstance(value, dict) else {}

    def field(entry: Any, key: str) -> Any:
        return entry.get(key) if isinstance(entry, dict) else None

    upstreams = set(section("upstreams")) if "upstreams" in raw else set(default_upstreams())
    return reference_problems(
        upstreams=upstreams,
        routes=_raw_route_upstreams(section("routes")),
        policies=set(section("policies")),
        tenants={name: field(tenant, "policy") for name, tenant in section("tenants").items()},
    )
