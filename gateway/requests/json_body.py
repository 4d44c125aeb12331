"""A JSON request body (generations): read through the front door's bounds, parsed, with the prompt
present."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.config import ServerSettings
from gateway.errors import InvalidRequest, UnsupportedMediaType
from gateway.front.body import BodyReader
from policies.findings import shown


async def parse(request: web.Request, bodies: BodyReader, server: ServerSettings) -> dict[str, Any]:
    """The request body as a JSON object (at most `server.max_body_bytes`), or an OpenAI-style 4xx."""
    content_type = request.headers.get("Content-Type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {shown(content_type) if content_type else 'none'}.",
            code="invalid_content_type",
        )
    raw = await bodies.read(request, server)
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
    if not isinstance(prompt, str) or not prompt:  # the API's minimum length is 1: "  " is a prompt
        raise InvalidRequest("'prompt' must be a non-empty string.", param="prompt", code="invalid_value")
    return body
