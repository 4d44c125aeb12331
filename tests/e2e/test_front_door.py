"""The front door under hostile HTTP: bytes an HTTP library would refuse to send, through raw sockets.

Each test fails without its fix (issue 12): a wrong status, a 500, a leaked byte, a stalled loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.app import RELOADER
from gateway.config import load_settings
from gateway.mock_upstream import MockOptions, create_mock_app
from tests.e2e.conftest import Running, StartGateway, base_url
from tests.e2e.test_edits import image_bytes
from tests.e2e.test_relay_faults import BIG_PARTIAL, COMPLETED, STREAM, StartServer
from tests.support.config import OTHER_KEY, TENANT_KEY, UPSTREAM_KEY, config_dict
from tests.support.processes import GatewayProcess
from tests.support.raw_http import RawResponse, exchange, read_response, request
from tests.support.scripted_upstream import Script, ScriptedUpstream

ADMIN_TOKEN = "admin-token-for-tests"
JSON = (b"Content-Type", b"application/json")
GOOD = b'{"model": "gpt-image-1.5", "prompt": "a cat", "quality": "low"}'


@pytest.fixture
async def admin_gateway(start_gateway: StartGateway, mock_openai, mock_do) -> Running:  # type: ignore[no-untyped-def]
    return await start_gateway(
        openai_url=base_url(mock_openai), do_url=base_url(mock_do), admin={"token": ADMIN_TOKEN}
    )


def answered(gateway: Running, status: int) -> float:
    """Requests answered with `status`, whatever their other labels."""
    return sum(
        sample.value
        for family in gateway.registry.collect()
        if family.name == "gateway_requests"
        for sample in family.samples
        if sample.name == "gateway_requests_total" and sample.labels["status"] == str(status)
    )


def port_of(gateway: Running) -> int:
    port = gateway.server.port
    assert port is not None
    return port


@pytest.mark.parametrize("path", ["/v1/images/generations", "/admin/usage"])
@pytest.mark.parametrize("value", [b"Bearer \xff\xfe\xfd", b"Bearer caf\xc3\xa9", b"\xff"])
async def test_non_ascii_authorization_is_401_invalid_key(
    admin_gateway: Running, path: str, value: bytes
) -> None:
    method = "POST" if path.startswith("/v1") else "GET"
    raw = request(path, method=method, headers=[JSON, (b"Authorization", value)], body=GOOD)
    response = await exchange(port_of(admin_gateway), raw)
    assert response.status == 401, response.body
    code = "invalid_api_key" if path.startswith("/v1") else "invalid_admin_token"
    assert response.json()["error"]["code"] == code  # type: ignore[index]
    assert answered(admin_gateway, 500) == 0


async def test_a_valid_key_still_works_over_raw_http(admin_gateway: Running) -> None:
    auth = (b"Authorization", b"Bearer " + TENANT_KEY.encode())
    response = await exchange(
        port_of(admin_gateway), request("/v1/images/generations", headers=[JSON, auth], body=GOOD)
    )
    assert response.status == 200


@pytest.mark.parametrize("size", ["1024x1024\n", "1024x1536\n", "auto\n"])
async def test_a_size_with_a_trailing_newline_is_refused(admin_gateway: Running, size: str) -> None:
    body = orjson.dumps({"model": "gpt-image-2", "prompt": "a cat", "size": size})
    auth = (b"Authorization", b"Bearer " + TENANT_KEY.encode())
    response = await exchange(
        port_of(admin_gateway), request("/v1/images/generations", headers=[JSON, auth], body=body)
    )
    assert response.status == 400, response.body
    assert response.json()["error"]["param"] == "size"  # type: ignore[index]
    assert "x-upstream-request-id" not in response.headers, "refused by the upstream, not the gateway"


@pytest.mark.parametrize("param", ["size", "model", "n", "extra", "user"])
async def test_a_990_level_value_is_a_short_400(admin_gateway: Running, param: str) -> None:
    body = b'{"prompt": "a cat", "' + param.encode() + b'": ' + b"[" * 990 + b"]" * 990 + b"}"
    auth = (b"Authorization", b"Bearer " + TENANT_KEY.encode())
    response = await exchange(
        port_of(admin_gateway), request("/v1/images/generations", headers=[JSON, auth], body=body)
    )
    assert response.status == 400, response.body[:300]
    assert len(response.body) < 1000


# --- connections: time to headers, keep-alive, body time, the cap ------------------------------------

AUTH = (b"Authorization", b"Bearer " + TENANT_KEY.encode())
GENERATE = "/v1/images/generations"


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before closing the connection, which it must do within `seconds`."""
    async with asyncio.timeout(seconds):
        return await reader.read()


@pytest.fixture
async def tight(start_gateway: StartGateway, mock_openai, mock_do) -> Running:  # type: ignore[no-untyped-def]
    """Short timeouts (each test waits for one to fire, with a wide margin) and a small body budget,
    all of it the one tenant's (its share: see `shares`)."""
    server = {
        "header_timeout_seconds": 0.3,
        "keepalive_timeout_seconds": 1.0,
        "body_timeout_seconds": 1.0,
        "max_body_bytes": 4096,
        "max_buffered_body_bytes": 8192,
        "max_tenant_share": 1,
    }
    return await start_gateway(openai_url=base_url(mock_openai), do_url=base_url(mock_do), server=server)


@pytest.fixture
async def capped(start_gateway: StartGateway, mock_openai, mock_do) -> Running:  # type: ignore[no-untyped-def]
    """Four connections at most; timeouts too long to interfere."""
    server = {"max_connections": 4, "header_timeout_seconds": 60, "body_timeout_seconds": 60}
    return await start_gateway(openai_url=base_url(mock_openai), do_url=base_url(mock_do), server=server)


def closes(gateway: Running, reason: str) -> float:
    return gateway.metric("gateway_connections_closed_total", listener="tenant", reason=reason)


async def test_a_connection_without_complete_headers_is_closed(tight: Running) -> None:
    silent = await asyncio.open_connection("127.0.0.1", port_of(tight))
    slow = await asyncio.open_connection("127.0.0.1", port_of(tight))
    slow[1].write(b"POST /v1/images/generations HTTP/1.1\r\nHost: gateway\r\nAuthor")
    assert await closed_within(silent[0], 5) == b""
    assert await closed_within(slow[0], 5) == b""
    assert closes(tight, "header_timeout") == 2
    for _, writer in (silent, slow):
        writer.close()


async def being_handled(
    start_gateway: StartGateway,
    start_server: Callable[[web.Application], Awaitable[TestServer]],
    mock_do: TestServer,
    server: dict[str, object],
) -> tuple[Running, asyncio.StreamReader, asyncio.StreamWriter]:
    """A gateway with `server` settings whose upstream takes a second, and a connection on which a
    generation is being handled."""
    slow = await start_server(
        create_mock_app(MockOptions(flavor="openai", api_key=UPSTREAM_KEY, latency_ms=1000))
    )
    gateway = await start_gateway(openai_url=base_url(slow), do_url=base_url(mock_do), server=server)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gateway))
    writer.write(request(GENERATE, headers=[JSON, AUTH], body=GOOD))
    await asyncio.sleep(0.2)
    return gateway, reader, writer


async def test_a_head_pipelined_behind_a_request_being_handled_has_the_header_deadline(
    start_gateway: StartGateway,
    start_server: Callable[[web.Application], Awaitable[TestServer]],
    mock_do: TestServer,
) -> None:
    """Its first bytes arrive while the upstream takes a second: the connection is closed for want of
    the rest once the request is answered, not kept until the (here 60 s) keep-alive timeout."""
    server = {"header_timeout_seconds": 0.3, "keepalive_timeout_seconds": 60}
    gateway, reader, writer = await being_handled(start_gateway, start_server, mock_do, server)
    writer.write(b"POST /v1/images/generations HTTP/1.1\r\nHost: gateway\r\nAuthor")
    response = await read_response(reader)
    assert response.status == 200 and not response.closed
    assert await closed_within(reader, 3) == b""
    assert closes(gateway, "header_timeout") == 1
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed(tight: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tight))
    writer.write(request("/healthz", method="GET"))
    response = await read_response(reader)
    assert response.status == 200 and not response.closed
    assert await closed_within(reader, 5) == b""
    assert closes(tight, "keepalive_timeout") == 1
    writer.close()


async def test_a_body_that_does_not_arrive_in_time_is_408_and_closed(tight: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(tight))
    head = request(GENERATE, headers=[JSON, AUTH, (b"Content-Length", b"100")])
    writer.write(head + b'{"prompt":')
    response = await read_response(reader)
    assert response.status == 408 and response.closed
    assert response.json()["error"]["code"] == "request_timeout"  # type: ignore[index]
    assert await closed_within(reader, 5) == b""
    writer.close()


async def test_at_the_cap_idle_connections_make_room_then_new_ones_get_503(capped: Running) -> None:
    port = port_of(capped)
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    await asyncio.sleep(0.1)
    served = await exchange(port, request("/healthz", method="GET"))  # the oldest idle one made room
    assert served.status == 200
    assert closes(capped, "idle_evicted") >= 1
    # four connections busy reading bodies: none idle, so a fifth is turned away, not failed
    busy = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
    for _, writer in busy:
        writer.write(request(GENERATE, headers=[JSON, AUTH, (b"Content-Length", b"100")]) + b"{")
    await asyncio.sleep(0.2)
    refused = await exchange(port, request("/healthz", method="GET"))
    assert refused.status == 503 and refused.closed
    assert refused.json()["error"]["code"] == "server_busy"  # type: ignore[index]
    assert closes(capped, "refused") >= 1
    for _, writer in idle + busy:
        writer.close()


# --- clients that do not read their answers, heads too large -----------------------------------------

LONG_PATH = b"/" + b"a" * 8000  # its 404 echoes the path: ~8 KB out per request


async def unread_answers(port: int, raw: bytes, count: int) -> tuple[socket.socket, asyncio.Task[None]]:
    """A connection that sends `count` pipelined copies of `raw` and reads none of the answers:
    enough (megabytes) to fill the kernel's buffers and the transport's."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()

    async def send() -> None:
        with contextlib.suppress(OSError):
            await loop.sock_sendall(sock, raw * count)

    return sock, asyncio.create_task(send())


async def until(condition: Callable[[], bool], seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds} s")


@pytest.mark.parametrize("listener", ["tenant", "ops"])
async def test_a_client_that_reads_no_answers_is_cut_off_at_the_write_timeout(
    start_gateway: StartGateway,
    mock_openai: TestServer,
    listener: str,
) -> None:
    """It is never idle (an answer waits to be written) nor waiting for a head: without a deadline
    on its writes it held its slot, here the listener's only one, for ever."""
    server = {
        "max_connections": 1,
        "ops_max_connections": 1,
        "client_write_timeout_seconds": 0.5,
        "header_timeout_seconds": 60,
        "keepalive_timeout_seconds": 60,
    }
    gateway = await start_gateway(openai_url=base_url(mock_openai), server=server)
    url = gateway.url if listener == "tenant" else gateway.ops_url
    port = int(url.rsplit(":", 1)[1])
    path = LONG_PATH if listener == "tenant" else b"/metrics"
    count = 1000 if listener == "tenant" else 2000
    sock, sending = await unread_answers(port, b"GET " + path + b" HTTP/1.1\r\nHost: g\r\n\r\n", count)
    closed = ("gateway_connections_closed_total", {"listener": listener, "reason": "write_timeout"})
    await until(lambda: gateway.metric(closed[0], **closed[1]) == 1)
    assert gateway.metric("gateway_connections_open", listener=listener) == 0
    assert (await exchange(port, request("/healthz", method="GET"))).status == 200  # its slot is free
    sending.cancel()
    sock.close()


async def test_at_the_cap_a_connection_not_taking_its_answers_makes_room(
    start_gateway: StartGateway, mock_openai: TestServer
) -> None:
    """None idle: one connection reads a body, the other has its answers stuck (writing paused for
    the stall grace, a quarter of the write timeout, which is far off). The stuck one is closed for
    a new connection, not the new one refused."""
    server = {"max_connections": 2, "client_write_timeout_seconds": 8, "header_timeout_seconds": 60}
    gateway = await start_gateway(openai_url=base_url(mock_openai), server=server)
    port = port_of(gateway)
    _, busy = await asyncio.open_connection("127.0.0.1", port)
    busy.write(request(GENERATE, headers=[JSON, AUTH, (b"Content-Length", b"100")]) + b"{")
    sock, sending = await unread_answers(port, b"GET " + LONG_PATH + b" HTTP/1.1\r\nHost: g\r\n\r\n", 1000)
    door = gateway.server.runner.door  # type: ignore[attr-defined]
    await until(lambda: any(connection.writing_paused for connection in door))
    stuck = next(connection for connection in door if connection.writing_paused)
    await asyncio.sleep(door.bounds.stall_grace)
    waiting = stuck._drain_waiter  # its handler's write, waiting for the client to take its answer
    served = await exchange(port, request("/healthz", method="GET"))
    assert served.status == 200
    assert closes(gateway, "stalled_evicted") == 1 and closes(gateway, "refused") == 0
    # the write fails as if the client had left (losing the connection would have resolved it: a
    # relay would count the bytes dropped as sent, and the client as served)
    assert waiting is not None and isinstance(waiting.exception(), ConnectionResetError)
    sending.cancel()
    sock.close()
    busy.close()


async def small_unsent_tail(
    start_gateway: StartGateway, mock_openai: TestServer, write_timeout: float
) -> tuple[Running, socket.socket]:
    """A gateway of one connection, and a client holding it that sends GETs without reading their
    answers, one at a time, until an answer is left partly unsent: under the transport's high-water
    mark (writing never paused), and the connection idle, so closed at the keep-alive timeout with
    those bytes still to send."""
    server = {
        "max_connections": 1,
        "client_write_timeout_seconds": write_timeout,
        "header_timeout_seconds": 60,
        "keepalive_timeout_seconds": 1.0,
    }
    gateway = await start_gateway(openai_url=base_url(mock_openai), server=server)
    door = gateway.server.runner.door  # type: ignore[attr-defined]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port_of(gateway)))
    for _ in range(2000):
        await loop.sock_sendall(sock, b"GET " + LONG_PATH + b" HTTP/1.1\r\nHost: g\r\n\r\n")
        await asyncio.sleep(0.02)
        (connection,) = door
        if connection.transport is not None and connection.transport.get_write_buffer_size() > 0:
            assert not connection.writing_paused
            await until(lambda: closes(gateway, "keepalive_timeout") == 1)
            return gateway, sock
    raise AssertionError("no answer left unsent")


async def test_a_connection_closed_with_a_small_unsent_tail_is_cut_off_at_the_write_timeout(
    start_gateway: StartGateway, mock_openai: TestServer
) -> None:
    """Closed (here at keep-alive) with under 64 KiB unsent, it waited for the client to take them:
    for ever, holding the listener's only slot (every new client a 503)."""
    gateway, sock = await small_unsent_tail(start_gateway, mock_openai, 0.5)
    await until(lambda: closes(gateway, "write_timeout") == 1)
    assert gateway.metric("gateway_connections_open", listener="tenant") == 0
    assert (await exchange(port_of(gateway), request("/healthz", method="GET"))).status == 200
    sock.close()


async def test_at_the_cap_a_connection_closed_with_a_small_unsent_tail_makes_room(
    start_gateway: StartGateway, mock_openai: TestServer
) -> None:
    """The same connection, a write timeout far off: it is stalled (neither idle nor paused), so
    it makes room for a new connection once stalled for the grace (a quarter of it)."""
    gateway, sock = await small_unsent_tail(start_gateway, mock_openai, 8)
    await asyncio.sleep(gateway.server.runner.door.bounds.stall_grace)  # type: ignore[attr-defined]
    assert (await exchange(port_of(gateway), request("/healthz", method="GET"))).status == 200
    assert closes(gateway, "stalled_evicted") == 1 and closes(gateway, "write_timeout") == 0
    sock.close()


async def test_at_the_cap_the_longest_stalled_connection_makes_room_not_a_reader(
    start_server: StartServer, start_gateway: StartGateway
) -> None:
    """A reads an event stream steadily (its transport pauses briefly for every 256 KiB event); B,
    opened after it, reads none of its answers. At the cap, a new connection evicts B, stalled
    since it filled its transport, though A is paused at that moment too: before, the oldest
    paused connection went, A, cut mid-stream. A's stream ends whole."""
    upstream = ScriptedUpstream(Script(chunks=[BIG_PARTIAL] * 40 + [COMPLETED]))
    server = await start_server(upstream.app())
    config = {"max_connections": 2, "client_write_timeout_seconds": 8, "header_timeout_seconds": 60}
    gateway = await start_gateway(openai_url=base_url(server), server=config)
    port = port_of(gateway)
    door = gateway.server.runner.door  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    reader.setblocking(False)
    await loop.sock_connect(reader, ("127.0.0.1", port))
    body = orjson.dumps(STREAM)
    await loop.sock_sendall(reader, request(GENERATE, headers=[JSON, AUTH], body=body))

    async def read_steadily() -> bytes:  # ~1.6 MB/s until the stream's last chunk
        received = bytearray()
        while not received.endswith(b"0\r\n\r\n"):
            data = await loop.sock_recv(reader, 16384)
            if not data:
                break
            received += data
            await asyncio.sleep(0.01)
        return bytes(received)

    reading = asyncio.create_task(read_steadily())
    await until(lambda: len(door.open) == 1)
    (a,) = door
    sock, sending = await unread_answers(port, b"GET " + LONG_PATH + b" HTTP/1.1\r\nHost: g\r\n\r\n", 1000)
    await until(lambda: len(door.open) == 2)
    b = list(door)[1]
    await until(lambda: b.writing_paused)
    await asyncio.sleep(door.bounds.stall_grace)
    await until(lambda: a.writing_paused, 5)
    assert (await exchange(port, request("/healthz", method="GET"))).status == 200
    assert closes(gateway, "stalled_evicted") == 1
    assert a in door.open and b not in door.open
    received = await asyncio.wait_for(reading, 30)
    assert b"image_generation.completed" in received
    sending.cancel()
    sock.close()
    reader.close()


def big_head(size: int, *, end: bool = True) -> bytes:
    """A GET /healthz whose head is `size` bytes, in headers of at most ~8 KB (each within aiohttp's
    own bounds); without its final empty line unless `end`."""
    head, tail = b"GET /healthz HTTP/1.1\r\nHost: g\r\n", b"\r\n" if end else b""
    field = len(b"X-Pad-0000: \r\n")
    left = size - len(head) - len(tail)
    full = (left - field - 1) // (8000 + field)
    values = [8000] * full + [left - full * (8000 + field) - field]
    fields = b"".join(b"X-Pad-%04d: %s\r\n" % (i, b"a" * n) for i, n in enumerate(values))
    return head + fields + tail


@pytest.fixture
async def small_heads(start_gateway: StartGateway, mock_openai, mock_do) -> Running:  # type: ignore[no-untyped-def]
    server = {"max_head_bytes": 16384, "header_timeout_seconds": 60}
    return await start_gateway(openai_url=base_url(mock_openai), do_url=base_url(mock_do), server=server)


async def test_a_head_over_max_head_bytes_is_431_before_it_ends(small_heads: Running) -> None:
    """Refused as its bytes arrive: the connection is answered and closed while the head is unfinished
    (it used to be held, ~2 bytes of memory a byte, up to 2 MiB, until the header timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(small_heads))
    head = big_head(20000, end=False)  # the fifth piece takes it over the limit
    for start in range(0, len(head), 4000):
        writer.write(head[start : start + 4000])
        await asyncio.sleep(0.01)
    response = await read_response(reader)
    assert response.status == 431 and response.closed
    assert response.json()["error"]["code"] == "request_head_too_large"  # type: ignore[index]
    assert response.headers["server"] == "image-gateway"
    assert await closed_within(reader, 5) == b""
    assert closes(small_heads, "head_too_large") == 1
    writer.close()


@pytest.mark.parametrize("size", [16385, 40000])
async def test_a_whole_head_over_max_head_bytes_in_one_read_is_431_unhandled(
    small_heads: Running, size: int
) -> None:
    response = await exchange(port_of(small_heads), big_head(size))
    assert response.status == 431 and response.closed
    assert answered(small_heads, 200) == 0


async def test_a_head_within_max_head_bytes_is_served(small_heads: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(small_heads))
    head = big_head(16384)
    writer.write(head[:9000])  # in two reads, the second ending exactly at the limit
    await asyncio.sleep(0.05)
    writer.write(head[9000:] + request("/healthz", method="GET"))  # and another request after it
    assert (await read_response(reader)).status == 200
    assert (await read_response(reader)).status == 200
    assert closes(small_heads, "head_too_large") == 0
    writer.close()


async def test_a_head_too_large_behind_a_request_being_handled_closes_after_its_answer(
    start_gateway: StartGateway,
    start_server: Callable[[web.Application], Awaitable[TestServer]],
    mock_do: TestServer,
) -> None:
    """A 431 cannot overtake the answer owed first: that answer is given, then the connection closed."""
    server = {"max_head_bytes": 16384, "header_timeout_seconds": 60}
    gateway, reader, writer = await being_handled(start_gateway, start_server, mock_do, server)
    writer.write(big_head(20000, end=False))
    response = await read_response(reader)
    assert response.status == 200
    assert await closed_within(reader, 5) == b""
    assert closes(gateway, "head_too_large") == 1
    writer.close()


# --- bodies: encoding, aborts, framing, the shared budget --------------------------------------------


def gzip_bomb(inflated: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    zeros = bytes(1 << 20)
    parts = [compressor.compress(zeros) for _ in range(inflated >> 20)]
    return b"".join([*parts, compressor.flush()])


async def test_a_compressed_body_is_415_before_it_is_read_and_the_connection_closes(gateway: Running) -> None:
    bomb = gzip_bomb(64 << 20)
    head = request(GENERATE, headers=[JSON, AUTH, (b"Content-Encoding", b"gzip")], body=bomb)
    response = await exchange(port_of(gateway), head)
    assert response.status == 415 and not response.closed  # the whole body is here: keep-alive stays
    # most of the body still to come: answered at once, and closed rather than drained
    response = await exchange(port_of(gateway), head[: len(head) - len(bomb) // 2])
    assert response.status == 415 and response.closed
    assert response.json()["error"]["code"] == "unsupported_content_encoding"  # type: ignore[index]
    garbage = request(GENERATE, headers=[JSON, AUTH, (b"Content-Encoding", b"gzip")], body=b"not gzip at all")
    assert (await exchange(port_of(gateway), garbage)).status == 415  # never inflated, so never a 500


async def test_a_client_that_aborts_its_upload_is_499_not_500(gateway: Running) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port_of(gateway))
    writer.write(request(GENERATE, headers=[JSON, AUTH, (b"Content-Length", b"5000")]) + b'{"prompt": "a')
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.transport.abort()
    for _ in range(100):
        if answered(gateway, 499) == 1:
            break
        await asyncio.sleep(0.05)
    assert answered(gateway, 499) == 1 and answered(gateway, 500) == 0


@pytest.mark.parametrize(
    "framing",
    [
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",  # a chunk size that is no number
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n",  # no CRLF after the chunk
    ],
)
async def test_broken_chunked_framing_is_a_400(gateway: Running, framing: bytes) -> None:
    head = request(GENERATE, headers=[JSON, AUTH]).removesuffix(b"\r\n")
    response = await exchange(port_of(gateway), head + framing)
    assert response.status == 400, response.body
    assert TENANT_KEY.encode() not in response.body


async def test_bodies_read_at_once_share_one_budget(tight: Running) -> None:
    """8 KiB for all bodies being read: two slow 4,000-byte uploads hold it, so a third body of the
    same size, still arriving, is not read (not buffered) until one of them is done (here: cut off
    at its timeout). A body that came whole with its head is in memory already: it takes no share."""
    port = port_of(tight)
    slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    for _, writer in slow:
        writer.write(request(GENERATE, headers=[JSON, AUTH, (b"Content-Length", b"4000")]) + b"{")
    await asyncio.sleep(0.1)
    assert tight.metric("gateway_body_bytes_buffered") == 8000
    body = orjson.dumps({"prompt": "a" * 3950, "quality": "low"})
    whole = await exchange(port, request(GENERATE, headers=[JSON, AUTH], body=body))
    assert whole.status == 200
    started = asyncio.get_running_loop().time()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = request(GENERATE, headers=[JSON, AUTH], body=body)
    writer.write(raw[:-1])  # the head and all but the last byte: a body still arriving
    await asyncio.sleep(0.05)
    writer.write(raw[-1:])
    third = await read_response(reader, 10)
    writer.close()
    waited = asyncio.get_running_loop().time() - started
    assert third.status == 200 and waited > 0.25, waited
    for _, writer in slow:
        writer.close()
    assert tight.metric("gateway_body_bytes_buffered") == 0


@pytest.fixture
async def shares(start_gateway: StartGateway, mock_openai, mock_do) -> Running:  # type: ignore[no-untyped-def]
    """Four places for requests waiting for admission and 8 KiB for bodies, each tenant's share half
    of them; a body timeout far longer than the tests, so nothing frees room on its own."""
    server = {"max_pending_admissions": 4, "max_body_bytes": 4096, "max_buffered_body_bytes": 8192}
    return await start_gateway(openai_url=base_url(mock_openai), do_url=base_url(mock_do), server=server)


OTHER = (b"Authorization", b"Bearer " + OTHER_KEY.encode())


async def slow_bodies(
    port: int, count: int, length: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`count` connections of the tenant, each a request whose body (of `length`) has only begun."""
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
    for _, writer in connections:
        writer.write(
            request(GENERATE, headers=[JSON, AUTH, (b"Content-Length", str(length).encode())]) + b"{"
        )
    return connections


def refused_for_its_share(response: RawResponse, bound: str) -> None:
    assert response.status == 429 and response.headers["retry-after"] == "1", response.body
    error = response.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"  # type: ignore[index]
    assert f"server.max_tenant_share of server.{bound}" in error["message"]  # type: ignore[index]


async def test_one_tenants_slow_bodies_leave_the_others_their_admission_places(shares: Running) -> None:
    """The tenant's requests beyond its share of `max_pending_admissions` (2 of 4) are a 429 at once,
    before their bodies are read; another tenant is served, not shed with 503 `overloaded`."""
    port = port_of(shares)
    holding = await slow_bodies(port, 2, 100)
    await until(lambda: shares.metric("gateway_pending_admissions") == 2)
    beyond = await slow_bodies(port, 2, 100)
    served = await exchange(port, request(GENERATE, headers=[JSON, OTHER], body=GOOD))
    assert served.status == 200, served.body
    for reader, _ in beyond:
        refused_for_its_share(await read_response(reader), "max_pending_admissions")
    assert shares.metric("gateway_tenant_share_refused_total", tenant="team", bound="pending_admissions") == 2
    for _, writer in holding + beyond:
        writer.close()
    await until(lambda: shares.metric("gateway_pending_admissions") == 0)
    assert (await exchange(port, request(GENERATE, headers=[JSON, AUTH], body=GOOD))).status == 200


async def test_a_strangers_early_answer_closes_at_once_without_reading_its_body(shares: Running) -> None:
    """Only a known tenant's unread body is drained (below): a request without a valid key, or
    for no route, is answered and closed at once, the rest of its body never read."""
    stranger = (b"Authorization", b"Bearer sk-not-a-key-of-this-gateway")
    for head in (
        request(GENERATE, headers=[JSON, stranger, (b"Content-Length", b"100000")]),
        request("/v1/nowhere", headers=[JSON, AUTH, (b"Content-Length", b"100000")]),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(shares))
        writer.write(head + b"{")
        answer = await read_response(reader)
        assert answer.status in (401, 404) and answer.closed, answer.body
        assert await closed_within(reader, 1.0) == b""  # not after a drain (2 s)
        writer.close()


async def test_the_sdk_gets_the_429_of_an_edit_refused_before_its_body_was_read(shares: Running) -> None:
    """The SDK sends a whole upload before it reads: an answer given before the body was read must
    reach it, not a connection closed under the unread upload and reset (the rest is read and
    dropped, for a known tenant)."""
    holding = await slow_bodies(port_of(shares), 2, 100)
    await until(lambda: shares.metric("gateway_pending_admissions") == 2)
    for _ in range(10):
        async with openai.AsyncOpenAI(base_url=shares.v1, api_key=TENANT_KEY, max_retries=0) as client:
            with pytest.raises(openai.RateLimitError) as refused:
                await client.images.edit(
                    model="gpt-image-1.5",
                    image=[("a.png", image_bytes(64, 64), "image/png")],
                    prompt="p",
                    quality="low",
                )
        assert refused.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    for _, writer in holding:
        writer.close()


async def test_one_tenants_slow_bodies_leave_the_others_room_in_the_body_budget(shares: Running) -> None:
    """The tenant's second slow 4,000-byte body would pass its 4 KiB share of the 8 KiB budget: a 429
    at once, instead of holding the rest of the budget while another tenant's body waits for room
    (here up to its 60 s timeout)."""
    port = port_of(shares)
    holding = await slow_bodies(port, 1, 4000)
    await until(lambda: shares.metric("gateway_body_bytes_buffered") == 4000)
    [(second, writer)] = await slow_bodies(port, 1, 4000)
    refused_for_its_share(await read_response(second), "max_buffered_body_bytes")
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = request(GENERATE, headers=[JSON, OTHER], body=orjson.dumps({"prompt": "a" * 3950}))
    writer.write(raw[:-1])  # the head and all but the last byte: a body still arriving
    await asyncio.sleep(0.05)
    writer.write(raw[-1:])
    served = await read_response(reader)
    writer.close()
    assert served.status == 200, served.body
    assert shares.metric("gateway_body_bytes_buffered") == 4000  # the tenant's first body, still arriving
    for _, writer in holding:
        writer.close()


async def test_a_reload_that_adds_or_removes_tenants_moves_their_default_share(
    start_gateway: StartGateway, mock_openai: TestServer, tmp_path: Path
) -> None:
    """Unset, `max_tenant_share` is all of the bounds for a tenant alone and half for several: a
    reload that adds a tenant gives each the half from its next request on, one that leaves a tenant
    alone gives it everything again. `max_tenant_share` itself is a `server` setting: a reload
    reports it as needing a restart and keeps it."""
    config = config_dict(base_url(mock_openai), server={"max_pending_admissions": 4})
    both = dict(config["tenants"])
    config["tenants"] = {"team": both["team"]}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    gateway = await start_gateway(load_settings(path), config_path=path)
    port, reloader = port_of(gateway), gateway.app[RELOADER]
    holding = await slow_bodies(port, 3, 100)  # alone: 3 of the 4 places are its to take
    await until(lambda: gateway.metric("gateway_pending_admissions") == 3)
    config["tenants"] = both
    path.write_text(yaml.safe_dump(config))
    reloader.reload()
    [(beyond, _)] = await slow_bodies(port, 1, 100)  # now 2 of 4: refused, not a 4th place
    refused_for_its_share(await read_response(beyond), "max_pending_admissions")
    served = await exchange(port, request(GENERATE, headers=[JSON, OTHER], body=GOOD))
    assert served.status == 200, served.body
    config["server"]["max_tenant_share"] = 1
    path.write_text(yaml.safe_dump(config))
    reloader.reload()
    assert reloader.needs_restart == ["server"]  # reported, and kept: still refused
    [(kept, _)] = await slow_bodies(port, 1, 100)
    refused_for_its_share(await read_response(kept), "max_pending_admissions")
    del config["server"]["max_tenant_share"]
    config["tenants"] = {"team": both["team"]}
    path.write_text(yaml.safe_dump(config))
    reloader.reload()
    holding += await slow_bodies(port, 1, 100)  # alone again: the 4th place is its
    await until(lambda: gateway.metric("gateway_pending_admissions") == 4)
    assert (
        gateway.metric("gateway_tenant_share_refused_total", tenant="team", bound="pending_admissions") == 2
    )
    for _, writer in holding:
        writer.close()


# --- the operations port, the Server header -------------------------------------------------------------


async def test_metrics_are_on_the_operations_port_only(gateway: Running) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gateway.url}/metrics") as resp:
            assert resp.status == 404
        async with session.get(f"{gateway.ops_url}/metrics") as resp:
            assert resp.status == 200 and "gateway_requests_total" in await resp.text()
        for url in (gateway.url, gateway.ops_url):
            for path in ("/healthz", "/readyz"):
                async with session.get(url + path) as resp:
                    assert resp.status == 200, (url, path)


async def test_the_operations_port_passes_the_same_front_door(
    mock_openai: TestServer, tmp_path: Path
) -> None:
    """`gateway serve`'s operations listener: a connection that sends no headers is closed, and it
    holds at most `server.ops_max_connections` (the oldest idle one makes room)."""
    server = {"header_timeout_seconds": 0.5, "keepalive_timeout_seconds": 60, "ops_max_connections": 2}
    gateway = GatewayProcess(config_dict(base_url(mock_openai), server=server), tmp_path)
    await gateway.start()
    try:
        silent, _ = await asyncio.open_connection("127.0.0.1", gateway.ops_port)
        assert await closed_within(silent, 5) == b""
        kept = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.ops_port)
            writer.write(request("/healthz", method="GET"))
            assert (await read_response(reader)).status == 200
            kept.append((reader, writer))
        scrape = await exchange(gateway.ops_port, request("/metrics", method="GET"))  # a third: at the cap
        assert scrape.status == 200
        assert await closed_within(kept[0][0], 5) == b""
        text = scrape.body.decode()
        assert 'gateway_connections_closed_total{listener="ops",reason="header_timeout"} 1.0' in text
        assert 'gateway_connections_closed_total{listener="ops",reason="idle_evicted"} 1.0' in text
        for _, writer in kept:
            writer.close()
    finally:
        assert gateway.stop() == 0


async def test_no_response_names_python_or_aiohttp(gateway: Running) -> None:
    for raw in (request("/healthz", method="GET"), request(GENERATE, headers=[JSON]), b"GARBAGE\r\n\r\n"):
        response = await exchange(port_of(gateway), raw)
        assert response.headers.get("server") == "image-gateway", response.headers


# --- malformed HTTP in a real process: what the client and the log see -----------------------------

PROMPT = b"a secret prompt about the moon"
KEY = TENANT_KEY.encode()
MALFORMED = {
    "space before colon": b"POST /v1/images/generations HTTP/1.1\r\nHost: g\r\nAuthorization : Bearer "
    + KEY
    + b"\r\nContent-Length: 2\r\n\r\n{}",
    "folded header": b"POST /v1/images/generations HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer\r\n "
    + KEY
    + b"\r\nContent-Length: 2\r\n\r\n{}",
    "bad chunk size": b"POST /v1/images/generations HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer "
    + KEY
    + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    + PROMPT
    + b"\r\n"
    + PROMPT
    + b"\r\n0\r\n\r\n",
    "bare LF": b"POST /v1/images/generations HTTP/1.1\nHost: g\nAuthorization: Bearer " + KEY + b"\n\n",
    "garbage request line": PROMPT + b" " + KEY + b"\r\n\r\n",
    "NUL in a header": b"GET /healthz HTTP/1.1\r\nHost: g\r\nX-Key: " + KEY + b"\x00" + PROMPT + b"\r\n\r\n",
}


async def test_malformed_http_is_an_openai_400_that_echoes_nothing_and_logs_nothing_of_it(
    mock_openai,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    gateway = GatewayProcess(config_dict(base_url(mock_openai)), tmp_path)
    await gateway.start()
    try:
        for name, raw in MALFORMED.items():
            response = await exchange(gateway.port, raw)
            assert response.status == 400, (name, response.body)
            assert response.headers["content-type"].startswith("application/json"), name
            assert response.json()["error"]["type"] == "invalid_request_error"  # type: ignore[index]
            assert KEY not in response.body and b"moon" not in response.body, name
    finally:
        assert gateway.stop() == 0
    lines = gateway.log_lines()
    assert lines
    for line in lines:
        assert orjson.loads(line), line  # one JSON object per line, no traceback lines between
        assert KEY.decode() not in line and "moon" not in line and "Traceback" not in line, line


@pytest.mark.parametrize("path", ["/v1/images/edits", "/v1/images/variations"])
async def test_uploads_pass_the_same_front_door(gateway: Running, path: str) -> None:
    """Multipart bodies are read through the same bounds: never inflated, never a 500 when cut off."""
    multipart = (b"Content-Type", b"multipart/form-data; boundary=XyZ")
    body = b'--XyZ\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na cat\r\n--XyZ--\r\n'
    gzip = (b"Content-Encoding", b"gzip")
    response = await exchange(port_of(gateway), request(path, headers=[multipart, AUTH, gzip], body=body))
    assert response.status == 415
    assert response.json()["error"]["code"] == "unsupported_content_encoding"  # type: ignore[index]
    _, writer = await asyncio.open_connection("127.0.0.1", port_of(gateway))
    writer.write(request(path, headers=[multipart, AUTH, (b"Content-Length", b"5000")]) + body[:40])
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.transport.abort()
    for _ in range(100):
        if answered(gateway, 499) == 1:
            break
        await asyncio.sleep(0.05)
    assert answered(gateway, 499) == 1 and answered(gateway, 500) == 0
