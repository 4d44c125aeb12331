"""The configuration file: pydantic models of its shape, `${VAR}` expansion, and readable errors.

This is the only module that reads `os.environ`. Every model is frozen and forbids unknown keys,
so a typo fails at start-up with the file name and the key path instead of being ignored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
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
    field_validator,
    model_validator,
)

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


class AdminSettings(_Frozen):
    token: SecretStr = SecretStr("")

    @property
    def enabled(self) -> bool:
        return bool(self.token.get_secret_value())


class UpstreamSettings(_Frozen):
    base_url: str
    api_key: SecretStr = SecretStr("")
    flavor: Literal["openai", "digitalocean"] | None = None
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    read_timeout_seconds: float = Field(default=600.0, gt=0)
    max_connections: int = Field(default=256, ge=1)
    # The image operations the upstream's API has; None: its flavor's (DigitalOcean: generate only)
    operations: list[Literal["generate", "edit", "variation"]] | None = Field(default=None, min_length=1)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^/\s]+(?:/\S*)?", value):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value.rstrip("/")


class RouteSettings(_Frozen):
    upstream: str
    model: str | None = None
    catalog: str | None = None


# The store does its arithmetic in Lua numbers (doubles): every amount stays below 2^53 to be exact.
# A per-minute level is the limit times 60e6 µs; USD is counted in nano-USD.
MAX_PER_MINUTE = 150_000_000
MAX_TOKENS_PER_DAY = 10**15
MAX_USD = Decimal(8_000_000)


class Limits(_Frozen):
    """Per-scope limits. Per-minute limits are smooth (a limit of N admits a burst of N)."""

    requests_per_minute: int | None = Field(default=None, ge=0, le=MAX_PER_MINUTE)
    images_per_minute: int | None = Field(default=None, ge=0, le=MAX_PER_MINUTE)
    tokens_per_minute: int | None = Field(default=None, ge=0, le=MAX_PER_MINUTE)
    tokens_per_day: int | None = Field(default=None, ge=0, le=MAX_TOKENS_PER_DAY)
    usd_per_day: Decimal | None = Field(default=None, ge=0, le=MAX_USD)
    usd_per_month: Decimal | None = Field(default=None, ge=0, le=MAX_USD)
    concurrent_requests: int | None = Field(default=None, ge=0, le=1_000_000)


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

    @model_validator(mode="after")
    def _references_resolve(self) -> Settings:
        problems = reference_problems(
            upstreams=set(self.upstreams),
            routes={name: route.upstream for name, route in self.routes.items()},
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
        seen: dict[str, str] = {}
        for name, tenant in self.tenants.items():
            for index, key in enumerate(tenant.keys):
                if key.hash in seen:
                    problems.append(
                        f"tenants.{name}.keys.{index}: key already belongs to tenant {seen[key.hash]!r}"
                    )
                seen[key.hash] = name
        if self.server.workers > 1 and self.store.backend != "redis":
            problems.append(
                "server.workers: several worker processes need store.backend: redis"
                " (the memory store would give each worker its own limits)"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

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
    used = {
        r["upstream"] for r in routes.values() if isinstance(r, dict) and isinstance(r.get("upstream"), str)
    }
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
        routes={name: field(route, "upstream") for name, route in section("routes").items()},
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


def expand_env(node: Any, environ: Mapping[str, str], path: str = "") -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of a parsed YAML tree."""
    if isinstance(node, dict):
        return {k: expand_env(v, environ, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v, environ, f"{path}.{i}") for i, v in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise ConfigError("", [f"{path}: environment variable {name} is not set"])

    # The value stays a string (a secret is never re-parsed as YAML); pydantic converts
    # `port: ${PORT:-8080}` to a number where the field is one.
    return _ENV_REF.sub(substitute, node)


def parse_settings(
    text: str,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    *,
    require_upstream_keys: bool = False,
) -> Settings:
    """Parse YAML text into Settings, or raise ConfigError naming `source` and each key path.

    `require_upstream_keys` (serving and check-config) adds `missing_key_problems`: a file can be
    well formed and still unable to serve because a secret was not exported.
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {exc}"]) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, ["the top level must be a mapping of sections"])
    try:
        expanded = expand_env(raw, os.environ if environ is None else environ)
    except ConfigError as exc:
        raise ConfigError(source, exc.errors) from None
    problems = missing_key_problems(raw, expanded) if require_upstream_keys else []
    try:
        settings = Settings.model_validate(expanded)
    except ValidationError as exc:
        errors = format_validation_error(exc)
        errors += [line for line in _raw_reference_problems(expanded) if line not in errors]
        raise ConfigError(source, errors + problems) from None
    if problems:
        raise ConfigError(source, problems)
    return settings


def load_settings(
    path: str | Path, environ: Mapping[str, str] | None = None, *, require_upstream_keys: bool = False
) -> Settings:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(file), [f"cannot read the file: {exc.strerror}"]) from exc
    return parse_settings(text, str(file), environ, require_upstream_keys=require_upstream_keys)
