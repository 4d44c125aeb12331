"""Relaying an upstream response to the client, byte for byte, while the usage reader looks on.

Each chunk is written as soon as it arrives (aiohttp flushes every write; TCP_NODELAY is on), so
memory stays flat in the body size and an SSE event reaches the client when the upstream sends it.
If the client leaves, the upstream is still read to its end, bounded by its read timeout, so the
generation is billed from the usage it reports. Once headers are sent the status cannot change: an
SSE stream that fails gets an `error` event and a clean end; a JSON body that fails is cut off
(connection closed, no terminating chunk) so the client cannot mistake it for a whole answer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.errors import GatewayError
from gateway.runtime import Route
from gateway.upstream import translate
from gateway.usage import UsageReader, usage_reader


@dataclass(slots=True)
class RelayOutcome:
    """What happened while relaying: for settlement, metrics and the access log."""

    response: web.StreamResponse
    status: int
    streaming: bool
    reader: UsageReader
    bytes_sent: int = 0
    first_byte_at: float | None = None  # perf_counter() of the first body bytes written
    client_gone: bool = False
    failure: GatewayError | None = None  # upstream failed after headers were sent


async def relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    headers: Mapping[str, str],
    route: Route,
) -> RelayOutcome:
    """Send `upstream`'s status, `headers` and body to the client; always consume the upstream body."""
    content_type = upstream.headers.get("Content-Type", "")
    streaming = content_type.startswith("text/event-stream")
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    outcome = RelayOutcome(response, upstream.status, streaming, usage_reader(content_type))
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    try:
        await response.prepare(request)
    except ConnectionError:
        outcome.client_gone = True
    try:
        await _pump(upstream, response, outcome)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        outcome.failure = translate(exc, route)
        outcome.reader.close()
        await _end_after_failure(request, response, outcome)
    finally:
        upstream.release()
    return outcome


async def _pump(
    upstream: aiohttp.ClientResponse, response: web.StreamResponse, outcome: RelayOutcome
) -> None:
    reader = outcome.reader
    async for chunk in upstream.content.iter_any():
        reader.feed(chunk)
        if outcome.client_gone:
            continue  # keep draining so the real usage is known and billed
        try:
            await response.write(chunk)
        except ConnectionError:
            outcome.client_gone = True
            continue
        if outcome.first_byte_at is None:
            outcome.first_byte_at = time.perf_counter()
        outcome.bytes_sent += len(chunk)
    reader.close()
    if not outcome.client_gone:
        try:
            await response.write_eof()
        except ConnectionError:
            outcome.client_gone = True


async def _end_after_failure(
    request: web.Request, response: web.StreamResponse, outcome: RelayOutcome
) -> None:
    if outcome.client_gone:
        return
    if outcome.streaming and outcome.failure is not None:
        try:
            await response.write(outcome.failure.to_sse())
            await response.write_eof()
            return
        except ConnectionError:
            outcome.client_gone = True
            return
    # A truncated JSON body must not look complete: drop the connection without a final chunk.
    if request.transport is not None:
        request.transport.abort()
