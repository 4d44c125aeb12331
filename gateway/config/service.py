"""The sections of the gateway's own process: `server` (listeners, workers, front-door bounds),
`store` (where limits and budgets are counted) and `admin` (the admin API's token)."""

from __future__ import annotations

import os
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from gateway.config.frozen import Frozen


class ServerSettings(Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=1_048_576, gt=0)  # a JSON body (generations)
    max_upload_bytes: int = Field(default=64 * 2**20, gt=0)  # a multipart body (edits, variations)
    # Where uploads are spooled past a request's first 64 KiB of files (anonymous files, gone when
    # closed); None: the system's temporary directory ($TMPDIR, else /tmp). On a tmpfs they count as
    # memory.
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
    # A request head (request line and headers) larger than this is refused with 431 as it arrives.
    max_head_bytes: int = Field(default=32 * 1024, ge=1024)
    max_connections: int | None = Field(default=None, ge=1)  # None: sized from the process's file limit
    ops_max_connections: int = Field(default=64, ge=1)  # the operations listener's (scrapes, probes)
    max_buffered_body_bytes: int = Field(default=64 * 1_048_576, gt=0)  # bodies being read at once, in all
    # The most of max_pending_admissions and of max_buffered_body_bytes one tenant may hold (a
    # fraction; 1: no share): beyond, its requests get 429 at once. Unset: 0.5 where there are
    # several tenants, 1 where there is one (`Settings.tenant_share`).
    max_tenant_share: float | None = Field(default=None, gt=0, le=1)

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


class StoreSettings(Frozen):
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


class AdminSettings(Frozen):
    token: SecretStr = SecretStr("")

    @property
    def enabled(self) -> bool:
        return bool(self.token.get_secret_value())
