"""`server.workers: 2`: the supervisor deals the tenant port's connections to its workers in turn, so
even a client with two keep-alive connections has one on each worker (with SO_REUSEPORT the kernel's
hash put both on one worker half of the time), and a worker stopped for good is skipped."""

from __future__ import annotations

import asyncio
import json
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
from tests.support import raw_http
from tests.support.config import TENANT_KEY, UPSTREAM_KEY, config_dict
from tests.support.processes import GatewayProcess
from tests.support.workers import connections_by_pid, worker_pids

StartServer = Callable[[web.Application], Awaitable[TestServer]]
SMALL = {"model": "gpt-image-1.5", "prompt": "a small square", "size": "1024x1024", "quality": "low"}
AUTH = {"Authorization": f"Bearer {TENANT_KEY}"}
CONNECTIONS = 30  # made just before shutdown
pytestmark = pytest.mark.slow


async def two_workers(
    start_server: StartServer, tmp_path: Path, redis_url: str, drain: float = 0
) -> tuple[GatewayProcess, list[int]]:
    mock = await start_server(create_mock_app(MockOptions(api_key=UPSTREAM_KEY)))
    server = {"workers": 2, "shutdown_grace_seconds": 5, "drain_delay_seconds": drain}
    config = config_dict(base_url(mock), store={"backend": "redis", "url": redis_url}, server=server)
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


async def send_requests(port: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """CONNECTIONS connections to `port`, each with a whole generation request sent."""
    headers = [(b"Authorization", AUTH["Authorization"].encode()), (b"Content-Type", b"application/json")]
    data = raw_http.request("/v1/images/generations", headers=headers, body=json.dumps(SMALL).encode())
    clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CONNECTIONS)]
    for _, writer in clients:
        writer.write(data)
        await writer.drain()
    return clients


async def statuses_of(clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> list[int | str]:
    """Each client's status, or the exception it got instead; the connections closed then."""
    try:
        answers = await asyncio.gather(
            *(raw_http.read_response(r) for r, _ in clients), return_exceptions=True
        )
    finally:
        for _, writer in clients:
            writer.close()
    return [a.status if isinstance(a, raw_http.RawResponse) else type(a).__name__ for a in answers]


@pytest.mark.parametrize("drain_delay", [0, 1.0])
async def test_connections_in_the_workers_channels_at_shutdown_are_all_answered(
    start_server: StartServer, tmp_path: Path, redis_url: str, drain_delay: float
) -> None:
    """Connections the supervisor handed to its workers before it stopped accepting, but which they
    had not yet taken from their channels when they closed their sites, are each answered: none is
    closed unanswered. The workers are held (SIGSTOP) while the connections come and the drain
    delay ends, as when they are busy: SIGTERM comes just before (drain delay 0) or earlier."""
    gateway, pids = await two_workers(start_server, tmp_path, redis_url, drain=drain_delay)
    assert gateway.process is not None
    if drain_delay:
        gateway.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(drain_delay / 2)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        clients = await send_requests(gateway.port)
        await asyncio.sleep(0.3)  # the dealer hands them on
        if not drain_delay:
            gateway.process.send_signal(signal.SIGTERM)  # forwarded to the held workers: pending
        await asyncio.sleep(1.0)  # the supervisor stops accepting; so would the workers
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    try:
        statuses = await statuses_of(clients)
        code = await asyncio.to_thread(gateway.process.wait, 30)
    finally:
        gateway.stop()
    assert statuses == [200] * CONNECTIONS
    assert code == 0


async def test_a_worker_stopped_alone_answers_what_was_handed_to_it_then_is_skipped(
    start_server: StartServer, tmp_path: Path, redis_url: str
) -> None:
    """A worker told to stop while the supervisor keeps dealing (SIGTERM to it alone) answers every
    connection already queued in its channel, then refuses more: the dealer skips it, and the
    other worker takes every later connection."""
    gateway, (stopping, _) = await two_workers(start_server, tmp_path, redis_url)
    os.kill(stopping, signal.SIGSTOP)
    try:
        os.kill(stopping, signal.SIGTERM)  # pending until it runs again
        clients = await send_requests(gateway.port)  # half of them queue in its channel
        await asyncio.sleep(0.3)
    finally:
        os.kill(stopping, signal.SIGCONT)
    try:
        statuses = await statuses_of(clients)
        for _ in range(200):  # it exits once it has answered them: its descriptors close
            if not open_files(stopping):
                break
            await asyncio.sleep(0.05)
        assert not open_files(stopping)
        for _ in range(4):
            async with aiohttp.ClientSession() as session:  # a new connection each
                await generate(session, gateway.url)
    finally:
        gateway.stop()  # the stopped worker's status is 0, the supervisor's too
    assert statuses == [200] * CONNECTIONS
