"""The configuration file: pydantic models of its shape, `${VAR}` expansion, and readable errors.

This is the only module that reads `os.environ`. Every model is frozen and forbids unknown keys,
so a typo fails at start-up with the file name and the key path instead of being ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.telemetry.config import TelemetrySettings, with_environment
from policies.rules import Policy

_KEY_HASH = re.compile(r"sha256:[0-9a-f]{64}")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# Hosts that answer every request without a key with 401. An upstream elsewhere (a mock, a proxy
# that adds its own credentials) may have no key: the gateway then sends no Authorization header.
_KEYED_HOSTS = ("api.openai.com", "do-ai.run")


class ConfigError(Exception):
    """A configuration file that cannot be used; `errors` holds one line per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__("\n".join(f"{source}: {line}" for line in errors))


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerSettings(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=1_048_576, gt=0)  # a JSON body (generations)
    max_upload_bytes: int = Field(default=64 * 2**20, gt=0)  # a multipart body (edits, variations)
    # Where uploads beyond 256 KiB a file are spooled (anonymous files, gone when closed); None:
    # the system's temporary directory ($TMPDIR, else /tmp). On a tmpfs they count as memory.
    upload_dir: str | None = None
    workers: int = Field(default=1, ge=1)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    # SIGTERM: /readyz says 503 but requests are still taken this long, so load balancers notice.
    drain_delay_seconds: float = Field(default=0.0, ge=0)
    # Requests being decided at once (arrived, not yet admitted or refused); beyond: 503 overloaded.
    max_pending_admissions: int = Field(default=1024, ge=1)
    # A client that stops reading without closing the connection is cut off after this long.
    client_write_timeout_seconds: float = Field(default=30.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    # The operations listener: /metrics, /healthz, /readyz (never the tenant API). 0: any free port.
    ops_host: str | None = None  # None: the same address as `host`
    ops_port: int = Field(default=9464, ge=0, le=65535)
    # The front door (gateway/front): how long a client may take and how many connections it may hold.
    header_timeout_seconds: float = Field(default=10.0, gt=0)  # connect (or a new request) to full headers
    keepalive_timeout_seconds: float = Field(default=75.0, gt=0)  # an idle keep-alive connection is closed
    body_timeout_seconds: float = Field(default=60.0, gt=0)  # headers to the last byte of the body
    max_connections: int | None = Field(default=None, ge=1)  # None: sized from the process's file limit
    max_buffered_body_bytes: int = Field(default=64 * 1_048_576, gt=0)  # bodies being read at once, in all

    @model_validator(mode="after")
    def _ports_differ(self) -> ServerSettings:
        if self.ops_port and self.ops_port == self.port and (self.ops_host or self.host) == self.host:
            raise ValueError("ops_port must differ from port (the tenant port never serves /metrics)")
        if self.max_buffered_body_bytes < self.max_body_bytes:
            raise ValueError("max_buffered_body_bytes must be at least max_body_bytes")
        return self

    @field_validator("upload_dir")
    @classmethod
    def _a_directory(cls, value: str | None) -> str | None:
        if value is not None and not os.path.isdir(value):
            raise ValueError(f"{value!r} is not a directory")
        return value


class StoreSettings(_Frozen):
    backend: Literal["memory", "redis"] = "memory"
    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool = False
    on_unavailable: Literal["fail_open", "fail_closed"] = "fail_closed"
    timeout_ms: int = Field(default=250, gt=0)
    lease_ttl_seconds: int = Field(default=900, gt=0)
    ledger_retention_days: int = Field(default=400, gt=0)
    # A directory on local disk for the durable outbox (one SQLite file per process); empty: the
    # outbox lives in memory only, and a killed process loses what it held.
    outbox_path: str = ""

    @property
    def shown_url(self) -> str:
        """`url` fit for a log line: without its password."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
        return parts._replace(netloc=netloc + (f":{parts.port}" if parts.port else "")).geturl()

    @field_validator("url")
    @classmethod
    def _redis_url(cls, url: str, info: ValidationInfo) -> str:
        if info.data.get("backend") == "redis" and (problem := redis_url_problem(url)):
            raise ValueError(problem)
        return url


def redis_url_problem(url: str) -> str | None:
    """Why `url` is not a Redis URL the store can connect with, or None."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError as exc:
        return f"{url!r} is not a URL ({exc})"
    if parts.scheme in ("redis", "rediss"):
        return None if parts.hostname else f"{url!r} names no host (redis://HOST:PORT/DB)"
    if parts.scheme == "unix":
        return None if parts.path else f"{url!r} names no socket path (unix:///path/to/redis.sock)"
    return f"{url!r} must be a redis://, rediss:// or unix:// URL"


class AdminSettings(_Frozen):
    token: SecretStr = SecretStr("")

    @property
    def enabled(self) -> bool:
        return bool(self.token.get_secret_value())


class ProviderLimits(_Frozen):
    """The organisation's own quota at one upstream (its per-minute limits there), shared by every
    tenant and every gateway process: a target whose quota is spent is skipped."""

    requests_per_minute: int | None = Field(default=None, ge=0, le=150_000_000)
    images_per_minute: int | None = Field(default=None, ge=0, le=150_000_000)
    tokens_per_minute: int | None = Field(default=None, ge=0, le=150_000_000)


class UpstreamSettings(_Frozen):
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


class TargetPrices(_Frozen):
    """USD per 1M tokens at one upstream, where it charges otherwise than the catalog says."""

    text_in: Decimal | None = Field(default=None, ge=0)
    image_in: Decimal | None = Field(default=None, ge=0)
    image_out: Decimal | None = Field(default=None, ge=0)


class TargetSettings(_Frozen):
    """One upstream a route may be served by: its model id there and, when that upstream charges
    otherwise, its prices (`prices`, over the route's catalog entry, or a whole `catalog` entry)."""

    upstream: str
    model: str | None = None
    catalog: str | None = None
    prices: TargetPrices | None = None
    weight: int = Field(default=1, ge=1)


class RouteSettings(_Frozen):
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


class Limits(_Frozen):
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


class KeySettings(_Frozen):
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


class TenantSettings(_Frozen):
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


def _default_upstreams() -> dict[str, UpstreamSettings]:
    return {
        "openai": UpstreamSettings(base_url="https://api.openai.com/v1"),
        "digitalocean": UpstreamSettings(base_url="https://inference.do-ai.run/v1"),
    }


class Settings(_Frozen):
    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    admin: AdminSettings = AdminSettings()
    upstreams: dict[str, UpstreamSettings] = Field(default_factory=_default_upstreams)
    routes: dict[str, RouteSettings] = Field(default_factory=dict)
    catalog: dict[str, dict[str, Any]] = Field(default_factory=dict)
    policies: dict[str, Policy] = Field(default_factory=dict)
    tenants: dict[str, TenantSettings] = Field(default_factory=dict)
    telemetry: TelemetrySettings = TelemetrySettings()  # tracing; completed from OTEL_* variables

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
        upstreams = {name: {"base_url": up.base_url} for name, up in _default_upstreams().items()}
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
        names = _ENV_REF.findall(str(written.get("api_key", ""))) if isinstance(written, dict) else []
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


def _raw_reference_problems(raw: dict[str, Any]) -> list[str]:
    """The same reference checks on a file whose fields did not validate, so all errors show at once."""

    def section(name: str) -> dict[str, Any]:
        value = raw.get(name)
        return value if isinstance(value, dict) else {}

    def field(entry: Any, key: str) -> Any:
        return entry.get(key) if isinstance(entry, dict) else None

    upstreams = set(section("upstreams")) if "upstreams" in raw else set(_default_upstreams())
    return reference_problems(
        upstreams=upstreams,
        routes=_raw_route_upstreams(section("routes")),
        policies=set(section("policies")),
        tenants={name: field(tenant, "policy") for name, tenant in section("tenants").items()},
    )


def format_validation_error(exc: ValidationError) -> list[str]:
    """One `key.path: message` line per pydantic error (multi-line model errors split out)."""
    lines: list[str] = []
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        for part in message.split("\n"):
            if ": " in part and path == "":
                lines.append(part)
            else:
                lines.append(f"{path}: {part}" if path else part)
    return lines


def expand_env(node: Any, environ: Mapping[str, str], missing: list[str], path: str = "") -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of a parsed YAML tree; a bare `${VAR}`
    that is not set becomes "" and is listed in `missing` (`key.path: ...`), so every other problem
    of the file can still be reported with it."""
    if isinstance(node, dict):
        return {
            k: expand_env(v, environ, missing, f"{path}.{k}" if path else str(k)) for k, v in node.items()
        }
    if isinstance(node, list):
        return [expand_env(v, environ, missing, f"{path}.{i}") for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        missing.append(f"{path}: environment variable {name} is not set")
        return ""

    # The value stays a string (a secret is never re-parsed as YAML); pydantic converts
    # `port: ${PORT:-8080}` to a number where the field is one.
    return _ENV_REF.sub(substitute, node)


# Sections nothing else in the file refers to: when only they fail, the rest is checked on without them.
_STANDALONE = frozenset({"server", "store", "admin", "telemetry"})

Checks = Callable[["Settings"], list[str]]


def parse_settings(
    text: str,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    *,
    require_upstream_keys: bool = False,
    checks: Checks | None = None,
) -> Settings:
    """Parse YAML text into Settings, or raise ConfigError naming `source` and each key path.

    Every problem is reported at once, as far as one depends on another: unset variables, the
    schema (types, unknown keys, references between sections), `require_upstream_keys` (serving
    and check-config: `missing_key_problems`, a well-formed file that cannot serve because a secret
    was not exported), then `checks` of the validated settings (routes, catalog and policies
    together; see gateway.routing). Those need valid `upstreams`, `routes`, `catalog`, `policies`
    and `tenants` sections: a broken `server`, `store` or `admin` section does not hide them.
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, ["the top level must be a mapping of sections"])
    missing: list[str] = []
    environ = os.environ if environ is None else environ
    expanded, problems = with_environment(expand_env(raw, environ, missing), environ)
    unset = tuple(line.split(": ", 1)[0] for line in missing)
    problems += missing_key_problems(raw, expanded) if require_upstream_keys else []
    try:
        settings: Settings | None = Settings.model_validate(expanded)
        errors: list[str] = []
    except ValidationError as exc:
        errors = format_validation_error(exc)
        errors += [line for line in _raw_reference_problems(expanded) if line not in errors]
        settings = _without_standalone_sections(expanded, exc)
    later = checks(settings) if checks is not None and settings is not None else []
    # A value left empty by an unset variable is reported once, as unset.
    reported = [line for line in errors + problems + later if not line.startswith(unset)] if unset else None
    everything = missing + (reported if reported is not None else errors + problems + later)
    if everything:
        raise ConfigError(source, everything)
    assert settings is not None  # no errors: it validated
    return settings


def _without_standalone_sections(expanded: dict[str, Any], exc: ValidationError) -> Settings | None:
    """The settings with the failing sections at their defaults, when only standalone ones failed."""
    failing = {str(error["loc"][0]) if error["loc"] else "" for error in exc.errors()}
    if not failing <= _STANDALONE:
        return None
    try:
        return Settings.model_validate({k: v for k, v in expanded.items() if k not in failing})
    except ValidationError:
        return None


def load_settings(
    path: str | Path,
    environ: Mapping[str, str] | None = None,
    *,
    require_upstream_keys: bool = False,
    checks: Checks | None = None,
) -> Settings:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(file), [f"cannot read the file: {exc.strerror}"]) from exc
    return parse_settings(
        text, str(file), environ, require_upstream_keys=require_upstream_keys, checks=checks
    )
