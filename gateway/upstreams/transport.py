"""One HTTP exchange with one upstream: the organisation's key, the headers that pass each way,
and error translation.

The tenant's key never leaves the gateway: the upstream gets the organisation's key for the
target. Network failures (the client's `UpstreamError`s) become GatewayErrors here (502
unreachable, 504 timeout), so no other module handles them. A generation can take minutes, so
there is no total timeout: the connect timeout bounds reaching the upstream and the read timeout
bounds the silence between two reads.

An upstream's error answer reaches the client in OpenAI's shape, which the SDKs read their
`code`, `type` and `param` from: one that has it goes as it came, byte for byte; a JSON object
without an `error` object (DigitalOcean's `{"id", "message", "request_id"}`, FACTS §5) is
rewritten by `openai_error` with its message kept, its `id` as the code and its `request_id` in
`x-upstream-request-id`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import (
    GatewayError,
    UpstreamTimeout,
    UpstreamUnavailable,
    drop_tracebacks,
    type_for_status,
)
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


# An upstream's error body is read whole to be translated only up to this size; a bigger one is no
# error body a client could use, and goes through as it comes.
ERROR_BODY_CAP = 64 * 1024
# What an upstream's error id or request id must look like to become a code or a header value:
# a short token, never text that could carry a line break or a message.
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def openai_error(
    status: int, headers: Mapping[str, str], body: bytes, upstream: str
) -> tuple[bytes, dict[str, str]] | None:
    """The OpenAI-shaped body (and the headers to add) for an upstream's non-2xx answer whose body
    is a JSON object without an `error` object; None for any other body, relayed as it came."""
    if headers.get("Content-Encoding", "identity").lower() != "identity":
        return None
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, dict) or isinstance(parsed.get("error"), dict):
        return None
    message = (
        _message(parsed) or f"Upstream {upstream!r} answered {status}: {body[:500].decode(errors='replace')}"
    )
    code, request_id = _token(parsed.get("id")), _token(parsed.get("request_id"))
    error = {"message": message, "type": type_for_status(status), "param": None, "code": code}
    added = {"Content-Type": "application/json"}
    if request_id is not None and "x-request-id" not in headers:
        added["x-upstream-request-id"] = request_id
    return orjson.dumps({"error": error}), added


def _message(parsed: dict[str, object]) -> str | None:
    """The text of an error body's own message, where the common shapes keep it: DigitalOcean's
    `message`, a bare `error` string, RFC 7807's `detail` or `title`, `errors[0].message`."""
    errors = parsed.get("errors")
    first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
    for text in (*(parsed.get(key) for key in ("message", "error", "detail", "title")), first.get("message")):
        if isinstance(text, str) and text:
            return text
    return None


def _token(value: object) -> str | None:
    return value if isinstance(value, str) and _TOKEN.fullmatch(value) else None


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
