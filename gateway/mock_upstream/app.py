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
from gateway.mock_upstream.edits import Form, Variation, parse_form, validate_edit, validate_variation
from gateway.mock_upstream.errors import UpstreamError, forced, not_found, unauthorized
from gateway.mock_upstream.images import ImageCache, ImageSpec
from gateway.mock_upstream.models import MODELS, image_usages, usage
from gateway.mock_upstream.options import (
    OPTIONS,
    RECEIVED,
    Headers,
    MockOptions,
    ReceivedFile,
    ReceivedRequest,
)
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
    app = web.Application(middlewares=[_record, _answer_errors, _authenticate], client_max_size=256 * 2**20)
    app[OPTIONS] = options
    app[RECEIVED] = []
    app[_IMAGES] = ImageCache()
    app[_FAILURES] = random.Random()
    app.router.add_post("/v1/images/generations", _generations)
    if options.flavor == "openai":  # DigitalOcean's image API has generations only
        app.router.add_post("/v1/images/edits", _edits)
        app.router.add_post("/v1/images/variations", _variations)
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
    files: tuple[ReceivedFile, ...] = ()
    if request.content_type == "multipart/form-data":
        try:
            form = parse_form(request.headers.get("Content-Type", ""), raw)
            body, files = dict(form.fields), tuple(form.files)
        except UpstreamError:
            pass  # answered by the handler
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
            files=files,
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


async def _knobs(request: web.Request) -> Knobs:
    """The test-only switches; waits the latency and raises a forced status."""
    options = request.app[OPTIONS]
    knobs = Knobs.from_headers(request.headers, options)
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
    return knobs


async def _generations(request: web.Request) -> web.StreamResponse:
    knobs = await _knobs(request)
    body = _parse(await request.read())
    if not isinstance(body, dict):
        raise UpstreamError(400, _BAD_JSON)
    return await _serve(request, validate(body, request.app[OPTIONS].flavor), knobs)


async def _form(request: web.Request) -> Form:
    return parse_form(request.headers.get("Content-Type", ""), await request.read())


async def _edits(request: web.Request) -> web.StreamResponse:
    knobs = await _knobs(request)
    options = request.app[OPTIONS]
    edit = validate_edit(await _form(request), options.flavor, options.serve_dall_e_2)
    if isinstance(edit, Variation):
        return await _dall_e_2(request, edit)
    return await _serve(request, edit, knobs)


async def _variations(request: web.Request) -> web.StreamResponse:
    await _knobs(request)
    return await _dall_e_2(
        request, validate_variation(await _form(request), request.app[OPTIONS].serve_dall_e_2)
    )


async def _dall_e_2(request: web.Request, variation: Variation) -> web.StreamResponse:
    """dall-e-2's answer: images only (priced per image, so no `usage`), as URLs or base64."""
    spec = ImageSpec(variation.side, variation.side, "png", False)
    if variation.response_format == "b64_json":
        item = {"b64_json": (await request.app[_IMAGES].b64(spec)).decode()}
    else:
        item = {"url": f"https://mock-upstream.invalid/images/{uuid.uuid4().hex}.png"}
    body = {"created": int(time.time()), "data": [item] * variation.n}
    return web.json_response(body, dumps=lambda v: orjson.dumps(v).decode())


async def _serve(request: web.Request, gen: Generation, knobs: Knobs) -> web.StreamResponse:
    options = request.app[OPTIONS]
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
    return usage(**_usage_inputs(gen))


def _image_usages(gen: Generation) -> list[dict[str, Any]]:
    """One `usage` per image (a stream's, on each completed event); they add up to `_usage(gen)`."""
    return image_usages(**_usage_inputs(gen))


def _usage_inputs(gen: Generation) -> dict[str, Any]:
    return {
        "family": gen.family,
        "width": gen.width,
        "height": gen.height,
        "quality": gen.quality,
        "n": gen.n,
        "prompt": gen.prompt,
        "partial_images": gen.partial_images,
        "image_in": gen.image_in,
    }
