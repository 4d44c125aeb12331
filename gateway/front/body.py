"""Request bodies at the front door: their encoding, size, time to arrive and memory, bounded.

- `Content-Encoding` other than identity is refused with 415 before a byte of the body is read:
  inflating would cost the gateway what the client saved (a 500 KB gzip bomb is 500 MiB), and
  the OpenAI API does not take compressed requests either.
- A body larger than `server.max_body_bytes` is a 413, as soon as its Content-Length or its bytes
  say so; one that has not fully arrived `server.body_timeout_seconds` after its headers is a 408.
- All bodies being read at once share `server.max_buffered_body_bytes`: a request waits (within its
  body timeout) for room before it reads, so a hundred concurrent 1 MiB uploads cannot grow the
  process by a hundred MiB; one that finds none in time is a 503 `server_busy`.
- A client that goes away mid-upload is `ClientGone` (499 in the access log, not an error); broken
  chunked framing is a 400.

A rejection before the whole body arrived closes the connection (see `front.connections`): the
rest of the body is never drained.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.errors import (
    ClientGone,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    ServerBusy,
    UnsupportedMediaType,
)
from gateway.metrics import Metrics
from gateway.settings import ServerSettings


class BodyBudget:
    """Bytes of request bodies being read at once, across every request of the process."""

    def __init__(self, capacity: int, metrics: Metrics) -> None:
        self.capacity = capacity
        self.used = 0
        self.metrics = metrics
        self._room = asyncio.Condition()

    async def take(self, size: int) -> None:
        async with self._room:
            await self._room.wait_for(lambda: self.used + size <= self.capacity)
            self.used += size
            self.metrics.body_bytes_buffered.set(self.used)

    async def give_back(self, size: int) -> None:
        async with self._room:
            self.used -= size
            self.metrics.body_bytes_buffered.set(self.used)
            self._room.notify_all()


def check_encoding(request: web.Request) -> None:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            "Request bodies must not be compressed: send them without Content-Encoding.",
            param=None,
            code="unsupported_content_encoding",
        )


class BodyReader:
    """Reads a request's body within the bounds of the settings in force and the shared budget."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget

    async def read(self, request: web.Request, server: ServerSettings) -> bytes:
        """The whole body, or a GatewayError (415, 413, 408, 503, 400, or ClientGone)."""
        return b"".join([chunk async for chunk in self.chunks(request, server)])

    async def chunks(self, request: web.Request, server: ServerSettings) -> AsyncIterator[bytes]:
        """The body as it arrives, within the same bounds (for readers that stream, like multipart)."""
        check_encoding(request)
        limit = server.max_body_bytes
        too_large = PayloadTooLarge(f"The request body is larger than the gateway's limit of {limit} bytes.")
        length = request.content_length
        if length is not None and length > limit:
            raise too_large
        share = length if length is not None else limit
        loop = asyncio.get_running_loop()
        deadline = loop.time() + server.body_timeout_seconds
        try:
            async with asyncio.timeout_at(deadline):
                await self.budget.take(share)
        except TimeoutError:
            raise ServerBusy(
                "The gateway is reading too many request bodies at once; retry shortly.",
                headers={"Retry-After": "1"},
            ) from None
        try:
            size = 0
            async with asyncio.timeout_at(deadline):
                async for chunk in _arrivals(request):
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    yield chunk
        except TimeoutError:
            raise RequestTimeout(
                f"The request body did not arrive within {server.body_timeout_seconds:g} seconds."
            ) from None
        finally:
            await asyncio.shield(self.budget.give_back(share))


async def _arrivals(request: web.Request) -> AsyncIterator[bytes]:
    """The body's chunks; a vanished client and broken framing become GatewayErrors."""
    content = request.content
    while True:
        try:
            chunk = await content.readany()
        except (ConnectionError, HttpProcessingError) as exc:
            transport = request.transport
            if isinstance(exc, ConnectionError) or transport is None or transport.is_closing():
                raise ClientGone("The client closed the connection before its request arrived.") from None
            raise InvalidRequest(
                "The request body's framing is broken (chunk sizes or Content-Length).", code="invalid_body"
            ) from None
        if not chunk:
            return
        yield chunk
