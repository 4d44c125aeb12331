"""A lean HTTP/1.1 client for the exchanges with the upstreams: one POST, one answer, relayed.

Each exchange is one `transport.write` of the request head and body (a streamed body follows its
head piece by piece, waiting for the transport to drain), answered through a C parser (httptools,
llhttp) straight into a deque of body pieces. Nothing is decompressed; the answer's head keeps
the upstream's header names, case and order. A body of a known length (`Content-Length`, the usual
JSON answer) goes through the parser only as far as the piece its head came in: the pieces after
it are counted down to its end and kept as they arrived, since the parser would only copy each
into a new bytes object to find the same end (a large image's body is mostly such pieces).

A `Pool` per upstream holds at most `max_connections` connections: idle ones are reused most
recent first and closed after `IDLE_SECONDS`; a request that finds none free waits for one, and
that wait plus a new connection's TCP/TLS connect is bounded by the connect timeout. A connection
is reused only when its answer was received to its end, the upstream kept it alive and nothing of
the request is still being sent.

The read timeout bounds the upstream's silence, from the request sent to the last body byte: one
timer per connection, re-armed lazily from when the upstream was last heard (not a timer per read,
nor one armed and cancelled per exchange: it is left running when an exchange ends, lapses when it
fires between exchanges, and the next exchange arms a new one only if there is none, or it is due
later than that exchange's own timeout); while reading is paused (the relay has not taken what is
buffered) silence does not count.

Failures are this module's own: `NotReached` (the request cannot have reached the upstream:
refused, DNS, TLS, connect timeout, no free connection in time) and the others (read timeout, a
connection dropped or a malformed answer once the request went out).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Mapping
from functools import cache
from typing import Protocol, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

IDLE_SECONDS = 15.0  # an idle connection is closed after this long (aiohttp's keep-alive default)
HIGH_WATER = 128 * 1024  # buffered body bytes above which the socket is not read (aiohttp's),
# unless a read waits for the piece that crossed it: at most HIGH_WATER or one socket read (~250 KB),
# plus one more socket read, is kept
LOW_WATER = 64 * 1024  # and below which it is read again
MAX_HEAD_BYTES = 64 * 1024  # an answer's status line and headers: far more than an upstream sends


class StreamedBody(Protocol):
    """A body sent in pieces (a multipart upload), of a length known in advance; it can be sent
    again (each `chunks()` starts from the beginning)."""

    @property
    def content_type(self) -> str: ...
    @property
    def length(self) -> int: ...
    def chunks(self) -> AsyncIterator[bytes]: ...


class UpstreamError(Exception):
    """An exchange with an upstream failed."""


class NotReached(UpstreamError):
    """No connection, or none in time: the upstream cannot have the request."""


class ConnectFailed(NotReached):
    """Refused, DNS or TLS failure."""


class ConnectTimeout(NotReached):
    """No connection within the connect timeout (a free pooled one, or a new one)."""


class ReadTimeout(UpstreamError):
    """The upstream sent nothing for the read timeout once it had the request."""


class Dropped(UpstreamError):
    """The connection closed, or the answer was not HTTP, once the request went out."""


class Response:
    """The upstream's answer: its head, and its body read piece by piece until `b""`. `release`
    (or leaving `with`) gives the connection back, or closes it when the body was not all received."""

    __slots__ = ("_connection", "content_length", "headers", "reason", "status")

    def __init__(
        self, connection: Connection, status: int, reason: str, headers: CIMultiDictProxy[str]
    ) -> None:
        self._connection = connection
        self.status = status
        self.reason = reason
        self.headers = headers
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and length.isdigit() else None

    def read(self) -> Awaitable[bytes]:
        """The next piece of the body as it arrived, `b""` at its end; raises an `UpstreamError`."""
        return self._connection.read()

    @property
    def ended(self) -> bool:
        """Whether the body has all arrived and been read: the last `read` gave its last piece."""
        connection = self._connection
        return connection.complete and not connection.body

    def release(self) -> None:
        connection = self._connection
        if connection.response is self:
            connection.response = None
            connection.pool.release(connection)

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class Connection(asyncio.Protocol):
    """One connection to an upstream, and the state of the exchange under way on it."""

    parser: httptools.HttpResponseParser  # from `connection_made` to `connection_lost`

    __slots__ = (
        "answered",
        "body",
        "buffered",
        "closed",
        "complete",
        "drained",
        "error",
        "head_bytes",
        "heard_at",
        "idle_since",
        "informational",
        "keep_alive",
        "left",
        "loop",
        "parser",
        "paused",
        "pool",
        "raw_headers",
        "read_timeout",
        "reason",
        "response",
        "timer",
        "timer_due",
        "transport",
        "until_close",
        "upload",
        "waiter",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.answered: asyncio.Future[Response] | None = None  # until the answer's head arrives
        self.response: Response | None = None  # from the head until released
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None  # a read waiting for body bytes
        self.drained: asyncio.Future[None] | None = None  # an upload waiting for the transport
        self.paused = False
        self.upload: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0  # when `timer` fires
        self.heard_at = 0.0
        self.head_bytes = 0
        self.read_timeout = 0.0
        self.raw_headers: list[tuple[str, str]] = []
        self.reason = b""
        self.informational = False
        self.until_close = False
        self.keep_alive = False
        self.left = 0  # what is still to come of a Content-Length body, read past the parser

    # -- the exchange ---------------------------------------------------------------------------

    async def exchange(self, head: bytes, body: bytes | StreamedBody, read_timeout: float) -> Response:
        """Send the request and wait for the answer's head."""
        assert self.transport is not None
        self.complete = False
        self.error = None
        self.buffered = 0
        self.body.clear()
        self.raw_headers = []
        self.reason = b""
        self.head_bytes = 0
        answered: asyncio.Future[Response] = self.loop.create_future()
        self.answered = answered
        self.read_timeout = read_timeout
        self.heard_at = now = self.loop.time()
        # A timer left from an earlier exchange is kept when it fires no later than this one's bound:
        # `_watch` then re-arms it from when the upstream was last heard.
        if self.timer is None or self.timer_due > now + read_timeout:
            self._stop_timer()
            self._arm(now + read_timeout)
        if isinstance(body, bytes):
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.upload = self.loop.create_task(self._upload(body))
        try:
            return await answered
        finally:
            self.answered = None

    async def read(self) -> bytes:
        body = self.body
        while not body:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            self.waiter = self.loop.create_future()
            await self.waiter
        piece = body.popleft()
        self.buffered -= len(piece)
        if self.paused and self.buffered <= LOW_WATER and self.transport is not None:
            self.paused = False
            self.heard_at = self.loop.time()  # silence while paused was the reader's, not the upstream's
            self.transport.resume_reading()
        return piece

    @property
    def reusable(self) -> bool:
        """Whether the next exchange may use this connection."""
        return (
            self.complete
            and self.keep_alive
            and not self.closed
            and (self.upload is None or self.upload.done())
        )

    def finish(self) -> None:
        """The exchange is over (released): forget its state (the timer lapses when it fires)."""
        self.body.clear()
        self.buffered = 0
        if self.paused:  # an answer received whole, but not read: the next one must be heard
            self.paused = False
            if not self.closed and self.transport is not None:
                self.transport.resume_reading()
        upload, self.upload = self.upload, None
        if upload is not None and not upload.done():
            upload.cancel()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    async def _upload(self, body: StreamedBody) -> None:
        """Send a streamed body, at the pace the upstream reads it. The upstream may answer before
        it is all sent (413, 401): the upload then goes on while the answer is read, and the
        connection is closed with the exchange."""
        try:
            async for chunk in body.chunks():
                if self.closed:
                    return
                assert self.transport is not None
                self.transport.write(chunk)
                self.heard_at = self.loop.time()  # the upstream is taking it: not silent
                if self.drained is not None:
                    await self.drained
        except Exception as exc:  # the body could not be read: the request is cut short
            self._fail(Dropped(f"the request body could not be sent: {exc!r}"))
            self.close()

    def _fail(self, error: UpstreamError) -> None:
        if self.complete or self.error is not None:
            return
        self.error = error
        self._stop_timer()
        answered = self.answered
        if answered is not None and not answered.done():
            answered.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _watch(self) -> None:
        """The read timeout: re-armed from when the upstream was last heard, until it has been
        silent for the whole timeout; it lapses when no exchange is under way."""
        self.timer = None
        if self.complete or self.error is not None:
            return
        now = self.loop.time()
        if self.paused:
            self.heard_at = now
        due = self.heard_at + self.read_timeout
        if now < due:
            self._arm(due)
            return
        self._fail(ReadTimeout(f"nothing received for {self.read_timeout:g} s"))
        self.close()

    def _arm(self, due: float) -> None:
        self.timer = self.loop.call_at(due, self._watch)
        self.timer_due = due

    def _stop_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's is not a subclass
        # The parser holds this connection's methods, a reference cycle: made only once connected
        # (a TLS handshake may fail before) and dropped with the connection (`connection_lost`),
        # so that reference counting frees both.
        self.parser = httptools.HttpResponseParser(self)

    def data_received(self, data: bytes) -> None:
        if self.left:
            self._count_down(data)
            return
        if self.answered is None and self.response is None:
            self.close()  # nothing was asked: an idle connection must stay silent
            return
        self.heard_at = self.loop.time()
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(Dropped(f"the answer is not HTTP/1.1: {exc}"))
            self.close()
            return
        if self.response is None:  # its head is still arriving: bounded, as the parser's is not
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD_BYTES:
                self._fail(Dropped(f"the answer's head is larger than {MAX_HEAD_BYTES} bytes"))
                self.close()

    def _count_down(self, data: bytes) -> None:
        """A piece of a Content-Length body after the one its head came with: kept as it arrived.
        The parser is left behind in the middle of the body: a fresh one reads the next answer."""
        self.heard_at = self.loop.time()
        left = self.left
        if len(data) <= left:
            self.left = left - len(data)
            self._keep(data)
            if not self.left:
                self.parser = httptools.HttpResponseParser(self)
                self.on_message_complete()
            return
        self.left = 0  # bytes past the answer's end: nothing asked for them (as the parser says)
        self._keep(data[:left])
        self.on_message_complete()
        self.close()

    def eof_received(self) -> bool:
        return False  # closes the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()  # a timer left running would keep the closed connection until it fires
        if self.until_close and self.response is not None and self.error is None:
            self.on_message_complete()  # a body without a length ends with the connection
        self._fail(Dropped("the connection closed before the answer ended"))
        drained, self.drained = self.drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)  # the upload sees `closed` and stops
        del self.parser

    def pause_writing(self) -> None:
        self.drained = self.loop.create_future()

    def resume_writing(self) -> None:
        drained, self.drained = self.drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- parser callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request
            raise httptools.HttpParserError("an answer nobody asked for")

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # 100 Continue and the like: the answer is still to come
            self.informational = True
            self.raw_headers = []
            self.reason = b""
            return
        headers = CIMultiDictProxy(CIMultiDict(self.raw_headers))
        response = self.response = Response(self, status, self.reason.decode("latin-1"), headers)
        # neither chunked nor bodiless (204, 304): the body ends at its length, or with the connection
        unchunked = "Transfer-Encoding" not in headers and status not in (204, 304)
        self.until_close = unchunked and response.content_length is None
        if unchunked and response.content_length:
            self.left = response.content_length  # the parser counts down what came with the head
        # asked now: the parser forgets the answer's `Connection` header once it has ended, and a
        # Content-Length body may end without it
        self.keep_alive = self.parser.should_keep_alive()
        answered = self.answered
        if answered is not None and not answered.done():
            answered.set_result(response)

    def on_body(self, piece: bytes) -> None:
        if self.left:
            self.left -= len(piece)
        self._keep(piece)

    def _keep(self, piece: bytes) -> None:
        """A body piece for `read`; reading pauses while more than `HIGH_WATER` is kept, unless
        a read is waiting for this very piece (it takes it at the loop's next turn: pausing would
        only be undone then, two system calls for nothing)."""
        self.body.append(piece)
        self.buffered += len(piece)
        if self.waiter is not None:
            self._wake()
        elif self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        self.complete = True
        self._wake()


class Pool:
    """The connections to one upstream (`base_url`), at most `size` at once."""

    def __init__(self, base_url: str, size: int) -> None:
        url = URL(base_url)
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.loop = asyncio.get_running_loop()
        self.size = size
        self.host = url.raw_host
        self.port: int = url.port or 80  # yarl knows the default ports of http and https
        self.tls = _tls_context() if url.scheme == "https" else None
        authority = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        if not url.is_default_port():
            authority = f"{authority}:{self.port}"
        self.prefix = url.raw_path.rstrip("/")
        self.authority = authority
        self.open = 0  # connections open or being opened, idle or busy
        self.idle: deque[Connection] = deque()  # oldest first
        self.waiters: deque[asyncio.Future[Connection | None]] = deque()
        self.connections: set[Connection] = set()
        self.sweeper: asyncio.TimerHandle | None = None
        self.closed = False

    async def request(
        self,
        path: str,
        headers: Mapping[str, str],
        body: bytes | StreamedBody,
        connect_timeout: float,
        read_timeout: float,
    ) -> Response:
        """POST `body` to `path` (after the base URL's own path); the answer's body is left to read."""
        head = self._head(path, headers, len(body) if isinstance(body, bytes) else body.length)
        connection = await self._acquire(connect_timeout)
        try:
            return await connection.exchange(head, body, read_timeout)
        except BaseException:
            connection.close()
            self.release(connection)
            raise

    def release(self, connection: Connection) -> None:
        """Back to the pool, or closed when it cannot serve another exchange."""
        reusable = connection.reusable and not self.closed
        connection.finish()
        connection.response = None
        if not reusable:
            connection.close()
            self._forget(connection)
            return
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        connection.idle_since = self.loop.time()
        self.idle.append(connection)
        if self.sweeper is None:
            self.sweeper = self.loop.call_at(connection.idle_since + IDLE_SECONDS, self._sweep)

    async def close(self) -> None:
        self.closed = True
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        for connection in list(self.connections):
            connection.close()
        self.idle.clear()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectFailed("the gateway is closing its connections"))

    def _head(self, path: str, headers: Mapping[str, str], length: int) -> bytes:
        lines = [f"POST {self.prefix}{path} HTTP/1.1\r\nHost: {self.authority}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        lines.append(f"Content-Length: {length}\r\n\r\n")
        head = "".join(lines)
        # A line break inside a name or value would let it write headers (or a request) of its own.
        if head.count("\n") != len(headers) + 4 or head.count("\r") != len(headers) + 4:
            raise ValueError("a header name or value holds a line break")
        return head.encode("utf-8", "surrogateescape")

    async def _acquire(self, within: float) -> Connection:
        idle = self.idle
        while idle:  # the most recently used first: the least likely to be closed by the upstream
            connection = idle.pop()
            if not connection.closed:
                return connection
            self._forget(connection)
        if self.closed:
            raise ConnectFailed("the gateway is closing its connections")
        try:
            async with asyncio.timeout(within):  # a wait for a free place, and the connect
                return await self._connect() if self._take_place() else await self._wait()
        except TimeoutError:
            raise ConnectTimeout("no connection within the connect timeout") from None

    def _take_place(self) -> bool:
        if self.open < self.size:
            self.open += 1
            return True
        return False

    async def _wait(self) -> Connection:
        """The first connection given back, or a place to open one in (when one closes)."""
        waiter: asyncio.Future[Connection | None] = self.loop.create_future()
        self.waiters.append(waiter)
        try:
            connection = await waiter
        except BaseException:  # timed out or cancelled: what was handed over meanwhile goes back
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                handed = waiter.result()
                if handed is None:
                    self.open -= 1
                    self._wake()
                else:
                    self.release(handed)
            waiter.cancel()
            raise
        return connection if connection is not None else await self._connect()

    async def _connect(self) -> Connection:
        """A new connection, in a place already counted in `open`."""
        try:
            _, connection = await self.loop.create_connection(
                lambda: Connection(self), self.host, self.port, ssl=self.tls
            )
        except BaseException as exc:
            self.open -= 1
            self._wake()
            if isinstance(exc, OSError):
                raise ConnectFailed(f"{self.host}:{self.port}: {exc}") from exc
            raise
        self.connections.add(connection)
        return connection

    def _forget(self, connection: Connection) -> None:
        """A closed connection gives its place to the first waiter, to open a new one."""
        if connection in self.connections:
            self.connections.discard(connection)
            self.open -= 1
            self._wake()

    def _wake(self) -> None:
        while self.waiters and self.open < self.size:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.open += 1
                waiter.set_result(None)

    def _sweep(self) -> None:
        """Close the connections idle for `IDLE_SECONDS` (the oldest are first)."""
        self.sweeper = None
        idle, stale = self.idle, self.loop.time() - IDLE_SECONDS
        while idle and (idle[0].closed or idle[0].idle_since <= stale):
            connection = idle.popleft()
            connection.close()
            self._forget(connection)
        if idle:
            self.sweeper = self.loop.call_at(idle[0].idle_since + IDLE_SECONDS, self._sweep)


@cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()
