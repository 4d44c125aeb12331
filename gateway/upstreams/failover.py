"""The failover rules: which targets a request is sent to, and when the next one may be tried.

The next target is tried only when the previous attempt cannot have produced a billed image:

* no connection could be made (refused, DNS, TLS, connect timeout, the pool or the tenant's share
  of it stayed busy), so the upstream never had the request;
* the upstream answered 429, 502, 503 or 504 (or 500, where the route lists it in `retry_on`):
  an answer that is not an image, before any body byte reached the client.

Never after a read timeout or a dropped connection once the body was sent (the upstream may be
generating: a second attempt could bill a second image), after any other 4xx (the request is
wrong everywhere: relayed as it is), or after a 500 by default. When the last possible target
answers a retryable status, that answer is relayed as the upstream gave it (in OpenAI's shape if
it was not: `transport.openai_error`); when it could not be reached, the client gets the gateway's
502/504. Ejected and cooling upstreams are skipped without
a connection attempt (see `health`); if every target of a route is ejected, they are tried anyway
(one sick upstream is better than none). A target whose provider quota is spent is skipped too;
when every target was skipped for quota or cool-down, the client gets 429 with the earliest
`Retry-After`.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import GatewayError, RateLimited, StoreUnavailable
from gateway.requests.model import PATHS, ClientRequest
from gateway.runtime import Route, Target
from gateway.telemetry.metrics import KeptCounter, Metrics
from gateway.telemetry.tracing import NO_ATTEMPT, OFF, AttemptTrace, RequestTrace
from gateway.upstreams import transport
from gateway.upstreams.client import Response
from gateway.upstreams.health import Health, Verdict, cool_down_seconds
from gateway.upstreams.pools import Pools, Share, TenantShareBusy
from gateway.upstreams.quota import Held, ProviderQuota
from gateway.upstreams.targets import body_for, ordered, refuses
from policies.cost import Cost
from policies.engine import Adjustment

_RETRYABLE = frozenset({429, 502, 503, 504})


@dataclass(slots=True)
class Attempt:
    upstream: str
    outcome: str  # ok, http_<status>, a gateway error code, or skipped_<why>
    duration_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"upstream": self.upstream, "outcome": self.outcome, "duration_ms": self.duration_ms}


@dataclass(slots=True)
class Attempts:
    """What one request's forwarding did: for settlement, the access log and headers."""

    log: list[Attempt] = field(default_factory=list)
    provider: list[Held] = field(default_factory=list)  # provider reservations, in attempt order
    waits_ms: list[int] = field(default_factory=list)  # when each skipped target frees up
    # The upstream may be generating: from sending the body until it answers with an error or the
    # send fails before reaching it. Cut off meanwhile (shutdown), the request is billed.
    reached: bool = False
    trace: RequestTrace = OFF  # the request's trace: a span per attempt, an event per skip
    sending: AttemptTrace = NO_ATTEMPT  # the span of the attempt under way

    @property
    def last_tried(self) -> str | None:
        """The upstream of the last attempt actually sent (the one that answered, or failed last)."""
        tried = [a.upstream for a in self.log if not a.outcome.startswith("skipped_")]
        return tried[-1] if tried else None


@dataclass(slots=True)
class Exchange:
    """The answer to relay: the upstream's response, who gave it and what it was sent."""

    response: Response
    target: Target
    body: dict[str, Any]
    adjustments: tuple[Adjustment, ...]
    forwarded_at: float
    share: Share  # the tenant's connection share, until the relay ends


@dataclass(slots=True)
class Request:
    """What every attempt of one request needs."""

    route: Route
    client: ClientRequest  # the operation, and the uploaded files an edit re-sends to each target
    body: Mapping[str, Any]  # as evaluated (public model name)
    estimate: Cost
    tenant: str
    request_id: str
    headers: Mapping[str, str]


class Forwarder:
    def __init__(
        self, pools: Pools, health: Health, quota: ProviderQuota, metrics: Metrics, rng: random.Random
    ) -> None:
        self.pools = pools
        self.health = health
        self.quota = quota
        self.metrics = metrics
        self.attempted = KeptCounter(metrics, metrics.upstream_attempts)
        self.rng = rng

    async def forward(self, request: Request, attempts: Attempts) -> Exchange:
        """Send the request to the first target that answers with something other than a failure
        that made no image; raise the gateway's error when none could be reached."""
        # Closed here, not left to the garbage collector: an async generator abandoned unfinished
        # is closed by a task the event loop schedules from another thread's wake-up.
        async with contextlib.aclosing(self._candidates(request, attempts)) as candidates:
            target = await anext(candidates, None)
            if target is None:
                raise self._nothing_to_try(request.route, attempts)
            while True:
                sent, adjustments = body_for(target, request.body)
                started = time.perf_counter()
                try:
                    response, share = await self._send(target, sent, request, attempts)
                except GatewayError as error:
                    if not self._may_fail_over(error, target, started, attempts):
                        raise  # it may be generating: never a second attempt
                    following = await anext(candidates, None)
                    if following is None:
                        raise
                else:
                    if not self._retryable(response, target, started, attempts, request.route):
                        return Exchange(response, target, sent, adjustments, started, share)
                    try:
                        following = await anext(candidates, None)
                    except BaseException:
                        response.release()
                        share.release()
                        raise
                    if following is None:  # the last failure, relayed as the upstream gave it
                        return Exchange(response, target, sent, adjustments, started, share)
                    attempts.reached = False  # it answered without an image
                    response.release()
                    share.release()
                self._failed_over(request.route, target, following)
                target = following

    async def _send(
        self, target: Target, sent: dict[str, Any], request: Request, attempts: Attempts
    ) -> tuple[Response, Share]:
        """One attempt: the tenant's share of the pool, then the request; the share stays held
        with the response (given back here on any failure, cancellation included)."""
        client = request.client
        body = client.upstream_body(sent)
        headers = transport.upstream_headers(target, request.headers, request.request_id, body)
        path = PATHS[client.operation]
        attempts.sending = attempts.trace.attempt(target, path, headers)  # and its traceparent
        share = await self.pools.share(target, request.tenant)
        try:
            attempts.reached = True
            response = await transport.send(self.pools.pool(target), target, path, body, headers)
        except BaseException:
            share.release()
            raise
        attempts.sending.answered(response.status)
        return response, share

    def _may_fail_over(self, error: GatewayError, target: Target, started: float, attempts: Attempts) -> bool:
        """Whether a failed send never reached the upstream (so no image can exist)."""
        busy = isinstance(error, TenantShareBusy)  # the tenant's own share: no sign of sickness
        never = busy or transport.never_reached(error.__cause__)
        self._record(attempts, target, error.error_code or "error", started, "neutral" if busy else "failure")
        if never:
            attempts.reached = False
        return never

    def _retryable(
        self,
        response: Response,
        target: Target,
        started: float,
        attempts: Attempts,
        route: Route,
    ) -> bool:
        """Whether the upstream's answer is a failure that made no image (429, 502, 503, 504, and
        500 where the route says so); records what it says of the upstream's health."""
        status = response.status
        if status in _RETRYABLE or status in route.retry_on:
            limited = status == 429
            cool = cool_down_seconds(response.headers) if limited else 0.0
            verdict: Verdict = "rate_limited" if limited else "failure"
            self._record(attempts, target, f"http_{status}", started, verdict, cool=cool)
            return True
        verdict = "failure" if status >= 500 else "neutral" if status in (401, 403) else "ok"
        self._record(attempts, target, "ok" if status < 400 else f"http_{status}", started, verdict)
        return False

    async def _candidates(self, request: Request, attempts: Attempts) -> AsyncGenerator[Target]:
        """The targets to try, in order: those in rotation with room in their provider quota."""
        order = ordered(request.route, self.rng)
        ejected: list[Target] = []
        yielded = False
        for target in order:
            if request.client.operation not in target.operations:
                self._skipped(attempts, target, "operation")  # e.g. an edit to DigitalOcean: never sent
                continue
            if len(order) > 1 and refuses(target, request.body, request.client.operation):
                self._skipped(attempts, target, "flavor")  # e.g. a size DigitalOcean does not take
                continue
            state = self.health.admit(target.upstream_name, target.upstream)
            if state in ("ejected", "cooling"):
                self._skipped(attempts, target, state)
                if state == "ejected":
                    ejected.append(target)
                else:
                    attempts.waits_ms.append(self.health.cool_left_ms(target.upstream_name))
                continue
            if await self._reserve_quota(request, target, attempts):
                yielded = True
                yield target
            elif state == "probe":
                self.health.release_probe(target.upstream_name)
        if not yielded:
            for target in ejected:  # every target is out of rotation: try them anyway
                if await self._reserve_quota(request, target, attempts):
                    yield target

    async def _reserve_quota(self, request: Request, target: Target, attempts: Attempts) -> bool:
        admission = await self.quota.reserve(
            target, request.estimate, request_id=request.request_id, model=request.route.name
        )
        if admission is None:
            return True
        if admission.reservation is not None:
            attempts.provider.append(Held(target.upstream_name, admission.reservation))
            return True
        if isinstance(admission.error, StoreUnavailable):
            raise admission.error
        self._skipped(attempts, target, "quota")
        retry = admission.headers.get("retry-after-ms")
        if retry is not None:
            attempts.waits_ms.append(int(retry))
        return False

    def _skipped(self, attempts: Attempts, target: Target, why: str) -> None:
        attempts.log.append(Attempt(target.upstream_name, f"skipped_{why}"))
        attempts.trace.skipped(target.upstream_name, why)
        self.attempted.inc((target.upstream_name, f"skipped_{why}"))

    def _record(
        self,
        attempts: Attempts,
        target: Target,
        outcome: str,
        started: float,
        verdict: Verdict,
        *,
        cool: float = 0,
    ) -> None:
        elapsed = round((time.perf_counter() - started) * 1000, 3)
        attempts.log.append(Attempt(target.upstream_name, outcome, elapsed))
        attempts.sending.end(outcome)
        self.attempted.inc((target.upstream_name, outcome))
        self.health.record(target.upstream_name, target.upstream, verdict, cool)

    def _failed_over(self, route: Route, source: Target, following: Target) -> None:
        self.metrics.failovers.labels(route.name, source.upstream_name, following.upstream_name).inc()

    @staticmethod
    def _nothing_to_try(route: Route, attempts: Attempts) -> GatewayError:
        """Every target was skipped (cooling down after a 429, or its provider quota spent): 429,
        with the earliest time one of them frees up. Nothing was sent."""
        wait_ms = max(1, min(attempts.waits_ms, default=1000))
        return RateLimited(
            f"Every upstream serving {route.name!r} is rate limited or out of the organisation's quota"
            f" there; retry in {wait_ms / 1000:g} s.",
            headers={"Retry-After": str(-(-wait_ms // 1000)), "retry-after-ms": str(wait_ms)},
        )
