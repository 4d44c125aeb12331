"""Running it: reload under load, graceful shutdown under load, several workers on one port."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import load_settings
from gateway.front.auth import hash_key
from gateway.mock_upstream import MockOptions, create_mock_app
from tests.e2e.conftest import StartGateway, base_url
from tests.support.config import OTHER_KEY, TENANT_KEY, UPSTREAM_KEY, config_dict
from tests.support.processes import GatewayProcess

StartServer = Callable[[web.Application], Awaitable[TestServer]]
SMALL = {"model": "gpt-image-1.5", "prompt": "a small square", "size": "1024x1024", "quality": "low"}
pytestmark = pytest.mark.slow


async def post(
    session: aiohttp.ClientSession, url: str, key: str, payload: dict[str, Any]
) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {key}"}
    async with session.post(f"{url}/v1/images/generations", json=payload, headers=headers) as resp:
        return resp.status, await resp.read()


def access_lines(gateway: GatewayProcess) -> list[dict[str, Any]]:
    lines = []
    for line in gateway.log_lines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "request_finished":
                lines.append(event)
    return lines


async def test_reload_under_load_fails_no_request(start_server: StartServer, tmp_path: Path) -> None:
    mock = await start_server(create_mock_app(MockOptions(api_key=UPSTREAM_KEY, latency_ms=20)))
    config = config_dict(base_url(mock))
    new_key = "igw_added_by_reload_000000000000"
    gateway = GatewayProcess(config, tmp_path)
    await gateway.start()
    assert gateway.process is not None
    try:
        async with aiohttp.ClientSession() as session:
            assert (await post(session, gateway.url, new_key, SMALL))[0] == 401

            async def traffic() -> list[int]:
                return [(await post(session, gateway.url, TENANT_KEY, SMALL))[0] for _ in range(25)]

            load = [asyncio.create_task(traffic()) for _ in range(6)]
            for round_ in range(4):
                await asyncio.sleep(0.1)
                config["tenants"]["team"]["keys"].append(hash_key(f"{new_key}{round_}"))
                gateway.config_path.write_text(yaml.safe_dump(config))
                gateway.process.send_signal(signal.SIGHUP)
            config["tenants"]["team"]["keys"].append(hash_key(new_key))
            gateway.config_path.write_text(yaml.safe_dump(config))
            gateway.process.send_signal(signal.SIGHUP)
            statuses = [status for task in load for status in await task]
            assert statuses == [200] * len(statuses)
            await asyncio.sleep(0.2)
            assert (await post(session, gateway.url, new_key, SMALL))[0] == 200

            gateway.config_path.write_text("tenants: {broken: [\n")
            gateway.process.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.3)
            assert (await post(session, gateway.url, new_key, SMALL))[0] == 200
    finally:
        assert gateway.stop() == 0
    assert any('"config_reload_failed"' in line for line in gateway.log_lines())


async def test_shutdown_under_load_truncates_no_stream_and_settles_all(
    start_server: StartServer, tmp_path: Path
) -> None:
    mock = await start_server(create_mock_app(MockOptions(api_key=UPSTREAM_KEY, partial_interval_ms=150)))
    gateway = GatewayProcess(config_dict(base_url(mock), server={"shutdown_grace_seconds": 20}), tmp_path)
    await gateway.start()
    assert gateway.process is not None
    payload = {**SMALL, "stream": True, "partial_images": 3}
    async with aiohttp.ClientSession() as session:
        streams = [asyncio.create_task(post(session, gateway.url, TENANT_KEY, payload)) for _ in range(8)]
        await asyncio.sleep(0.25)  # every stream has started
        gateway.process.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*streams)
    assert await asyncio.to_thread(gateway.stop) == 0
    for status, body in results:
        assert status == 200
        assert body.count(b"event: image_generation.partial_image") == 3
        assert b"event: image_generation.completed" in body and body.endswith(b"\n\n")
    finished = access_lines(gateway)
    assert len(finished) == 8
    assert all(line["settled"] == "usage" and line["status"] == 200 for line in finished)


async def test_workers_share_a_port_and_metrics_add_up(
    start_server: StartServer, tmp_path: Path, redis_url: str
) -> None:
    mock = await start_server(create_mock_app(MockOptions(api_key=UPSTREAM_KEY)))
    config = config_dict(base_url(mock), store={"backend": "redis", "url": redis_url}, server={"workers": 2})
    gateway = GatewayProcess(config, tmp_path)
    await gateway.start()

    def worker_pids() -> set[int]:
        return {json.loads(line)["pid"] for line in gateway.log_lines() if '"gateway_started"' in line}

    try:
        for _ in range(200):  # one worker answers health first; wait for the other on a loaded machine
            if len(worker_pids()) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(worker_pids()) == 2
        async with aiohttp.ClientSession() as session:
            for _ in range(30):
                async with aiohttp.ClientSession() as fresh:  # new connections spread over workers
                    assert (await post(fresh, gateway.url, TENANT_KEY, SMALL))[0] == 200
            assert (await post(session, gateway.url, OTHER_KEY, SMALL))[0] == 200
            for _ in range(10):
                async with aiohttp.ClientSession() as fresh, fresh.get(f"{gateway.ops_url}/metrics") as resp:
                    text = await resp.text()
                total = sum(
                    float(m.group(1))
                    for m in re.finditer(
                        r'^gateway_requests_total\{[^}]*tenant="team"[^}]*\} (\S+)$', text, re.M
                    )
                )
                assert total == 30
    finally:
        assert gateway.stop() == 0


def metric_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


async def test_workers_reload_once_each_and_export_only_what_the_configuration_says(
    start_server: StartServer, tmp_path: Path, redis_url: str
) -> None:
    """Two workers: one POST /admin/reload reloads each worker once; a limit the reload removes
    leaves gateway_budget_limit (multiprocess mode cannot clear a gauge's labels, so it is read
    from the configuration at scrape time); no worker prints a non-JSON warning; the documented
    counters are exported at 0 before they first fire; each worker journals in its own file."""
    mock = await start_server(create_mock_app(MockOptions(api_key=UPSTREAM_KEY)))
    outbox = tmp_path / "outbox"
    config = config_dict(
        base_url(mock),
        store={"backend": "redis", "url": redis_url, "outbox_path": str(outbox)},
        server={"workers": 2},
        admin={"token": "admin-secret"},
        limits={"requests_per_minute": 100, "usd_per_day": 50},
    )
    gateway = GatewayProcess(config, tmp_path)
    await gateway.start()

    def events(name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in gateway.log_lines() if f'"event":"{name}"' in line]

    async def scrape() -> str:
        async with aiohttp.ClientSession() as fresh, fresh.get(f"{gateway.ops_url}/metrics") as resp:
            return await resp.text()

    try:
        for _ in range(200):
            if len(events("gateway_started")) == 2:
                break
            await asyncio.sleep(0.1)
        before = await scrape()
        written = yaml.safe_load(gateway.config_path.read_text())  # with the ports it was given
        written["tenants"]["team"]["limits"] = {"requests_per_minute": 100}  # usd_per_day removed
        gateway.config_path.write_text(yaml.safe_dump(written))
        async with aiohttp.ClientSession() as session:
            admin = {"Authorization": "Bearer admin-secret"}
            async with session.post(f"{gateway.url}/admin/reload", headers=admin) as resp:
                assert resp.status == 200
                assert (await resp.json())["needs_restart"] == []
        for _ in range(100):
            if len(events("config_reloaded")) >= 2:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # time for a third reload, if one were coming
        after = [await scrape() for _ in range(6)]  # fresh connections: both workers answer
    finally:
        assert gateway.stop() == 0
    assert len(events("config_reloaded")) == 2  # once per worker
    assert sorted(p.name for p in outbox.glob("*.sqlite3")) == ["outbox-0.sqlite3", "outbox-1.sqlite3"]
    assert any('limit="usd_per_day"' in line for line in metric_lines(before, "gateway_budget_limit"))
    for text in after:
        assert metric_lines(text, "gateway_budget_limit") == [
            'gateway_budget_limit{limit="requests_per_minute",tenant="team"} 100.0'
        ]
    assert not [line for line in gateway.log_lines() if not line.startswith("{")]  # JSON only
    for name, labels in (
        ("gateway_upstream_errors_total", 'kind="upstream_unavailable",upstream="openai"'),
        ("gateway_usage_missing_total", 'model="gpt-image-1.5",tenant="team"'),
        ("gateway_clients_gone_total", 'model="gpt-image-1.5",tenant="team"'),
        ("gateway_store_errors_total", 'operation="settle"'),
        ("gateway_store_degraded_decisions_total", 'mode="fail_closed"'),
    ):
        assert f"{name}{{{labels}}} 0.0" in before, name


async def test_admin_reload_applies_a_new_key_and_refuses_a_broken_file(
    start_gateway: StartGateway, mock_openai: TestServer, tmp_path: Path
) -> None:
    config = config_dict(base_url(mock_openai), admin={"token": "admin-secret"})
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    gw = await start_gateway(load_settings(path), config_path=path)
    admin = {"Authorization": "Bearer admin-secret"}
    new_key = "igw_added_by_admin_reload_0000000"
    async with aiohttp.ClientSession() as session:
        assert (await post(session, gw.url, new_key, SMALL))[0] == 401
        config["tenants"]["team"]["keys"].append(hash_key(new_key))
        path.write_text(yaml.safe_dump(config))
        async with session.post(f"{gw.url}/admin/reload", headers=admin) as resp:
            assert resp.status == 200
            assert "team" in (await resp.json())["tenants"]
        assert (await post(session, gw.url, new_key, SMALL))[0] == 200
        path.write_text("tenants: {team: {policy: missing, keys: []}}\n")
        async with session.post(f"{gw.url}/admin/reload", headers=admin) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "config_invalid"
        assert (await post(session, gw.url, new_key, SMALL))[0] == 200
