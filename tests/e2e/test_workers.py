"""`server.workers: 2`: the supervisor deals the tenant port's connections to its workers in turn, so
even a client with two keep-alive connections has one on each worker (with SO_REUSEPORT the kernel's
hash put both on one worker half of the time), and a worker stopped for good is skipped."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.mock_upstream import MockOptions, create_mock_app
from tests.e2e.conftest import base_url
from tests.support.config import TENANT_KEY, UPSTREAM_KEY, config_dict
from tests.support.processes import GatewayProcess
from tests.support.workers import connections_by_pid, worker_pids

StartServer = Callable[[web.Application], Awaitable[TestServer]]
SMALL = {"model": "gpt-image-1.5", "prompt": "a small square", "size": "1024x1024", "quality": "low"}
AUTH = {"Authorization": f"Bearer {TENANT_KEY}"}
pytestmark = pytest.mark.slow


async def two_workers(
    start_server: StartServer, tmp_path: Path, redis_url: str
) -> tuple[GatewayProcess, list[int]]:
    mock = await start_server(create_mock_app(MockOptions(api_key=UPSTREAM_KEY)))
    config = config_dict(base_url(mock), store={"backend": "redis", "url": redis_url}, server={"workers": 2})
    gateway = GatewayProcess(config, tmp_path)
    await gateway.start()
    assert gateway.process is not None
    for _ in range(200):  # one worker answers health first; wait for the other on a loaded machine
        if sum('"gateway_started"' in line for line in gateway.log_lines()) == 2:
            break
        await asyncio.sleep(0.1)
    pids = worker_pids(gateway.process.pid)
    assert len(pids) == 2
    return gateway, pids


def open_files(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    return len(list(fds.iterdir())) if fds.exists() else 0


async def generate(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(f"{url}/v1/images/generations", json=SMALL, headers=AUTH) as resp:
        assert resp.status == 200
        await resp.read()


async def test_two_keepalive_connections_land_on_both_workers(
    start_server: StartServer, tmp_path: Path, redis_url: str
) -> None:
    gateway, pids = await two_workers(start_server, tmp_path, redis_url)
    try:
        for _ in range(6):  # hashing alone would pass all six rounds once in 64 runs
            sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) for _ in range(2)]
            try:
                for session in sessions:  # one kept-alive connection each, opened one after the other
                    await generate(session, gateway.url)
                held = connections_by_pid(pids, gateway.port)
            finally:
                for session in sessions:
                    await session.close()
            assert sorted(held.values()) == [1, 1], held
    finally:
        assert gateway.stop() == 0


async def test_a_worker_that_died_is_skipped(
    start_server: StartServer, tmp_path: Path, redis_url: str
) -> None:
    """Every new connection after a worker died is served by the other one: none is handed to the
    dead worker's channel and lost."""
    gateway, (dead, _) = await two_workers(start_server, tmp_path, redis_url)
    try:
        os.kill(dead, signal.SIGKILL)
        for _ in range(200):  # its descriptors, its end of the channel included, close as it dies
            if not open_files(dead):
                break
            await asyncio.sleep(0.05)
        for _ in range(6):
            async with aiohttp.ClientSession() as session:  # a new connection each
                await generate(session, gateway.url)
    finally:
        gateway.stop()  # the dead worker's status makes the exit status non-zero
