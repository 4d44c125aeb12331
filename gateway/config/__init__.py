"""The configuration file: its shape as frozen pydantic models, and loading it.

Modules: `frozen` (the strict base of every model), `service` (server, store and admin sections),
`upstreams` (upstreams, routes and their targets), `tenants` (tenants, their keys and limits),
`telemetry` (tracing, and the OTEL_* variables that set it), `settings` (the whole file and
what its sections say of each other), `references` (names that
point nowhere, upstream keys left empty), `env` (`${VAR}` expansion), `errors` (ConfigError and
its lines), `loader` (parse and load; the only module that reads `os.environ`).
"""

from gateway.config.errors import ConfigError
from gateway.config.loader import load_settings, parse_settings
from gateway.config.service import AdminSettings, ServerSettings, StoreSettings
from gateway.config.settings import Settings
from gateway.config.telemetry import TelemetrySettings
from gateway.config.tenants import KeySettings, Limits, TenantSettings
from gateway.config.upstreams import (
    ProviderLimits,
    RouteSettings,
    TargetPrices,
    TargetSettings,
    UpstreamSettings,
)

__all__ = [
    "AdminSettings",
    "ConfigError",
    "KeySettings",
    "Limits",
    "ProviderLimits",
    "RouteSettings",
    "ServerSettings",
    "Settings",
    "StoreSettings",
    "TargetPrices",
    "TargetSettings",
    "TelemetrySettings",
    "TenantSettings",
    "UpstreamSettings",
    "load_settings",
    "parse_settings",
]
