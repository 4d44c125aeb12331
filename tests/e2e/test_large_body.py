"""A response of tens of MB relays through a real gateway process with memory flat in its size."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.e2e.conftest import base_url
from tests.support.config import TENANT_KEY, config_dict
from tests.support.processes import GatewayProcess, peak_rss_kib
from tests.support.scripted_upstream import Script, ScriptedUpstream

StartServer = Callable[[web.Application], Awaitable[TestServer]]
IMAGE_B64 = 4 * 1024 * 1024  # ten of these: 40 MiB of base64 in one JSON body
CHUNK = b"A" * 65536


def large_body_chunks(images: int = 10) -> list[bytes]:
    chunks = [b'{"created":1,"data":[']
    for i in range(images):
        chunks.append(b'{"b64_json":"' if i == 0 else b',{"b64_json":"')
        chunks.extend([CHUNK] * (IMAGE_B64 // len(CHUNK)))  # one object, referenced many times
        chunks.append(b'"}')
    chunks.append(
        b'],"usage":{"input_tokens":9,"input_tokens_details":{"text_tokens":9,"image_tokens":0},'
        b'"output_tokens":2720,"total_tokens":2729}}'
    )
    return chunks


@pytest.mark.slow
async def test_40mb_response_relays_with_bounded_memory(start_server: StartServer, tmp_path: Path) -> None:
    chunks = large_body_chunks()
    total = sum(len(c) for c in chunks)
    assert total > 40 * 1024 * 1024
    small = Script(content_type="application/json", chunks=large_body_chunks(images=0), content_length=True)
    upstream = ScriptedUpstream(small)
    server = await start_server(upstream.app())
    gateway = GatewayProcess(config_dict(base_url(server)), tmp_path)
    await gateway.start()
    try:
        headers = {"Authorization": f"Bearer {TENANT_KEY}"}
        payload = {"model": "gpt-image-1.5", "prompt": "ten big images", "n": 10, "quality": "low"}
        async with aiohttp.ClientSession() as session:
            # a small request first, so the baseline includes everything a request touches
            async with session.post(
                f"{gateway.url}/v1/images/generations", json={**payload, "n": 1}, headers=headers
            ) as r:
                await r.read()
            assert gateway.process is not None
            baseline = peak_rss_kib(gateway.process.pid)
            upstream.script = Script(content_type="application/json", chunks=chunks, content_length=True)
            received = 0
            async with session.post(
                f"{gateway.url}/v1/images/generations", json=payload, headers=headers
            ) as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(65536):
                    received += len(chunk)
            assert received == total
            growth_mib = (peak_rss_kib(gateway.process.pid) - baseline) / 1024
            async with session.get(f"{gateway.ops_url}/metrics") as resp:
                metrics = await resp.text()
        assert growth_mib < 16, f"peak RSS grew by {growth_mib:.1f} MiB relaying {total / 2**20:.0f} MiB"
        assert (
            'gateway_tokens_total{bucket="image_out",model="gpt-image-1.5",settled="usage",tenant="team"} 5440.0'
            in metrics
        )
    finally:
        assert gateway.stop() == 0
