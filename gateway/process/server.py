"""Running the gateway: event loop, listening sockets, signals, workers, graceful shutdown.

One process serves with `serve`: the tenant port through the front door (`front.connections`) and
the operations port (`server.ops_port`: /metrics, /healthz, /readyz). With `server.workers: N`,
`supervise` listens on the tenant port itself and starts N worker processes; it deals them its
connections in turn (handoff.py: evenly, however few), while they share the operations port with
SO_REUSEPORT and one Prometheus multiprocess directory (so any worker's /metrics shows the whole
gateway), and receive the signals the supervisor gets.

Signals: SIGHUP re-reads the configuration (see reload.py). SIGTERM or SIGINT shuts down within
a known bound (shutdown.py): not ready at once, listeners closed after `drain_delay_seconds`,
in-flight work finished within `shutdown_grace_seconds` or cut and settled, the store flushed.
The exit status is EXIT_SETTLEMENTS_LOST when anything had to be given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import http_writer, web

from gateway.app import PIPELINE, RELOADER, create_app
from gateway.config import ConfigError, ServerSettings, Settings
from gateway.front.connections import FrontRunner, raise_file_limit
from gateway.health import METRICS, create_ops_app
from gateway.logs import get_logger
from gateway.process.garbage import GarbageCollection
from gateway.process.handoff import SUPERVISOR_WAIT, Dealer, HandedSite
from gateway.process.heap import keep_heap
from gateway.process.shutdown import IN_FLIGHT, RUNNER_SHUTDOWN_TIMEOUT, SETTLEMENTS_LOST, drain

log = get_logger("gateway.server")
T = TypeVar("T")
# `serve` exits with this status when settlements or releases were given up at shutdown.
EXIT_SETTLEMENTS_LOST = 3


class ListenError(Exception):
    """The listening socket could not be opened: the port is taken, the address is not ours, ..."""

    def __init__(self, host: str, port: int, exc: OSError) -> None:
        # asyncio words EADDRINUSE as "error while attempting to bind on address (...): ...": say
        # it once, plainly, as the C library names the errno.
        reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)
        super().__init__(f"cannot listen on {host}:{port}: {reason[:1].lower()}{reason[1:]}")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop where it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def write_unjoined() -> bool:
    """Let aiohttp hand a response's pieces (its head and a body piece) to uvloop's transport as
    they are, rather than joined into a copy first; whether it now does.

    On Python < 3.12.9 aiohttp joins them (`http_writer.SKIP_WRITELINES`) because asyncio's own
    socket transport got a `writelines` without flow control in 3.12 (CPython gh-127655; on 3.11
    its `writelines` joins anyway). uvloop's transport has its own, with flow control, which sends
    the pieces in one `writev`: a 64 KiB JSON answer is then not copied once more with its head.
    Only under uvloop; on asyncio's loop aiohttp's choice stands."""
    if type(asyncio.get_running_loop()).__module__.partition(".")[0] == "uvloop":
        http_writer.SKIP_WRITELINES = False
    return not http_writer.SKIP_WRITELINES


async def serve(
    settings: Settings,
    *,
    config_path: Path | None = None,
    on_ready: Callable[[str], None] | None = None,
    worker: int | None = None,
    channel: socket.socket | None = None,
    server_overrides: Mapping[str, Any] | None = None,
) -> int:
    """Serve until SIGTERM or SIGINT, then shut down (shutdown.py); the number of settlements lost
    at shutdown. Raises ListenError when the address cannot be bound.
    `worker`: this process is worker number `worker` under `supervise`, which hands it tenant
    connections over `channel` (handoff.py); `server_overrides`: the command line's
    `--host/--port`, already in `settings`."""
    app = create_app(settings, config_path=config_path, worker=worker or 0, server_overrides=server_overrides)
    reuse_port = worker is not None  # the workers share the operations port
    if reuse_port:  # a worker under `supervise`: admin reloads go through the supervisor
        app[RELOADER].supervisor_pid = os.getppid()
    server = settings.server
    file_limit = raise_file_limit()  # before the front door sizes its connection cap from it
    keep_heap()  # large answers relayed without growing and trimming the heap each time
    write_unjoined()  # an answer's head and body go to the client without a copy joining them
    runner = FrontRunner(app, handle_signals=False, access_log=None, shutdown_timeout=RUNNER_SHUTDOWN_TIMEOUT)
    await runner.setup()
    site = _tenant_site(runner, server, channel)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()  # the store and the upstream session were already opened
        raise ListenError(server.host, server.port, exc) from exc
    # Prometheus and probes pass the same front door, with a cap of their own
    ops_runner = FrontRunner(create_ops_app(app), listener="ops", handle_signals=False, access_log=None)
    await ops_runner.setup()
    ops_host = server.ops_host or server.host
    ops_site = web.TCPSite(ops_runner, ops_host, server.ops_port, reuse_port=reuse_port or None)
    try:
        await ops_site.start()
    except OSError as exc:
        await ops_runner.cleanup()
        await runner.cleanup()
        raise ListenError(ops_host, server.ops_port, exc) from exc
    url = f"http://{server.host}:{_bound_port(runner) or server.port}"
    # What startup built is frozen out of every collection from here on (garbage.py).
    collection = GarbageCollection(
        app[METRICS], lambda: max(len(app[IN_FLIGHT]), len(app[PIPELINE].tasks))
    )  # an admitted request has a handler and its pipeline's work: counted once
    collection.start()
    _log_store(settings)
    log.info(
        "gateway_started",
        url=url,
        ops_url=f"http://{ops_host}:{_bound_port(ops_runner) or server.ops_port}",
        max_connections=runner.door.bounds.max_connections,
        file_limit=file_limit,
        store=settings.store.backend,
        tenants=len(settings.tenants),
        pid=os.getpid(),
    )
    if on_ready is not None:
        on_ready(url)
    stop = _on_signals(app)
    try:
        await stop.wait()
    finally:
        # Once shutdown has begun, a repeated SIGTERM (a supervisor or orchestrator insisting) must
        # not kill the process after the loop's handlers are gone: shutdown is already under way.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        stopping = time.monotonic()
        await drain(app, runner, server, app[PIPELINE].tasks)
        await runner.cleanup()
        await ops_runner.cleanup()  # last: /healthz and /metrics answer while the tenant port drains
        await collection.close()
        lost = app[SETTLEMENTS_LOST][0]
        stopped = log.error if lost else log.info
        stopped("gateway_stopped", seconds=round(time.monotonic() - stopping, 3), settlements_lost=lost)
    return lost


def _tenant_site(runner: FrontRunner, server: ServerSettings, channel: socket.socket | None) -> web.BaseSite:
    """The tenant port's listener, or under `supervise` the connections handed over `channel`."""
    if channel is None:
        return web.TCPSite(runner, server.host, server.port, backlog=1024)
    wait = min(SUPERVISOR_WAIT, server.shutdown_grace_seconds)  # part of the grace
    return HandedSite(runner, channel, supervisor_wait=wait)


def _log_store(settings: Settings) -> None:
    """Which store holds the limits, said at every start: the memory store loudly."""
    store = settings.store
    if store.backend == "memory":
        log.warning(
            "store_in_memory",
            message="limits, budgets and the ledger live in this process only and start from zero at"
            " every restart; for Redis set store.backend: redis (GATEWAY_STORE_BACKEND=redis with"
            " config.example.yaml)",
        )
    else:
        log.info("store_selected", backend=store.backend, url=store.shown_url, cluster=store.cluster)


def _on_signals(app: web.Application) -> asyncio.Event:
    """SIGHUP reloads the configuration; SIGTERM and SIGINT set the event returned."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, app)
    return stop


def _reload(app: web.Application) -> None:
    with contextlib.suppress(ConfigError):  # logged by the reloader; the old configuration stays
        app[RELOADER].reload()


def _bound_port(runner: web.AppRunner) -> int | None:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return None


def supervise(settings: Settings, worker_argv: Sequence[str]) -> int:
    """Run `settings.server.workers` worker processes on one port, dealing them its connections in
    turn (handoff.py); forward signals; wait for all."""
    server = settings.server
    try:
        dealer = Dealer(server.host, server.port, server.workers)
    except OSError as exc:
        print(f"gateway: {ListenError(server.host, server.port, exc)}", file=sys.stderr)
        return 1
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    workers = []
    for index, channel in enumerate(dealer.worker_ends):
        argv = [*worker_argv, "--port", str(dealer.port), "--worker", str(index)]
        argv += ["--channel-fd", str(channel.fileno())]
        workers.append(
            subprocess.Popen([sys.executable, "-m", "gateway", *argv], env=env, pass_fds=[channel.fileno()])
        )
    dealer.start()
    log.info("workers_started", workers=len(workers), pids=[w.pid for w in workers], port=dealer.port)

    def forward(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)
        if signum != signal.SIGHUP:  # the workers close their sites after the drain delay: so do we
            stopping = threading.Timer(server.drain_delay_seconds, dealer.stop)
            stopping.daemon = True  # the workers' exit ends the supervisor, drain delay or not
            stopping.start()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        codes = [worker.wait() for worker in workers]
    finally:
        dealer.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("workers_stopped", exit_codes=codes)
    return max((abs(code) for code in codes), default=0)
