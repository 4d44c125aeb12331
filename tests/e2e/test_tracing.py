"""Tracing end to end: the real `openai` SDK sends a W3C traceparent, the gateway continues the
trace, sends its own traceparent upstream, and exports the spans over OTLP/HTTP to a real HTTP
server that decodes the protobuf export requests (tests/support/otlp_receiver.py)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.mock_upstream import RECEIVED
from tests.e2e.conftest import Running, StartGateway, base_url
from tests.e2e.test_failover import mock, two_targets, upstream_config
from tests.e2e.test_operations import SMALL, post
from tests.e2e.test_quotas import eventually
from tests.e2e.test_relay_faults import partial
from tests.support.config import DO_UPSTREAM_KEY, TENANT_KEY, UPSTREAM_KEY, config_dict
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support.processes import GatewayProcess
from tests.support.scripted_upstream import Script, ScriptedUpstream

StartServer = Callable[[web.Application], Awaitable[TestServer]]
PROMPT = "a secret lighthouse painted by marker-7f3a9c"
USER = "alice@example.com"
USER_HASH_KEY = "trace-user-key-4e1d0b"
STAGES = {"policy", "admission", "relay", "settlement"}


def telemetry(endpoint: str, **extra: Any) -> dict[str, Any]:
    return {"endpoint": endpoint, "schedule_delay_ms": 20, "sampler": "parentbased_always_on", **extra}


def client_trace() -> tuple[str, str, dict[str, str]]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, {"traceparent": f"00-{trace_id}-{span_id}-01", "tracestate": "client=1"}


def sdk(gw: Running, headers: dict[str, str]) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0, default_headers=headers)


def of_trace(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.trace_id == trace_id]


def ended(trace_id: str) -> Callable[[list[ReceivedSpan]], bool]:
    """The request's SERVER span arrived (it ends last, with the access log line)."""
    return lambda spans: any(s.kind == "SERVER" for s in of_trace(spans, trace_id))


async def test_a_request_continues_the_client_trace_with_genai_attributes(
    start_gateway: StartGateway,
    mock_openai: TestServer,
    mock_do: TestServer,
    receiver: tuple[OtlpReceiver, str],
) -> None:
    collector, endpoint = receiver
    gw = await start_gateway(
        openai_url=base_url(mock_openai),
        do_url=base_url(mock_do),
        telemetry=telemetry(endpoint, user_hash_key=USER_HASH_KEY),
    )
    trace_id, parent_id, headers = client_trace()
    async with sdk(gw, headers) as client:
        image = await client.images.generate(  # the end user is the safety_identifier, not `user`
            model="gpt-image-1.5",
            prompt=PROMPT,
            size="1024x1024",
            quality="low",
            safety_identifier=USER,
            user="shared-service-account",
        )
    await collector.wait_for(ended(trace_id))
    spans = of_trace(collector.spans, trace_id)
    (server,) = [s for s in spans if s.kind == "SERVER"]
    assert server.parent_span_id == parent_id  # the client's span is the gateway's parent
    assert server.name == "POST /v1/images/generations"
    stages = {s.name: s for s in spans if s.kind == "INTERNAL"}
    assert set(stages) == STAGES
    assert all(s.parent_span_id == server.span_id for s in stages.values())
    (attempt,) = [s for s in spans if s.kind == "CLIENT"]
    assert attempt.parent_span_id == server.span_id

    # The upstream got the gateway's traceparent: the same trace, the attempt's span as parent.
    sent = mock_openai.app[RECEIVED][-1].headers
    assert sent["traceparent"] == f"00-{trace_id}-{attempt.span_id}-01"
    assert sent["tracestate"] == "client=1"

    usage = image.usage
    assert usage is not None
    assert server.attributes | {"gateway.request_id": None, "gateway.cost_usd": None} == {
        "http.request.method": "POST",
        "http.route": "/v1/images/generations",
        "url.path": "/v1/images/generations",
        "http.response.status_code": 200,
        "gateway.request_id": None,
        "gateway.decision": "served",
        "gen_ai.operation.name": "image_generation",
        "gen_ai.output.type": "image",
        "gen_ai.request.model": "gpt-image-1.5",
        "gen_ai.response.model": "gpt-image-1.5",
        "gen_ai.provider.name": "openai",
        "gen_ai.usage.input_tokens": usage.input_tokens,
        "gen_ai.usage.output_tokens": usage.output_tokens,
        "gateway.tenant": "team",
        "gateway.key_name": "key0",
        "gateway.upstream": "openai",
        "gateway.image.size": "1024x1024",
        "gateway.image.quality": "low",
        "gateway.image.n": 1,
        "gateway.stream": False,
        "gateway.user": hmac.new(USER_HASH_KEY.encode(), USER.encode(), "sha256").hexdigest()[:32],
        "gateway.settled": "usage",
        "gateway.cost_usd": None,
        "gateway.images": 1,
        "gateway.attempts": 1,
    }
    assert server.attributes["gateway.cost_usd"] > 0
    assert attempt.attributes["gateway.attempt.outcome"] == "ok"
    assert attempt.attributes["http.response.status_code"] == 200
    assert attempt.attributes["gen_ai.provider.name"] == "openai"
    assert server.resource["service.name"] == "image-gateway"
    _nothing_secret(collector)


async def test_without_a_user_hash_key_the_user_is_left_out(
    start_gateway: StartGateway, mock_openai: TestServer, receiver: tuple[OtlpReceiver, str]
) -> None:
    """No `telemetry.user_hash_key`: no `gateway.user` at all, rather than a hash anyone holding a
    list of user ids could reverse."""
    collector, endpoint = receiver
    gw = await start_gateway(openai_url=base_url(mock_openai), telemetry=telemetry(endpoint))
    trace_id, _, headers = client_trace()
    async with sdk(gw, headers) as client:
        await client.images.generate(
            model="gpt-image-1.5", prompt=PROMPT, size="1024x1024", quality="low", user=USER
        )
    await collector.wait_for(ended(trace_id))
    (server,) = [s for s in of_trace(collector.spans, trace_id) if s.kind == "SERVER"]
    assert server.attributes["gateway.tenant"] == "team"
    assert "gateway.user" not in server.attributes
    _nothing_secret(collector)


async def test_a_stream_has_its_first_event_on_the_span(
    start_gateway: StartGateway, mock_openai: TestServer, receiver: tuple[OtlpReceiver, str]
) -> None:
    collector, endpoint = receiver
    gw = await start_gateway(openai_url=base_url(mock_openai), telemetry=telemetry(endpoint))
    trace_id, _, headers = client_trace()
    async with sdk(gw, headers) as client:
        stream = await client.images.generate(
            model="gpt-image-1.5", prompt=PROMPT, quality="low", stream=True, partial_images=1
        )
        events = [event.type async for event in stream]
    assert events[-1] == "image_generation.completed"
    await collector.wait_for(ended(trace_id))
    (server,) = [s for s in of_trace(collector.spans, trace_id) if s.kind == "SERVER"]
    assert [name for name, _ in server.events] == ["gateway.stream.first_event"]
    assert server.attributes["gateway.stream"] is True
    assert server.attributes["gateway.settled"] == "usage"
    _nothing_secret(collector)


async def test_a_stream_cut_by_the_upstream_marks_the_request_failed(
    start_server: StartServer, start_gateway: StartGateway, receiver: tuple[OtlpReceiver, str]
) -> None:
    collector, endpoint = receiver
    script = Script(chunks=[partial("\n")], chunk_delay=0.1, abort_after_chunks=True)
    upstream = await start_server(ScriptedUpstream(script).app())
    gw = await start_gateway(openai_url=base_url(upstream), telemetry=telemetry(endpoint))
    trace_id, _, headers = client_trace()
    async with sdk(gw, headers) as client:
        stream = await client.images.generate(model="gpt-image-1.5", prompt=PROMPT, stream=True)
        with pytest.raises(openai.APIError):
            [event async for event in stream]
    await collector.wait_for(ended(trace_id))
    (server,) = [s for s in of_trace(collector.spans, trace_id) if s.kind == "SERVER"]
    assert server.attributes["http.response.status_code"] == 200  # sent before the cut
    assert (server.status, server.attributes["error.type"]) == (2, "upstream_unavailable")


async def test_failover_shows_one_span_per_attempt(
    start_server: StartServer, start_gateway: StartGateway, receiver: tuple[OtlpReceiver, str]
) -> None:
    collector, endpoint = receiver
    sick = await mock(start_server, fail_status=503)
    do = await mock(start_server, "digitalocean")
    gw = await start_gateway(
        openai_url=base_url(sick),
        upstreams=upstream_config(base_url(sick), base_url(do)),
        routes=two_targets(),
        telemetry=telemetry(endpoint),
    )
    trace_id, _, headers = client_trace()
    async with sdk(gw, headers) as client:
        await client.images.generate(model="gpt-image-1.5", prompt=PROMPT, size="1536x1024", quality="low")
    await collector.wait_for(ended(trace_id))
    spans = of_trace(collector.spans, trace_id)
    attempts = sorted((s for s in spans if s.kind == "CLIENT"), key=lambda s: s.start_ns)
    assert [
        (a.attributes["gateway.upstream"], a.attributes["gateway.attempt.outcome"]) for a in attempts
    ] == [
        ("openai", "http_503"),
        ("digitalocean", "ok"),
    ]
    assert attempts[0].status == 2 and attempts[1].status != 2  # the failed attempt is an error
    for upstream, attempt in ((sick, attempts[0]), (do, attempts[1])):
        assert upstream.app[RECEIVED][-1].headers["traceparent"] == f"00-{trace_id}-{attempt.span_id}-01"
    (server,) = [s for s in spans if s.kind == "SERVER"]
    assert server.attributes["gateway.attempts"] == 2
    assert server.attributes["gen_ai.provider.name"] == "digitalocean"
    assert server.attributes["gen_ai.response.model"] == "openai-gpt-image-1.5"


async def test_a_refused_request_is_traced_without_its_prompt(
    start_gateway: StartGateway, mock_openai: TestServer, receiver: tuple[OtlpReceiver, str]
) -> None:
    collector, endpoint = receiver
    gw = await start_gateway(
        openai_url=base_url(mock_openai),
        telemetry=telemetry(endpoint),
        policy={"default_model": "gpt-image-1.5", "deny_prompt_patterns": ["lighthouse"]},
    )
    trace_id, _, headers = client_trace()
    async with sdk(gw, headers) as client:
        with pytest.raises(openai.PermissionDeniedError):
            await client.images.generate(model="gpt-image-1.5", prompt=PROMPT)
    await collector.wait_for(ended(trace_id))
    spans = of_trace(collector.spans, trace_id)
    (server,) = [s for s in spans if s.kind == "SERVER"]
    assert server.attributes["gateway.decision"] == "policy_denied"
    (policy,) = [s for s in spans if s.name == "policy"]
    assert policy.attributes["error.type"] == "policy_violation"
    assert not [s for s in spans if s.name in ("admission", "relay", "settlement") or s.kind == "CLIENT"]
    _nothing_secret(collector)


async def test_an_unsampled_request_exports_nothing_but_passes_its_trace_on(
    start_gateway: StartGateway, mock_openai: TestServer, receiver: tuple[OtlpReceiver, str]
) -> None:
    collector, endpoint = receiver
    gw = await start_gateway(openai_url=base_url(mock_openai), telemetry=telemetry(endpoint))
    trace_id, parent_id, _ = client_trace()
    async with sdk(gw, {"traceparent": f"00-{trace_id}-{parent_id}-00"}) as client:  # not sampled
        await client.images.generate(model="gpt-image-1.5", prompt="a kite", quality="low")
    sampled_id, _, headers = client_trace()
    async with sdk(gw, headers) as client:  # then a sampled one, to know the export has happened
        await client.images.generate(model="gpt-image-1.5", prompt="a kite", quality="low")
    await collector.wait_for(ended(sampled_id))
    assert not of_trace(collector.spans, trace_id)
    sent = mock_openai.app[RECEIVED][-2].headers["traceparent"]
    assert sent.startswith(f"00-{trace_id}-") and sent.endswith("-00")


async def test_a_collector_that_is_down_costs_requests_nothing_and_drops_are_counted(
    start_gateway: StartGateway, mock_openai: TestServer, refusing_url: str
) -> None:
    gw = await start_gateway(
        openai_url=base_url(mock_openai),
        telemetry=telemetry(refusing_url, max_queue_size=8, export_timeout_seconds=0.5),
    )
    async with sdk(gw, {}) as client:
        results = await asyncio.gather(
            *(
                client.images.generate(model="gpt-image-1.5", prompt="a kite", quality="low")
                for _ in range(20)
            )
        )
    assert all(r.data[0].b64_json for r in results)
    # 20 requests x 6 spans into a queue of 8: most are dropped, the rest fail to export.
    dropped = lambda reason: gw.metric("gateway_trace_spans_dropped_total", reason=reason)  # noqa: E731
    assert dropped("queue_full") > 0

    async def failed_exports() -> bool:
        return dropped("export_failed") > 0

    await eventually(failed_exports, timeout=15)
    async with aiohttp.ClientSession() as session, session.get(f"{gw.ops_url}/metrics") as resp:
        assert 'gateway_trace_spans_dropped_total{reason="queue_full"}' in await resp.text()


async def test_tracing_off_sends_no_traceparent_upstream(gateway: Running, mock_openai: TestServer) -> None:
    _, _, headers = client_trace()
    async with sdk(gateway, headers) as client:
        await client.images.generate(model="gpt-image-1.5", prompt="a kite", quality="low")
    assert "traceparent" not in mock_openai.app[RECEIVED][-1].headers
    assert gateway.metric("gateway_trace_spans_dropped_total", reason="queue_full") == 0


@pytest.mark.slow
async def test_each_worker_exports_its_own_spans_configured_by_the_environment(
    mock_openai: TestServer, receiver: tuple[OtlpReceiver, str], tmp_path: Path, redis_url: str
) -> None:
    """`gateway serve` with two workers, tracing set by OTEL_* variables only: each worker builds
    its own batch processor (its pid in `service.instance.id`); spans still queued at SIGTERM (the
    schedule delay is a minute) go out at shutdown."""
    collector, endpoint = receiver
    config = config_dict(
        base_url(mock_openai), store={"backend": "redis", "url": redis_url}, server={"workers": 2}
    )
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": "gateway-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "60000",
    }
    gateway = GatewayProcess(config, tmp_path, environ)
    await gateway.start()
    try:
        async with asyncio.timeout(20):
            while len(workers := _worker_pids(gateway)) < 2:  # noqa: ASYNC110 (read from the log)
                await asyncio.sleep(0.1)
        for _ in range(30):
            async with aiohttp.ClientSession() as fresh:  # new connections spread over workers
                assert (await post(fresh, gateway.url, TENANT_KEY, SMALL))[0] == 200
        assert not collector.spans  # held in each worker's queue: the batch is not due yet
    finally:
        # In a thread: the receiver runs on this loop, and the workers export to it as they stop.
        assert await asyncio.to_thread(gateway.stop) == 0
    await collector.wait_for(lambda spans: sum(s.kind == "SERVER" for s in spans) == 30)
    instances = {s.resource["service.instance.id"] for s in collector.spans}
    assert {int(instance.rsplit("/", 1)[1]) for instance in instances} == workers
    assert {s.resource["service.name"] for s in collector.spans} == {"gateway-under-test"}


def _worker_pids(gateway: GatewayProcess) -> set[int]:
    return {json.loads(line)["pid"] for line in gateway.log_lines() if '"gateway_started"' in line}


def _nothing_secret(collector: OtlpReceiver) -> None:
    """No prompt, tenant key, upstream key or user id in any byte the collector received."""
    exported = b"".join(collector.bodies)
    assert exported
    for secret in (PROMPT, "marker-7f3a9c", TENANT_KEY, UPSTREAM_KEY, DO_UPSTREAM_KEY, USER, "alice"):
        assert secret.encode() not in exported, secret
    assert USER_HASH_KEY.encode() not in exported
    # nor the unkeyed hash of the user id (as the store's key names hold it): a list of user ids
    # would reverse it
    assert hashlib.sha256(USER.encode()).hexdigest()[:16].encode() not in exported
