"""Every error a client can meet, OpenAI-shaped: status, type, code and param asserted."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.e2e.conftest import Running, StartGateway, base_url
from tests.support.config import TENANT_KEY, config_dict, make_settings
from tests.support.scripted_upstream import Script, ScriptedUpstream

AUTH = {"Authorization": f"Bearer {TENANT_KEY}"}
StartServer = Callable[[web.Application], Awaitable[TestServer]]
GOOD = {"model": "gpt-image-1.5", "prompt": "a cat", "quality": "low"}


async def call(
    url: str,
    *,
    method: str = "POST",
    path: str = "/v1/images/generations",
    data: bytes | None = None,
    json: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url + path, data=data, json=json, headers=headers) as resp:
            assert resp.content_type == "application/json", await resp.text()
            return resp.status, await resp.json(), resp.headers


def assert_error(body: dict[str, Any], type_: str, code: str | None, param: str | None = None) -> None:
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == (type_, code, param)
    assert error["message"] and "Traceback" not in error["message"]


@pytest.mark.parametrize(
    ("headers", "code_expected"),
    [
        ({}, "invalid_api_key"),
        ({"Authorization": "Bearer wrong"}, "invalid_api_key"),
        ({"Authorization": "Basic abc"}, "invalid_api_key"),
    ],
)
async def test_missing_or_unknown_key_is_401(
    gateway: Running, headers: dict[str, str], code_expected: str
) -> None:
    status, body, _ = await call(gateway.url, json=GOOD, headers=headers)
    assert status == 401
    assert_error(body, "invalid_request_error", code_expected)


@pytest.mark.parametrize(
    ("data", "code", "param"),
    [
        (b'{"prompt": "x",', "invalid_json", None),
        (b'["prompt"]', "invalid_json", None),
        (b'{"model": "gpt-image-1.5"}', "missing_required_parameter", "prompt"),
        (b'{"model": "gpt-image-1.5", "prompt": ""}', "invalid_value", "prompt"),
        (b'{"model": "gpt-image-1.5", "prompt": 5}', "invalid_value", "prompt"),
    ],
)
async def test_bad_bodies_are_400(gateway: Running, data: bytes, code: str, param: str | None) -> None:
    status, body, _ = await call(gateway.url, data=data, headers={**AUTH, "Content-Type": "application/json"})
    assert status == 400
    assert_error(body, "invalid_request_error", code, param)


async def test_unknown_model_is_400_with_param_model(gateway: Running) -> None:
    status, body, _ = await call(gateway.url, json={**GOOD, "model": "no-such-model"}, headers=AUTH)
    assert status == 400
    assert body["error"]["param"] == "model" and body["error"]["type"] == "invalid_request_error"


async def test_body_over_limit_is_413(start_gateway: StartGateway, mock_openai: TestServer) -> None:
    gw = await start_gateway(make_settings(base_url(mock_openai), server={"max_body_bytes": 2000}))
    status, body, _ = await call(gw.url, json={**GOOD, "prompt": "x" * 5000}, headers=AUTH)
    assert status == 413
    assert_error(body, "invalid_request_error", "request_too_large")


async def test_wrong_content_type_is_415(gateway: Running) -> None:
    status, body, _ = await call(
        gateway.url, data=b"prompt=x", headers={**AUTH, "Content-Type": "text/plain"}
    )
    assert status == 415
    assert_error(body, "invalid_request_error", "invalid_content_type")


async def test_wrong_method_is_405(gateway: Running) -> None:
    status, body, headers = await call(gateway.url, method="GET", headers=AUTH)
    assert status == 405
    assert_error(body, "invalid_request_error", "method_not_allowed")
    assert "POST" in headers["Allow"]


async def test_unknown_path_is_404(gateway: Running) -> None:
    status, body, _ = await call(gateway.url, path="/v1/nothing", json=GOOD, headers=AUTH)
    assert status == 404
    assert_error(body, "invalid_request_error", "unknown_url")


@pytest.mark.parametrize(
    ("status", "error_body"),
    [
        (500, b'{"error":{"message":"boom","type":"server_error","param":null,"code":null}}'),
        (400, b'{"error": {"message": "size is required", "type": "invalid_request_error"}, "x": 1}'),
        (502, b"<html><body>502 Bad Gateway</body></html>"),  # not JSON: nothing to translate
        (
            429,
            b'{"error":{"message":"slow down","type":"requests","param":null,"code":"rate_limit_exceeded"}}',
        ),
    ],
)
async def test_upstream_errors_are_relayed_unchanged(
    start_server: StartServer, start_gateway: StartGateway, status: int, error_body: bytes
) -> None:
    """Bodies already in OpenAI's shape (or not JSON at all) go through byte for byte."""
    upstream = ScriptedUpstream(Script(status=status, content_type="application/json", chunks=[error_body]))
    server = await start_server(upstream.app())
    gw = await start_gateway(openai_url=base_url(server))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gw.v1}/images/generations", json=GOOD, headers=AUTH) as resp:
            assert resp.status == status
            assert await resp.read() == error_body


async def test_an_upstream_error_in_another_shape_is_relayed_in_openais(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    """DigitalOcean's `{"id", "message", "request_id"}` (FACTS §5), cut across chunks: the client gets
    `{"error": {...}}` with the message, the id as its code, the request id in a header."""
    do_body = b'{"id":"bad_request","message":"size is required","request_id":"r-1"}'
    upstream = ScriptedUpstream(
        Script(status=400, content_type="application/json", chunks=[do_body[:9], do_body[9:]])
    )
    server = await start_server(upstream.app())
    gw = await start_gateway(openai_url=base_url(server))
    status, body, headers = await call(gw.url, json=GOOD, headers=AUTH)
    assert status == 400
    assert_error(body, "invalid_request_error", "bad_request")
    assert body["error"]["message"] == "size is required"
    assert headers["x-upstream-request-id"] == "r-1"
    assert int(headers["Content-Length"]) == len(orjson.dumps(body))


async def test_unreachable_upstream_is_502(start_gateway: StartGateway) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        gw = await start_gateway(openai_url=f"http://127.0.0.1:{port}/v1")
        status, body, _ = await call(gw.url, json=GOOD, headers=AUTH)
    assert status == 502
    assert_error(body, "upstream_error", "upstream_unavailable")


@pytest.fixture
async def full_backlog() -> AsyncIterator[int]:
    """A port whose accept queue is full: the kernel drops new SYNs, so connecting times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    await asyncio.sleep(0.05)
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


async def test_connect_timeout_is_504(start_gateway: StartGateway, full_backlog: int) -> None:
    url = f"http://127.0.0.1:{full_backlog}/v1"
    config = config_dict(url)
    config["upstreams"]["openai"]["connect_timeout_seconds"] = 0.3
    from gateway.config import Settings

    gw = await start_gateway(Settings.model_validate(config))
    status, body, _ = await call(gw.url, json=GOOD, headers=AUTH)
    assert status == 504
    assert_error(body, "upstream_error", "upstream_connect_timeout")


async def test_read_timeout_is_504(start_server: StartServer, start_gateway: StartGateway) -> None:
    upstream = ScriptedUpstream(
        Script(content_type="application/json", chunks=[b"{}"], delay_before_headers=5)
    )
    server = await start_server(upstream.app())
    config = config_dict(base_url(server))
    config["upstreams"]["openai"]["read_timeout_seconds"] = 0.3
    from gateway.config import Settings

    gw = await start_gateway(Settings.model_validate(config))
    status, body, _ = await call(gw.url, json=GOOD, headers=AUTH)
    assert status == 504
    assert_error(body, "upstream_error", "upstream_read_timeout")


async def test_upstream_failure_after_stream_started_becomes_sse_error_event(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    first = b'event: image_generation.partial_image\ndata: {"type":"image_generation.partial_image","b64_json":"AA=="}\n\n'
    upstream = ScriptedUpstream(Script(chunks=[first], abort_after_chunks=True))
    server = await start_server(upstream.app())
    gw = await start_gateway(openai_url=base_url(server))
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{gw.v1}/images/generations", json={**GOOD, "stream": True}, headers=AUTH) as resp,
    ):
        assert resp.status == 200
        body = await resp.read()
    assert body.startswith(first)
    tail = body[len(first) :]
    assert tail.startswith(b"event: error\ndata: {")
    assert b'"type":"error"' in tail and b'"code":"upstream_unavailable"' in tail
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0)
    stream = await client.images.generate(model="gpt-image-1.5", prompt="x", stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    await client.close()


async def test_truncated_json_body_is_not_passed_off_as_complete(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    upstream = ScriptedUpstream(
        Script(
            content_type="application/json",
            chunks=[b'{"created":1,"data":[{"b64_json":"AAAA'],
            abort_after_chunks=True,
        )
    )
    server = await start_server(upstream.app())
    gw = await start_gateway(openai_url=base_url(server))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gw.v1}/images/generations", json=GOOD, headers=AUTH) as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()


async def test_client_leaving_mid_stream_is_billed_from_drained_usage(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    usage = b'{"input_tokens":3,"input_tokens_details":{"text_tokens":3,"image_tokens":0},"output_tokens":372,"total_tokens":375}'
    chunks = [
        b'event: image_generation.partial_image\ndata: {"type":"image_generation.partial_image","b64_json":"AA=="}\n\n',
        b'event: image_generation.completed\ndata: {"type":"image_generation.completed","b64_json":"AA==","usage":'
        + usage
        + b"}\n\n",
    ]
    upstream = ScriptedUpstream(Script(chunks=chunks, chunk_delay=0.3))
    server = await start_server(upstream.app())
    gw = await start_gateway(openai_url=base_url(server))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{gw.v1}/images/generations", json={**GOOD, "stream": True}, headers=AUTH)
        await resp.content.readuntil(b"\n\n")
        resp.close()  # the client leaves before the completed event
    await asyncio.wait_for(upstream.finished.wait(), 5)
    for _ in range(50):
        if gw.metric(
            "gateway_tokens_total", tenant="team", model="gpt-image-1.5", bucket="image_out", settled="usage"
        ):
            break
        await asyncio.sleep(0.05)
    assert (
        gw.metric(
            "gateway_tokens_total", tenant="team", model="gpt-image-1.5", bucket="image_out", settled="usage"
        )
        == 372
    )


@pytest.mark.parametrize("status", [401, 403])
async def test_upstream_refusing_the_org_key_is_502_without_its_words(
    start_server: StartServer, start_gateway: StartGateway, status: int
) -> None:
    leaked = b'{"error":{"message":"Incorrect API key provided: sk-test-****-key","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}'
    upstream = ScriptedUpstream(Script(status=status, content_type="application/json", chunks=[leaked]))
    server = await start_server(upstream.app())
    gw = await start_gateway(openai_url=base_url(server))
    code, body, _ = await call(gw.url, json=GOOD, headers=AUTH)
    assert code == 502
    assert_error(body, "upstream_error", "upstream_auth_failed")
    assert "sk-test" not in body["error"]["message"]


async def test_compressed_upstream_body_keeps_its_content_encoding(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    import gzip

    raw = gzip.compress(b'{"created":1,"data":[{"b64_json":"AA=="}]}')
    upstream = ScriptedUpstream(
        Script(content_type="application/json", chunks=[raw], extra_headers={"Content-Encoding": "gzip"})
    )
    server = await start_server(upstream.app())
    gw = await start_gateway(openai_url=base_url(server))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gw.v1}/images/generations", json=GOOD, headers=AUTH) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Encoding"] == "gzip"
            assert (await resp.json())["data"][0]["b64_json"] == "AA=="


async def test_limit_headers_come_with_what_reached_the_limiter_only(
    start_gateway: StartGateway, mock_openai: TestServer
) -> None:
    """As the README says: an admitted request and a 429 carry the limit headers; a request refused
    before the limiter (403 policy, 400 capability, 401) consumed nothing and carries none."""
    gw = await start_gateway(
        openai_url=base_url(mock_openai), policy={"max_n": 1}, limits={"requests_per_minute": 1}
    )
    ok = {"model": "gpt-image-1.5", "prompt": "x", "quality": "low", "size": "1024x1024"}
    auth = {"Authorization": f"Bearer {TENANT_KEY}"}
    url = f"{gw.v1}/images/generations"
    seen = {}
    async with aiohttp.ClientSession() as session:
        for name, body, headers in (
            ("policy", {**ok, "n": 2}, auth),
            ("capability", {**ok, "size": "7x7"}, auth),
            ("key", ok, {}),
            ("admitted", ok, auth),
            ("rate", ok, auth),
        ):
            async with session.post(url, json=body, headers=headers) as resp:
                seen[name] = (resp.status, "x-ratelimit-limit-requests" in resp.headers)
    assert seen == {
        "policy": (403, False),
        "capability": (400, False),
        "key": (401, False),
        "admitted": (200, True),
        "rate": (429, True),
    }
