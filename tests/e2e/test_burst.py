"""Quota truth under load: bursts of thousands of requests at once against one gateway process and
against three on one Redis, in both `on_unavailable` modes. A healthy Redis is never taken for an
outage (no degraded decision, no 503 from the store), admission is exact, and a process with more
requests waiting for a decision than `server.max_pending_admissions` sheds the rest explicitly.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest

from tests.support import redis_servers
from tests.support.burst import LOW, HeldUpstream, burst, gateway_config, start_gateways
from tests.support.config import TENANT_KEY, config_dict
from tests.support.processes import GatewayProcess

pytestmark = [pytest.mark.redis, pytest.mark.slow]
redis_factory = redis_servers.redis_server_factory

CONCURRENCY = 100
BURST = 3000


def metric_lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name)]


@pytest.mark.parametrize("mode", ["fail_open", "fail_closed"])
@pytest.mark.parametrize("processes", [1, 3])
async def test_a_burst_is_admitted_exactly_and_never_taken_for_a_store_outage(
    redis_factory, tmp_path: Path, processes: int, mode: str
) -> None:
    redis = redis_factory()
    upstream = HeldUpstream()
    await upstream.start()
    config = gateway_config(
        upstream.url, redis.url, {"concurrent_requests": CONCURRENCY}, on_unavailable=mode
    )
    gateways = await start_gateways(config, tmp_path, processes)
    try:
        result = await burst([gateway.url for gateway in gateways], BURST, upstream)
        async with aiohttp.ClientSession() as session:
            shed = 0.0
            for gateway in gateways:
                async with session.get(f"{gateway.ops_url}/metrics") as resp:
                    text = await resp.text()
                degraded = metric_lines(text, "gateway_store_degraded_decisions_total")
                assert degraded == [f'gateway_store_degraded_decisions_total{{mode="{mode}"}} 0.0']
                [line] = metric_lines(text, "gateway_load_shed_total")
                shed += float(line.split()[-1])
    finally:
        codes = [await asyncio.to_thread(gateway.stop) for gateway in gateways]
        await upstream.stop()
    assert result.admitted == CONCURRENCY, (result.statuses, result.codes)
    assert upstream.holding == CONCURRENCY
    # Every other request was refused by the limiter, or shed (its own status code and metric).
    assert set(result.codes) <= {"rate_limit_exceeded", "overloaded"}, result.codes
    assert result.codes["overloaded"] == shed
    assert sum(result.statuses.values()) == BURST
    assert codes == [0] * processes
    for gateway in gateways:
        assert not [line for line in gateway.log_lines() if "store_unavailable" in line]


async def test_beyond_max_pending_admissions_a_request_is_shed_at_once(tmp_path: Path) -> None:
    """One request waiting for its body holds the only place: the next is refused with 503
    `overloaded` and Retry-After, before its body is read, and counted; then all is served again."""
    upstream = HeldUpstream()
    await upstream.start()
    upstream.release()
    config = config_dict(upstream.url, server={"max_pending_admissions": 1})
    gateway = GatewayProcess(config, tmp_path)
    await gateway.start()
    headers = {"Authorization": f"Bearer {TENANT_KEY}"}
    try:
        slow = socket.create_connection(("127.0.0.1", gateway.port))
        slow.sendall(
            b"POST /v1/images/generations HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + TENANT_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{"
        )
        async with aiohttp.ClientSession() as session:
            for _ in range(50):  # until the slow request holds its place
                async with session.post(
                    f"{gateway.url}/v1/images/generations", json=LOW, headers=headers
                ) as resp:
                    body = await resp.json()
                    if resp.status == 503:
                        break
                await asyncio.sleep(0.05)
            assert resp.status == 503, body
            assert body["error"] == {
                "message": "The gateway is overloaded and could not take the request. Retry shortly.",
                "type": "service_unavailable_error",
                "param": None,
                "code": "overloaded",
            }
            assert resp.headers["Retry-After"] == "1"
            slow.close()  # its place is given back
            for _ in range(50):
                async with session.post(
                    f"{gateway.url}/v1/images/generations", json=LOW, headers=headers
                ) as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.05)
            assert resp.status == 200
            async with session.get(f"{gateway.ops_url}/metrics") as resp:
                [line] = metric_lines(await resp.text(), "gateway_load_shed_total")
            assert float(line.split()[-1]) >= 1
    finally:
        await asyncio.to_thread(gateway.stop)
        await upstream.stop()
