"""A JSON request body (generations): size-capped, parsed, with the prompt present."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType


async def parse(request: web.Request, max_body_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object, size-capped, or an OpenAI-style 4xx."""
    content_type = request.headers.get("Content-Type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {content_type or 'none'!r}.",
            code="invalid_content_type",
        )
    raw = await _read_capped(request, max_body_bytes)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON: {exc.msg} (at byte {exc.pos}).", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest(
            "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter"
        )
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest("'prompt' must be a non-empty string.", param="prompt", code="invalid_value")
    return body


async def _read_capped(request: web.Request, limit: int) -> bytes:
    too_large = PayloadTooLarge(f"The request body is larger than the gateway's limit of {limit} bytes.")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
