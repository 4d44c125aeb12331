"""Shutdown measured from outside: a `gateway serve` process on a real Redis with long streams open
gets SIGTERM. It exits within drain_delay + grace + the documented margin (gateway/process/shutdown.py),
with every reservation settled (no record, no lease left), and keeps serving, not ready, during
its drain delay.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.process.shutdown import MARGIN_SECONDS
from tests.support import raw_http, redis_servers
from tests.support.burst import LOW
from tests.support.config import TENANT_KEY, config_dict
from tests.support.held_upstreams import PARTIAL, EndlessStreams
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]
redis_factory = redis_servers.redis_server_factory

AUTH = {"Authorization": f"Bearer {TENANT_KEY}"}
STREAMS = 20
GRACE = 5.0  # aiohttp's own shutdown took twice this and more: 12 s, past GRACE + MARGIN_SECONDS


async def store_keys(redis: RedisServer) -> dict[str, int]:
    keys = (await asyncio.to_thread(redis.cli, "--scan", "--pattern", "igw:*")).split()
    found: dict[str, int] = {}
    for key in keys:
        found[key.split(":")[2]] = found.get(key.split(":")[2], 0) + 1
    return found


async def test_sigterm_with_long_streams_open_exits_within_grace_and_margin_all_settled(
    redis_factory, tmp_path: Path
) -> None:
    redis = redis_factory()
    upstream = EndlessStreams()
    await upstream.start()
    config = config_dict(
        upstream.url,
        store={"backend": "redis", "url": redis.url},
        limits={"concurrent_requests": 1000, "usd_per_day": 100},
        server={"shutdown_grace_seconds": GRACE},
    )
    gateway = GatewayProcess(config, tmp_path)
    await gateway.start()
    assert gateway.process is not None
    payload = {**LOW, "stream": True, "partial_images": 1}
    try:
        async with aiohttp.ClientSession() as session:

            async def stream() -> bytes:
                async with session.post(
                    f"{gateway.url}/v1/images/generations", json=payload, headers=AUTH
                ) as resp:
                    assert resp.status == 200
                    body = b""
                    with pytest.raises(aiohttp.ClientPayloadError):  # cut: no final chunk after the error
                        async for chunk in resp.content.iter_any():
                            body += chunk
                    return body

            streams = [asyncio.create_task(stream()) for _ in range(STREAMS)]
            while upstream.open < STREAMS:  # noqa: ASYNC110 (a count kept by the upstream)
                await asyncio.sleep(0.02)
            assert (await store_keys(redis)).get("rsv") == STREAMS
            sent = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(gateway.process.wait, GRACE + MARGIN_SECONDS + 10)
            took = time.monotonic() - sent
            bodies = await asyncio.gather(*streams, return_exceptions=True)
    finally:
        await asyncio.to_thread(gateway.stop)
        await upstream.stop()
    assert code == 0
    assert GRACE <= took <= GRACE + MARGIN_SECONDS, took
    for body in bodies:
        assert isinstance(body, bytes), body
        assert body.startswith(PARTIAL)
    keys = await store_keys(redis)
    assert keys.get("settled") == STREAMS and "rsv" not in keys, keys  # every reservation settled
    lease_count = await asyncio.to_thread(redis.cli, "ZCARD", "igw:{team}:lease:tenant")
    assert int(lease_count) == 0
    events = [json.loads(line) for line in gateway.log_lines() if line.startswith("{")]
    [stopped] = [e for e in events if e["event"] == "gateway_stopped"]
    assert stopped["settlements_lost"] == 0
    finished = [e for e in events if e["event"] == "request_finished"]
    assert len(finished) == STREAMS and {e["settled"] for e in finished} == {"estimate"}


async def answering_gateway(tmp_path: Path, **server: float) -> tuple[EndlessStreams, GatewayProcess]:
    """A started gateway with `server` settings, before an upstream that answers at once (an empty
    stream)."""
    upstream = EndlessStreams()
    await upstream.start()
    upstream.end()
    gateway = GatewayProcess(config_dict(upstream.url, server=server), tmp_path)
    await gateway.start()
    assert gateway.process is not None
    return upstream, gateway


async def test_during_the_drain_delay_readyz_is_503_and_requests_are_still_served(tmp_path: Path) -> None:
    upstream, gateway = await answering_gateway(tmp_path, drain_delay_seconds=1.5, shutdown_grace_seconds=1)
    assert gateway.process is not None
    try:
        async with aiohttp.ClientSession() as session:
            sent = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with session.get(f"{gateway.url}/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["status"] == "draining"
            payload = {**LOW, "stream": True, "partial_images": 1}
            async with session.post(
                f"{gateway.url}/v1/images/generations", json=payload, headers=AUTH
            ) as resp:
                assert resp.status == 200
            code = await asyncio.to_thread(gateway.process.wait, 10)
            took = time.monotonic() - sent
            with pytest.raises(aiohttp.ClientConnectionError):
                await session.get(f"{gateway.url}/healthz")
    finally:
        await asyncio.to_thread(gateway.stop)
        await upstream.stop()
    assert code == 0
    assert 1.5 <= took <= 1.5 + 1 + MARGIN_SECONDS


async def test_settlements_given_up_at_shutdown_make_the_exit_status_say_so(
    redis_factory, tmp_path: Path
) -> None:
    """fail_open serves while Redis is down; their settlements wait in the outbox. Redis never
    comes back, so SIGTERM must give them up: logged with their amounts, and exit status 3."""
    redis = redis_factory()
    upstream = EndlessStreams()
    await upstream.start()
    upstream.end()
    config = config_dict(
        upstream.url,
        store={"backend": "redis", "url": redis.url, "on_unavailable": "fail_open", "timeout_ms": 100},
        limits={"usd_per_day": 100},
        server={"shutdown_grace_seconds": 1},
    )
    gateway = GatewayProcess(config, tmp_path)
    await gateway.start()
    assert gateway.process is not None
    try:
        redis.stop()
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.post(
                    f"{gateway.url}/v1/images/generations", json=LOW, headers=AUTH
                ) as resp:
                    assert resp.status == 200  # served blind
        gateway.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(gateway.process.wait, 1 + MARGIN_SECONDS + 10)
    finally:
        await asyncio.to_thread(gateway.stop)
        await upstream.stop()
    assert code == 3
    lines = gateway.log_lines()
    assert "gateway: 3 settlements or releases were given up at shutdown" in lines
    events = [json.loads(line) for line in lines if line.startswith("{")]
    assert len([e for e in events if e["event"] == "settlement_lost"]) == 3
    [stopped] = [e for e in events if e["event"] == "gateway_stopped"]
    assert (stopped["level"], stopped["settlements_lost"]) == ("error", 3)


@pytest.mark.parametrize("sent_before", ["head_in_part", "head_and_body_in_part"])
async def test_a_request_arriving_as_shutdown_begins_is_answered(tmp_path: Path, sent_before: str) -> None:
    """A request whose first bytes arrived before SIGTERM and the rest after (a client mid-send
    when the listeners close) is answered, then its connection closes: it is not closed as idle
    (the rest of its head) nor starved of the rest of its body."""
    upstream, gateway = await answering_gateway(tmp_path, shutdown_grace_seconds=5)
    assert gateway.process is not None
    body = json.dumps(LOW).encode()
    headers = [(b"Authorization", AUTH["Authorization"].encode()), (b"Content-Type", b"application/json")]
    data = raw_http.request("/v1/images/generations", headers=headers, body=body)
    split = data.index(b"\r\n") + 2 if sent_before == "head_in_part" else len(data) - len(body) // 2
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(data[:split])
        await writer.drain()
        await asyncio.sleep(0.3)  # read by the gateway
        gateway.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)  # the listener closes and idle connections with it (drain delay 0)
        writer.write(data[split:])
        answer = await raw_http.read_response(reader)
        rest = await reader.read()  # then the connection closes
        writer.close()
        code = await asyncio.to_thread(gateway.process.wait, 10)
    finally:
        await asyncio.to_thread(gateway.stop)
        await upstream.stop()
    assert (answer.status, rest) == (200, b"")
    assert code == 0
