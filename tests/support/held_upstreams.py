"""Upstreams for tests and benches that must control when an answer comes: `HeldUpstream` holds
every request until released (exact admission under a burst), `EndlessStreams` keeps every stream
open after its first partial image (shutdown with long streams open). Both serve the image API on a
free port of this process.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from tests.support.processes import free_port

USAGE = {
    "input_tokens": 5,
    "input_tokens_details": {"text_tokens": 5, "image_tokens": 0},
    "output_tokens": 272,
    "total_tokens": 277,
}
PARTIAL = (
    b"event: image_generation.partial_image\n"
    b'data: {"type":"image_generation.partial_image","b64_json":"AA==","partial_image_index":0}\n\n'
)


class _HeldImageApi:
    """`POST /v1/images/generations` on a free port of this process, answered by `_answer` once
    `_go` is set; `count` says how many requests have reached the point where they wait."""

    def __init__(self) -> None:
        self.count = 0
        self._go = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/images/generations", self._answer)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def stop(self) -> None:
        self._go.set()
        if self._runner is not None:
            await self._runner.cleanup()


class HeldUpstream(_HeldImageApi):
    """Answers nothing until `release()`; `holding` requests are waiting."""

    @property
    def holding(self) -> int:
        return self.count

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.count += 1
        await self._go.wait()
        return web.json_response({"created": 1, "data": [{"b64_json": "AA=="}], "usage": USAGE})

    def release(self) -> None:
        self._go.set()


class EndlessStreams(_HeldImageApi):
    """Streams send one partial image, then nothing until `end()`; `open` streams are waiting."""

    @property
    def open(self) -> int:
        return self.count

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(PARTIAL)
        self.count += 1
        await self._go.wait()
        return response

    def end(self) -> None:
        """Every stream, open or to come, ends now."""
        self._go.set()
