"""Request bodies at the front door: their encoding, size, time to arrive and memory, bounded.

- `Content-Encoding` other than identity is refused with 415 before a byte of the body is read:
  inflating would cost the gateway what the client saved (a 500 KB gzip bomb is 500 MiB), and
  the OpenAI API does not take compressed requests either.
- A body larger than `server.max_body_bytes` is a 413, as soon as its Content-Length or its bytes
  say so; one that has not fully arrived `server.body_timeout_seconds` after its headers is a 408.
- All bodies being read at once share `server.max_buffered_body_bytes`: a request waits (within its
  body timeout) for room before it reads, so a hundred concurrent 1 MiB uploads cannot grow the
  process by a hundred MiB; one that finds none in time is a 503 `server_busy`. One tenant may claim
  at most its share of it (`server.max_tenant_share`), counting its bodies being read and those
  waiting for room: beyond, its next body is a 429 at once rather than a wait, so one tenant's slow
  bodies cannot make every other tenant's wait for room. The share is its request's configuration's
  (`Settings.tenant_buffered_body_bytes`): by default it follows the number of tenants at a reload.
- A client that goes away mid-upload is `ClientGone` (499 in the access log, not an error); broken
  chunked framing is a 400.

A rejection before the whole body arrived closes the connection (see `front.connections`): the
rest of the body is never drained.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.config import ServerSettings
from gateway.errors import (
    ClientGone,
    CompressedBody,
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    ServerBusy,
)
from gateway.front.admission import hold, over_share
from gateway.telemetry.metrics import Metrics


class BodyBudget:
    """Bytes of request bodies being read at once, across every request of the process, and what
    each tenant has claimed of them: the bodies it is reading and those waiting for room."""

    def __init__(self, capacity: int, metrics: Metrics) -> None:
        self.capacity = capacity
        self.used = 0  # taken: bodies being read
        self.by_tenant: dict[str, int] = {}  # claimed, waiting or taken, per tenant (none: absent)
        self.metrics = metrics
        self._room = asyncio.Condition()

    async def take(self, size: int, tenant: str, share: int) -> None:
        """Wait for room for `size` bytes, within the tenant's `share` of the budget (the settings of
        its request's configuration). A body that would take the tenant past its share, counting its
        bodies still waiting for room, is RateLimited at once: waiting would let one tenant's slow
        bodies queue every other tenant's behind them, and the share is decided here, once, so a
        body that waits waits only for room in the whole budget. A tenant with no body claimed may
        always claim one (its share may be smaller than one upload's). A share of the whole budget
        (`max_tenant_share: 1`) is none: its bodies wait for room like any."""
        held = self.by_tenant.get(tenant, 0)
        if held and share < self.capacity and held + size > share:
            raise over_share(
                self.metrics,
                tenant,
                "buffered_body_bytes",
                f"Tenant {tenant!r} has {held} bytes of request bodies being received, or waiting to"
                f" be, by this gateway process; {size} more would pass its share, {share} bytes"
                " (server.max_tenant_share of server.max_buffered_body_bytes). Retry once some of them"
                " have arrived.",
            )
        hold(self.by_tenant, tenant, size)
        try:
            async with self._room:
                await self._room.wait_for(lambda: self.used + size <= self.capacity)
                self.used += size
                self.metrics.body_bytes_buffered.set(self.used)
        except BaseException:  # no room in time, or the client left: the claim goes
            hold(self.by_tenant, tenant, -size)
            raise

    async def give_back(self, size: int, tenant: str) -> None:
        async with self._room:
            self.used -= size
            hold(self.by_tenant, tenant, -size)
            self.metrics.body_bytes_buffered.set(self.used)
            self._room.notify_all()


def check_encoding(request: web.Request) -> None:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise CompressedBody("Request bodies must not be compressed: send them without Content-Encoding.")


class BodyReader:
    """Opens one tenant's request bodies within the bounds of the settings in force and the shared
    budget, of which the tenant may claim `share` bytes."""

    __slots__ = ("budget", "share", "tenant")

    def __init__(self, budget: BodyBudget, tenant: str, share: int) -> None:
        self.budget = budget
        self.tenant = tenant
        self.share = share

    async def read(self, request: web.Request, server: ServerSettings) -> bytes:
        """The whole body (at most `server.max_body_bytes`), or a GatewayError (415, 413, 408, 503,
        400, or ClientGone)."""
        if request.content.is_eof():
            # All of it came with the head (the usual small JSON body): it is in memory already and
            # there is nothing to wait for, so no share of the budget and no deadline.
            check_encoding(request)
            whole = _arrived(request)
            if len(whole) > server.max_body_bytes:
                raise _too_large(server.max_body_bytes)
            return whole
        async with self.open(request, server) as body:
            return await body.read_all()

    def open(
        self,
        request: web.Request,
        server: ServerSettings,
        *,
        limit: int | None = None,
        charge: int | None = None,
        too_large: PayloadTooLarge | None = None,
    ) -> BoundedBody:
        """The body as it arrives, for readers that stream it (multipart). `limit` defaults to
        `server.max_body_bytes`; `charge` is what the reader holds in memory at most, taken from the
        budget (default: the Content-Length, or the limit); `too_large` the 413 to raise."""
        limit = server.max_body_bytes if limit is None else limit
        too_large = too_large or _too_large(limit)
        length = request.content_length
        if charge is None:
            charge = length if length is not None and length <= limit else limit
        return BoundedBody(
            self,
            request,
            timeout=server.body_timeout_seconds,
            limit=limit,
            charge=charge,
            too_large=too_large,
        )


class BoundedBody:
    """One request's body within its bounds: `async with`, then `readany()` until it returns b""."""

    def __init__(
        self,
        reader: BodyReader,
        request: web.Request,
        *,
        timeout: float,
        limit: int,
        charge: int,
        too_large: PayloadTooLarge,
    ) -> None:
        self.reader = reader
        self.request = request
        self.timeout = timeout
        self.limit = limit
        self.charge = charge
        self.too_large = too_large
        self.received = 0
        self.deadline = 0.0
        self.taken = False

    async def __aenter__(self) -> BoundedBody:
        check_encoding(self.request)
        length = self.request.content_length
        if length is not None and length > self.limit:
            raise self.too_large
        self.deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            async with asyncio.timeout_at(self.deadline):
                await self.reader.budget.take(self.charge, self.reader.tenant, self.reader.share)
        except TimeoutError:
            raise ServerBusy(
                "The gateway is reading too many request bodies at once; retry shortly.",
                headers={"Retry-After": "1"},
            ) from None
        self.taken = True
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.taken:
            self.taken = False
            reader = self.reader
            await asyncio.shield(reader.budget.give_back(self.charge, reader.tenant))

    async def readany(self) -> bytes:
        """The next bytes that arrived (b"" at the end of the body)."""
        try:
            async with asyncio.timeout_at(self.deadline):
                chunk = await _arrival(self.request)
        except TimeoutError:
            raise RequestTimeout(
                f"The request body did not arrive within {self.timeout:g} seconds."
            ) from None
        self.received += len(chunk)
        if self.received > self.limit:
            raise self.too_large
        return chunk

    async def read_all(self) -> bytes:
        chunks = []
        while chunk := await self.readany():
            chunks.append(chunk)
        return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than the gateway's limit of {limit} bytes.")


async def _arrival(request: web.Request) -> bytes:
    """The next chunk of the body; a vanished client and broken framing become GatewayErrors."""
    try:
        return await request.content.readany()
    except (ConnectionError, HttpProcessingError) as exc:
        raise _body_error(request, exc) from None


def _arrived(request: web.Request) -> bytes:
    """The whole body, which has arrived (the stream keeps an error that came after it: a client
    gone before its request was handled)."""
    try:
        return request.content.read_nowait()
    except (ConnectionError, HttpProcessingError) as exc:
        raise _body_error(request, exc) from None


def _body_error(request: web.Request, exc: ConnectionError | HttpProcessingError) -> GatewayError:
    transport = request.transport
    if isinstance(exc, ConnectionError) or transport is None or transport.is_closing():
        return ClientGone("The client closed the connection before its request arrived.")
    return InvalidRequest(
        "The request body's framing is broken (chunk sizes or Content-Length).", code="invalid_body"
    )
