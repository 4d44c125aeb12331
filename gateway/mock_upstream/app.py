"""The mock upstream's aiohttp app: routes, auth, request recording, latency, and serving it."""

from __future__ import annotations

import asyncio
import hmac
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.mock_upstream.bodies import Knobs, Reply, write_json, write_sse
from gateway.mock_upstream.errors import UpstreamError, forced, not_found, unauthorized
from gateway.mock_upstream.images import ImageCache, ImageSpec
from gateway.mock_upstream.models import MODELS, image_usages, usage
from gateway.mock_upstream.options import OPTIONS, RECEIVED, Headers, MockOptions, ReceivedRequest
from gateway.mock_upstream.validation import Generation, validate

log = logging.getLogger(__name__)
_IMAGES: web.AppKey[ImageCache] = web.AppKey("mock_upstream_images", ImageCache)
_FAILURES: web.AppKey[random.Random] = web.AppKey("mock_upstream_failures", random.Random)
_RECORD_LIMIT = 10_000  # a long benchmark keeps only the most recent requests, so memory stays flat
_BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
    "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
)


def create_mock_app(options: MockOptions = MockOptions()) -> web.Application:  # noqa: B008 - frozen
    """A fresh mock upstream; each app has its own request record and image cache."""
    app = web.Application(middlewares=[_record, _answer_errors, _authenticate], client_max_size=8 * 2**20)
    app[OPTIONS] = options
    app[RECEIVED] = []
    app[_IMAGES] = ImageCache()
    app[_FAILURES] = random.Random()
    app.router.add_post("/v1/images/generations", _generations)
    app.router.add_get("/v1/models", _models)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    app.on_response_prepare.append(_stamp_request_id)
    app.cleanup_ctx.append(_image_cache)
    return app


async def run_mock_upstream(host: str, port: int, options: MockOptions) -> None:
    """Serve a mock upstream on host:port until cancelled, then shut it down cleanly."""
    runner = web.AppRunner(create_mock_app(options), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("mock upstream (%s) listening on http://%s:%d/v1", options.flavor, host, port)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def _image_cache(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[_IMAGES].close()


def _request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


async def _stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("x-request-id", _request_id())  # errors carry the id of their body


def _parse(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None


@web.middleware
async def _record(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Keep what arrived, before anything can reject it."""
    raw = await request.read()
    body = _parse(raw)
    received = request.app[RECEIVED]
    if len(received) >= 2 * _RECORD_LIMIT:
        del received[:-_RECORD_LIMIT]
    received.append(
        ReceivedRequest(
            headers=Headers(request.headers.items()),
            body=body if isinstance(body, dict) else {},
            raw=raw,
            method=request.method,
            path=request.path,
        )
    )
    return await handler(request)


@web.middleware
async def _answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except UpstreamError as error:
        return error.response(request.app[OPTIONS].flavor, _request_id())


@web.middleware
async def _authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    expected = request.app[OPTIONS].api_key
    if expected is not None:
        sent = request.headers.get("Authorization")
        if not hmac.compare_digest((sent or "").encode(), f"Bearer {expected}".encode()):
            raise unauthorized(sent)
    return await handler(request)


async def _not_found(request: web.Request) -> web.StreamResponse:
    raise not_found(request.method, request.path)


async def _models(request: web.Request) -> web.StreamResponse:
    flavor = request.app[OPTIONS].flavor
    owner = "openai" if flavor == "openai" else "digitalocean"
    data = [
        {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": owner}
        for model in MODELS[flavor]
    ]
    return web.json_response({"object": "list", "data": data}, dumps=lambda v: orjson.dumps(v).decode())


async def _generations(request: web.Request) -> web.StreamResponse:
    options = request.app[OPTIONS]
    knobs = Knobs.from_headers(request.headers)
    latency_ms = options.latency_ms if knobs.latency_ms is None else knobs.latency_ms
    if latency_ms > 0:
        await asyncio.sleep(latency_ms / 1000)
    if knobs.status is not None:
        raise forced(knobs.status)
    if options.hang_ms > 0:
        await asyncio.sleep(options.hang_ms / 1000)
    if options.fail_status is not None and request.app[_FAILURES].random() < options.fail_rate:
        error = forced(options.fail_status)
        if options.retry_after is not None:
            error.headers["Retry-After"] = f"{options.retry_after:g}"
        raise error
    body = _parse(await request.read())
    if not isinstance(body, dict):
        raise UpstreamError(400, _BAD_JSON)
    gen = validate(body, options.flavor)
    cache = request.app[_IMAGES]

    async def image(variant: int) -> bytes:
        transparent = gen.background == "transparent"
        spec = ImageSpec(gen.width, gen.height, gen.output_format, transparent, variant, options.image_bytes)
        return await cache.b64(spec)

    reply = Reply(gen, image, _usage(gen), _image_usages(gen), created=int(time.time()))
    if gen.stream:
        return await write_sse(request, reply, knobs, options.partial_interval_ms / 1000)
    return await write_json(request, reply, knobs)


def _usage(gen: Generation) -> dict[str, Any]:
    """The whole request's `usage` (a JSON body's)."""
    partials = gen.partial_images
    return usage(
        gen.family, gen.width, gen.height, gen.quality, n=gen.n, prompt=gen.prompt, partial_images=partials
    )


def _image_usages(gen: Generation) -> list[dict[str, Any]]:
    """One `usage` per image (a stream's, on each completed event); they add up to `_usage(gen)`."""
    partials = gen.partial_images
    return image_usages(
        gen.family, gen.width, gen.height, gen.quality, n=gen.n, prompt=gen.prompt, partial_images=partials
    )
