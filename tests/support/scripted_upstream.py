"""An upstream that answers with exactly the bytes a test scripts: for byte-exactness and failures."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Script:
    status: int = 200
    content_type: str = "text/event-stream"
    chunks: list[bytes] = field(default_factory=list)
    chunk_delay: float = 0.0
    delay_before_headers: float = 0.0
    hold: asyncio.Event | None = None  # set by the test when the answer may go (after the delay)
    abort_after_chunks: bool = False  # drop the connection instead of ending the body
    extra_headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = False


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclass
class ScriptedUpstream:
    script: Script = field(default_factory=Script)
    received: list[Received] = field(default_factory=list)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 2**20)  # large uploads (edits)
        app.router.add_post("/v1/images/generations", self.handle)
        app.router.add_post("/v1/images/edits", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(Received(dict(request.headers), await request.read()))
        script = self.script
        await asyncio.sleep(script.delay_before_headers)
        if script.hold is not None:
            await script.hold.wait()
        response = web.StreamResponse(status=script.status, headers=script.extra_headers)
        response.content_type = script.content_type
        if script.content_length:
            response.content_length = sum(len(c) for c in script.chunks)
        await response.prepare(request)
        try:
            for chunk in script.chunks:
                await response.write(chunk)
                if script.chunk_delay:
                    await asyncio.sleep(script.chunk_delay)
            if script.abort_after_chunks:
                assert request.transport is not None
                request.transport.abort()
                return response
            await response.write_eof()
        finally:
            self.finished.set()
        return response
