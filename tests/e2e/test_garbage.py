"""A finished request leaves no reference cycle of the gateway's own, whichever way it ended, so
reference counting frees it at once and garbage.py may freeze long-lived objects; `gateway serve`
exports how long its garbage collections stop it."""

from __future__ import annotations

import asyncio
import gc
import types
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import PIPELINE
from tests.e2e.conftest import Running, StartGateway, base_url
from tests.e2e.test_relay_faults import COMPLETED, partial
from tests.support.config import TENANT_KEY, config_dict
from tests.support.processes import GatewayProcess, free_port
from tests.support.scripted_upstream import Script, ScriptedUpstream

StartServer = Callable[[web.Application], Awaitable[TestServer]]
AUTH = {"Authorization": f"Bearer {TENANT_KEY}"}
STREAM = {"model": "gpt-image-1.5", "prompt": "p", "quality": "low", "stream": True}
JSON = {"model": "gpt-image-1.5", "prompt": "p", "quality": "low"}
REQUESTS = 3


def gateways_own(objects: list[object]) -> list[str]:
    """The objects of the gateway's own types, and the frames of its code, among `objects`."""
    names = set()
    for obj in objects:
        if type(obj).__module__.split(".")[0] in ("gateway", "policies"):
            names.add(type(obj).__qualname__)
        elif isinstance(obj, types.FrameType) and "/gateway/" in obj.f_code.co_filename:
            names.add(f"frame of {obj.f_code.co_name}")
    return sorted(names)


async def cyclic_garbage(
    gw: Running, requests: Callable[[aiohttp.ClientSession], Awaitable[None]]
) -> list[str]:
    """What `requests` left in reference cycles (found by a full collection), once the gateway has
    finished them."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(REQUESTS):
                await requests(session)
        for _ in range(200):  # until the pipeline has drained and settled each of them
            if not gw.app[PIPELINE].tasks and not gw.metric("gateway_in_flight_requests"):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        gc.collect()
        return gateways_own(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def stream_read_whole(gw: Running, session: aiohttp.ClientSession, status: int = 200) -> None:
    async with session.post(f"{gw.v1}/images/generations", json=STREAM, headers=AUTH) as resp:
        assert resp.status == status
        await resp.read()


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(Script(chunks=[partial("\n"), COMPLETED], chunk_delay=0.05), id="ends-whole"),
        pytest.param(
            Script(chunks=[partial("\n")], chunk_delay=0.05, abort_after_chunks=True), id="upstream-dies"
        ),
    ],
)
async def test_a_stream_that_ends_leaves_no_cycle(
    start_server: StartServer, start_gateway: StartGateway, script: Script
) -> None:
    upstream = await start_server(ScriptedUpstream(script).app())
    gw = await start_gateway(openai_url=base_url(upstream))
    assert await cyclic_garbage(gw, lambda session: stream_read_whole(gw, session)) == []


async def test_a_client_that_leaves_mid_stream_leaves_no_cycle(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    script = Script(chunks=[partial("\n"), COMPLETED], chunk_delay=0.3)
    upstream = await start_server(ScriptedUpstream(script).app())
    gw = await start_gateway(openai_url=base_url(upstream))

    async def leave_after_the_first_event(session: aiohttp.ClientSession) -> None:
        resp = await session.post(f"{gw.v1}/images/generations", json=STREAM, headers=AUTH)
        await resp.content.readuntil(b"\n\n")
        resp.close()

    assert await cyclic_garbage(gw, leave_after_the_first_event) == []


async def test_an_unreachable_upstream_and_a_refused_key_leave_no_cycle(start_gateway: StartGateway) -> None:
    gw = await start_gateway(openai_url=f"http://127.0.0.1:{free_port()}/v1")  # nothing listens there

    async def unreachable(session: aiohttp.ClientSession) -> None:
        async with session.post(f"{gw.v1}/images/generations", json=JSON, headers=AUTH) as resp:
            assert resp.status == 502

    async def refused(session: aiohttp.ClientSession) -> None:
        headers = {"Authorization": "Bearer igw_not_a_key"}
        async with session.post(f"{gw.v1}/images/generations", json=JSON, headers=headers) as resp:
            assert resp.status == 401

    assert await cyclic_garbage(gw, unreachable) == []
    assert await cyclic_garbage(gw, refused) == []


async def test_serve_exports_its_garbage_collection_pauses(mock_openai: TestServer, tmp_path: Path) -> None:
    gateway = GatewayProcess(config_dict(base_url(mock_openai)), tmp_path)
    await gateway.start()
    counts: dict[str, float] = {}
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(30):
                async with session.post(
                    f"{gateway.url}/v1/images/generations", json=JSON, headers=AUTH
                ) as resp:
                    assert resp.status == 200
            for _ in range(100):  # the policy collects every quarter of a second
                async with session.get(f"{gateway.ops_url}/metrics") as resp:
                    counts = {
                        line.split('"')[1]: float(line.split()[-1])
                        for line in (await resp.text()).splitlines()
                        if line.startswith("gateway_gc_pause_seconds_count{")
                    }
                if sum(counts.values()):
                    break
                await asyncio.sleep(0.1)
    finally:
        gateway.stop()
    assert set(counts) == {"0", "1", "2"}
    assert sum(counts.values()) > 0
