"""Each request's id and log context, its access-log line and metrics, the one place errors become
responses, and the set of running handlers that the shutdown waits for: the gateway's one middleware.

Each request gets an id of the gateway's own making, returned in `x-request-id`, forwarded upstream
and bound into every log line. A client's own `x-request-id` is never used for that (it could forge
or collide with another request's log lines and traces): a sane one is logged as
`client_request_id`. Each request ends in one `request_finished` access-log line and the request
metrics, whatever the outcome. The metrics count when the request is answered
(`RequestRecord.answer`), before its client can read them; the log line waits for the settlement,
whose usage it carries. GatewayErrors render as OpenAI-style JSON; aiohttp's own HTTP errors
(404, 405) are translated; anything else is a logged 500 with no traceback. A request answered
before its body arrived closes its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import StreamReader, web

from gateway import logs
from gateway.errors import GatewayError, InternalError, MethodNotAllowed, NotFound, drop_tracebacks
from gateway.front.auth import bearer_token
from gateway.logs import get_logger
from gateway.telemetry.activity import Activity
from gateway.telemetry.metrics import KeptCounter, KeptHistogram, Metrics
from gateway.telemetry.tracing import OFF, RequestTrace, Tracing

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# How long the rest of a known tenant's body is read and dropped after an answer given before it
# arrived (`error_response`): enough for an upload in flight on a working link, bounded.
DRAIN_SECONDS = 2.0
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
log = get_logger("gateway.access")
_REQUEST_ID = logs.context_var("request_id")


@dataclass(slots=True)
class RequestRecord:
    """What the access log and request metrics say about one request; the pipeline fills it in."""

    request_id: str
    started: float
    tenant: str = ""
    key: str = ""
    model: str = ""
    upstream: str = ""
    operation: str = ""  # generate | edit | variation, once the route is known
    stream: bool = False
    status: int = 0
    ttfb_ms: float | None = None
    answered: float | None = None  # perf_counter() when it was answered (before it settles)
    fields: dict[str, Any] = field(default_factory=dict)
    pending: asyncio.Future[Any] | None = None  # work that outlives the handler (the settlement)
    trace: RequestTrace = OFF  # the request's spans (telemetry.tracing), when tracing is on
    counter: RequestCounter | None = None  # counts its metrics once answered (`/v1/` requests)

    def answer(self, status: int) -> None:
        """The request is answered with `status` (its last byte sent, or about to be): its metrics
        count now, not after the settlement, so a client that reads /metrics next finds them."""
        self.status = status
        if self.answered is None:
            self.answered = time.perf_counter()
        counter, self.counter = self.counter, None  # counted once
        if counter is not None:
            counter.count(self)


class RequestCounter:
    """A `/v1/` request's metrics (and the usage page's count), those the settlement does not change."""

    __slots__ = ("activity", "durations", "requests")

    def __init__(self, metrics: Metrics, activity: Activity | None) -> None:
        self.requests = KeptCounter(metrics, metrics.requests, next_scrape=True)
        self.durations = KeptHistogram(metrics, metrics.request_duration, next_scrape=True)
        self.activity = activity

    def count(self, record: RequestRecord) -> None:
        assert record.answered is not None
        if self.activity is not None:
            self.activity.count(record.status)
        tenant, model = record.tenant, record.model
        self.requests.inc((tenant, model, record.upstream, record.operation, str(record.status)))
        self.durations.observe(
            (tenant, model, "true" if record.stream else "false"), record.answered - record.started
        )


RECORD = web.RequestKey("record", RequestRecord)


def new_request_id() -> str:
    """A fresh request id: 32 hex digits of the OS's randomness, as long as the `uuid4().hex` it
    replaces, without a UUID object built and formatted for it (a fifth of the cost)."""
    return os.urandom(16).hex()


def client_request_id(request: web.Request) -> str | None:
    """A client's own `x-request-id`, if it is sane and not its key (a client that misplaces its key
    there must not have it logged)."""
    incoming = request.headers.get("x-request-id")
    if not incoming or not _SAFE_REQUEST_ID.fullmatch(incoming):  # most clients send none
        return None
    key = bearer_token(request.headers.get("Authorization"))
    return None if key and (key in incoming or incoming in key) else incoming


async def error_response(error: GatewayError, request: web.Request, record: RequestRecord) -> web.Response:
    """The error's answer. One given before the body arrived closes the connection rather than read
    (and pay for) the rest of the body: a stranger's at once. A known tenant's (unless the body is
    the fault: `drains_body`) is sent at once, and then the rest of the body is read and dropped,
    for up to `DRAIN_SECONDS`, before the connection closes: its client may still be sending (the
    SDKs send a whole upload before they read), and a connection closed under it is reset, the
    answer lost. The record counts the answer once it is sent, not after the drain."""
    headers = {**error.headers, "x-request-id": record.request_id}
    response = web.Response(
        status=error.status, body=error.to_json(), content_type="application/json", headers=headers
    )
    if not request.content.is_eof():
        response.force_close()
        if record.tenant and error.drains_body and request.transport is not None:
            try:  # sent now (aiohttp finds it done when it is returned)
                await response.prepare(request)
                await response.write_eof()
            except ConnectionError:  # gone meanwhile: nothing to drain for
                return response
            record.answer(response.status)
            await _drain(request.content)
    return response


async def _drain(content: StreamReader) -> None:
    """Read and drop what is left of a body, for up to DRAIN_SECONDS; whatever ends it (the time, the
    client leaving, a broken body) ends only the drain."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(DRAIN_SECONDS):
            while await content.readany():
                pass


def _as_gateway_error(exc: web.HTTPException, request: web.Request) -> GatewayError:
    if exc.status == 404:
        return NotFound(f"Unknown request URL: {request.method} {request.path}.")
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return MethodNotAllowed(
            f"{request.method} is not allowed on {request.path}; allowed: {allowed or 'none'}.",
            headers={"Allow": allowed} if allowed else None,
        )
    return InternalError(exc.reason)


def create_request_middleware(
    metrics: Metrics,
    activity: Activity | None = None,
    tracing: Tracing | None = None,
    running: set[asyncio.Task[Any]] | None = None,
) -> Any:
    """`activity`, when given, counts each answered `/v1/` request by decision (the usage page);
    `tracing`, when given, gives each `/v1/` request its trace; `running`, when given, holds each
    handler's task while it runs (the shutdown's drain waits for them: gateway/process/shutdown.py).

    The gateway's only middleware: each layer costs every request a coroutine and a frame."""
    counter = RequestCounter(metrics, activity)
    handlers = running if running is not None else set()

    @web.middleware
    async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        # The handler's own task, found through the connection task's loop: without one given,
        # current_task() looks the loop up, a getpid() system call on Python 3.11.
        task = asyncio.current_task(request.task.get_loop())
        assert task is not None
        record = RequestRecord(request_id=new_request_id(), started=time.perf_counter())
        if (client_id := client_request_id(request)) is not None:
            record.fields["client_request_id"] = client_id
        request[RECORD] = record
        if request.path.startswith("/v1/"):
            record.counter = counter
            if tracing is not None:
                record.trace = tracing.request(request)
        bound = _REQUEST_ID.set(record.request_id)  # for every line of the request, its work's too
        handlers.add(task)  # here, where the `finally` below lets go of it on every path
        try:
            try:
                response = await handler(request)
            except GatewayError as error:
                drop_tracebacks(error)  # the pipeline's task holds it, and its frames hold the task
                response = await error_response(error, request, record)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                response = await error_response(_as_gateway_error(exc, request), request, record)
            except Exception:
                log.exception("request_failed", path=request.path)
                failure = InternalError("The gateway failed to handle the request.")
                response = await error_response(failure, request, record)
            else:
                if not response.prepared:
                    response.headers["x-request-id"] = record.request_id
            record.answer(response.status)
            return response
        finally:
            handlers.discard(task)  # first: whatever the logging below does
            # The record lets go of the work: the work's result or traceback holds the request and
            # so the record, a cycle that only a full garbage collection would free (garbage.py).
            pending, record.pending = record.pending, None
            if pending is not None and not pending.done():
                # The pipeline still works (settling, or relaying for a handler that was
                # cancelled): log when it is done.
                pending.add_done_callback(lambda _: _finish(request, record))
            else:
                _finish(request, record)
            _REQUEST_ID.reset(bound)  # (the callback above runs in a copy of the context, bound)

    return request_middleware


def _finish(request: web.Request, record: RequestRecord) -> None:
    if request.path.startswith("/v1/"):
        record.answer(record.status)  # counted already, unless its handler was cancelled first
        assert record.answered is not None
        duration = record.answered - record.started
        line = {
            "method": request.method,
            "path": request.path,
            "status": record.status,
            "tenant": record.tenant or None,
            "key": record.key or None,
            "model": record.model or None,
            "upstream": record.upstream or None,
            "operation": record.operation or None,
            "stream": record.stream,
            "duration_ms": round(duration * 1000, 3),
            "ttfb_ms": record.ttfb_ms,
            **record.fields,
        }
        logs.info(log, "request_finished", line)
        record.trace.finish(record)
