"""The front door's connections: how long a client may take, how many it may hold, and what the HTTP
layer itself answers.

`FrontRunner` is aiohttp's AppRunner whose server builds a `FrontConnection` (aiohttp's own request
handler, bounded) per client connection. Both listeners pass it: the tenant port, and the operations
port (`listener="ops"`: /metrics, /healthz, /readyz), with a cap of its own.

- Time to headers: a connection that has not sent a complete request head within
  `server.header_timeout_seconds` of connecting, or of the first byte of its next request, is closed.
  A head pipelined behind a request still being handled is closed at the first check (one each
  header timeout from its first byte) that finds that request answered and the head incomplete.
- Size of a head: a request head (request line and headers) larger than `server.max_head_bytes` is
  refused as its bytes arrive, before aiohttp's parser holds them (it allows 128 headers of 16 KiB:
  2 MiB, ~4 MB of memory, per connection): a 431 and the connection closed; one pipelined behind a
  request being handled closes the connection once that request is answered (a response cannot
  overtake it). Bytes of a head that arrive in the same read as the end of the request before it
  (pipelining) are not counted: at most one read (256 KiB), after which the rest is.
- Keep-alive: an idle connection is closed after `server.keepalive_timeout_seconds`.
- Writes: a connection whose answers the client does not take is closed, dropping what it did not
  read, once the transport has held more than its high-water mark (64 KiB) for
  `server.client_write_timeout_seconds` without draining below its low-water mark: otherwise it
  would hold its slot (and its handler) forever, being neither idle nor waiting for a head. The
  timer runs only while the transport has paused writing, so it costs nothing on the normal path.
  The write waiting then fails as if the client had left (the relay counts it gone), and the
  line `client_write_timed_out` says so. A connection closing (keep-alive, `Connection: close`, an
  early answer, a 431) with bytes still unsent, even under the high-water mark, gets the same
  deadline from when its handler ends: closing waits for them to drain, and aiohttp forgets the
  transport at once, so the connection keeps its own reference to cut it off.
  Pipelining is bounded by aiohttp: it parses at most 32 requests ahead of the one being handled,
  then stops reading the socket (keeping the rest of that read, at most 256 KiB, unparsed) until
  they are down to 16; a client that sends requests without reading answers fills its transport
  and is closed as above.
- A cap, `server.max_connections` (by default sized from the process's file limit, leaving room for
  upstream and Redis connections and the operations listener's `server.ops_max_connections`). At
  the cap, the longest-idle connection (no request in progress) is closed to make room, else the
  one stalled longest (writing paused, or closing with bytes unsent: `FrontConnection.stalled_since`)
  if for at least `Bounds.stall_grace` (a client that reads pauses too, briefly); when there is
  neither, the new connection gets a 503 and is closed, so the process never runs out of file descriptors.
- Request bodies are never inflated (`auto_decompress` off: `front.body` refuses Content-Encoding),
  and a request answered before its body arrived closes the connection rather than draining it.
- aiohttp's parser errors (malformed request line, headers or chunking) get an OpenAI-shaped 400
  that quotes nothing of the request, and a log line that names only the error's class.
- At shutdown (`Door.close_all`) a connection closes after the request it is handling, an idle one at
  once, unless a request has begun to arrive on it (part of its head read, or bytes waiting in the
  kernel's buffer, as on a connection accepted a moment ago): that request is answered first. A
  request body still arriving is read to its end. A client that sent a request gets an answer, not
  a reset.

Every close is counted in `gateway_connections_closed_total{listener,reason}`.
"""

from __future__ import annotations

import asyncio
import fcntl
import resource
import struct
import termios
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web, web_protocol, web_response
from aiohttp.streams import StreamReader
from aiohttp.web_request import BaseRequest

from gateway.config import Settings
from gateway.errors import GatewayError, HeadTooLarge, InternalError, InvalidRequest, ServerBusy
from gateway.front.access_log import new_request_id
from gateway.health import METRICS, RUNTIME
from gateway.logs import get_logger
from gateway.telemetry.metrics import Metrics

log = get_logger("gateway.front")

SERVER_HEADER = "image-gateway"  # not aiohttp's default, which names Python's and aiohttp's versions
_FILE_RESERVE = 64  # descriptors for everything but clients and upstreams: Redis, logs, the listeners

Listener = Literal["tenant", "ops"]


@dataclass(frozen=True, slots=True)
class Bounds:
    header_timeout: float
    max_connections: int
    write_timeout: float
    max_head_bytes: int

    @property
    def stall_grace(self) -> float:
        """How long a connection must have been stalled (see `FrontConnection.stalled_since`) to be
        evicted at the cap: a quarter of the write timeout. A client that reads pauses the transport
        too, for as long as it takes to read one piece of an answer (up to 64 KiB plus one upstream
        read, 256 KiB): past a quarter of the timeout it reads at under four times the least rate
        the timeout allows, slow though the timeout alone would not cut it, and at the cap it makes
        room before a newcomer is refused; a client that reads nothing is stalled from its first
        pause on."""
        return self.write_timeout / 4


def default_max_connections(settings: Settings) -> int:
    """Client connections one process may hold: its file limit less a reserve, the operations
    listener's cap and the upstream connections they can use. A client connection holds at most
    one upstream connection at a time, so pools larger than half the descriptors (sized for many
    open streams) reserve half: the cap never collapses below what those pools could be filled by."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    files = soft - settings.server.ops_max_connections - _FILE_RESERVE
    upstream = sum(u.max_connections for u in settings.upstreams.values())
    return max(16, files - min(upstream, files // 2))


def connection_cap(settings: Settings, listener: Listener) -> int:
    """The most connections `listener` may hold at once."""
    server = settings.server
    if listener == "ops":
        return server.ops_max_connections
    return server.max_connections or default_max_connections(settings)


def raise_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
        return hard
    return soft


class Door:
    """The open connections of one listener, oldest first, and the cap on them."""

    def __init__(self, bounds: Bounds, metrics: Metrics, listener: Listener) -> None:
        self.bounds = bounds
        self.listener = listener
        self.metrics = metrics
        self.open: dict[FrontConnection, None] = {}  # insertion-ordered: the oldest first

    def admit(self, connection: FrontConnection) -> bool:
        """Room for a new connection, making it by closing the oldest idle one if need be, else the
        one stalled longest (for at least `Bounds.stall_grace`)."""
        if len(self.open) >= self.bounds.max_connections:
            victim, reason = next((c for c in self.open if c.idle), None), "idle_evicted"
            if victim is None:
                victim, reason = self._longest_stalled(), "stalled_evicted"
            if victim is None:
                self.closed_because("refused")
                return False
            victim.cut_off()
            self.left(victim)
            self.closed_because(reason)
        self.open[connection] = None
        self.metrics.connections_open.labels(self.listener).inc()
        return True

    def _longest_stalled(self) -> FrontConnection | None:
        since = asyncio.get_running_loop().time() - self.bounds.stall_grace
        stalled = (c for c in self.open if c.stalled_since is not None and c.stalled_since <= since)
        return min(stalled, key=lambda c: c.stalled_since or 0.0, default=None)

    def left(self, connection: FrontConnection) -> None:
        if self.open.pop(connection, 0) is None:
            self.metrics.connections_open.labels(self.listener).dec()

    def closed_because(self, reason: str) -> None:
        self.metrics.connections_closed.labels(self.listener, reason).inc()

    def __iter__(self) -> Iterator[FrontConnection]:
        return iter(list(self.open))

    def close_all(self) -> set[asyncio.Task[None]]:
        """At shutdown: every connection closes after the request it is handling, or at once when
        idle; the tasks of those whose next request has begun to arrive, which end once it is
        answered (the drain waits for them as for the handlers)."""
        arriving = (connection.close_when_answered() for connection in self)
        return {task for task in arriving if task is not None}


def _closing_response(status: bytes, error: GatewayError, headers: bytes = b"") -> bytes:
    """`error` as the last response of a connection, written to its transport as it is: for the
    door's own answers, given before (or instead of) aiohttp's parsing a request."""
    body = error.to_json()
    return (
        b"HTTP/1.1 %s\r\nServer: %s\r\nContent-Type: application/json\r\n%sConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (status, SERVER_HEADER.encode(), headers, len(body), body)
    )


_BUSY_RESPONSE = _closing_response(
    b"503 Service Unavailable",
    ServerBusy("The gateway is at its connection limit; retry shortly."),
    b"Retry-After: 1\r\n",
)
_HEAD_TOO_LARGE_RESPONSE = _closing_response(
    b"431 Request Header Fields Too Large",
    HeadTooLarge("The request's headers are too large."),
)


class FrontConnection(web_protocol.RequestHandler):
    """aiohttp's request handler with the front door's bounds on time to headers and on count."""

    __slots__ = (
        "_closing",
        "_door",
        "_head_bytes",
        "_head_end",
        "_header_timer",
        "_last_body",
        "_partial",
        "_socket",
        "_stalled_since",
        "_write_timer",
    )

    def __init__(self, manager: web.Server, door: Door, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._door = door
        self._header_timer: asyncio.TimerHandle | None = None
        self._partial = False  # bytes of a request head have arrived, not all of it
        self._head_bytes = 0  # how many (see the module on pipelining)
        self._head_end = b""  # their last three: the end of the head may straddle two reads
        self._write_timer: asyncio.TimerHandle | None = None  # armed while stalled (see stalled_since)
        self._stalled_since: float | None = None
        # The transport until the connection is lost: aiohttp forgets it as soon as it closes it,
        # with what the client has not read yet still to send.
        self._socket: asyncio.Transport | None = None
        self._last_body: StreamReader | None = None  # the body of the latest request parsed
        self._closing = False  # shutting down: close once the request arriving is answered

    @property
    def idle(self) -> bool:
        """Waiting for a request (none in progress, none queued): safe to close."""
        return self._waiter is not None and not self._waiter.done() and not self._messages

    @property
    def stalled_since(self) -> float | None:
        """Since when (loop time) the client has not been taking what is written to it: writing
        paused (the transport holds more than 64 KiB) and not resumed since, or the connection
        closed with bytes still unsent; None otherwise."""
        return self._stalled_since

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._socket = self.transport
        if self._task_handler is not None:
            self._task_handler.add_done_callback(self._handler_ended)
        if not self._door.admit(self):
            if self.transport is not None:
                self.transport.write(_BUSY_RESPONSE)
            self.force_close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_header_timer()
        self._disarm_write_timer()
        self._last_body = None
        self._socket = None
        self._door.left(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        # bytes after the latest request's whole body are the next request's head (kept alive, or
        # pipelined behind a request still being handled), not more of that body
        next_head = self._last_body is None or self._last_body.is_eof()
        over = next_head and self._head_bytes + len(data) > self._door.bounds.max_head_bytes
        if over and self._head_too_large(data):  # (the exact check only when the count says it may be)
            return
        super().data_received(data)
        if self._request_count != heads:
            self._partial = False
            self._head_bytes, self._head_end = 0, b""
            self._disarm_header_timer()
            if self._messages:
                self._last_body = self._messages[-1][1]
                if self._closing:
                    self._last_body.on_eof(self.close)  # at once if it has none
        elif data and next_head:
            self._partial = True  # the next request's head has begun: it has a deadline
            self._head_bytes += len(data)
            self._head_end = data[-3:]
            if self._header_timer is None:
                self._arm_header_timer()

    def _head_too_large(self, data: bytes) -> bool:
        """Whether the head these bytes continue ends beyond `max_head_bytes`; if so it is refused
        unparsed: a 431 and the connection closed, or (pipelined behind a request not yet answered,
        whose answer must come first) closed once that request is answered."""
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            size = self._head_bytes + end + 4
        elif (self._head_end + data[:3]).find(b"\r\n\r\n") >= 0:
            return False  # it ended with the previous read
        else:
            size = self._head_bytes + len(data)
        if size <= self._door.bounds.max_head_bytes:
            return False
        self._door.closed_because("head_too_large")
        log.info("http_head_too_large", max_head_bytes=self._door.bounds.max_head_bytes)
        if (self.idle or self._request_count == 0) and self.transport is not None:
            self.transport.write(_HEAD_TOO_LARGE_RESPONSE)
            self.force_close()
        else:
            self.close()  # aiohttp reads nothing more, and closes after the answer under way
        return True

    def close_when_answered(self) -> asyncio.Task[None] | None:
        """Shutting down: close after the request being handled, or now when idle; but not before a
        request arriving is in: when idle with the next one arriving, close once it is answered,
        and return the task that ends then."""
        if self._force_close:
            return None
        if self._last_body is not None and not self._last_body.is_eof():
            self._last_body.on_eof(self.close)  # aiohttp reads nothing once closing: not even a body
        elif self.idle and (self._partial or _unread(self.transport)):
            self._closing = True
            return self._task_handler
        else:
            self.close()
        return None

    def _arm_header_timer(self) -> None:
        self._header_timer = self._loop.call_later(self._door.bounds.header_timeout, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._force_close:
            return
        if self.idle and (self._partial or self._request_count == 0):
            self._door.closed_because("header_timeout")
            self.force_close()
        elif self._partial:
            # pipelined behind a request still being handled: not closed under it, checked again
            self._arm_header_timer()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._stall()

    def resume_writing(self) -> None:
        super().resume_writing()
        handler = self._task_handler
        if handler is not None and not handler.done():  # else closing: the deadline stands
            self._disarm_write_timer()
            self._stalled_since = None

    def _handler_ended(self, _: object) -> None:
        """No more requests on this connection: it is closing. Bytes the client has not taken yet
        (under the high-water mark: writing never paused) get the write deadline too, else the
        connection would wait for them for as long as TCP does (forever, for a client that
        stays but does not read)."""
        if self._socket is not None and self._socket.get_write_buffer_size() > 0:
            self._stall()

    def _stall(self) -> None:
        if self._write_timer is None:
            self._stalled_since = self._loop.time()
            self._write_timer = self._loop.call_later(self._door.bounds.write_timeout, self._write_timed_out)

    def _disarm_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        self._door.closed_because("write_timeout")
        log.warning(
            "client_write_timed_out",
            listener=self._door.listener,
            timeout_seconds=self._door.bounds.write_timeout,
        )
        self.cut_off()

    def cut_off(self) -> None:
        """Close now, dropping what the client has not read (closing a transport waits for it to
        drain: for a client that is not reading, forever). The write waiting fails, as if the
        client had left (else losing the connection would resolve it: the relay would count the
        dropped bytes as sent)."""
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("the client did not take its answer in time"))
        if self._socket is not None:
            self._socket.abort()
        self.force_close()

    def _process_keepalive(self) -> None:
        was_open = not self._force_close
        super()._process_keepalive()
        if was_open and self._force_close:
            self._door.closed_because("keepalive_timeout")

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's parser errors (and anything that escaped the middleware): OpenAI-shaped, echoing
        nothing of the request; logged by class name only (the exception's text quotes raw bytes)."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response had begun; the connection is closed instead")
        error: GatewayError
        if status == 400:
            self._door.closed_because("malformed")
            error = InvalidRequest(
                "The request is not valid HTTP/1.1 (request line, headers or chunked framing).",
                code="invalid_http",
            )
            log.info("http_malformed", error=type(exc).__name__ if exc else None)
        else:
            error = InternalError("The gateway failed to handle the request.")
            log.error("http_failed", status=status, error=type(exc).__name__ if exc else None)
        response = web.Response(
            status=error.status,
            body=error.to_json(),
            content_type="application/json",
            headers={"x-request-id": new_request_id(), "Server": SERVER_HEADER},
        )
        response.force_close()
        return response


def _unread(transport: asyncio.BaseTransport | None) -> int:
    """Bytes received on the transport's socket that it has not read yet."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return 0
    try:
        count = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:  # closed meanwhile
        return 0
    return int(struct.unpack("i", count)[0])


class FrontServer(web.Server):
    """aiohttp's low-level server, building FrontConnections."""

    def __init__(self, plain: web.Server, door: Door) -> None:
        # the handler arguments the runner gathered (keep-alive, field sizes, ...), kept as they are
        kwargs: dict[str, Any] = dict(plain._kwargs)
        super().__init__(plain.request_handler, request_factory=plain.request_factory, **kwargs)
        self.door = door

    def __call__(self) -> web_protocol.RequestHandler:
        return FrontConnection(self, self.door, loop=self._loop, **self._kwargs)


class FrontRunner(web.AppRunner):
    """An AppRunner for one of the gateway's listeners (the tenant app, or the operations app) whose
    connections pass the front door (see the module)."""

    def __init__(self, app: web.Application, *, listener: Listener = "tenant", **kwargs: Any) -> None:
        settings = app[RUNTIME].current.settings
        server = settings.server
        kwargs.setdefault("keepalive_timeout", server.keepalive_timeout_seconds)
        kwargs.setdefault("auto_decompress", False)  # never inflate a body on the event loop
        # aiohttp's lingering (every answer given before its body arrived waits, reading the rest)
        # is off: only a known tenant's is drained, and before it is sent (`access_log.error_response`)
        kwargs.setdefault("lingering_time", 0)
        super().__init__(app, **kwargs)
        bounds = Bounds(
            server.header_timeout_seconds,
            connection_cap(settings, listener),
            server.client_write_timeout_seconds,
            server.max_head_bytes,
        )
        self.door = Door(bounds, app[METRICS], listener)

    async def _make_server(self) -> web.Server:
        return FrontServer(await super()._make_server(), self.door)


def name_the_server() -> None:
    """Every response names the gateway, not its Python and aiohttp versions: the `Server` that
    aiohttp gives a response without one. (An on_response_prepare signal would do the same at the
    cost of two coroutines per response.) Process-wide: every aiohttp server in it is the gateway's."""
    web_response.SERVER_SOFTWARE = SERVER_HEADER  # type: ignore[attr-defined]
