"""A 40 MB edit upload through a real gateway process keeps its peak RSS flat (spooled, streamed)."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.mock_upstream.images import ImageSpec, render_b64
from tests.e2e.conftest import base_url
from tests.e2e.test_large_body import large_body_chunks
from tests.support.config import TENANT_KEY, config_dict
from tests.support.processes import GatewayProcess, peak_rss_kib
from tests.support.scripted_upstream import Script, ScriptedUpstream

StartServer = Callable[[web.Application], Awaitable[TestServer]]
IMAGE_BYTES = 13 * 2**20  # three of these: a 40 MB upload


def big_png(variant: int, size: int = IMAGE_BYTES) -> bytes:
    """A real 1024x1024 png padded to `size` bytes with a chunk decoders skip."""
    return base64.b64decode(render_b64(ImageSpec(1024, 1024, "png", False, variant, size * 4 // 3)))


def edit_form(images: list[bytes]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("model", "gpt-image-1.5")
    form.add_field("prompt", "three reference images")
    form.add_field("quality", "low")
    for index, data in enumerate(images):
        form.add_field("image[]", data, filename=f"ref{index}.png", content_type="image/png")
    return form


@pytest.mark.slow
async def test_40mb_upload_with_bounded_memory(start_server: StartServer, tmp_path: Path) -> None:
    answer = Script(content_type="application/json", chunks=large_body_chunks(images=0), content_length=True)
    upstream = ScriptedUpstream(answer)
    server = await start_server(upstream.app())
    gateway = GatewayProcess(config_dict(base_url(server)), tmp_path)
    await gateway.start()
    images = [big_png(variant) for variant in range(3)]
    assert sum(map(len, images)) > 40_000_000
    headers = {"Authorization": f"Bearer {TENANT_KEY}"}
    try:
        async with aiohttp.ClientSession() as session:
            # a small edit first, so the baseline includes everything an edit touches
            small = edit_form([big_png(9, 300_000)])
            async with session.post(f"{gateway.url}/v1/images/edits", data=small, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
            assert gateway.process is not None
            baseline = peak_rss_kib(gateway.process.pid)
            async with session.post(
                f"{gateway.url}/v1/images/edits", data=edit_form(images), headers=headers
            ) as r:
                assert r.status == 200, await r.text()
            growth_mib = (peak_rss_kib(gateway.process.pid) - baseline) / 1024
        assert growth_mib < 24, f"peak RSS grew by {growth_mib:.1f} MiB for a 40 MB upload"
        received = upstream.received[-1].body
        for image in images:
            assert image in received  # each file arrived whole, byte for byte
    finally:
        assert gateway.stop() == 0
