"""The composition root: `create_app(settings)` builds every part and wires it under AppKeys.

Nothing is global: the metrics registry, the store, the upstream session and the runtime
configuration belong to the app, are created here or in `cleanup_ctx`, and are torn down there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.admin import create_admin_app
from gateway.config import ConfigError, Settings
from gateway.front.access_log import create_request_middleware
from gateway.front.body import BodyBudget
from gateway.front.connections import name_the_server
from gateway.health import DRAINING, METRICS, RUNTIME, STORE, add_health_routes
from gateway.limits import JournalError, Store, create_store
from gateway.model_list import add_model_routes
from gateway.pipeline import Pipeline
from gateway.process.shutdown import IN_FLIGHT, SETTLEMENTS_LOST
from gateway.reload import Reloader
from gateway.runtime import Runtime, RuntimeHolder
from gateway.telemetry.activity import Activity
from gateway.telemetry.metrics import ConfigCollector, Metrics
from gateway.telemetry.tracing import Tracing
from gateway.upstreams.pools import Pools

PIPELINE = web.AppKey("pipeline", Pipeline)
RELOADER = web.AppKey("reloader", Reloader)
BODIES = web.AppKey("bodies", BodyBudget)
TRACING = web.AppKey("tracing", Tracing)


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    store: Store | None = None,
    config_path: Path | None = None,
    worker: int = 0,
    server_overrides: Mapping[str, Any] | None = None,
) -> web.Application:
    """The gateway as an aiohttp Application; raises ConfigError for an unusable configuration.
    `worker` is this process's index among `server.workers` (its durable outbox file);
    `server_overrides` are the command line's (`--host/--port`), applied again at each reload."""
    name_the_server()
    holder = RuntimeHolder(Runtime.build(settings))
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    activity = Activity()
    tracing = Tracing(settings.telemetry, metrics)
    in_flight: set[asyncio.Task[object]] = set()
    app = web.Application(
        middlewares=[create_request_middleware(metrics, activity, tracing, in_flight)],
        client_max_size=settings.server.max_body_bytes,
        handler_args={"max_field_size": 16384},
    )
    app[RUNTIME] = holder
    app[METRICS] = metrics
    app[STORE] = store if store is not None else _store(settings, metrics, worker)
    app[DRAINING] = [False]
    app[IN_FLIGHT] = in_flight
    app[SETTLEMENTS_LOST] = [0]
    app[TRACING] = tracing
    metrics.initialise(settings)
    metrics.registry.register(ConfigCollector(lambda: holder.current.settings))
    app[RELOADER] = Reloader(
        holder, config_path, lambda runtime: metrics.initialise(runtime.settings), server_overrides
    )
    app[BODIES] = BodyBudget(settings.server.max_buffered_body_bytes, metrics)
    app.cleanup_ctx.append(_resources)
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_post("/v1/images/edits", edits)
    app.router.add_post("/v1/images/variations", variations)
    add_health_routes(app)
    add_model_routes(app)
    if settings.admin.enabled:
        reloader = app[RELOADER]
        app.add_subapp(
            "/admin",
            create_admin_app(
                app[STORE],
                lambda: holder.current.settings,
                lambda: _reload_all(reloader),
                activity,
            ),
        )
    return app


def _reload_all(reloader: Reloader) -> tuple[Settings, list[str]]:
    runtime, needs_restart = reloader.reload_all()
    return runtime.settings, needs_restart


def _store(settings: Settings, metrics: Metrics, worker: int) -> Store:
    try:
        return create_store(settings.store, metrics, worker=worker, workers=settings.server.workers)
    except JournalError as exc:
        raise ConfigError("store.outbox_path", [str(exc)]) from exc


async def _resources(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE]
    await store.start()
    app[TRACING].start()  # here, in the serving process: its export thread is this process's
    pools = Pools()
    app[PIPELINE] = Pipeline(app[RUNTIME], pools, store, app[METRICS], app[BODIES])
    try:
        yield
    finally:
        # The pipeline's work has finished, or was cut and settled (shutdown.drain): what the
        # store still holds goes out now, within its own bound.
        await pools.close()
        # The last spans go out meanwhile (within their own bound, on a thread): no added wait.
        app[SETTLEMENTS_LOST][0], _ = await asyncio.gather(store.close(), app[TRACING].close())


async def generations(request: web.Request) -> web.StreamResponse:
    return await request.app[PIPELINE].handle(request, "generate")


async def edits(request: web.Request) -> web.StreamResponse:
    return await request.app[PIPELINE].handle(request, "edit")


async def variations(request: web.Request) -> web.StreamResponse:
    return await request.app[PIPELINE].handle(request, "variation")
