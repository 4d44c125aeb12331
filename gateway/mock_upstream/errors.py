"""Errors as the real upstreams write them: OpenAI's `{"error": {...}}` or DigitalOcean's `{"id", ...}`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from gateway.mock_upstream.options import Flavor

_DO_IDS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    429: "too_many_requests",
    500: "server_error",
    503: "service_unavailable",
}
# (type, code) OpenAI uses for a status when the mock is told to fail with it
_OPENAI_KINDS = {
    401: ("invalid_request_error", "invalid_api_key"),
    429: ("requests", "rate_limit_exceeded"),
    503: ("service_unavailable_error", None),
}


class UpstreamError(Exception):
    """An error response of the mocked upstream."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_
        self.headers = dict(headers or {})

    def body(self, flavor: Flavor, request_id: str) -> dict[str, Any]:
        if flavor == "digitalocean":
            fallback = "bad_request" if self.status < 500 else "server_error"
            return {
                "id": _DO_IDS.get(self.status, fallback),
                "message": self.message,
                "request_id": request_id,
            }
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": error}

    def response(self, flavor: Flavor, request_id: str) -> web.Response:
        return web.Response(
            status=self.status,
            body=orjson.dumps(self.body(flavor, request_id)),
            content_type="application/json",
            headers={**self.headers, "x-request-id": request_id},
        )


def invalid(param: str | None, message: str, code: str | None = "invalid_value") -> UpstreamError:
    """A 400 for a bad request parameter."""
    return UpstreamError(400, message, param=param, code=code)


def forced(status: int) -> UpstreamError:
    """The error the mock answers with when a test asks for `status` (header `x-mock-status`)."""
    type_, code = _OPENAI_KINDS.get(
        status, ("server_error" if status >= 500 else "invalid_request_error", None)
    )
    return UpstreamError(
        status, f"Mock upstream answering with status {status} as asked.", code=code, type_=type_
    )


def unauthorized(sent: str | None) -> UpstreamError:
    if not sent:
        message = (
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    else:
        message = "Incorrect API key provided."
    return UpstreamError(401, message, code="invalid_api_key")


def not_found(method: str, path: str) -> UpstreamError:
    return UpstreamError(404, f"Invalid URL ({method} {path})")
