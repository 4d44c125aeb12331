"""The whole configuration file as one model, and the checks between its sections."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, ValidationError, model_validator

from gateway.config.errors import format_validation_error
from gateway.config.frozen import Frozen
from gateway.config.references import reference_problems
from gateway.config.service import AdminSettings, ServerSettings, StoreSettings
from gateway.config.telemetry import TelemetrySettings
from gateway.config.tenants import TenantSettings
from gateway.config.upstreams import RouteSettings, UpstreamSettings, default_upstreams
from policies.rules import Policy


class Settings(Frozen):
    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    admin: AdminSettings = AdminSettings()
    upstreams: dict[str, UpstreamSettings] = Field(default_factory=default_upstreams)
    routes: dict[str, RouteSettings] = Field(default_factory=dict)
    catalog: dict[str, dict[str, Any]] = Field(default_factory=dict)
    policies: dict[str, Policy] = Field(default_factory=dict)
    tenants: dict[str, TenantSettings] = Field(default_factory=dict)
    telemetry: TelemetrySettings = TelemetrySettings()  # tracing; completed from OTEL_* variables

    @property
    def tenant_share(self) -> float:
        """`server.max_tenant_share`, or by default half where tenants share the process and all of
        it where one tenant has it alone (nobody to keep room for)."""
        share = self.server.max_tenant_share
        if share is None:
            return 0.5 if len(self.tenants) > 1 else 1.0
        return share

    @property
    def tenant_pending_admissions(self) -> int:
        """The requests one tenant may have waiting for their admission decision (at least one)."""
        return max(1, int(self.server.max_pending_admissions * self.tenant_share))

    @property
    def tenant_buffered_body_bytes(self) -> int:
        """The bytes of bodies one tenant may have being read (beyond its first body)."""
        return int(self.server.max_buffered_body_bytes * self.tenant_share)

    @model_validator(mode="after")
    def _references_resolve(self) -> Settings:
        problems = reference_problems(
            upstreams=set(self.upstreams),
            routes={
                f"{name}{'.targets.' + str(i) if route.targets is not None else ''}": target.upstream
                for name, route in self.routes.items()
                for i, target in enumerate(route.all_targets)
            },
            policies=set(self.policies),
            tenants={name: tenant.policy for name, tenant in self.tenants.items()},
        )
        for name, tenant in self.tenants.items():
            if tenant.policy in self.policies and tenant.policy_overrides:
                try:
                    self.policies[tenant.policy].with_overrides(tenant.policy_overrides)
                except ValidationError as exc:
                    problems.extend(
                        f"tenants.{name}.policy_overrides.{line}" for line in format_validation_error(exc)
                    )
        problems += [
            f"tenants.{name}: a tenant name may not start with 'upstream:' (the provider quotas use it)"
            for name in self.tenants
            if name.startswith("upstream:")
        ]
        seen: dict[str, str] = {}
        for name, tenant in self.tenants.items():
            for index, key in enumerate(tenant.keys):
                if key.hash in seen:
                    problems.append(
                        f"tenants.{name}.keys.{index}: key already belongs to tenant {seen[key.hash]!r}"
                    )
                seen[key.hash] = name
        if self.store.outbox_path and self.store.backend != "redis":
            problems.append(
                "store.outbox_path: the durable outbox needs store.backend: redis"
                " (the memory store's counts die with the process)"
            )
        if self.server.workers > 1 and self.store.backend != "redis":
            problems.append(
                "server.workers: several worker processes need store.backend: redis"
                " (the memory store would give each worker its own limits)"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def with_server(self, overrides: Mapping[str, Any]) -> Settings:
        """These settings with single `server` fields replaced (`serve --host/--port`)."""
        if not overrides:
            return self
        return self.model_copy(update={"server": self.server.model_copy(update=dict(overrides))})

    def models_for(self, tenant: str) -> list[str]:
        """The public model names `tenant` may use: routed, and allowed by its policy (every routed
        one under a shadow policy, which refuses none)."""
        policy = self.policy_for(tenant)
        allowed = None if policy.mode == "shadow" else policy.models
        return [name for name in self.routes if allowed is None or name in allowed]

    def policy_for(self, tenant: str) -> Policy:
        settings = self.tenants[tenant]
        policy = self.policies[settings.policy]
        return policy.with_overrides(settings.policy_overrides) if settings.policy_overrides else policy
