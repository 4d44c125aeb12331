"""The `telemetry:` section (tracing over OTLP) and the OTEL_* variables that set the same.

Tracing is off unless an OTLP endpoint is configured. Each setting is resolved in one order:
the value written in the `telemetry:` section, else its OpenTelemetry environment variable (a
signal-specific `OTEL_EXPORTER_OTLP_TRACES_*` before the generic `OTEL_EXPORTER_OTLP_*`), else
the OpenTelemetry default. `with_environment` does that before the file is validated, so a bad
value from either source is reported by `check-config` like any other, naming where it came from.
The environment is passed in by `gateway.config.loader` (the one reader of `os.environ`).

A few exporter details are left to the OpenTelemetry exporter, which reads their variables
itself: TLS (`OTEL_EXPORTER_OTLP_CERTIFICATE`, `..._CLIENT_KEY`, `..._CLIENT_CERTIFICATE`),
`OTEL_EXPORTER_OTLP_COMPRESSION`, the export headers when `telemetry.headers` is not set
(`OTEL_EXPORTER_OTLP_HEADERS`), and `OTEL_RESOURCE_ATTRIBUTES` (read by the SDK's resource).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator

from gateway.config.frozen import Frozen

Sampler = Literal[
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
]

# field -> the variables that set it when the section does not, the first set one winning
ENVIRONMENT: dict[str, tuple[str, ...]] = {
    "traces_endpoint": ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",),
    "endpoint": ("OTEL_EXPORTER_OTLP_ENDPOINT",),
    "protocol": ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
    "service_name": ("OTEL_SERVICE_NAME",),
    "sampler": ("OTEL_TRACES_SAMPLER",),
    "sampler_arg": ("OTEL_TRACES_SAMPLER_ARG",),
    "max_queue_size": ("OTEL_BSP_MAX_QUEUE_SIZE",),
    "max_export_batch_size": ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE",),
    "schedule_delay_ms": ("OTEL_BSP_SCHEDULE_DELAY",),
}
# Either endpoint written in the file stands for both: the environment's are then not consulted.
_ENDPOINTS = ("endpoint", "traces_endpoint")


class TelemetrySettings(Frozen):
    """Tracing: one OpenTelemetry trace per request, exported over OTLP by a batch processor."""

    # false: no tracing even where an endpoint is set (also OTEL_SDK_DISABLED=true)
    enabled: bool = True
    endpoint: str | None = None  # base URL of the collector; /v1/traces is appended
    traces_endpoint: str | None = None  # the full URL of the traces endpoint, used as it is
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    headers: dict[str, SecretStr] | None = None  # sent with each export (a collector's API key)
    service_name: str = Field(default="image-gateway", min_length=1)
    sampler: Sampler = "parentbased_always_on"
    sampler_arg: float = Field(default=1.0, ge=0, le=1)  # the ratio of the *traceidratio samplers
    export_timeout_seconds: float = Field(default=10.0, gt=0)  # one export, retries included
    max_queue_size: int = Field(default=2048, ge=1)  # spans waiting for export; beyond: dropped
    max_export_batch_size: int = Field(default=512, ge=1)
    schedule_delay_ms: int = Field(default=5000, ge=1)  # the longest a span waits for its batch
    # the key of the HMAC-SHA-256 that the request's end user is hashed with for `gateway.user`;
    # unset or empty: the attribute is left out (an unkeyed hash of a user id is reversible)
    user_hash_key: SecretStr | None = None

    @field_validator("user_hash_key")
    @classmethod
    def _empty_is_unset(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None

    @field_validator("endpoint", "traces_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value

    @field_validator("protocol")
    @classmethod
    def _exporter_installed(cls, value: str) -> str:
        if value == "grpc" and importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is None:
            raise ValueError(
                "grpc needs the opentelemetry-exporter-otlp-proto-grpc package"
                " (pip install it next to the gateway), or use http/protobuf (port 4318)"
            )
        return value

    @property
    def active(self) -> bool:
        """Whether requests are traced: enabled, with somewhere to send the spans."""
        return self.enabled and (self.endpoint is not None or self.traces_endpoint is not None)

    @property
    def url(self) -> str:
        """Where spans go: `traces_endpoint` as it is, else `endpoint` with the signal's path."""
        if self.traces_endpoint is not None:
            return self.traces_endpoint
        assert self.endpoint is not None
        if self.protocol == "grpc":
            return self.endpoint
        return f"{self.endpoint.rstrip('/')}/v1/traces"


def with_environment(config: dict[str, Any], environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """The configuration with its `telemetry:` section completed from the OTEL_* variables where it
    is silent, and the problems of those variables (`OTEL_X: message`), whose values are left out."""
    section = config.get("telemetry")
    if section is not None and not isinstance(section, dict):
        return config, []  # not a mapping: the schema reports it
    written: dict[str, Any] = dict(section or {})
    merged = dict(written)
    problems: list[str] = []
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" and "enabled" not in written:
        merged["enabled"] = False
    for name, variables in ENVIRONMENT.items():
        if name in written or (name in _ENDPOINTS and any(e in written for e in _ENDPOINTS)):
            continue
        variable = next((v for v in variables if environ.get(v, "").strip()), None)
        if variable is None:
            continue
        value = environ[variable].strip()
        try:
            TelemetrySettings.model_validate({name: value})
        except ValidationError as exc:
            message = exc.errors()[0]["msg"].removeprefix("Value error, ")
            problems.append(f"{variable}: {message} (for telemetry.{name}, got {value!r})")
            continue
        merged[name] = value
    if not merged and "telemetry" not in config:
        return config, problems
    return {**config, "telemetry": merged}, problems  # a section of comments only is {}
