"""Graceful shutdown inside a known bound: what SIGTERM (or SIGINT) sets off, step by step.

    t = 0                      /readyz answers 503 (draining); requests are still accepted
    t = drain_delay            the listeners close (a worker's after it took every connection
                               the supervisor handed it), idle keep-alive connections are closed
                               (not those whose next request has begun to arrive: they close
                               once it is answered)
    ... until drain_delay + grace: in-flight requests and streams finish on their own
    at drain_delay + grace     what is still running is cut off (its connection closes without
                               a final chunk: a truncated answer), and settles on the way out (at
                               the estimate once its body reached the upstream), for at most
                               CUT_SETTLE_SECONDS
    then                       the upstream session and the store close: the outbox delivers
                               what it holds for at most outbox.CLOSE_DEADLINE seconds and logs
                               what it must give up (`settlement_lost`); calls still unanswered
                               get batching.CLOSE_WAIT more

So the process exits within `drain_delay_seconds + shutdown_grace_seconds + MARGIN_SECONDS`, and
orchestrators must allow that (Kubernetes: `terminationGracePeriodSeconds`). aiohttp's own
shutdown is not used for the waiting: it waits its timeout, cancels, then waits it again.

The grace counts from t = drain_delay: a worker's wait there for the supervisor to stop dealing it
connections (at most handoff.SUPERVISOR_WAIT) is part of it.

The request middleware (gateway/front/access_log.py) keeps every running handler in `IN_FLIGHT`,
so requests not yet admitted (still uploading, waiting for their admission) are waited for and cut
like admitted ones.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from gateway.config import ServerSettings
from gateway.front.connections import FrontRunner
from gateway.health import DRAINING
from gateway.limits.batching import CLOSE_WAIT
from gateway.limits.outbox import CLOSE_DEADLINE
from gateway.logs import get_logger

log = get_logger("gateway.server")

CUT_SETTLE_SECONDS = 1.5
MARGIN_SECONDS = CUT_SETTLE_SECONDS + CLOSE_DEADLINE + CLOSE_WAIT  # 5 s
# aiohttp's cleanup, once every handler has finished: nothing should be left for it to wait on.
RUNNER_SHUTDOWN_TIMEOUT = 0.25

IN_FLIGHT = web.AppKey("in_flight", set[asyncio.Task[object]])
# How many settlements and releases the store gave up when it closed (the exit status says so).
SETTLEMENTS_LOST = web.AppKey("settlements_lost", list[int])


async def drain(
    app: web.Application,
    runner: FrontRunner,
    server: ServerSettings,
    admitted: set[asyncio.Task[None]],
) -> None:
    """Everything before the resources close: readiness off, listeners closed, work finished or
    cut. `admitted` is the pipeline's work, which must settle before the store closes."""
    loop = asyncio.get_running_loop()
    app[DRAINING][0] = True
    log.info(
        "gateway_stopping",
        drain_delay_seconds=server.drain_delay_seconds,
        grace_seconds=server.shutdown_grace_seconds,
        exits_within_seconds=server.drain_delay_seconds + server.shutdown_grace_seconds + MARGIN_SECONDS,
    )
    if server.drain_delay_seconds:
        await asyncio.sleep(server.drain_delay_seconds)  # load balancers see /readyz 503 meanwhile
    deadline = loop.time() + server.shutdown_grace_seconds
    for site in list(runner.sites):
        await site.stop()  # a worker's first takes every connection already handed to it (handoff.py)
    # idle keep-alive connections close; busy ones after their answer, as do those whose next
    # request has begun to arrive (`arriving`: their tasks end once it is answered)
    arriving = runner.door.close_all()
    running = _running(app, admitted, arriving)
    if running:
        log.info("draining_requests", in_flight=len(running), grace_seconds=server.shutdown_grace_seconds)
    while running and loop.time() < deadline:
        await asyncio.wait(running, timeout=deadline - loop.time())
        running = _running(app, admitted, arriving)
    if not running:
        return
    cut = set(admitted)
    log.warning("requests_cut", in_flight=len(running), admitted=len(cut))
    for task in cut:  # first the admitted work: each settles as it unwinds
        task.cancel()
    if cut:
        await asyncio.wait(cut, timeout=CUT_SETTLE_SECONDS)
    for leftover in _running(app, admitted, arriving):  # not admitted yet: nothing to settle
        leftover.cancel()


def _running(
    app: web.Application, admitted: set[asyncio.Task[None]], arriving: set[asyncio.Task[None]]
) -> set[asyncio.Task[Any]]:
    return {task for task in (*app[IN_FLIGHT], *admitted, *arriving) if not task.done()}
