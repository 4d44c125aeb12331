"""Running the gateway: event loop, listening socket, signals, graceful shutdown.

SIGTERM or SIGINT stops accepting connections, marks the gateway not ready, lets in-flight
requests and streams finish within `server.shutdown_grace_seconds` (each settles its reservation
on the way out), closes the store and the upstream session, and returns.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from gateway.app import create_app
from gateway.health import DRAINING
from gateway.logs import get_logger
from gateway.settings import Settings

log = get_logger("gateway.server")


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine on uvloop where it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


async def serve(settings: Settings, *, on_ready: Callable[[str], None] | None = None) -> None:
    app = create_app(settings)
    server = settings.server
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, shutdown_timeout=server.shutdown_grace_seconds
    )
    await runner.setup()
    site = web.TCPSite(runner, server.host, server.port, backlog=1024, reuse_port=server.workers > 1)
    await site.start()
    url = f"http://{server.host}:{_bound_port(runner) or server.port}"
    log.info("gateway_started", url=url, store=settings.store.backend, tenants=len(settings.tenants))
    if on_ready is not None:
        on_ready(url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        app[DRAINING][0] = True
        log.info("gateway_stopping", grace_seconds=server.shutdown_grace_seconds)
        await runner.cleanup()
        log.info("gateway_stopped")


def _bound_port(runner: web.AppRunner) -> int | None:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return None
