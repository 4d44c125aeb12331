"""Relaying an upstream response to the client, byte for byte, while the usage reader looks on.

The readers it drives live beside it: `usage` (the upstream's reported usage, from a JSON body or
an event stream), `sse` (event framing) and `json_scan` (one JSON document, streamed).

Each chunk is written as soon as it arrives (aiohttp flushes every write; TCP_NODELAY is on), so
memory stays flat in the body size and an SSE event reaches the client when the upstream sends it.
If the client leaves, the upstream is still read to its end, bounded by its read timeout, so the
generation is billed from the usage it reports. A client that stops reading without leaving would
pin the request (a write waits for the transport to drain): the front door's connection gives every
write to a client `server.client_write_timeout_seconds` (`front.connections`), then cuts it off; the
write under way fails, and the client is treated as gone.

Once headers are sent the status cannot change. An SSE stream that fails between two events gets an
`error` event and a clean end; one that fails inside an event is cut off, since an `error` event
spliced onto half an event would corrupt it for parsers. A JSON body that fails is cut off too
(connection closed, no terminating chunk) so the client cannot mistake it for a whole answer. A
JSON answer's headers go out with its first body bytes: one that fails before them has sent nothing,
so `relay` raises the failure and the client gets it as an error answer, as when the upstream fails
before its headers.

The one exception to bytes relayed unchanged: a non-2xx answer is read whole first (an error body
is small; one past `ERROR_BODY_CAP` goes through as it comes), so that one not in OpenAI's shape
reaches the client in it (`gateway.upstreams.transport.openai_error`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import cast

from aiohttp import web
from aiohttp.http import StreamWriter

from gateway.errors import GatewayError
from gateway.relay.usage import UsageReader, usage_reader
from gateway.runtime import Target
from gateway.upstreams.client import Response, UpstreamError
from gateway.upstreams.transport import ERROR_BODY_CAP, openai_error, translate


@dataclass(slots=True)
class RelayOutcome:
    """What happened while relaying: for settlement, metrics and the access log."""

    response: web.StreamResponse
    status: int
    streaming: bool
    reader: UsageReader
    bytes_sent: int = 0
    first_byte_at: float | None = None  # perf_counter() of the first body bytes written
    # left before the end, or stopped reading for longer than the write timeout; a client that
    # closes after `data: [DONE]` (openai-python does) read everything and is not gone
    client_gone: bool = False
    failure: GatewayError | None = None  # upstream failed after headers were sent


async def relay(
    request: web.Request,
    upstream: Response,
    headers: Mapping[str, str],
    target: Target,
) -> RelayOutcome:
    """Send `upstream`'s status, `headers` and body to the client; always consume the upstream body.
    Raises the upstream's failure (a GatewayError) when nothing was sent yet."""
    content_type = upstream.headers.get("Content-Type", "")
    streaming = content_type.startswith("text/event-stream")
    answer = web.StreamResponse if streaming else _HeadersWithBody
    response = answer(status=upstream.status, reason=upstream.reason, headers=headers)
    outcome = RelayOutcome(response, upstream.status, streaming, usage_reader(content_type))
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    client = _Client(request, outcome)
    try:
        if streaming:  # a JSON answer's are prepared with its first body bytes (`_Client.write`)
            await client.prepare()
            await _pump(upstream, client)
        elif upstream.status >= 400:
            await _relay_error(upstream, client, target)
        else:
            await _pump(upstream, client)
    except (UpstreamError, OSError) as exc:
        failure = translate(exc, target)
        if not response.prepared:
            raise failure from exc
        outcome.failure = failure
        outcome.reader.close()
        await client.end_after_failure(failure)
    finally:
        upstream.release()
    return outcome


async def _pump(upstream: Response, client: _Client) -> None:
    """Each piece as the upstream connection delivered it, one by one (joining what is buffered
    would copy most of a large body). The body's last piece, when the upstream has ended it
    already, goes out with the end of the answer in one write."""
    while chunk := await upstream.read():
        if upstream.ended:
            break
        await client.write(chunk)  # once the client is gone, this keeps draining for the usage
    await client.finish(chunk)


async def _relay_error(upstream: Response, client: _Client, target: Target) -> None:
    """A non-2xx answer: read whole, then sent as it came or, when it is not in OpenAI's shape,
    as `openai_error` rewrites it. One past `ERROR_BODY_CAP` is relayed as it comes."""
    body = b""
    while chunk := await upstream.read():
        body += chunk
        if len(body) > ERROR_BODY_CAP:
            await client.write(body)
            await _pump(upstream, client)
            return
        if upstream.ended:
            break
    rewritten = openai_error(upstream.status, upstream.headers, body, target.upstream_name)
    if rewritten is not None:
        body, headers = rewritten
        response = client.outcome.response
        response.headers.update(headers)
        response.content_length = len(body)
    await client.finish(body)


class _HeadersWithBody(web.StreamResponse):
    """A JSON answer: its headers go out with its first body bytes, in one write (as aiohttp's own
    `web.Response` does), instead of a write of their own. An SSE answer's go at once: a client
    waits on them before the first event."""

    _send_headers_immediately = False


class _Client:
    """The client side of one relay: whether the client is still there; where the bytes sent so far end.

    Between the headers and the end, a piece goes straight to the client's transport (`_push`):
    aiohttp's `StreamResponse.write` costs four coroutines per piece and, on Python < 3.12.9, joins
    a chunk and its framing into a copy before writing. The headers and the end of the answer go
    through aiohttp's response, which keeps the connection's state (keep-alive, eof, bytes out).
    A piece the client is too slow for waits for the transport to drain, within the connection's
    write deadline."""

    __slots__ = ("closed", "outcome", "read_to_end", "request", "tail", "transport", "writer")
    transport: asyncio.Transport  # the client's, once the headers are out

    def __init__(self, request: web.Request, outcome: RelayOutcome) -> None:
        self.request = request
        self.outcome = outcome
        self.tail = b""  # the last bytes written: enough to tell whether an SSE event has ended
        self.closed = False  # no more writes: the connection is gone
        self.read_to_end = False  # what was written includes the stream's `data: [DONE]`
        self.writer: StreamWriter | None = None  # aiohttp's, once the headers are out

    async def prepare(self) -> None:
        """Start the answer; an SSE answer's headers go out now, a JSON one's with its first bytes."""
        if await self._send(self.outcome.response.prepare(self.request)) and self.outcome.streaming:
            self._headers_out()

    async def write(self, chunk: bytes) -> None:
        """A (non-empty) piece of the body."""
        writer = self.writer
        if writer is not None:
            sent = self._push(writer, chunk)
            if sent and self.transport.get_write_buffer_size():  # the client is behind
                sent = await self._send(writer.drain())  # waits while aiohttp's protocol is paused
        else:  # a JSON answer's first bytes: aiohttp sends its headers with them, in one write
            if not self.outcome.response.prepared:
                await self.prepare()
            sent = not self.closed and await self._send(self.outcome.response.write(chunk))
            if sent:
                self._headers_out()
        self._seen(chunk, sent)

    async def finish(self, last: bytes = b"") -> None:
        """The body's `last` bytes (if any) and its end, in one write; the usage reader closes."""
        response = self.outcome.response
        if not response.prepared:
            await self.prepare()  # a JSON answer's headers, with its last bytes (or an empty body)
        sent = not self.closed and await self._send(response.write_eof(last))
        self._seen(last, sent)
        self.outcome.reader.close()

    def _headers_out(self) -> None:
        """The pieces to come can go straight to the transport."""
        transport = self.request.transport
        if transport is not None:  # (None: the client left; aiohttp's writes find that out)
            self.transport = transport
            self.writer = cast(StreamWriter, self.request.writer)

    def _push(self, writer: StreamWriter, chunk: bytes) -> bool:
        """Hand `chunk` to the transport as aiohttp's writer would frame it (a chunk of a chunked
        body: its size line, itself and a line end in one `writelines`, which uvloop sends in one
        `writev` without joining them), counting it in the writer's `output_size` as aiohttp does;
        False if the client is gone.

        No bytes beyond a declared Content-Length need clipping (aiohttp's writer would clip them):
        the upstream client ends a body at its own Content-Length."""
        transport = self.transport
        if self.closed:
            return False
        if transport.is_closing():
            self._gone()
            return False
        if writer.chunked:
            size = b"%x\r\n" % len(chunk)
            transport.writelines((size, chunk, b"\r\n"))
            writer.output_size += len(size) + len(chunk) + 2
        else:
            transport.write(chunk)
            writer.output_size += len(chunk)
        return True

    def _seen(self, chunk: bytes, sent: bool) -> None:
        """After `chunk` was sent (or not: the client is gone), the usage reader sees it: an SSE
        event reaches the client before the reader parses it."""
        if not chunk:
            return
        outcome = self.outcome
        outcome.reader.feed(chunk)
        if not sent:
            return
        if outcome.first_byte_at is None:
            outcome.first_byte_at = time.perf_counter()
        outcome.bytes_sent += len(chunk)
        self.tail = chunk[-4:] if len(chunk) >= 4 else (self.tail + chunk)[-4:]
        self.read_to_end = outcome.reader.done

    async def end_after_failure(self, failure: GatewayError) -> None:
        outcome = self.outcome
        if self.closed:
            return
        if outcome.streaming and (outcome.bytes_sent == 0 or _ends_event(self.tail)):
            if await self._send(outcome.response.write(failure.to_sse())):
                await self._send(outcome.response.write_eof())
            return
        # Half an SSE event, or a JSON body: the client must see a truncated response, not a whole
        # one; drop the connection without a final chunk.
        self._abort()

    async def _send(self, write: Awaitable[object]) -> bool:
        """Await one write; False (and the client counted gone) if it left or stopped reading (cut
        off at the connection's write deadline: the write fails)."""
        try:
            await write
        except ConnectionError:
            self._gone()
            return False
        return not self.closed

    def _gone(self) -> None:
        self.closed = True
        self.outcome.client_gone = not self.read_to_end

    def _abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.abort()


def _ends_event(tail: bytes) -> bool:
    """Whether bytes ending in `tail` end at an SSE event boundary: a line end, then an empty line.

    Line ends are CRLF, LF or CR, in any mix (`\\n\\n`, `\\r\\n\\r\\n`, `\\r\\r`, `\\r\\n\\n`, ...).
    """
    for line_end in (b"\r\n", b"\n", b"\r"):
        if tail.endswith(line_end):
            return tail[: -len(line_end)].endswith((b"\n", b"\r"))
    return False
