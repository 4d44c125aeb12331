"""The image-generation pipeline: one request from key to settlement, in DESIGN.md's order.

auth -> parse -> policy -> estimate -> admit -> forward -> relay -> settle -> record. Each stage
lives in its own module; this one only sequences them and guarantees that an admitted request is
settled exactly once, whatever happens after admission (upstream error, client gone, shutdown).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from gateway.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    PolicyViolation,
    UpstreamAuthFailed,
    drop_tracebacks,
)
from gateway.front.access_log import RECORD, RequestRecord
from gateway.front.admission import AdmissionQueue
from gateway.front.auth import Credential
from gateway.front.body import BodyBudget, BodyReader
from gateway.limits import Admission, Reservation, Store, merge_upstream_limit_headers
from gateway.logs import get_logger
from gateway.process.shutdown import CUT_SETTLE_SECONDS
from gateway.relay import RelayOutcome, relay
from gateway.requests.model import ClientRequest, read_request
from gateway.runtime import Route, Runtime, RuntimeHolder, Target
from gateway.telemetry.charges import ChargeMetrics
from gateway.telemetry.metrics import KeptGauge, KeptHistogram, Metrics
from gateway.upstreams import transport as upstream
from gateway.upstreams.client import Response
from gateway.upstreams.failover import Attempts, Exchange, Forwarder, Request
from gateway.upstreams.health import Health
from gateway.upstreams.pools import Pools
from gateway.upstreams.quota import ProviderQuota
from gateway.upstreams.targets import covering_estimate
from policies.catalog import ModelEntry
from policies.cost import Cost, actual_cost
from policies.end_user import end_user
from policies.engine import Decision, evaluate
from policies.entry import Operation
from policies.findings import SHOWN_CHARS, shown

log = get_logger("gateway.pipeline")


@dataclass(slots=True)
class Admitted:
    """An admitted request: what must be settled, and against what estimate."""

    decision: Decision
    route: Route
    estimate: Cost
    admission: Admission
    reservation: Reservation
    client: ClientRequest
    attempts: Attempts = field(default_factory=Attempts)
    served: Exchange | None = None  # the answer relayed, once one was chosen

    @property
    def entry(self) -> ModelEntry:
        """The catalog entry of the prices charged: the serving target's, else the route's."""
        target: Target = self.served.target if self.served is not None else self.route.targets[0]
        assert target.entry is not None
        return target.entry

    @property
    def body(self) -> dict[str, Any]:
        """The body as the serving upstream got it (what its usage is priced on)."""
        return self.served.body if self.served is not None else self.decision.body


class Pipeline:
    def __init__(
        self, runtime: RuntimeHolder, pools: Pools, store: Store, metrics: Metrics, budget: BodyBudget
    ) -> None:
        self.runtime = runtime
        self.budget = budget  # bodies being read, each tenant's share of it
        self.store = store
        self.metrics = metrics
        self.charges = ChargeMetrics(metrics)
        # The process's bound is restart-only (`server`); each tenant's share of it is its request's.
        self.admissions = AdmissionQueue(runtime.current.settings.server.max_pending_admissions, metrics)
        self.quota = ProviderQuota(store, metrics)
        self.forwarder = Forwarder(pools, Health(metrics), self.quota, metrics, random.Random())
        self.tasks: set[asyncio.Task[None]] = set()
        self.in_flight = KeptGauge(metrics, metrics.in_flight)
        self.open_streams = KeptGauge(metrics, metrics.open_streams)
        self.upstream_ttfb = KeptHistogram(metrics, metrics.upstream_ttfb)
        self.first_event = KeptHistogram(metrics, metrics.first_event)

    async def handle(self, request: web.Request, operation: Operation = "generate") -> web.StreamResponse:
        runtime = self.runtime.current
        record = request[RECORD]
        record.operation = operation
        credential = runtime.credentials.authenticate(request.headers.get("Authorization"))
        record.tenant, record.key = credential.tenant, credential.key_label
        # Beyond its bound: 503 overloaded; beyond the tenant's share of it: 429. Before the body.
        # The shares are this configuration's: by default they follow the tenants at a reload.
        with self.admissions.place(credential.tenant, runtime.tenant_pending_admissions):
            bodies = BodyReader(self.budget, credential.tenant, runtime.tenant_buffered_body_bytes)
            client = await read_request(request, operation, runtime.settings.server, bodies, runtime.catalog)
            record.fields.update(client.log_fields())
            try:
                with record.trace.stage("policy"):
                    decision = self.apply_policy(runtime, credential, client, record)
                record.trace.describe(decision.body)
                with record.trace.stage("admission"):
                    admitted = await self.admit(runtime, credential, decision, client, record)
            except BaseException:
                client.close()  # an upload's spooled files go with the request, on every path
                raise
        # From here the work is owned by the pipeline, not by the connection: if the handler is
        # cancelled (client gone, shutdown), the upstream is still drained and the request settled.
        loop = request.task.get_loop()  # (asyncio's own look-up is a getpid() system call on 3.11)
        answered: asyncio.Future[web.StreamResponse] = loop.create_future()
        answered.add_done_callback(_retrieve)
        work = loop.create_task(self.serve(request, runtime, credential, admitted, record, answered=answered))
        self.tasks.add(work)
        work.add_done_callback(lambda task: self._forget(task, client))
        record.pending = work  # the access-log line waits for the settlement
        # Not shielded: a cancelled handler cancels `answered` only, which `serve` then leaves be.
        return await answered

    async def serve(
        self,
        request: web.Request,
        runtime: Runtime,
        credential: Credential,
        admitted: Admitted,
        record: RequestRecord,
        *,
        answered: asyncio.Future[web.StreamResponse],
    ) -> None:
        """Forward, relay and settle an admitted request; settles exactly once on every path.

        `answered` gets the response (or the error to answer with) once the relay is done, and the
        settlement goes on after it: the client's connection takes its next request meanwhile,
        instead of waiting a store round trip. Its store call is queued first; where the store
        takes calls in the order they are made (`Store.settles_in_order`: the memory store, a plain
        `redis://` connection), a next request on the connection reaches the store after it, so a
        sequential client never finds its own finished request holding a concurrency slot. On
        other connections (TLS, unix socket, cluster) a request that holds one answers once settled.
        """
        answer: web.StreamResponse | BaseException | None = None  # None: not served (a bug)
        loop = answered.get_loop()  # (asyncio's own look-up is a getpid() system call on 3.11)
        try:
            with self.in_flight:
                outcome: RelayOutcome | None = None
                try:
                    self.store.hold(admitted.reservation)  # its concurrency leases, renewed until settled
                    # Its rate-limit headers are rendered while the upstream works: called soon, so
                    # once this step has sent the upstream request (or waits for a connection).
                    loop.call_soon(admitted.admission.render)
                    answer, outcome = await self.forward_and_relay(request, runtime, admitted, record)
                except GatewayError as error:
                    error.headers.update(admitted.admission.headers)
                    self.metrics.upstream_errors.labels(record.upstream, error.error_code or "error").inc()
                    log.warning("upstream_failed", error=error.error_code, upstream=record.upstream)
                    answer = error
                except BaseException as exc:  # cancelled (shutdown cut it), or a bug: settled all the same
                    answer = exc
                if isinstance(answer, web.StreamResponse | GatewayError):
                    record.answer(answer.status)  # its metrics count before it settles
                with record.trace.stage("settlement"):
                    settling = loop.create_task(self.settle(credential, admitted, outcome, record))
                    if self.store.settles_in_order or not admitted.reservation.holds_leases:
                        # Answered in this turn: the settlement's first step was scheduled first,
                        # so it queues its store call before the handler even resumes.
                        _answer(answered, answer)
                    await _settled(settling)
        finally:
            _answer(answered, answer)  # whatever happened above, the handler gets its answer
        if isinstance(answer, asyncio.CancelledError):
            raise answer

    def _forget(self, task: asyncio.Task[None], client: ClientRequest) -> None:
        """The work is over (one done callback, not one per concern: each is a loop turn's call)."""
        self.tasks.discard(task)
        client.close()  # an upload's spooled files go with the request
        if not task.cancelled():
            task.exception()  # retrieved: `_settled` logged a settlement that failed

    def apply_policy(
        self, runtime: Runtime, credential: Credential, client: ClientRequest, record: RequestRecord
    ) -> Decision:
        policy = runtime.policies[credential.tenant]
        decision = evaluate(policy, runtime.catalog, runtime.targets, client.body, client.inputs)
        record.stream = decision.body.get("stream") is True
        if decision.model in runtime.routes:
            record.model = decision.model
            record.upstream = runtime.routes[decision.model].targets[0].upstream_name
        if decision.error is not None:
            raise InvalidRequest(
                decision.error.message,
                param=decision.error.param,
                code=decision.error.code or "invalid_value",
            )
        tenant = credential.tenant
        for violation in decision.violations:
            outcome = "shadow_deny" if decision.shadow else "deny"
            self.metrics.policy_decisions.labels(tenant, violation.rule, outcome).inc()
        for adjustment in decision.adjustments:
            self.metrics.policy_decisions.labels(tenant, adjustment.param, "adjusted").inc()
        if decision.violations:
            log.info(
                "policy_violated",
                shadow=decision.shadow,
                rules=[v.rule for v in decision.violations],
            )
        if not decision.allowed:
            first = decision.violations[0]
            raise PolicyViolation(
                _violation_message(decision),
                param=first.param,
                violations=[v.to_dict() for v in decision.violations],
            )
        return decision

    async def admit(
        self,
        runtime: Runtime,
        credential: Credential,
        decision: Decision,
        client: ClientRequest,
        record: RequestRecord,
    ) -> Admitted:
        assert decision.model is not None and decision.entry is not None  # allowed decisions name both
        route = runtime.routes[decision.model]
        cost = covering_estimate(route, decision.body, client.inputs)
        plan = runtime.limit_plan(credential, end_user(decision.body))
        admission = await self.store.reserve(plan, cost, request_id=record.request_id, model=decision.model)
        if not admission.allowed or admission.reservation is None:
            error = admission.error or InvalidRequest("The request was not admitted.")
            error.headers = {**admission.headers, **error.headers}
            raise error
        record.fields["estimate_tokens"] = cost.tokens
        attempts = Attempts(trace=record.trace)
        return Admitted(decision, route, cost, admission, admission.reservation, client, attempts)

    async def forward_and_relay(
        self, request: web.Request, runtime: Runtime, admitted: Admitted, record: RequestRecord
    ) -> tuple[web.StreamResponse, RelayOutcome]:
        forwarding = Request(
            admitted.route,
            admitted.client,
            admitted.decision.body,
            admitted.estimate,
            record.tenant,
            record.request_id,
            request.headers,
        )
        try:
            exchange = await self.forwarder.forward(forwarding, admitted.attempts)
        finally:
            record.fields["attempts"] = [attempt.to_dict() for attempt in admitted.attempts.log]
            record.upstream = admitted.attempts.last_tried or record.upstream  # who answered or failed
        admitted.served = exchange
        with exchange.share, exchange.response:  # the tenant's connection, until the relay is done
            return await self.relay_answer(request, runtime, admitted, exchange, record)

    async def relay_answer(
        self,
        request: web.Request,
        runtime: Runtime,
        admitted: Admitted,
        exchange: Exchange,
        record: RequestRecord,
    ) -> tuple[web.StreamResponse, RelayOutcome]:
        response, target = exchange.response, exchange.target
        name = record.upstream = target.upstream_name
        admitted.attempts.reached = response.status < 400
        if response.status in (401, 403):
            # The organisation's key was refused: a tenant must neither see its fragments nor
            # think its own key is wrong.
            response.release()
            log.error("upstream_auth_failed", upstream=name, status=response.status)
            raise UpstreamAuthFailed(f"The gateway's credentials for upstream {name!r} were refused.")
        self.upstream_ttfb.observe((name,), time.perf_counter() - exchange.forwarded_at)
        headers = self.response_headers(response, admitted, record)
        if response.status >= 400:
            self.metrics.upstream_errors.labels(name, f"http_{response.status}").inc()
        streaming = response.headers.get("Content-Type", "").startswith("text/event-stream")
        if streaming:
            self.open_streams.value += 1
        record.trace.served(target)
        try:
            with record.trace.stage("relay"):
                outcome = await relay(request, response, headers, target)
        finally:
            if streaming:
                self.open_streams.value -= 1
        record.status = outcome.status
        if outcome.first_byte_at is not None:
            record.ttfb_ms = round((outcome.first_byte_at - record.started) * 1000, 3)
            if outcome.streaming:
                record.trace.first_event(outcome.first_byte_at)
                self.first_event.observe(
                    (record.tenant, record.model), outcome.first_byte_at - record.started
                )
        if outcome.failure is not None:
            code = record.fields["upstream_failure"] = outcome.failure.error_code or "failure"
            record.trace.failed(code)
            self.metrics.upstream_errors.labels(name, code).inc()
            log.warning(
                "upstream_failed_mid_response",
                error=outcome.failure.error_code,
                client_gone=outcome.client_gone,
            )
        elif (stream_error := outcome.reader.error) is not None:
            # The upstream reported a failure inside a 200 stream: relayed as it is, counted as one.
            record.trace.failed("stream_error")
            self.metrics.upstream_errors.labels(name, "stream_error").inc()
            log.warning("upstream_stream_error", error=stream_error.get("code") or stream_error.get("type"))
        return outcome.response, outcome

    def response_headers(
        self, response: Response, admitted: Admitted, record: RequestRecord
    ) -> CIMultiDict[str]:
        headers = upstream.relayable_headers(response.headers)
        # Each name the merge returns replaces the upstream's (names distinct ignoring case).
        headers.update(merge_upstream_limit_headers(admitted.admission.headers, headers))
        adjustments = admitted.decision.adjustments
        if admitted.served is not None:
            adjustments += admitted.served.adjustments
            headers["x-gateway-upstream"] = admitted.served.target.upstream_name
        if adjustments:
            headers["x-gateway-adjusted"] = "; ".join(
                f"{a.param}={_plain(a.before)}->{_plain(a.after)} ({a.reason})" for a in adjustments
            )
        headers["x-request-id"] = record.request_id
        return headers

    async def settle(
        self, credential: Credential, admitted: Admitted, outcome: RelayOutcome | None, record: RequestRecord
    ) -> None:
        """Replace the reservation with what the upstream reported, exactly once, on every path."""
        try:
            actual, how = self.actual(admitted, outcome)
        except Exception:  # a bug: still settled (at the estimate), so its leases are released
            log.exception("usage_unreadable")
            actual, how = admitted.estimate, "estimate"
        label = "ok" if outcome is not None and _succeeded(outcome) else "failed"
        attempts = admitted.attempts
        settled = self.store.settle(admitted.reservation, actual, outcome=label)
        if attempts.provider:
            # The tenant's store call is made in this step (awaited here, not wrapped in a task as
            # `gather` would): `serve` answers the handler counting on it being queued already.
            providers = asyncio.ensure_future(
                self.quota.settle(attempts.provider, attempts.last_tried, actual, outcome=label)
            )
            try:
                await settled
            finally:
                await providers
        else:
            await settled
        tenant, model = credential.tenant, record.model
        self.record_usage(tenant, model, admitted, actual, how)
        if outcome is not None and outcome.client_gone:
            self.metrics.clients_gone.labels(tenant, model).inc()
        record.fields.update(
            settled=how,
            images=actual.images,
            tokens_text_in=actual.text_in_tokens,
            tokens_image_in=actual.image_in_tokens,
            tokens_image_out=actual.image_out_tokens,
            usd=actual.usd,
            client_gone=outcome.client_gone if outcome else False,
        )

    def actual(self, admitted: Admitted, outcome: RelayOutcome | None) -> tuple[Cost, str]:
        """The cost to settle at, and how it was known: usage, refund or estimate."""
        if outcome is None and admitted.attempts.reached:
            return admitted.estimate, "estimate"  # cut off after the upstream accepted the work
        if outcome is None or outcome.status >= 400:
            return Cost(), "refund"  # nothing was generated: only the request itself counts
        reader = outcome.reader
        cost = actual_cost(admitted.body, reader.usage, reader.images, admitted.entry)
        if cost is not None and outcome.failure is not None and reader.images < admitted.estimate.images:
            # Cut off between images: those still under way may be billed upstream, unreported.
            return admitted.estimate, "estimate"
        if cost is not None:
            return cost, "usage"
        # A 2xx answer, JSON or a stream however early it broke, means the upstream took the work,
        # unless it said it failed before it sent any image, partial or final: nothing was made.
        if reader.error is not None and not reader.image_events:
            return Cost(), "refund"
        return admitted.estimate, "estimate"

    def record_usage(self, tenant: str, model: str, admitted: Admitted, actual: Cost, how: str) -> None:
        """Count what was charged, as the ledger and the budgets were: from usage or at the estimate."""
        if how == "estimate":
            log.warning("usage_missing", settled_at="estimate")
        elif how != "usage":
            return  # refunded: nothing charged
        body = admitted.body
        labels = (tenant, model, how, _size_label(body, admitted.entry), str(body.get("quality", "auto")))
        self.charges.record(labels, actual, admitted.estimate.tokens)


async def _settled(settling: asyncio.Future[None]) -> None:
    """Wait for the settlement; one that failed is logged (the client has its answer already).
    Shutdown's cut does not orphan it: it is waited for CUT_SETTLE_SECONDS more, then the cut
    goes on."""
    try:
        await asyncio.shield(settling)
    except asyncio.CancelledError:
        await asyncio.wait({settling}, timeout=CUT_SETTLE_SECONDS)
        raise
    except Exception:
        log.exception("settlement_failed")


def _answer(
    answered: asyncio.Future[web.StreamResponse], result: web.StreamResponse | BaseException | None
) -> None:
    if answered.done():
        return
    if result is None:
        result = InternalError("The request was not served.")
    if isinstance(result, asyncio.CancelledError):
        answered.cancel()
    elif isinstance(result, BaseException):
        if isinstance(result, GatewayError):  # rendered, never logged: its frames hold `answered`
            drop_tracebacks(result)
        answered.set_exception(result)
    else:
        answered.set_result(result)


def _retrieve(answered: asyncio.Future[web.StreamResponse]) -> None:
    """An answer whose handler was cancelled (the client left) is never awaited: retrieved here."""
    if not answered.cancelled():
        answered.exception()


def _succeeded(outcome: RelayOutcome) -> bool:
    """A whole 2xx answer without an error inside it (a stream's `error` event)."""
    return outcome.status < 400 and outcome.failure is None and outcome.reader.error is None


def _size_label(body: dict[str, Any], entry: ModelEntry) -> str:
    """A bounded label: the model's listed sizes and `auto`; any other (gpt-image-2's free sizes)
    is `custom`."""
    size = str(body.get("size", "auto"))
    return size if size == "auto" or size in entry.sizes else "custom"


def _plain(value: Any) -> str:
    """A value for the `x-gateway-adjusted` header: printable ASCII only, whatever a client sent."""
    text = "unset" if value is None else value if isinstance(value, str) else shown(value)
    text = text[:SHOWN_CHARS]
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _violation_message(decision: Decision) -> str:
    parts = [v.message for v in decision.violations]
    return "Request violates the tenant's policy: " + " ".join(parts)
