"""One HTTP exchange with one upstream: the organisation's key, the headers that pass each way,
and error translation.

The tenant's key never leaves the gateway: the upstream gets the organisation's key for the
target. Network failures (the client's `UpstreamError`s) become GatewayErrors here (502
unreachable, 504 timeout), so no other module handles them. A generation can take minutes, so
there is no total timeout: the connect timeout bounds reaching the upstream and the read timeout
bounds the silence between two reads.
"""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import GatewayError, UpstreamTimeout, UpstreamUnavailable, drop_tracebacks
from gateway.runtime import Target
from gateway.upstreams.client import (
    ConnectFailed,
    ConnectTimeout,
    NotReached,
    Pool,
    ReadTimeout,
    Response,
    StreamedBody,
    UpstreamError,
)

# Request headers a client may send that the upstream should see; everything else (its key, its
# organisation and project headers, cookies, hop-by-hop headers) stays at the gateway.
_FORWARDED_REQUEST_HEADERS = ("accept", "user-agent", "idempotency-key")

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


def upstream_headers(
    target: Target, client_headers: Mapping[str, str], request_id: str, body: bytes | StreamedBody
) -> dict[str, str]:
    headers = {name: client_headers[name] for name in _FORWARDED_REQUEST_HEADERS if name in client_headers}
    if "accept" not in headers:
        headers["Accept"] = "*/*"
    headers["Content-Type"] = "application/json" if isinstance(body, bytes) else body.content_type
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
    pool: Pool,
    target: Target,
    path: str,
    body: bytes | StreamedBody,
    headers: Mapping[str, str],
) -> Response:
    """POST the request to `path` at the target's upstream; the response's body is left for the relay."""
    settings = target.upstream
    try:
        return await pool.request(
            path, headers, body, settings.connect_timeout_seconds, settings.read_timeout_seconds
        )
    except UpstreamError as exc:
        raise translate(exc, target) from exc


def never_reached(exc: BaseException | None) -> bool:
    """Whether a failure of `send` came before the upstream could have the request (no connection,
    or none in time): nothing can have been generated. A read timeout or a dropped connection after
    the body went out cannot say so."""
    return isinstance(exc, NotReached)


def translate(exc: UpstreamError | OSError, target: Target) -> GatewayError:
    """A failure talking to `target`'s upstream as the error a client sees."""
    drop_tracebacks(exc)
    name = target.upstream_name
    if isinstance(exc, ConnectTimeout):
        return UpstreamTimeout(
            f"Upstream {name!r} did not accept a connection within "
            f"{target.upstream.connect_timeout_seconds:g} s (or all {target.upstream.max_connections} "
            "of its connections stayed busy).",
            code="upstream_connect_timeout",
        )
    if isinstance(exc, ReadTimeout):
        return UpstreamTimeout(
            f"Upstream {name!r} sent nothing for {target.upstream.read_timeout_seconds:g} s.",
            code="upstream_read_timeout",
        )
    if isinstance(exc, ConnectFailed):
        return UpstreamUnavailable(f"Upstream {name!r} could not be reached.")
    return UpstreamUnavailable(f"Upstream {name!r} closed the connection unexpectedly.")
