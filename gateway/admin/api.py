"""The admin API, mounted at `/admin` when `admin.token` is set: limit state and the usage ledger.

* `GET /admin/tenants`: every configured tenant with its policy, limits mode and the limits of
  the tenant and of each of its keys (as below), for the usage page in one round trip.
* `GET /admin/tenants/{tenant}/usage`: every limit of the tenant and of each of its keys, with
  its value, used, remaining and time to reset, read live from the store.
* `GET /admin/upstreams`: each upstream's provider quota (`upstreams.*.limits`), the organisation's
  own limits there shared by all tenants, with value, used, remaining and time to reset.
* `GET /admin/activity`: requests by decision per minute over the last hour, counted by the
  process that answers (see gateway/telemetry/activity.py).
* `POST /admin/reload`: re-read the configuration file (as SIGHUP does); 200 with what is now in
  force, or 400 `config_invalid` listing every problem while the old configuration stays.
* `GET /admin/usage?from=YYYY-MM-DD&to=YYYY-MM-DD[&tenant=]`: the ledger, one row per tenant,
  UTC day and model; JSON, or CSV for `Accept: text/csv`. `to` defaults to today (UTC), `from`
  to `to`. Without `tenant`, rows of every tenant found in the store, including tenants no
  longer configured (their usage is still billable).

The usage page (`GET /admin/ui`, ui.py) is served without the token: it holds no data, and asks
for the token to call the API. Every other request needs `Authorization: Bearer <admin token>`,
compared in constant time with the token of the configuration in force (read per request, so a
reload applies). Errors are `GatewayError`s, rendered by the main app's middleware, which the
sub-app inherits.
"""

from __future__ import annotations

import asyncio
import csv
import hmac
import io
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from aiohttp import web

from gateway.admin.ui import add_ui_routes, is_public
from gateway.config import ConfigError, Settings, TenantSettings
from gateway.errors import AdminUnauthorized, InvalidRequest, NotFound
from gateway.front.auth import bearer_token
from gateway.limits import LedgerRow, LimitPlan, LimitStatus, Store
from gateway.limits.headers import go_duration
from gateway.limits.ledger import CSV_COLUMNS
from gateway.telemetry.activity import DECISIONS, Activity
from gateway.upstreams.quota import provider_plan
from policies.cost import NANO_PER_USD

_MAX_DAYS = 731  # two years of ledger in one answer is plenty; beyond that, ask in pieces


@dataclass(frozen=True, slots=True)
class _Admin:
    store: Store
    get_settings: Callable[[], Settings]
    reload: Callable[[], tuple[Settings, list[str]]]
    activity: Activity


ADMIN = web.AppKey("admin", _Admin)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_admin_app(
    store: Store,
    get_settings: Callable[[], Settings],
    reload: Callable[[], tuple[Settings, list[str]]],
    activity: Activity,
) -> web.Application:
    """`reload` re-reads the configuration and returns it with the sections that need a restart
    to apply, or raises ConfigError (the old configuration kept). `activity` counts the requests
    this process finished."""
    app = web.Application(middlewares=[_authorize])
    app[ADMIN] = _Admin(store, get_settings, reload, activity)
    app.router.add_get("/tenants", tenants)
    app.router.add_get("/tenants/{tenant}/usage", tenant_usage)
    app.router.add_get("/activity", activity_minutes)
    app.router.add_get("/usage", usage)
    app.router.add_get("/upstreams", upstreams)
    app.router.add_post("/reload", reload_config)
    add_ui_routes(app)
    return app


async def reload_config(request: web.Request) -> web.Response:
    try:
        settings, needs_restart = request.app[ADMIN].reload()
    except ConfigError as exc:
        raise InvalidRequest(
            "The configuration file was not reloaded: " + "; ".join(exc.errors),
            code="config_invalid",
            extra={"errors": exc.errors},
        ) from None
    return web.json_response(
        {
            "status": "reloaded",
            "tenants": sorted(settings.tenants),
            "routes": sorted(settings.routes),
            "needs_restart": needs_restart,
        }
    )


@web.middleware
async def _authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
    if is_public(request):
        return await handler(request)
    expected = request.app[ADMIN].get_settings().admin.token.get_secret_value().encode()
    presented = (bearer_token(request.headers.get("Authorization")) or "").encode()
    # compare_digest on every path (even an empty token) so timing says nothing about the token.
    if not hmac.compare_digest(presented, expected) or not expected:
        raise AdminUnauthorized("A valid admin token is required: `Authorization: Bearer <admin token>`.")
    return await handler(request)


def _tenant(settings: Settings, name: str) -> TenantSettings:
    tenant = settings.tenants.get(name)
    if tenant is None:
        raise NotFound(f"Unknown tenant '{name}'.", param="tenant", code="unknown_tenant")
    return tenant


def _status_json(status: LimitStatus) -> dict[str, Any]:
    usd = status.unit == "nano_usd"

    def amount(value: int) -> int | float:
        return value / NANO_PER_USD if usd else value

    return {
        "limit": status.limit,
        "unit": "usd" if usd else status.unit,
        "value": amount(status.value),
        "used": amount(status.used),
        "remaining": amount(status.remaining),
        "reset_seconds": round(status.reset_seconds, 3),
        "reset": go_duration(round(status.reset_seconds * 1_000_000)),
        "mode": status.mode,
    }


async def upstreams(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    found: dict[str, Any] = {}
    for name, upstream in admin.get_settings().upstreams.items():
        plan = provider_plan(name, upstream.limits) if upstream.limits is not None else None
        statuses = await admin.store.limit_status(plan) if plan is not None else []
        found[name] = {"limits": [_status_json(status) for status in statuses]}
    return web.json_response({"upstreams": found})


async def _tenant_json(store: Store, name: str, tenant: TenantSettings) -> dict[str, Any]:
    statuses = await store.limit_status(LimitPlan.for_tenant(name, tenant))
    scopes: dict[str, list[dict[str, Any]]] = {}
    for status in statuses:
        scopes.setdefault(status.scope, []).append(_status_json(status))
    return {
        "tenant": name,
        "policy": tenant.policy,
        "limits_mode": tenant.limits_mode,
        "scopes": [{"scope": scope, "limits": limits} for scope, limits in scopes.items()],
    }


async def tenants(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    configured = admin.get_settings().tenants
    # Asked together, the store sends one batch to Redis instead of a round trip per tenant.
    found = await asyncio.gather(
        *(_tenant_json(admin.store, name, configured[name]) for name in sorted(configured))
    )
    return web.json_response({"tenants": found})


async def tenant_usage(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    name = request.match_info["tenant"]
    return web.json_response(await _tenant_json(admin.store, name, _tenant(admin.get_settings(), name)))


async def activity_minutes(request: web.Request) -> web.Response:
    minutes = request.app[ADMIN].activity.last_hour()
    totals = {decision: sum(m[decision] for m in minutes) for decision in DECISIONS}
    return web.json_response(
        {"pid": os.getpid(), "decisions": list(DECISIONS), "totals": totals, "minutes": minutes}
    )


def _date(request: web.Request, name: str, default: date) -> date:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be a date as YYYY-MM-DD, got '{raw}'.", param=name) from None


def _range(request: web.Request) -> tuple[date, date]:
    end = _date(request, "to", datetime.now(UTC).date())
    start = _date(request, "from", end)
    if start > end:
        raise InvalidRequest(f"'from' ({start}) is after 'to' ({end}).", param="from")
    if (end - start).days >= _MAX_DAYS:
        raise InvalidRequest(f"Ask for at most {_MAX_DAYS} days at a time.", param="to")
    return start, end


def _wants_csv(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return any(part.split(";", 1)[0].strip().lower() == "text/csv" for part in accept.split(","))


def _csv(rows: list[LedgerRow]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.to_dict())
    return out.getvalue()


async def usage(request: web.Request) -> web.Response:
    admin = request.app[ADMIN]
    start, end = _range(request)
    # Any tenant name, configured or not: a removed tenant's usage is still billable, and a name
    # with no usage simply has no rows.
    tenant = request.query.get("tenant") or None
    rows = await admin.store.ledger(start, end, tenant)
    if _wants_csv(request):
        return web.Response(
            text=_csv(rows),
            content_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="usage-{start}-{end}.csv"'},
        )
    return web.json_response(
        {
            "from": start.isoformat(),
            "to": end.isoformat(),
            "tenant": tenant,
            "rows": [r.to_dict() for r in rows],
        }
    )
