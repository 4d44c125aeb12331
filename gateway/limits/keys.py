"""Redis key names: `igw:{tenant}:<kind>:<name>`, every one carrying the tenant's hash tag.

All keys of a tenant hash to one Redis Cluster slot (the `{tenant}` tag), which is what lets one
script touch all of them atomically. The tag is always decided inside the `igw:{tenant}` prefix,
whatever characters the tenant name holds, so every key of a tenant shares it. End users appear
only as a truncated SHA-256 (see `plan`), never as the id the client sent.
"""

from __future__ import annotations

from datetime import date

PREFIX = "igw:"


def _key(tenant: str, kind: str, name: str) -> str:
    return f"{PREFIX}{{{tenant}}}:{kind}:{name}"


def rate_key(tenant: str, scope: str, short: str) -> str:
    """A smooth limiter's state: `<level> <timestamp µs>`."""
    return _key(tenant, "rate", f"{scope}:{short}")


def window_key(tenant: str, scope: str, short: str, period_label: str) -> str:
    """A calendar window's counter for one period (`2026-05-09`, `2026-05`)."""
    return _key(tenant, "window", f"{scope}:{short}:{period_label}")


def lease_key(tenant: str, scope: str) -> str:
    """A scope's concurrency leases: reservation id -> expiry (µs)."""
    return _key(tenant, "lease", scope)


def reservation_key(tenant: str, reservation_id: str) -> str:
    """What a pending reservation charged to each of its keys."""
    return _key(tenant, "rsv", reservation_id)


def settled_key(tenant: str, reservation_id: str) -> str:
    """The marker that makes settle idempotent."""
    return _key(tenant, "settled", reservation_id)


def ledger_key(tenant: str, day: date) -> str:
    """One UTC day of usage: a hash of `<field>:<model>` counters."""
    return _key(tenant, "ledger", day.isoformat())


LEDGER_PATTERN = f"{PREFIX}*:ledger:*"
# The provider quota of upstream X is kept as the pseudo-tenant `upstream:X` (gateway.upstreams.quota);
# no tenant may be named so, and the tenants' ledger report leaves those rows out.
PROVIDER_TENANT_PREFIX = "upstream:"


def parse_ledger_key(key: str) -> tuple[str, date] | None:
    """(tenant, day) of a ledger key, or None for anything else."""
    head, sep, day = key.rpartition(":ledger:")
    if not sep or not head.startswith(PREFIX + "{") or not head.endswith("}"):
        return None
    try:
        return head[len(PREFIX) + 1 : -1], date.fromisoformat(day)
    except ValueError:
        return None
