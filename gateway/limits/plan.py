"""Which limits apply to one request: a pure `LimitPlan` built from the tenant's settings.

A request is checked against up to three scopes, all charged in the same atomic step:

* ``tenant``: the tenant's `limits`;
* ``key:<name or index>``: the limits of the key it authenticated with (`KeySettings.limits`);
* ``user:<digest>``: the tenant's `user_limits` for the request's end user (`policies.end_user`:
  a non-empty `safety_identifier`, else a non-empty `user`). The digest is the first 24 hex digits
  of SHA-256 of the user id: enough to never collide in practice, and the raw id (often an e-mail
  address) never reaches Redis.

`shadow` mirrors `limits_mode: shadow`: everything is checked and charged, nothing is rejected.
A single limit may be shadowed too (`{value: N, mode: shadow}`): `PlannedLimit.shadow`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from gateway.config import KeySettings, Limits, TenantSettings
from gateway.limits.kinds import LimitKind, configured

_USER_DIGEST_CHARS = 24


@dataclass(frozen=True, slots=True)
class PlannedLimit:
    kind: LimitKind
    value: int  # in the kind's unit (nano-USD for USD limits)
    shadow: bool = False  # this limit alone is dark-launched: counted, never rejecting


@dataclass(frozen=True, slots=True)
class ScopePlan:
    name: str  # `tenant`, `key:ops`, `user:<digest>`: part of the Redis key names
    label: str  # how messages name it: "tenant 'team'", "key 'ops'", "end user"
    limits: tuple[PlannedLimit, ...]

    @property
    def kind(self) -> str:
        """`tenant`, `key` or `user`: a bounded label for metrics and header names."""
        return self.name.split(":", 1)[0]


def _scope(name: str, label: str, limits: Limits | None) -> ScopePlan | None:
    limits = limits or Limits()
    planned = tuple(
        PlannedLimit(kind, value, limits.shadowed(kind.name)) for kind, value in configured(limits)
    )
    return ScopePlan(name, label, planned) if planned else None


def user_scope_name(user: str) -> str:
    return "user:" + hashlib.sha256(user.encode("utf-8")).hexdigest()[:_USER_DIGEST_CHARS]


def key_scope_name(key: KeySettings, key_index: int) -> str:
    return f"key:{key.name}" if key.name else f"key:{key_index}"


@dataclass(frozen=True, slots=True)
class LimitPlan:
    tenant: str
    scopes: tuple[ScopePlan, ...]
    shadow: bool = False
    # Hashed once: a plan is a cache key (`calls.plan_day`) on every request, and hashing it
    # anew walks every scope and limit.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.tenant, self.scopes, self.shadow)))

    def __hash__(self) -> int:
        return self._hash

    @staticmethod
    def build(
        tenant_name: str, tenant: TenantSettings, key: KeySettings, key_index: int, user: str | None
    ) -> LimitPlan:
        """The limits for a request by `key` of `tenant`, on behalf of end user `user` (if any)."""
        if not tenant_name:
            raise ValueError("a tenant name is needed: it is the Redis hash tag of its keys")
        key_name = key_scope_name(key, key_index)
        scopes = [
            _scope("tenant", f"tenant '{tenant_name}'", tenant.limits),
            _scope(key_name, f"key '{key_name.removeprefix('key:')}'", key.limits),
        ]
        if user is not None and tenant.user_limits is not None:
            scopes.append(_scope(user_scope_name(user), "this end user", tenant.user_limits))
        present = tuple(scope for scope in scopes if scope is not None)
        return LimitPlan(tenant_name, present, tenant.limits_mode == "shadow")

    @staticmethod
    def for_tenant(tenant_name: str, tenant: TenantSettings) -> LimitPlan:
        """The tenant scope and every key scope (what the admin API reports); no user scopes."""
        scopes = [_scope("tenant", f"tenant '{tenant_name}'", tenant.limits)]
        for index, key in enumerate(tenant.keys):
            name = key_scope_name(key, index)
            scopes.append(_scope(name, f"key '{name.removeprefix('key:')}'", key.limits))
        present = tuple(scope for scope in scopes if scope is not None)
        return LimitPlan(tenant_name, present, tenant.limits_mode == "shadow")
