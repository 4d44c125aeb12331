"""gateway.upstreams.transport.openai_error: an upstream's error body as OpenAI-speaking clients read it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.errors import type_for_status
from gateway.upstreams.transport import openai_error

JSON = {"Content-Type": "application/json"}
DO_BODY = b'{"id":"too_many_requests","message":"Slow down.","request_id":"5b0c2e1f-7d0a"}'


def rewritten(
    body: bytes, status: int = 429, headers: dict[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    answer = openai_error(status, headers or JSON, body, "do")
    assert answer is not None
    return orjson.loads(answer[0]), answer[1]


def test_digitalocean_body_becomes_openai_shaped_with_its_id_and_request_id_kept() -> None:
    body, headers = rewritten(DO_BODY)
    assert body == {
        "error": {"message": "Slow down.", "type": "requests", "param": None, "code": "too_many_requests"}
    }
    assert headers == {"Content-Type": "application/json", "x-upstream-request-id": "5b0c2e1f-7d0a"}


def test_an_upstream_request_id_header_is_not_overridden_by_the_body() -> None:
    _, headers = rewritten(DO_BODY, headers={**JSON, "x-request-id": "from-the-header"})
    assert "x-upstream-request-id" not in headers  # relayable_headers sends the header's own


@pytest.mark.parametrize(
    "body",
    [
        b'{"error":{"message":"boom","type":"server_error","param":null,"code":null}}',
        b'{"error": {"message": "odd spacing"}, "extra": 1}',
        b"<html>502 Bad Gateway</html>",
        b'["not", "an", "object"]',
        b"",
        b'{"id":"x","message":"cut',
    ],
    ids=["openai", "openai_with_extras", "html", "array", "empty", "truncated"],
)
def test_bodies_in_openai_shape_or_not_json_objects_go_as_they_came(body: bytes) -> None:
    assert openai_error(500, JSON, body, "do") is None


def test_a_compressed_body_goes_as_it_came() -> None:
    assert openai_error(429, {**JSON, "Content-Encoding": "gzip"}, DO_BODY, "do") is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error":"just text"}', "just text"),
        (b'{"detail":"RFC 7807 detail","title":"Unavailable"}', "RFC 7807 detail"),
        (b'{"title":"Unavailable","status":503}', "Unavailable"),
        (b'{"errors":[{"message":"first of a list"},{"message":"second"}]}', "first of a list"),
        (b'{"message":"","error":"the error text"}', "the error text"),
        (b'{"reason":"elsewhere"}', 'Upstream \'do\' answered 503: {"reason":"elsewhere"}'),
    ],
)
def test_the_message_is_the_upstreams_when_it_has_one(body: bytes, message: str) -> None:
    error = rewritten(body, 503)[0]["error"]
    assert (error["message"], error["type"], error["code"]) == (message, "service_unavailable_error", None)


@pytest.mark.parametrize(
    "value", ["bad\r\nx-injected: 1", "a" * 129, "has space", 7, None, {"id": "x"}, "-leading-dash"]
)
def test_ids_that_are_not_short_tokens_are_dropped_not_relayed(value: object) -> None:
    body, headers = rewritten(orjson.dumps({"id": value, "message": "m", "request_id": value}))
    assert body["error"]["code"] is None and "x-upstream-request-id" not in headers


@pytest.mark.parametrize(
    ("status", "type_"),
    [
        (400, "invalid_request_error"),
        (404, "invalid_request_error"),
        (422, "invalid_request_error"),
        (429, "requests"),
        (500, "server_error"),
        (502, "upstream_error"),
        (503, "service_unavailable_error"),
        (504, "upstream_error"),
        (520, "server_error"),
    ],
)
def test_the_type_follows_the_status_as_for_the_gateways_own_errors(status: int, type_: str) -> None:
    assert type_for_status(status) == type_
    assert rewritten(DO_BODY, status)[0]["error"]["type"] == type_
