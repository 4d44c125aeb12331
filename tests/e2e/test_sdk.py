"""The official SDKs, unchanged but for base_url and key, against the gateway on real sockets."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from PIL import Image

from gateway.mock_upstream import RECEIVED, MockOptions, create_mock_app
from tests.e2e.conftest import Running, StartGateway, base_url
from tests.support.config import DO_UPSTREAM_KEY, TENANT_KEY

StartServer = Callable[[web.Application], Awaitable[TestServer]]


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def sync_client(gateway: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=TENANT_KEY, max_retries=0)


async def test_sync_sdk_non_streaming_image_decodes_at_requested_size(gateway: Running) -> None:
    client = sync_client(gateway)
    result = await asyncio.to_thread(
        client.images.generate, model="gpt-image-1.5", prompt="a red fox", size="1536x1024", quality="low"
    )
    assert result.data is not None and result.data[0].b64_json is not None
    assert decode(result.data[0].b64_json).size == (1536, 1024)
    assert result.usage is not None and result.usage.output_tokens == 400


async def test_async_sdk_non_streaming_n2_jpeg(gateway: Running) -> None:
    client = openai.AsyncOpenAI(base_url=gateway.v1, api_key=TENANT_KEY, max_retries=0)
    result = await client.images.generate(
        model="gpt-image-1.5",
        prompt="two owls",
        n=2,
        size="1024x1536",
        quality="medium",
        output_format="jpeg",
    )
    assert result.data is not None and len(result.data) == 2
    for item in result.data:
        assert item.b64_json is not None
        image = decode(item.b64_json)
        assert image.size == (1024, 1536) and image.format == "JPEG"
    await client.close()


async def test_sync_sdk_streaming_events_and_final_image(gateway: Running) -> None:
    client = sync_client(gateway)

    def run() -> list[Any]:
        stream = client.images.generate(
            model="gpt-image-1.5",
            prompt="a lighthouse",
            size="1024x1024",
            quality="low",
            stream=True,
            partial_images=2,
        )
        return list(stream)

    events = await asyncio.to_thread(run)
    types = [e.type for e in events]
    assert types.count("image_generation.partial_image") == 2
    assert types[-1] == "image_generation.completed"
    final = events[-1]
    assert decode(final.b64_json).size == (1024, 1024)
    assert final.usage.output_tokens == 272 + 2 * 100


async def test_async_sdk_streaming(gateway: Running) -> None:
    client = openai.AsyncOpenAI(base_url=gateway.v1, api_key=TENANT_KEY, max_retries=0)
    stream = await client.images.generate(
        model="gpt-image-2",
        prompt="a harbour",
        size="1024x1024",
        quality="low",
        stream=True,
        partial_images=1,
    )
    events = [event async for event in stream]
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert decode(events[-1].b64_json).size == (1024, 1024)
    await client.close()


async def test_digitalocean_route_through_openai_sdk(gateway: Running) -> None:
    """The same client request works against DigitalOcean, which requires n and size."""
    client = sync_client(gateway)
    result = await asyncio.to_thread(client.images.generate, model="gpt-image-1", prompt="a kite")
    assert result.data is not None and result.data[0].b64_json is not None
    decode(result.data[0].b64_json)


async def test_what_digitalocean_refuses_is_a_400_naming_the_field_before_anything_is_sent(
    gateway: Running, mock_do: TestServer
) -> None:
    """DigitalOcean's gpt-image-1 takes n=1 only and three sizes: the gateway says so itself, in
    OpenAI's shape, instead of forwarding what DigitalOcean would refuse in its own."""
    client = openai.AsyncOpenAI(base_url=gateway.v1, api_key=TENANT_KEY, max_retries=0)
    for extra, param in (({"n": 2}, "n"), ({"size": "1024x1024"}, "size")):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.images.generate(model="gpt-image-1", prompt="a kite", **extra)  # type: ignore[arg-type]
        assert refused.value.code == "invalid_value" and refused.value.param == param
        assert "on digitalocean" in refused.value.message
    await client.close()
    assert mock_do.app[RECEIVED] == []


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, (openai.BadRequestError, "invalid_request_error", "bad_request")),
        (404, (openai.NotFoundError, "invalid_request_error", "not_found")),
        (429, (openai.RateLimitError, "requests", "too_many_requests")),
        (500, (openai.InternalServerError, "server_error", "server_error")),
        (503, (openai.InternalServerError, "service_unavailable_error", "service_unavailable")),
    ],
)
async def test_digitalocean_errors_reach_the_sdk_in_openai_shape(
    start_server: StartServer,
    start_gateway: StartGateway,
    mock_openai: TestServer,
    status: int,
    expected: tuple[type[openai.APIStatusError], str, str],
) -> None:
    """DigitalOcean answers errors as `{"id", "message", "request_id"}` (FACTS §5); openai-python
    reads `code`, `type` and `param` from `{"error": {...}}` only, so the gateway rewrites it."""
    failing = MockOptions(flavor="digitalocean", api_key=DO_UPSTREAM_KEY, fail_status=status)
    mock_do = await start_server(create_mock_app(failing))
    gateway = await start_gateway(openai_url=base_url(mock_openai), do_url=base_url(mock_do))
    client = openai.AsyncOpenAI(base_url=gateway.v1, api_key=TENANT_KEY, max_retries=0)
    raised, type_, code = expected
    try:
        with pytest.raises(raised) as error:
            await client.images.generate(model="gpt-image-1", prompt="a kite")
    finally:
        await client.close()
    failure = error.value
    assert (failure.status_code, failure.type, failure.code, failure.param) == (status, type_, code, None)
    assert isinstance(failure.body, dict)  # what the SDK took out of `{"error": {...}}`
    assert failure.body["message"] == f"Mock upstream answering with status {status} as asked."
    assert failure.response.headers["x-upstream-request-id"]  # DigitalOcean's request id, to quote
    assert len(mock_do.app[RECEIVED]) == 1


async def test_pydo_client_through_gateway(gateway: Running) -> None:
    pydo_inference = pytest.importorskip("pydo.inference")
    client = pydo_inference.Client(token=TENANT_KEY, inference_endpoint=gateway.url)
    body = {"model": "gpt-image-1", "prompt": "a sailing boat", "n": 1, "size": "1536x1024"}
    # azure-core refuses bearer tokens over plain http unless told this is a test on loopback
    result = await asyncio.to_thread(client.inference.create_image, body, enforce_https=False)
    payload = (
        result
        if isinstance(result, dict)
        else result.as_dict()
        if hasattr(result, "as_dict")
        else dict(result)
    )
    assert decode(payload["data"][0]["b64_json"]).size == (1536, 1024)
    assert payload["usage"]["total_tokens"] > 0


async def test_a_plain_sdk_call_under_a_narrow_policy_is_served_with_allowed_values(
    start_gateway: StartGateway, mock_openai: TestServer
) -> None:
    """The SDK omits background, output_format and moderation: a policy that does not allow their
    defaults fills them with allowed values and says so, instead of answering 403."""
    policy = {"backgrounds": ["opaque"], "output_formats": ["webp"], "moderation": ["low"]}
    gw = await start_gateway(openai_url=base_url(mock_openai), policy=policy)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0)
    raw = await client.images.with_raw_response.generate(model="gpt-image-1.5", prompt="a red fox")
    await client.close()
    assert raw.status_code == 200
    adjusted = raw.headers["x-gateway-adjusted"]
    for change in (
        "background=unset->opaque (policy default: auto is not in backgrounds)",
        "output_format=unset->webp (policy default: png is not in output_formats)",
        "moderation=unset->low (policy default: auto is not in moderation)",
    ):
        assert change in adjusted
    [sent] = mock_openai.app[RECEIVED]
    assert (sent.body["background"], sent.body["output_format"], sent.body["moderation"]) == (
        "opaque",
        "webp",
        "low",
    )


async def test_models_list_and_retrieve_show_what_the_tenant_may_use(
    start_gateway: StartGateway, mock_openai: TestServer, mock_do: TestServer
) -> None:
    """client.models.list() / retrieve(): the routed models the tenant's policy allows, from the
    configuration alone (no upstream is asked)."""
    policy = {"models": ["gpt-image-1.5", "gpt-image-1"]}
    gw = await start_gateway(openai_url=base_url(mock_openai), do_url=base_url(mock_do), policy=policy)
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0)
    listed = [(m.id, m.object, m.owned_by) async for m in client.models.list()]
    assert sorted(listed) == [("gpt-image-1", "model", "digitalocean"), ("gpt-image-1.5", "model", "openai")]
    one = await client.models.retrieve("gpt-image-1")
    assert (one.id, one.owned_by) == ("gpt-image-1", "digitalocean")
    for hidden in ("gpt-image-2", "dall-e-3", "no-such-model"):  # not allowed, not routed, unknown
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve(hidden)
        assert missing.value.code == "model_not_found"
    bad = openai.AsyncOpenAI(base_url=gw.v1, api_key="igw_wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.models.list()
    await client.close()
    await bad.close()
    assert mock_openai.app[RECEIVED] == [] and mock_do.app[RECEIVED] == []
