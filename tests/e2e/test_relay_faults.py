"""Relay faults on real sockets: a client that stops reading is cut off after the write timeout and
the request is still billed from the upstream's usage; an upstream that dies between two SSE events
ends the stream with an `error` event, one that dies inside an event leaves it visibly truncated.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.config import UpstreamSettings
from gateway.relay import RelayOutcome, relay
from gateway.runtime import Target
from gateway.upstreams import transport as upstream_module
from gateway.upstreams.client import Pool
from tests.e2e.conftest import GatewayTestServer, StartGateway, base_url
from tests.e2e.test_relay import USAGE
from tests.support.config import TENANT_KEY, make_settings
from tests.support.scripted_upstream import Script, ScriptedUpstream

StartServer = Callable[[web.Application], Awaitable[TestServer]]
AUTH = {"Authorization": f"Bearer {TENANT_KEY}"}
STREAM = {"model": "gpt-image-1.5", "prompt": "p", "quality": "low", "stream": True}

BIG_PARTIAL = (
    b'event: image_generation.partial_image\ndata: {"type":"image_generation.partial_image","b64_json":"'
    + b"A" * 262_144
    + b'","partial_image_index":0}\n\n'
)
COMPLETED = (
    b'event: image_generation.completed\ndata: {"type":"image_generation.completed","b64_json":"AA==",'
    b'"usage":' + USAGE + b"}\n\n"
)


def send_buffer_max() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 << 20


# Partial images of 256 KiB, twice what the gateway's socket send buffer can grow to (and so far
# more than the client's receive buffer): a client that does not read must block the relay.
PARTIALS = 2 * send_buffer_max() // len(BIG_PARTIAL) + 8
FLOOD = Script(chunks=[BIG_PARTIAL] * PARTIALS + [COMPLETED])


# --- 1. a client that stops reading ----------------------------------------------------------------


async def stalled_client(url: str, path: str, body: dict[str, Any]) -> socket.socket:
    """Send one request with a tiny receive buffer, then never read: the connection stays open."""
    host, port = url.removeprefix("http://").split(":")
    payload = orjson.dumps(body)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {TENANT_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, int(port)))
    await loop.sock_sendall(sock, head.encode() + payload)
    return sock


async def until(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.05)


async def connection_closed(sock: socket.socket, seconds: float = 5.0) -> None:
    """Read what the gateway sent until the connection ends (EOF or reset)."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if not await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), deadline - time.monotonic()):
                return
        except ConnectionResetError:
            return
    raise AssertionError("the gateway kept the connection open")


async def test_a_client_that_stops_reading_is_cut_off_and_billed_from_the_usage(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    upstream = ScriptedUpstream(FLOOD)
    server = await start_server(upstream.app())
    gw = await start_gateway(openai_url=base_url(server), server={"client_write_timeout_seconds": 0.5})
    with capture_logs() as logs:
        sock = await stalled_client(gw.url, "/v1/images/generations", STREAM)
        try:
            started = time.monotonic()
            await until(lambda: any(line["event"] == "request_finished" for line in logs), 10)
            elapsed = time.monotonic() - started
            await connection_closed(sock)
        finally:
            sock.close()
    [line] = [line for line in logs if line["event"] == "request_finished"]
    assert (line["client_gone"], line["settled"], line["status"]) == (True, "usage", 200)
    assert (line["tokens_text_in"], line["tokens_image_out"]) == (5, 272)
    assert upstream.finished.is_set()  # drained to its end, so the usage was known
    assert any(line["event"] == "client_write_timed_out" for line in logs)
    assert elapsed < 5


async def test_relay_cuts_off_a_client_that_stops_reading_and_drains_the_upstream(
    start_server: StartServer,
) -> None:
    """relay() itself, between a real upstream and a real client socket that never reads."""
    upstream_server = await start_server(ScriptedUpstream(FLOOD).app())
    upstream_url = base_url(upstream_server)
    target = Target("openai", UpstreamSettings(base_url=upstream_url), "gpt-image-1.5")
    relays: list[asyncio.Task[RelayOutcome]] = []

    async def relay_upstream(request: web.Request) -> RelayOutcome:
        pool = Pool(upstream_url, 1)
        try:
            response = await pool.request("/images/generations", {}, b"{}", 10, 30)
            headers = upstream_module.relayable_headers(response.headers)
            return await relay(request, response, headers, target)
        finally:
            await pool.close()

    async def handler(request: web.Request) -> web.StreamResponse:
        # As the pipeline does: the work outlives the handler, which the test server cancels when
        # the connection is lost.
        relays.append(asyncio.create_task(relay_upstream(request)))
        return (await asyncio.shield(relays[0])).response

    # the gateway's app for its front door (the write deadline is the connection's), with a route of
    # the test's own
    settings = make_settings(upstream_url, server={"client_write_timeout_seconds": 0.5})
    app = create_app(settings, registry=CollectorRegistry())
    app.router.add_post("/relay", handler)
    gateway = await start_server(GatewayTestServer(app, host="127.0.0.1"))
    sock = await stalled_client(str(gateway.make_url("")).rstrip("/"), "/relay", {})
    try:
        started = time.monotonic()
        await until(lambda: bool(relays) and relays[0].done(), 10)
        elapsed = time.monotonic() - started
        await connection_closed(sock)
    finally:
        sock.close()
    outcome = relays[0].result()
    assert outcome.client_gone and outcome.failure is None
    assert outcome.bytes_sent < len(BIG_PARTIAL) * PARTIALS  # the client took only part of the body ...
    assert outcome.reader.usage is not None  # ... yet the upstream was read to its usage
    assert outcome.reader.usage.get("output_tokens") == 272
    assert elapsed < 5


# --- 2. an upstream that dies in the middle of a stream --------------------------------------------


def partial(line_end: str) -> bytes:
    data = {"type": "image_generation.partial_image", "b64_json": "iVBORw0KGgo=", "partial_image_index": 0}
    return f"event: image_generation.partial_image{line_end}data: {json.dumps(data)}{line_end}{line_end}".encode()


@pytest.mark.parametrize(
    "before_the_cut",
    [[], [partial("\n")], [partial("\r\n")], [partial("\r")]],
    ids=["no event", "an event ending LF", "an event ending CRLF", "an event ending CR"],
)
async def test_a_stream_cut_between_events_ends_with_an_error_event(
    start_server: StartServer, start_gateway: StartGateway, before_the_cut: list[bytes]
) -> None:
    """The upstream drops the connection after whole events, or after its headers alone: the
    client gets an `error` event and a clean end, not a cut."""
    script = Script(chunks=before_the_cut, chunk_delay=0.1, abort_after_chunks=True)
    server = await start_server(ScriptedUpstream(script).app())
    gw = await start_gateway(openai_url=base_url(server))
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0)
    stream = await client.images.generate(model="gpt-image-1.5", prompt="p", quality="low", stream=True)
    events = []
    with pytest.raises(openai.APIError) as info:
        async for event in stream:
            events.append(event)
    await client.close()
    assert type(info.value) is openai.APIError  # the relayed error event, not a broken connection
    assert info.value.code == "upstream_unavailable"
    assert [event.type for event in events] == ["image_generation.partial_image"] * len(before_the_cut)


CUT_INSIDE_AN_EVENT = [
    b'data: {"type":"image_generation.completed","b64_js',  # halfway through a data line
    b"event: image_generation.completed\n",  # a whole line, but the event has not ended
    b'event: image_generation.completed\r\ndata: {"type":"image_generation.completed"}\r\n',
]


@pytest.mark.parametrize("cut", CUT_INSIDE_AN_EVENT)
async def test_a_stream_cut_inside_an_event_is_left_truncated(
    start_server: StartServer, start_gateway: StartGateway, cut: bytes
) -> None:
    sent = partial("\n") + cut
    script = Script(chunks=[partial("\n"), cut], chunk_delay=0.1, abort_after_chunks=True)
    server = await start_server(ScriptedUpstream(script).app())
    gw = await start_gateway(openai_url=base_url(server))
    received = b""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gw.v1}/images/generations", json=STREAM, headers=AUTH) as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):  # no terminating chunk
                async for chunk in resp.content.iter_any():
                    received += chunk
    assert sent.startswith(received) and received.startswith(partial("\n"))
    assert b"event: error" not in received


async def test_the_sdk_sees_a_stream_cut_inside_an_event_as_a_broken_connection(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    script = Script(chunks=[partial("\n"), CUT_INSIDE_AN_EVENT[0]], chunk_delay=0.1, abort_after_chunks=True)
    server = await start_server(ScriptedUpstream(script).app())
    gw = await start_gateway(openai_url=base_url(server))
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0)
    stream = await client.images.generate(model="gpt-image-1.5", prompt="p", quality="low", stream=True)
    events = []
    with pytest.raises(openai.APIConnectionError):  # the transport broke: no error event was parsed
        async for event in stream:
            events.append(event)
    await client.close()
    assert [event.type for event in events] == ["image_generation.partial_image"]


async def test_a_stream_read_to_its_done_is_not_a_client_gone(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    """openai-python closes the connection at `data: [DONE]`: it read the whole stream. What the
    gateway writes after that (here the upstream's trailing comment, then the end of the chunked
    body) fails, but the client is not counted gone, in the access log or the metric."""
    upstream = ScriptedUpstream(
        Script(chunks=[COMPLETED, b"data: [DONE]\n\n", b": upstream closing\n\n"], chunk_delay=0.3)
    )
    server = await start_server(upstream.app())
    gw = await start_gateway(openai_url=base_url(server))
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0)
    with capture_logs() as logs:
        stream = await client.images.generate(**STREAM)
        events = [event.type async for event in stream]
        await until(lambda: any(line["event"] == "request_finished" for line in logs), 10)
    await client.close()
    assert events == ["image_generation.completed"]
    [line] = [line for line in logs if line["event"] == "request_finished"]
    assert (line["client_gone"], line["settled"], line["status"]) == (False, "usage", 200)
    assert gw.metric("gateway_clients_gone_total", tenant="team", model="gpt-image-1.5") == 0
