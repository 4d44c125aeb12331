"""One HTTP exchange with one upstream: the organisation's key, the headers that pass each way,
and error translation.

The tenant's key never leaves the gateway: the upstream gets the organisation's key for the
target. Network failures become GatewayErrors here (502 unreachable, 504 timeout), so no other
module handles aiohttp's exception family. A generation can take minutes, so there is no total
timeout: the connect timeout bounds reaching the upstream and the read timeout bounds the silence
between two reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from functools import lru_cache
from typing import Protocol

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.errors import GatewayError, UpstreamTimeout, UpstreamUnavailable, drop_tracebacks
from gateway.runtime import Target

# Request headers a client may send that the upstream should see; everything else (its key, its
# organisation and project headers, cookies, hop-by-hop headers) stays at the gateway.
_FORWARDED_REQUEST_HEADERS = ("accept", "user-agent", "idempotency-key")

_NO_USER_AGENT = ("User-Agent",)

# Response headers that describe a connection, not the content, or that identify the
# organisation behind the upstream key: never relayed.
_DROPPED_RESPONSE_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "set-cookie",
        "date",
        "server",
        "openai-organization",
        "openai-project",
        "x-request-id",
        "alt-svc",
    }
)


class StreamedBody(Protocol):
    """A body sent in pieces (a multipart upload), of a length known in advance; it can be sent
    again (each `chunks()` starts from the beginning)."""

    @property
    def content_type(self) -> str: ...
    @property
    def length(self) -> int: ...
    def chunks(self) -> AsyncIterator[bytes]: ...


def upstream_headers(
    target: Target, client_headers: Mapping[str, str], request_id: str, body: bytes | StreamedBody
) -> dict[str, str]:
    headers = {name: client_headers[name] for name in _FORWARDED_REQUEST_HEADERS if name in client_headers}
    if isinstance(body, bytes):
        headers["Content-Type"] = "application/json"
    else:
        headers["Content-Type"] = body.content_type
        headers["Content-Length"] = str(body.length)
    headers["Accept-Encoding"] = "identity"
    headers["X-Request-Id"] = request_id
    key = target.upstream.api_key.get_secret_value()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def relayable_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's response headers a client may see; its request id under our own name."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        if name.lower() not in _DROPPED_RESPONSE_HEADERS:
            headers.add(name, value)
    if "x-request-id" in upstream:
        headers["x-upstream-request-id"] = upstream["x-request-id"]
    return headers


async def send(
    session: aiohttp.ClientSession,
    target: Target,
    path: str,
    body: bytes | StreamedBody,
    headers: Mapping[str, str],
) -> aiohttp.ClientResponse:
    """POST the request to `path` at the target's upstream; the response's body is left for the relay."""
    settings = target.upstream
    timeout = _timeout(settings.connect_timeout_seconds, settings.read_timeout_seconds)
    data = body if isinstance(body, bytes) else body.chunks()
    # Where the client sent no User-Agent, neither does the gateway (not aiohttp's own). Asked per
    # request rather than of the session: a request that has one takes aiohttp's faster path.
    skip = None if "user-agent" in headers else _NO_USER_AGENT
    url = _url(settings.base_url, path)
    try:
        return await session.post(url, data=data, headers=headers, timeout=timeout, skip_auto_headers=skip)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise translate(exc, target) from exc


@lru_cache(maxsize=256)  # parsed once per upstream and operation, not per request
def _url(base_url: str, path: str) -> URL:
    return URL(f"{base_url}{path}")


@lru_cache(maxsize=256)
def _timeout(connect: float, read: float) -> aiohttp.ClientTimeout:
    # connect: a free pooled connection, or a new one; read: the silence between two reads
    return aiohttp.ClientTimeout(total=None, connect=connect, sock_read=read)


def never_reached(exc: BaseException | None) -> bool:
    """Whether a failure of `send` came before the upstream could have the request (no connection,
    or none in time): nothing can have been generated. A read timeout or a dropped connection after
    the body went out cannot say so."""
    return isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))


def translate(exc: aiohttp.ClientError | asyncio.TimeoutError | OSError, target: Target) -> GatewayError:
    """An aiohttp/OS failure talking to `target`'s upstream as the error a client sees.

    `exc` loses its traceback: aiohttp keeps the exception (a response's stream reader holds it to
    raise again) while the traceback's frames hold that reader and the request."""
    drop_tracebacks(exc)
    name = target.upstream_name
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamTimeout(
            f"Upstream {name!r} did not accept a connection within "
            f"{target.upstream.connect_timeout_seconds:g} s (or all {target.upstream.max_connections} "
            "of its connections stayed busy).",
            code="upstream_connect_timeout",
        )
    if isinstance(exc, (aiohttp.SocketTimeoutError, asyncio.TimeoutError)):
        return UpstreamTimeout(
            f"Upstream {name!r} sent nothing for {target.upstream.read_timeout_seconds:g} s.",
            code="upstream_read_timeout",
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(f"Upstream {name!r} could not be reached.")
    return UpstreamUnavailable(f"Upstream {name!r} closed the connection unexpectedly.")
