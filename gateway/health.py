"""Liveness, readiness and the Prometheus scrape endpoint, and the operations listener's app.

`/healthz` answers while the process serves; `/readyz` says whether new traffic should come here
(not while shutting down, nor while a fail-closed store is unreachable); both are on the tenant port
and on the operations port. `/metrics` exposes the app's registry, or every worker's metrics when
several processes share a multiprocess directory, on the operations port only (`server.ops_port`):
it names every tenant, its spend and budget, which are no tenant's business.
"""

from __future__ import annotations

import os

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.limits import Store
from gateway.runtime import RuntimeHolder
from gateway.telemetry.metrics import ConfigCollector, Metrics

METRICS = web.AppKey("metrics", Metrics)
STORE = web.AppKey("store", Store)
RUNTIME = web.AppKey("runtime", RuntimeHolder)
DRAINING = web.AppKey("draining", list[bool])


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    if app[DRAINING][0]:
        return web.json_response({"status": "draining"}, status=503)
    store_ok = await app[STORE].healthy()
    settings = app[RUNTIME].current.settings.store
    if not store_ok and settings.on_unavailable == "fail_closed":
        return web.json_response({"status": "store_unavailable"}, status=503)
    return web.json_response({"status": "ready", "store": "up" if store_ok else "degraded"})


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS].registry
    multiproc_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if multiproc_dir:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=multiproc_dir)  # type: ignore[no-untyped-call]
        runtime = request.app[RUNTIME]
        registry.register(ConfigCollector(lambda: runtime.current.settings))
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_health_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def create_ops_app(gateway: web.Application) -> web.Application:
    """The operations listener's app: /metrics, /healthz and /readyz of `gateway`'s own state."""
    ops = web.Application()
    ops[METRICS], ops[STORE] = gateway[METRICS], gateway[STORE]
    ops[RUNTIME], ops[DRAINING] = gateway[RUNTIME], gateway[DRAINING]
    add_health_routes(ops)
    ops.router.add_get("/metrics", metrics)
    return ops
