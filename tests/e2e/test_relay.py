"""Relaying: byte-exact SSE, key swap, every field forwarded, headers, large bodies with flat memory."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.mock_upstream import RECEIVED
from tests.e2e.conftest import Running, StartGateway, base_url
from tests.support import raw_http
from tests.support.config import TENANT_KEY, UPSTREAM_KEY
from tests.support.scripted_upstream import Script, ScriptedUpstream

AUTH = {"Authorization": f"Bearer {TENANT_KEY}"}
StartServer = Callable[[web.Application], Awaitable[TestServer]]

USAGE = b'{"input_tokens":5,"input_tokens_details":{"text_tokens":5,"image_tokens":0},"output_tokens":272,"total_tokens":277}'
SSE_PIECES = [
    b": keep-alive comment\r\n\r\n",
    b"event: image_generation.partial_image\r\n",
    b'data: {"type":"image_generation.partial_image","b64_json":"iVBORw0KGgo=","partial_image_index":0}\r\n\r\n',
    b"event: image_generation.completed\n",
    b'data: {"type":"image_generation.completed",\n',
    b'data: "b64_json":"iVBORw0KGgo=","usage":' + USAGE + b"}\n\n",
    b"data: [DONE]\n\n",
]


JSON_ANSWER = b'{"created":1,"data":[{"b64_json":"AA=="}],"usage":' + USAGE + b"}"


def json_script(headers: dict[str, str]) -> Script:
    """A whole JSON answer, with a Content-Length, and these headers of the upstream's."""
    return Script(
        content_type="application/json", chunks=[JSON_ANSWER], content_length=True, extra_headers=headers
    )


def odd_chunks(data: bytes, sizes: tuple[int, ...] = (1, 7, 2, 13, 3, 64, 5)) -> list[bytes]:
    """Split bytes at awkward places: inside CRLF, inside `data:`, inside JSON."""
    chunks, i, k = [], 0, 0
    while i < len(data):
        size = sizes[k % len(sizes)]
        chunks.append(data[i : i + size])
        i, k = i + size, k + 1
    return chunks


def generation_request(*, stream: bool) -> bytes:
    """A generation request's bytes, as a client sends them on its connection."""
    return raw_http.request(
        "/v1/images/generations",
        headers=[
            (b"Authorization", b"Bearer " + TENANT_KEY.encode()),
            (b"Content-Type", b"application/json"),
        ],
        body=orjson.dumps({"model": "gpt-image-1.5", "prompt": "p", "stream": stream}),
    )


async def scripted(start_server: StartServer, script: Script) -> tuple[ScriptedUpstream, TestServer]:
    upstream = ScriptedUpstream(script)
    return upstream, await start_server(upstream.app())


async def test_sse_relayed_byte_for_byte_with_odd_chunks(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    body = b"".join(SSE_PIECES)
    _, server = await scripted(start_server, Script(chunks=odd_chunks(body), chunk_delay=0.001))
    gw = await start_gateway(openai_url=base_url(server))
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        payload = {"model": "gpt-image-1.5", "prompt": "p", "stream": True}
        async with session.post(f"{gw.v1}/images/generations", json=payload, headers=AUTH) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert "Content-Encoding" not in resp.headers
            received = b"".join([chunk async for chunk in resp.content.iter_any()])
    assert received == body
    assert (
        gw.metric(
            "gateway_tokens_total", tenant="team", model="gpt-image-1.5", bucket="image_out", settled="usage"
        )
        == 272
    )


async def test_openai_sdk_parses_relayed_crlf_multiline_done_stream(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    _, server = await scripted(start_server, Script(chunks=odd_chunks(b"".join(SSE_PIECES))))
    gw = await start_gateway(openai_url=base_url(server))
    client = openai.AsyncOpenAI(base_url=gw.v1, api_key=TENANT_KEY, max_retries=0)
    stream = await client.images.generate(model="gpt-image-1.5", prompt="p", stream=True)
    events = [event async for event in stream]
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert events[-1].usage.output_tokens == 272
    await client.close()


async def test_first_event_reaches_client_before_upstream_finishes(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    first = b'event: image_generation.partial_image\ndata: {"type":"image_generation.partial_image"}\n\n'
    script = Script(chunks=[first, b'data: {"type":"image_generation.completed"}\n\n'], chunk_delay=1.0)
    upstream, server = await scripted(start_server, script)
    gw = await start_gateway(openai_url=base_url(server))
    async with aiohttp.ClientSession() as session:
        payload = {"model": "gpt-image-1.5", "prompt": "p", "stream": True}
        async with session.post(f"{gw.v1}/images/generations", json=payload, headers=AUTH) as resp:
            got = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=0.5)
            assert got == first
            assert not upstream.finished.is_set()
            await resp.read()


async def test_a_streams_headers_reach_the_client_before_its_first_event_comes(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    """The upstream's headers come, its first event a second later: the client has the headers
    (the answer's status) at once, not with the first event."""
    event = b'data: {"type":"image_generation.completed"}\n\n'
    _, server = await scripted(start_server, Script(chunks=[b"", event], chunk_delay=1.0))
    gw = await start_gateway(openai_url=base_url(server))
    async with aiohttp.ClientSession() as session:
        payload = {"model": "gpt-image-1.5", "prompt": "p", "stream": True}
        started = asyncio.get_running_loop().time()
        async with session.post(f"{gw.v1}/images/generations", json=payload, headers=AUTH) as resp:
            assert asyncio.get_running_loop().time() - started < 0.5
            assert resp.status == 200
            assert await resp.read() == event


async def test_upstream_gets_org_key_and_every_field(gateway: Running, mock_openai: TestServer) -> None:
    payload = {
        "model": "gpt-image-1.5",
        "prompt": "a cat",
        "n": 1,
        "size": "1024x1024",
        "quality": "low",
        "moderation": "low",
        "background": "opaque",
        "output_format": "webp",
        "output_compression": 40,
        "user": "end-user-7",
    }
    headers = {**AUTH, "OpenAI-Organization": "org-tenant", "User-Agent": "test-agent/1"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gateway.v1}/images/generations", json=payload, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["x-request-id"]
            await resp.read()
    received = mock_openai.app[RECEIVED][-1]
    assert received.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert TENANT_KEY not in orjson.dumps(received.headers).decode()
    assert "OpenAI-Organization" not in received.headers
    assert received.headers["User-Agent"] == "test-agent/1"
    assert received.body == payload


async def test_upstream_gets_no_user_agent_of_aiohttp_and_asks_for_identity(
    gateway: Running, mock_openai: TestServer
) -> None:
    """A client without a User-Agent is relayed without one (not aiohttp's), with or without; the
    body is always asked for uncompressed, whatever the client accepts."""
    payload = {"model": "gpt-image-1.5", "prompt": "a cat", "quality": "low"}
    sent: list[str | None] = []
    for extra in ({}, {"User-Agent": "test-agent/1", "Accept-Encoding": "gzip, br"}):
        async with aiohttp.ClientSession(skip_auto_headers=("User-Agent", "Accept-Encoding")) as session:
            headers = {**AUTH, **extra}
            async with session.post(
                f"{gateway.v1}/images/generations", json=payload, headers=headers
            ) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
        received = mock_openai.app[RECEIVED][-1].headers  # repeated headers joined with ", "
        sent.append(received.get("User-Agent"))
        assert (received["Accept-Encoding"], received["Accept"]) == ("identity", "*/*")
    assert sent == [None, "test-agent/1"]


async def test_digitalocean_route_maps_model_id_and_fills_required_fields(
    gateway: Running, mock_do: TestServer
) -> None:
    async with aiohttp.ClientSession() as session:
        payload = {"model": "gpt-image-1", "prompt": "a kite", "stream": True}
        async with session.post(f"{gateway.v1}/images/generations", json=payload, headers=AUTH) as resp:
            assert resp.status == 200, await resp.text()
            assert "x-gateway-adjusted" in resp.headers
            await resp.read()
    received = mock_do.app[RECEIVED][-1]
    assert received.body["model"] == "openai-gpt-image-1"
    assert received.body["n"] == 1 and "size" in received.body and received.body["partial_images"] >= 1


async def test_a_client_chosen_request_id_is_logged_never_used(
    gateway: Running, mock_openai: TestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A client's x-request-id could forge another request's log lines and traces: the gateway makes
    its own id (returned, forwarded upstream) and logs the client's as `client_request_id`."""
    async with aiohttp.ClientSession() as session:
        payload = {"model": "gpt-image-1.5", "prompt": "x", "quality": "low"}
        headers = {**AUTH, "x-request-id": "req-abc-123"}
        async with session.post(f"{gateway.v1}/images/generations", json=payload, headers=headers) as resp:
            ours = resp.headers["x-request-id"]
    assert ours != "req-abc-123" and len(ours) == 32
    assert mock_openai.app[RECEIVED][-1].headers["X-Request-Id"] == ours
    assert "client_request_id=req-abc-123" in capsys.readouterr().out


async def test_upstream_rate_limit_headers_pass_through_hop_by_hop_do_not(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    body = JSON_ANSWER
    script = json_script(
        {
            "x-ratelimit-remaining-requests": "7",
            "ratelimit-remaining": "3",
            "Keep-Alive": "timeout=5",
            "openai-organization": "org-secret",
            "Set-Cookie": "a=b",
            "Server": "upstream-secret/1.0",
        }
    )
    _, server = await scripted(start_server, script)
    gw = await start_gateway(openai_url=base_url(server))
    async with aiohttp.ClientSession() as session:
        payload = {"model": "gpt-image-1.5", "prompt": "x"}
        async with session.post(f"{gw.v1}/images/generations", json=payload, headers=AUTH) as resp:
            assert await resp.read() == body
            assert resp.headers["ratelimit-remaining"] == "3"
            assert resp.headers["x-ratelimit-remaining-requests"] == "7"
            assert resp.headers["Content-Length"] == str(len(body))
            for name in ("Keep-Alive", "openai-organization", "Set-Cookie"):
                assert name not in resp.headers
            assert resp.headers.getall("Server") == ["image-gateway"]  # not the upstream's


async def test_relayed_header_names_keep_the_upstreams_order_and_our_limit_headers_replace_its_own(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    """The answer's header names, in order and case: the upstream's (less what is dropped), a limit
    header of both sides where the upstream put it (under our spelling), ours and then the gateway's
    after them; none twice, whatever case the upstream wrote them in."""
    body = JSON_ANSWER
    script = json_script(
        {
            "X-RateLimit-Limit-Requests": "9",
            "openai-processing-ms": "12",
            "X-RateLimit-Remaining-Requests": "7",
            "RATELIMIT": '"up";r=3;t=1',
            "x-ratelimit-reset-images": "2s",
            "Ratelimit-Remaining": "3",
            "x-request-id": "req_up",
            "Server": "upstream",
        }
    )
    _, server = await scripted(start_server, script)
    limits = {"requests_per_minute": 60, "tokens_per_minute": 10**7, "images_per_minute": 100}
    gw = await start_gateway(openai_url=base_url(server), limits=limits)
    async with aiohttp.ClientSession() as session:
        payload = {"model": "gpt-image-1.5", "prompt": "x"}
        async with session.post(f"{gw.v1}/images/generations", json=payload, headers=AUTH) as resp:
            assert await resp.read() == body
            names = [name.decode() for name, _ in resp.raw_headers]
            assert (resp.headers["x-ratelimit-remaining-requests"], resp.headers["RateLimit-Remaining"]) == (
                "7",
                "3",
            )
    assert names == [
        "x-ratelimit-limit-requests",
        "openai-processing-ms",
        "x-ratelimit-remaining-requests",
        "RateLimit",
        "x-ratelimit-reset-images",
        "ratelimit-remaining",
        "Content-Type",
        "Content-Length",
        "x-upstream-request-id",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
        "x-ratelimit-limit-images",
        "x-ratelimit-remaining-images",
        "RateLimit-Policy",
        "x-gateway-upstream",
        "x-request-id",
        "Date",
        "Server",
    ]


@pytest.mark.parametrize("usage_first", [False, True])
async def test_usage_read_wherever_it_sits(
    start_server: StartServer, start_gateway: StartGateway, usage_first: bool
) -> None:
    data = b'"data":[{"b64_json":"' + b"A" * 300_000 + b'"},{"b64_json":"' + b"B" * 300_000 + b'"}]'
    usage = b'"usage":' + USAGE
    body = b"{" + (usage + b"," + data if usage_first else data + b"," + usage) + b',"created":1}'
    _, server = await scripted(
        start_server, Script(content_type="application/json", chunks=odd_chunks(body, (4096, 17)))
    )
    gw = await start_gateway(openai_url=base_url(server))
    async with aiohttp.ClientSession() as session:
        payload = {"model": "gpt-image-1.5", "prompt": "x", "n": 2}
        async with session.post(f"{gw.v1}/images/generations", json=payload, headers=AUTH) as resp:
            assert await resp.read() == body
    assert (
        gw.metric(
            "gateway_tokens_total", tenant="team", model="gpt-image-1.5", bucket="image_out", settled="usage"
        )
        == 272
    )
    assert (
        gw.metric(
            "gateway_tokens_total", tenant="team", model="gpt-image-1.5", bucket="text_in", settled="usage"
        )
        == 5
    )


@pytest.mark.parametrize("request_id", [TENANT_KEY, f"x{TENANT_KEY}y", "a b", "é" * 3, "x" * 129])
async def test_a_client_request_id_that_is_a_key_or_insane_is_not_logged(
    gateway: Running, capsys: pytest.CaptureFixture[str], request_id: str
) -> None:
    async with aiohttp.ClientSession() as session:
        payload = {"model": "gpt-image-1.5", "prompt": "x", "quality": "low"}
        headers = {**AUTH, "x-request-id": request_id}
        async with session.post(f"{gateway.v1}/images/generations", json=payload, headers=headers) as resp:
            assert resp.status == 200
    out = capsys.readouterr().out
    assert "request_finished" in out and "client_request_id" not in out and TENANT_KEY not in out


async def test_a_stream_the_upstream_ended_at_its_last_piece_keeps_its_chunked_framing(
    start_gateway: StartGateway,
) -> None:
    """An upstream whose whole answer arrives at once (head, body and its end in one send): the
    relay sends the body's last piece with the answer's end, still framed byte for byte, and the
    client's connection stays usable for its next request."""
    body = b"".join(SSE_PIECES)
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(body)
        + body
        + b"\r\n0\r\n\r\n"
    )

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not reader.at_eof():
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            writer.write(answer)  # all of it in one send
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        gw = await start_gateway(openai_url=f"http://127.0.0.1:{port}/v1")
        ask = generation_request(stream=True)
        assert gw.server.port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
        try:
            for _ in range(2):  # the second on the same connection: the first ended cleanly
                writer.write(ask)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in head
                framed = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
                assert await asyncio.wait_for(reader.readexactly(len(framed)), 10) == framed
        finally:
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("streaming", [True, False], ids=["sse", "json"])
async def test_pieces_arriving_apart_are_framed_exactly_and_the_connection_stays_usable(
    start_server: StartServer, start_gateway: StartGateway, streaming: bool
) -> None:
    """Pieces that arrive one by one go to the client as they come (each as a chunk of its own
    when the answer is chunked); the answer ends cleanly, so the next request on the connection
    is answered too."""
    body = b"".join(SSE_PIECES) if streaming else JSON_ANSWER
    script = Script(
        content_type="text/event-stream" if streaming else "application/json",
        chunks=odd_chunks(body, (40, 1, 300, 7)),
        chunk_delay=0.002,
        content_length=not streaming,
    )
    _, server = await scripted(start_server, script)
    gw = await start_gateway(openai_url=base_url(server))
    ask = generation_request(stream=streaming)
    assert gw.server.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
    try:
        for _ in range(2):
            writer.write(ask)
            answer = await raw_http.read_response(reader)
            assert answer.status == 200 and not answer.closed
            assert answer.body == body
            if streaming:
                assert answer.headers["transfer-encoding"] == "chunked"
            else:
                assert answer.headers["content-length"] == str(len(body))
    finally:
        writer.close()


async def test_an_http_1_0_client_gets_the_stream_unframed_to_the_connections_end(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    """HTTP/1.0 has no chunks: the stream's pieces go out as they are and its end closes the
    connection."""
    body = b"".join(SSE_PIECES)
    _, server = await scripted(start_server, Script(chunks=odd_chunks(body), chunk_delay=0.001))
    gw = await start_gateway(openai_url=base_url(server))
    payload = orjson.dumps({"model": "gpt-image-1.5", "prompt": "p", "stream": True})
    ask = (
        b"POST /v1/images/generations HTTP/1.0\r\nAuthorization: Bearer "
        + TENANT_KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload)
        + payload
    )
    assert gw.server.port is not None
    answer = await raw_http.exchange(gw.server.port, ask)
    assert answer.status == 200 and "transfer-encoding" not in answer.headers
    assert answer.body == body
