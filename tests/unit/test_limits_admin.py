"""The admin API over the memory store, behind the main app's error middleware."""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.admin import create_admin_app
from gateway.config import ConfigError, Settings
from gateway.front.access_log import create_request_middleware
from gateway.limits import LimitPlan, create_store
from gateway.telemetry.activity import Activity
from gateway.telemetry.metrics import Metrics
from policies.cost import Cost

TOKEN = "admin-secret-token"
KEY = "sha256:" + "a" * 64


def _settings(token: str = TOKEN) -> Settings:
    return Settings.model_validate(
        {
            "admin": {"token": token},
            "policies": {"open": {}},
            "tenants": {
                "team": {
                    "policy": "open",
                    "keys": [{"hash": KEY, "name": "ops", "limits": {"requests_per_minute": 5}}],
                    "limits": {
                        "requests_per_minute": 60,
                        "usd_per_day": {"value": 50, "mode": "shadow"},
                        "concurrent_requests": 4,
                    },
                }
            },
        }
    )


@pytest.fixture
async def admin(aiohttp_client: Any) -> Any:
    metrics = Metrics(CollectorRegistry())
    frozen = time.time()  # the limits stand still while the test reads them
    store = create_store(_settings().store, metrics, clock=lambda: frozen)
    current = {"settings": _settings()}
    app = web.Application(middlewares=[create_request_middleware(metrics)])

    def reload() -> tuple[Settings, list[str]]:
        if current.get("broken"):
            raise ConfigError("gateway.yaml", ["tenants.team.policy: unknown policy 'nope'"])
        return current["settings"], current.get("needs_restart", [])

    app.add_subapp("/admin", create_admin_app(store, lambda: current["settings"], reload, Activity()))
    tenant = current["settings"].tenants["team"]
    plan = LimitPlan.build("team", tenant, tenant.keys[0], 0, None)
    for model in ("gpt-image-1.5", "gpt-image-2"):
        admission = await store.reserve(
            plan, Cost(images=1, image_out_tokens=100, nano_usd=170_000_000), request_id="r", model=model
        )
        assert admission.reservation is not None
        await store.settle(
            admission.reservation, Cost(images=1, image_out_tokens=90, nano_usd=150_000_000), outcome="ok"
        )
    client = await aiohttp_client(app)
    client.current = current
    return client


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
async def test_the_admin_token_is_required(admin: Any, headers: dict[str, str]) -> None:
    response = await admin.get("/admin/usage", headers=headers)
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "invalid_admin_token"


async def test_an_emptied_token_closes_the_api(admin: Any) -> None:
    admin.current["settings"] = _settings(token="")
    assert (await admin.get("/admin/usage", headers={"Authorization": "Bearer "})).status == 401


async def test_tenant_usage_shows_every_limit_of_the_tenant_and_its_keys(admin: Any) -> None:
    response = await admin.get("/admin/tenants/team/usage", headers=AUTH)
    assert response.status == 200
    body = await response.json()
    scopes = {
        scope["scope"]: {limit["limit"]: limit for limit in scope["limits"]} for scope in body["scopes"]
    }
    assert set(scopes) == {"tenant", "key:ops"}
    rpm = scopes["tenant"]["requests_per_minute"]
    assert (rpm["value"], rpm["used"], rpm["remaining"], rpm["reset"]) == (60, 2, 58, "2s")
    usd = scopes["tenant"]["usd_per_day"]
    assert (usd["unit"], usd["value"], usd["used"]) == ("usd", 50.0, 0.3)
    assert (usd["mode"], rpm["mode"]) == ("shadow", "enforce")  # a dark-launched limit says so
    assert scopes["tenant"]["concurrent_requests"]["used"] == 0
    assert scopes["key:ops"]["requests_per_minute"]["remaining"] == 3


async def test_unknown_tenant_is_404(admin: Any) -> None:
    response = await admin.get("/admin/tenants/nobody/usage", headers=AUTH)
    assert response.status == 404
    error = (await response.json())["error"]
    assert (error["code"], error["param"]) == ("unknown_tenant", "tenant")


async def test_the_ledger_answers_for_any_tenant_name_even_one_no_longer_configured(admin: Any) -> None:
    response = await admin.get("/admin/usage?tenant=nobody", headers=AUTH)
    assert response.status == 200
    assert (await response.json())["rows"] == []


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("from=2026-13-01", "from"),
        ("to=yesterday", "to"),
        ("from=2026-02-02&to=2026-02-01", "from"),
        ("from=2020-01-01&to=2026-01-01", "to"),
    ],
)
async def test_bad_dates_are_400_naming_the_parameter(admin: Any, query: str, param: str) -> None:
    response = await admin.get(f"/admin/usage?{query}", headers=AUTH)
    assert response.status == 400
    assert (await response.json())["error"]["param"] == param


async def test_usage_as_json_and_csv(admin: Any) -> None:
    today = datetime.now(UTC).date().isoformat()
    response = await admin.get(f"/admin/usage?from={today}&to={today}&tenant=team", headers=AUTH)
    body = await response.json()
    assert (body["from"], body["to"], body["tenant"]) == (today, today, "team")
    rows = {row["model"]: row for row in body["rows"]}
    assert set(rows) == {"gpt-image-1.5", "gpt-image-2"}
    assert (rows["gpt-image-2"]["requests"], rows["gpt-image-2"]["tokens"], rows["gpt-image-2"]["usd"]) == (
        1,
        90,
        0.15,
    )

    response = await admin.get("/admin/usage", headers={**AUTH, "Accept": "text/csv"})
    assert response.status == 200 and response.content_type == "text/csv"
    table = list(csv.DictReader(io.StringIO(await response.text())))
    assert [row["model"] for row in table] == ["gpt-image-1.5", "gpt-image-2"]
    assert table[0]["day"] == today and table[0]["nano_usd"] == "150000000" and table[0]["tenant"] == "team"


async def test_reload_answers_what_is_in_force(admin: Any) -> None:
    response = await admin.post("/admin/reload", headers=AUTH)
    assert response.status == 200
    assert await response.json() == {
        "status": "reloaded",
        "tenants": ["team"],
        "routes": [],
        "needs_restart": [],
    }
    admin.current["needs_restart"] = ["server"]
    assert (await (await admin.post("/admin/reload", headers=AUTH)).json())["needs_restart"] == ["server"]


async def test_reload_of_a_broken_file_is_refused_with_every_problem(admin: Any) -> None:
    admin.current["broken"] = True
    response = await admin.post("/admin/reload", headers=AUTH)
    assert response.status == 400
    error = (await response.json())["error"]
    assert error["code"] == "config_invalid"
    assert error["errors"] == ["tenants.team.policy: unknown policy 'nope'"]


async def test_reload_needs_the_admin_token(admin: Any) -> None:
    assert (await admin.post("/admin/reload")).status == 401


async def test_tenants_lists_every_configured_tenant_with_its_limits(admin: Any) -> None:
    response = await admin.get("/admin/tenants", headers=AUTH)
    assert response.status == 200
    (team,) = (await response.json())["tenants"]
    assert (team["tenant"], team["policy"], team["limits_mode"]) == ("team", "open", "enforce")
    one = (await (await admin.get("/admin/tenants/team/usage", headers=AUTH)).json())["scopes"]
    assert team["scopes"] == one
    assert (await admin.get("/admin/tenants")).status == 401


async def test_activity_needs_the_token_and_answers_the_last_hour(admin: Any) -> None:
    assert (await admin.get("/admin/activity")).status == 401
    body = await (await admin.get("/admin/activity", headers=AUTH)).json()
    assert body["decisions"] == ["served", "policy_denied", "rate_limited", "failed", "rejected"]
    assert len(body["minutes"]) == 60
    assert body["totals"] == dict.fromkeys(body["decisions"], 0)
    assert isinstance(body["pid"], int)


@pytest.mark.parametrize(
    ("path", "content_type", "needle"),
    [
        ("/admin/ui", "text/html", b"<title>Image gateway usage</title>"),
        ("/admin/ui/app.js", "text/javascript", b"sessionStorage"),
        ("/admin/ui/style.css", "text/css", b"meter"),
    ],
)
async def test_the_usage_page_is_served_without_the_token_under_a_strict_policy(
    admin: Any, path: str, content_type: str, needle: bytes
) -> None:
    response = await admin.get(path)
    assert response.status == 200
    assert response.content_type == content_type
    assert needle in await response.read()
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"


async def test_only_the_pages_own_files_go_without_the_token(admin: Any) -> None:
    for path in ("/admin/ui/other.js", "/admin/ui/../usage", "/admin/uix"):
        assert (await admin.get(path)).status == 401
