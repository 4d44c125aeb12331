"""The durable outbox (`store.outbox_path`): a gateway process killed with SIGKILL loses nothing.

Real processes throughout: `gateway serve` in a subprocess, a real Redis server stopped and started,
the mock upstream on loopback, the openai SDK as the client. The journal is read with sqlite3 from
outside, as an operator would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from tests.e2e.conftest import base_url
from tests.e2e.test_quotas import (
    ADMIN_TOKEN,
    LOW,
    LOW_ESTIMATE_TOKENS,
    eventually,
    generate,
    ledger_rows,
    nano_usd,
    redis_store,
    tenant_limits,
)
from tests.support import redis_servers
from tests.support.config import TENANT_KEY, config_dict
from tests.support.processes import GatewayProcess
from tests.support.redis_servers import RedisServer
from tests.support.scripted_upstream import Script, ScriptedUpstream

pytestmark = [pytest.mark.redis, pytest.mark.slow]
redis_factory = redis_servers.redis_server_factory


def owed(directory: Path) -> list[tuple[str, str]]:
    """(reservation id, state) of every row the gateway's journal holds now."""
    path = directory / "outbox-0.sqlite3"
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        return [(row[0], row[1]) for row in db.execute("SELECT id, state FROM owed ORDER BY rowid")]


def gateway_config(upstream_url: str, redis: RedisServer, outbox: Path, **limits: Any) -> dict[str, Any]:
    return config_dict(
        upstream_url,
        store=redis_store(redis, on_unavailable="fail_open", timeout_ms=100, outbox_path=str(outbox)),
        limits=limits or None,
        admin={"token": ADMIN_TOKEN},
    )


def kill_9(gateway: GatewayProcess) -> None:
    assert gateway.process is not None
    os.kill(gateway.process.pid, signal.SIGKILL)
    assert gateway.process.wait(10) == -signal.SIGKILL


async def test_served_blind_then_killed_with_sigkill_the_restart_bills_the_upstreams_usage(
    mock_openai: TestServer, redis_factory: Any, tmp_path: Path
) -> None:
    redis = redis_factory()
    outbox = tmp_path / "outbox"
    config = gateway_config(base_url(mock_openai), redis, outbox, tokens_per_day=1_000_000)
    first = GatewayProcess(config, tmp_path)
    await first.start()
    try:
        await asyncio.to_thread(redis.stop)
        client = openai.AsyncOpenAI(base_url=f"{first.url}/v1", api_key=TENANT_KEY, max_retries=0)
        served = [await client.images.generate(**LOW) for _ in range(3)]  # fail_open: served blind
        await client.close()

        async def journalled() -> bool:
            return [state for _, state in owed(outbox)] == ["settle"] * 3

        await eventually(journalled)
        kill_9(first)  # the three settlements existed only in its outbox
    finally:
        first.stop()

    await asyncio.to_thread(redis.start)  # the same port, and empty
    second = GatewayProcess(config, tmp_path)
    await second.start()
    try:
        async with aiohttp.ClientSession() as session:

            async def emptied() -> bool:
                return owed(outbox) == []

            # Read once the whole outbox is replayed: a ledger row appears with the first of the
            # three settlements, so reading at the first row could catch the replay midway.
            await eventually(emptied)
            [row] = await ledger_rows(session, second.url)
            limits = await tenant_limits(session, second.url)
    finally:
        second.stop()
    usages = [image.usage.model_dump() for image in served if image.usage]
    assert len(usages) == 3
    assert row["requests"] == 3
    assert row["tokens"] == sum(u["total_tokens"] for u in usages)
    assert row["nano_usd"] == sum(nano_usd(u) for u in usages)
    # Charged to the day's budget after the fact, exactly once.
    assert limits["tenant.tokens_per_day"]["used"] == row["tokens"]
    assert any('"outbox_replayed"' in line for line in second.log_lines())
    assert any('"store_selected"' in line and redis.url in line for line in second.log_lines())


async def test_killed_between_admission_and_settlement_the_restart_settles_at_the_estimate(
    start_server: Any, redis_factory: Any, tmp_path: Path
) -> None:
    """The upstream is still generating when the process dies: the next process settles the
    reservation at its estimate (recorded in the ledger as failed) and frees its concurrency slot
    at once, instead of after lease_ttl_seconds."""
    redis = redis_factory()
    upstream = ScriptedUpstream(
        Script(content_type="application/json", chunks=[b"{}"], delay_before_headers=60)
    )
    server = await start_server(upstream.app())
    outbox = tmp_path / "outbox"
    config = gateway_config(base_url(server), redis, outbox, concurrent_requests=1)
    first = GatewayProcess(config, tmp_path)
    await first.start()
    async with aiohttp.ClientSession() as session:
        try:
            request = asyncio.create_task(generate(session, first.url))

            async def admitted() -> bool:
                return [state for _, state in owed(outbox)] == ["open"]

            await eventually(admitted)
            busy, _, _ = await generate(session, first.url)
            assert busy == 429  # the one slot is held
            kill_9(first)
            with pytest.raises(aiohttp.ClientError):
                await request
        finally:
            first.stop()

        second = GatewayProcess(config, tmp_path)
        await second.start()
        try:

            async def replayed() -> bool:
                return bool(await ledger_rows(session, second.url))

            await eventually(replayed)
            [row] = await ledger_rows(session, second.url)
            limits = await tenant_limits(session, second.url)
        finally:
            second.stop()
    assert (row["requests"], row["tokens"], row["failed"]) == (1, LOW_ESTIMATE_TOKENS, 1)
    assert limits["tenant.concurrent_requests"]["used"] == 0
    assert owed(outbox) == []
    assert any('"reservation_interrupted"' in line for line in second.log_lines())
