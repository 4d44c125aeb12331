"""The GatewayError family: the only place where an HTTP status, error `type` and `code` are chosen.

Domain code raises these; only the error middleware (and, once a stream has started, the
relay) renders them, always in OpenAI's shape:
`{"error": {"message": str, "type": str, "param": str | None, "code": str | None}}`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import orjson


class GatewayError(Exception):
    """An error a client may see. Subclasses fix the status, `type` and default `code`."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None
    # Given before a known tenant's body has arrived, the rest of the body is read and dropped so
    # that its client, still sending, gets the answer (`front.access_log.error_response`); not
    # where the body itself is at fault.
    drains_body: ClassVar[bool] = True

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.error_code = code if code is not None else self.code
        self.headers: dict[str, str] = dict(headers or {})
        self.extra: dict[str, Any] = dict(extra or {})

    def body(self) -> dict[str, Any]:
        """The `error` object, with any extra keys (SDKs ignore unknown keys)."""
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.error_code,
        }
        error.update(self.extra)
        return {"error": error}

    def to_json(self) -> bytes:
        return orjson.dumps(self.body())

    def to_sse(self) -> bytes:
        """The same error as an SSE `error` event, for failures after a stream has begun."""
        error = self.body()["error"]
        return b"event: error\ndata: " + orjson.dumps({"type": "error", "error": error}) + b"\n\n"


def drop_tracebacks(exc: BaseException) -> None:
    """Forget the tracebacks of `exc` and of its causes, once it has been rendered or translated.

    A traceback's frames hold the request's objects, and something reachable from them often holds
    the exception (the pipeline's task, aiohttp's stream reader): a cycle that reference counting
    cannot free, left to a full garbage collection (see garbage.py). Nothing logs these tracebacks."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__traceback__ = None
        link = link.__cause__ or link.__context__


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class InvalidApiKey(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PolicyViolation(GatewayError):
    """403: the request is valid for the model but the tenant's policy does not allow it."""

    status = 403
    type = "invalid_request_error"
    code = "policy_violation"

    def __init__(self, message: str, *, param: str | None, violations: Sequence[Mapping[str, Any]]):
        super().__init__(message, param=param, extra={"violations": [dict(v) for v in violations]})


class AdminUnauthorized(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_admin_token"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "unknown_url"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(GatewayError):
    """The body did not arrive within `server.body_timeout_seconds`."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"
    drains_body = False  # too slow already


class ClientGone(GatewayError):
    """The client closed its connection before its request was read: nothing to answer, nobody to
    answer. 499 in the access log and metrics (nginx's convention), never an error of the gateway."""

    status = 499
    type = "client_gone"
    code = "client_gone"
    drains_body = False  # nobody to answer


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeadTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "request_head_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class CompressedBody(UnsupportedMediaType):
    """A body with a Content-Encoding: refused unread, never inflated (nor drained)."""

    code = "unsupported_content_encoding"
    drains_body = False


class RateLimited(GatewayError):
    """429 that clears with time: the SDKs retry it after Retry-After."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class QuotaExceeded(GatewayError):
    """429 for a spent budget: not retryable, so `x-should-retry: false` goes with it."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message, headers={**(headers or {}), "x-should-retry": "false"})


class InternalError(GatewayError):
    status = 500
    type = "server_error"
    code = "internal_error"


class UpstreamUnavailable(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamAuthFailed(UpstreamUnavailable):
    """The upstream refused the organisation's key (its 401/403 is not the tenant's business)."""

    code = "upstream_auth_failed"


class StoreUnavailable(GatewayError):
    status = 503
    type = "service_unavailable_error"
    code = "service_unavailable"


class ServerBusy(GatewayError):
    """The front door is at a bound it shares between clients (bytes of bodies being read at once)."""

    status = 503
    type = "service_unavailable_error"
    code = "server_busy"


class Overloaded(GatewayError):
    """This process has more requests waiting for a decision than it may hold (load shedding)."""

    status = 503
    type = "service_unavailable_error"
    code = "overloaded"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


def type_for_status(status: int) -> str:
    """The error `type` this module gives its own errors of `status`: for an upstream's error that
    came without one (DigitalOcean's `{"id", "message", "request_id"}`), so clients see it in the
    same terms as the gateway's own."""
    if status == RateLimited.status:
        return RateLimited.type
    if status == StoreUnavailable.status:
        return StoreUnavailable.type
    if status in (UpstreamUnavailable.status, UpstreamTimeout.status):
        return UpstreamUnavailable.type
    if status >= InternalError.status:
        return InternalError.type
    return InvalidRequest.type
