"""The front door under hostile HTTP: bytes an HTTP library would refuse to send, through raw sockets.

Each test fails without its fix (issue 12): a wrong status, a 500, a leaked byte, a stalled loop.
"""

from __future__ import annotations

import orjson
import pytest

from tests.e2e.conftest import Running, StartGateway, base_url
from tests.support.config import TENANT_KEY
from tests.support.raw_http import exchange, request

ADMIN_TOKEN = "admin-token-for-tests"
JSON = (b"Content-Type", b"application/json")
GOOD = b'{"model": "gpt-image-1.5", "prompt": "a cat", "quality": "low"}'


@pytest.fixture
async def admin_gateway(start_gateway: StartGateway, mock_openai, mock_do) -> Running:  # type: ignore[no-untyped-def]
    return await start_gateway(
        openai_url=base_url(mock_openai), do_url=base_url(mock_do), admin={"token": ADMIN_TOKEN}
    )


def port_of(gateway: Running) -> int:
    port = gateway.server.port
    assert port is not None
    return port


@pytest.mark.parametrize("path", ["/v1/images/generations", "/admin/usage"])
@pytest.mark.parametrize("value", [b"Bearer \xff\xfe\xfd", b"Bearer caf\xc3\xa9", b"\xff"])
async def test_non_ascii_authorization_is_401_invalid_key(
    admin_gateway: Running, path: str, value: bytes
) -> None:
    method = "POST" if path.startswith("/v1") else "GET"
    raw = request(path, method=method, headers=[JSON, (b"Authorization", value)], body=GOOD)
    response = await exchange(port_of(admin_gateway), raw)
    assert response.status == 401, response.body
    code = "invalid_api_key" if path.startswith("/v1") else "invalid_admin_token"
    assert response.json()["error"]["code"] == code  # type: ignore[index]
    assert admin_gateway.metric("gateway_requests_total", tenant="", model="", upstream="", status="500") == 0


async def test_a_valid_key_still_works_over_raw_http(admin_gateway: Running) -> None:
    auth = (b"Authorization", b"Bearer " + TENANT_KEY.encode())
    response = await exchange(
        port_of(admin_gateway), request("/v1/images/generations", headers=[JSON, auth], body=GOOD)
    )
    assert response.status == 200


@pytest.mark.parametrize("size", ["1024x1024\n", "1024x1536\n", "auto\n"])
async def test_a_size_with_a_trailing_newline_is_refused(admin_gateway: Running, size: str) -> None:
    body = orjson.dumps({"model": "gpt-image-2", "prompt": "a cat", "size": size})
    auth = (b"Authorization", b"Bearer " + TENANT_KEY.encode())
    response = await exchange(
        port_of(admin_gateway), request("/v1/images/generations", headers=[JSON, auth], body=body)
    )
    assert response.status == 400, response.body
    assert response.json()["error"]["param"] == "size"  # type: ignore[index]
    assert "x-upstream-request-id" not in response.headers, "refused by the upstream, not the gateway"


@pytest.mark.parametrize("param", ["size", "model", "n", "extra", "user"])
async def test_a_990_level_value_is_a_short_400(admin_gateway: Running, param: str) -> None:
    body = b'{"prompt": "a cat", "' + param.encode() + b'": ' + b"[" * 990 + b"]" * 990 + b"}"
    auth = (b"Authorization", b"Bearer " + TENANT_KEY.encode())
    response = await exchange(
        port_of(admin_gateway), request("/v1/images/generations", headers=[JSON, auth], body=body)
    )
    assert response.status == 400, response.body[:300]
    assert len(response.body) < 1000
