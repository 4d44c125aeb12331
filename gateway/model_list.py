"""`GET /v1/models` and `GET /v1/models/{model}`: the models a tenant can use, in OpenAI's shape.

What `client.models.list()` / `client.models.retrieve(id)` of the SDKs read: the public model
names the gateway routes and the tenant's policy allows, answered from the configuration (no
upstream call, no store call). `owned_by` names the upstream that serves the model; `created` is
0, as the catalog records no release dates. A name the tenant cannot use is a 404
`model_not_found`, like OpenAI's answer for a model the key has no access to.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.errors import NotFound
from gateway.front.access_log import RECORD
from gateway.health import RUNTIME
from gateway.runtime import Runtime


def _model(runtime: Runtime, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        "owned_by": runtime.routes[name].targets[0].upstream_name,
    }


def _tenant_models(request: web.Request) -> tuple[Runtime, list[str]]:
    runtime = request.app[RUNTIME].current
    credential = runtime.credentials.authenticate(request.headers.get("Authorization"))
    record = request[RECORD]
    record.tenant, record.key = credential.tenant, credential.key_label
    return runtime, runtime.settings.models_for(credential.tenant)


async def list_models(request: web.Request) -> web.Response:
    runtime, names = _tenant_models(request)
    return web.json_response({"object": "list", "data": [_model(runtime, name) for name in names]})


async def retrieve_model(request: web.Request) -> web.Response:
    runtime, names = _tenant_models(request)
    name = request.match_info["model"]
    if name not in names:
        raise NotFound(
            f"The model {name!r} does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
    request[RECORD].model = name
    return web.json_response(_model(runtime, name))


def add_model_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", retrieve_model)
