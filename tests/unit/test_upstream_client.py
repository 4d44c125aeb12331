"""The upstream HTTP/1.1 client against real local servers: an aiohttp application, and raw TCP
servers that answer with exactly the bytes a test gives (split where it says, or cut short)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.upstreams import client
from gateway.upstreams.client import (
    ConnectFailed,
    ConnectTimeout,
    Dropped,
    NotReached,
    Pool,
    ReadTimeout,
    Response,
    UpstreamError,
)

HEADERS = {"Content-Type": "application/json", "X-Request-Id": "req-1"}


async def body_of(response: Response) -> bytes:
    pieces = []
    while piece := await response.read():
        pieces.append(piece)
    return b"".join(pieces)


async def post(pool: Pool, body: bytes = b"{}", *, read_timeout: float = 5.0) -> tuple[Response, bytes]:
    response = await pool.request("/echo", HEADERS, body, 1.0, read_timeout)
    with response:
        return response, await body_of(response)


@pytest.fixture
async def app_server() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    servers: list[TestServer] = []

    async def start(app: web.Application) -> str:
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("/v1"))

    yield start
    for server in servers:
        await server.close()


Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Answer], Awaitable[str]]]:
    """A TCP server whose every connection is handed to `answer` (after its request head is read)."""
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = next(
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    )
                    await reader.readexactly(length)
                    await answer(reader, writer)
                    if writer.is_closing():
                        return
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def sends(*pieces: bytes, close: bool = False, pause: float = 0.005) -> Answer:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(pause)
        if close:
            writer.close()

    return answer


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"  # the shortest whole answer


def in_turn(*answers: Answer) -> Answer:
    """Each request, on whichever connection, answered by the next of `answers`, in the order they come."""
    remaining = iter(answers)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await next(remaining)(reader, writer)

    return answer


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Case: Kept\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"7\r\ndata: 1\r\n"
    b"9\r\n\n\ndata: 2\r\n"
    b"2\r\n\n\n\r\n0\r\n\r\n"
)


async def test_a_body_split_at_every_boundary_arrives_whole_and_the_connection_is_reused(
    raw_server: Callable[[Answer], Awaitable[str]],
) -> None:
    for split in range(1, len(CHUNKED)):
        pool = Pool(await raw_server(sends(CHUNKED[:split], CHUNKED[split:])), 1)
        for _ in range(2):  # the second exchange on the same connection
            response, body = await post(pool)
            assert body == b"data: 1\n\ndata: 2\n\n", split
            assert (response.status, response.reason, response.content_length) == (200, "OK", None)
            assert list(response.headers.items())[:2] == [
                ("Content-Type", "text/event-stream"),
                ("X-Case", "Kept"),
            ]
        assert len(pool.connections) == 1
        await pool.close()


SIZED_BODY = b'{"data": [{"b64_json": "aGk="}]}'
SIZED = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(SIZED_BODY),
    SIZED_BODY,
)


async def test_a_content_length_body_split_anywhere_arrives_whole_and_the_next_answer_is_parsed(
    raw_server: Callable[[Answer], Awaitable[str]],
) -> None:
    """Past the piece with its head, a Content-Length body is counted down, not parsed: wherever
    the pieces split, the body is whole and the next answer on the connection is read afresh."""
    head = SIZED.index(b"\r\n\r\n") + 4
    splits = [(split,) for split in range(1, len(SIZED))]
    splits += [(head + cut, head + cut + 1) for cut in range(len(SIZED) - head - 1)]  # 3 pieces
    splits += [(head, head + 13)]  # the head alone, then the body in two
    for cuts in splits:
        bounds = [0, *cuts, len(SIZED)]
        pieces = [SIZED[start:end] for start, end in itertools.pairwise(bounds)]
        pool = Pool(await raw_server(sends(*pieces)), 1)
        for _ in range(2):  # the next exchange on the same connection
            response, body = await post(pool)
            assert body == SIZED_BODY, cuts
            assert (response.status, response.content_length) == (200, len(SIZED_BODY))
            assert response.headers["Content-Type"] == "application/json"
        assert len(pool.connections) == 1 and len(pool.idle) == 1, cuts
        await pool.close()


async def test_bytes_past_a_content_length_body_close_the_connection(
    raw_server: Callable[[Answer], Awaitable[str]],
) -> None:
    head = SIZED.index(b"\r\n\r\n") + 4
    extra = OK
    for after in (extra, b"x"):  # another answer, or not even that
        pool = Pool(await raw_server(sends(SIZED[: head + 5], SIZED[head + 5 :] + after)), 1)
        assert (await post(pool))[1] == SIZED_BODY  # the answer asked for is whole
        assert pool.open == 0 and not pool.idle  # but the connection is not trusted again
        await pool.close()


async def test_content_length_and_until_close_bodies(raw_server: Callable[[Answer], Awaitable[str]]) -> None:
    sized = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhel" + b"lo"
    pool = Pool(await raw_server(sends(sized[:-2], sized[-2:])), 4)
    response, body = await post(pool)
    assert (response.status, response.reason, response.content_length, body) == (201, "Created", 5, b"hello")
    assert len(pool.idle) == 1
    await pool.close()

    until_close = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n", b'{"a":', b" 1}"
    pool = Pool(await raw_server(sends(*until_close, close=True)), 4)
    response, body = await post(pool)
    assert body == b'{"a": 1}' and response.content_length is None
    assert not pool.idle and pool.open == 0  # its end was the connection's: not reused
    await pool.close()


async def test_connection_close_is_honoured(raw_server: Callable[[Answer], Awaitable[str]]) -> None:
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
    for pieces in ((answer,), (answer[:-1], answer[-1:])):  # the body's end found by either reader
        pool = Pool(await raw_server(sends(*pieces)), 4)
        assert (await post(pool))[1] == b"{}"
        assert not pool.idle and pool.open == 0


async def test_an_informational_answer_is_skipped(raw_server: Callable[[Answer], Awaitable[str]]) -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\n" + OK
    pool = Pool(await raw_server(sends(answer)), 4)
    response, body = await post(pool)
    assert (response.status, body) == (200, b"{}")
    await pool.close()


async def first_piece_then(
    pool: Pool, first: bytes, failure: type[UpstreamError], *, read_timeout: float = 5.0
) -> None:
    """The body's first piece arrives, then the next read fails; the connection is not reused."""
    response = await pool.request("/echo", HEADERS, b"{}", 1.0, read_timeout)
    assert await response.read() == first
    with pytest.raises(failure):
        await response.read()
    response.release()
    assert pool.open == 0
    await pool.close()


async def test_a_connection_dropped_mid_body_fails_the_read_and_is_not_reused(
    raw_server: Callable[[Answer], Awaitable[str]],
) -> None:
    for cut in (
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ):
        await first_piece_then(Pool(await raw_server(sends(cut, close=True)), 4), b"hello", Dropped)
    # cut short after a piece counted down past the parser
    pieces = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel", b"lo"
    pool = Pool(await raw_server(sends(*pieces, close=True)), 4)
    response = await pool.request("/echo", HEADERS, b"{}", 1.0, 5.0)
    assert await response.read() == b"hel"
    assert await response.read() == b"lo"
    with pytest.raises(Dropped):
        await response.read()
    response.release()
    assert pool.open == 0
    await pool.close()


async def test_a_dropped_connection_before_the_answer_and_a_malformed_answer_are_not_never_reached(
    raw_server: Callable[[Answer], Awaitable[str]],
) -> None:
    endless_head = [b"HTTP/1.1 200 OK\r\n"] + [b"X-Padding: " + b"p" * 1000 + b"\r\n"] * 100
    for answer in (sends(close=True), sends(b"SMTP ready\r\n\r\n"), sends(*endless_head, pause=0)):
        pool = Pool(await raw_server(answer), 4)
        with pytest.raises(Dropped) as info:
            await pool.request("/echo", HEADERS, b"{}", 1.0, 5.0)
        assert not isinstance(info.value, NotReached)
        assert pool.open == 0
        await pool.close()


async def test_the_read_timeout_is_the_silence_between_two_reads(
    raw_server: Callable[[Answer], Awaitable[str]],
) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    # four pieces 0.15 s apart (0.6 s in all) pass a 0.4 s read timeout; a 0.6 s silence does not
    steady = [head] + [b"1\r\na\r\n"] * 4 + [b"0\r\n\r\n"]
    pool = Pool(await raw_server(sends(*steady, pause=0.15)), 4)
    assert (await post(pool, read_timeout=0.4))[1] == b"aaaa"
    await pool.close()

    pool = Pool(await raw_server(sends(head + b"1\r\na\r\n", b"1\r\nb\r\n0\r\n\r\n", pause=0.6)), 4)
    await first_piece_then(pool, b"a", ReadTimeout, read_timeout=0.4)

    sized = [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"] + [b"a"] * 4  # counted past the parser
    pool = Pool(await raw_server(sends(*sized, pause=0.15)), 4)
    assert (await post(pool, read_timeout=0.4))[1] == b"aaaa"
    await pool.close()
    pool = Pool(await raw_server(sends(sized[0] + b"a", b"a", b"bb", pause=0.6)), 4)
    await first_piece_then(pool, b"a", ReadTimeout, read_timeout=0.4)

    pool = Pool(await raw_server(sends(pause=1.0)), 4)  # no answer at all
    with pytest.raises(ReadTimeout):
        await pool.request("/echo", HEADERS, b"{}", 1.0, 0.3)
    await pool.close()


async def test_a_connections_read_timer_runs_on_between_exchanges_and_bounds_each(
    raw_server: Callable[[Answer], Awaitable[str]],
) -> None:
    """One timer per connection, not one armed and cancelled per exchange; an exchange with a
    shorter read timeout than the one the running timer was armed for still gets its own bound."""
    pool = Pool(await raw_server(in_turn(sends(OK), sends(OK), sends())), 1)  # the third never answers
    await post(pool, read_timeout=30.0)
    [connection] = pool.idle
    timer = connection.timer
    assert timer is not None  # left running after the exchange
    await post(pool, read_timeout=30.0)
    assert connection.timer is timer  # the second exchange armed none of its own
    started = asyncio.get_running_loop().time()
    with pytest.raises(ReadTimeout):  # the upstream is silent: 0.3 s, not the 30 s timer's
        await pool.request("/echo", HEADERS, b"{}", 1.0, 0.3)
    assert asyncio.get_running_loop().time() - started < 0.9
    # the third exchange's shorter bound armed a timer of its own in its place
    assert timer.cancelled() and connection.timer is None
    await pool.close()


async def test_a_timer_left_from_an_earlier_exchange_neither_cuts_the_next_short_nor_lets_it_hang(
    raw_server: Callable[[Answer], Awaitable[str]],
) -> None:
    """The kept timer fires during the next exchange, from the earlier one's start: it re-arms from
    when the upstream was last heard, so an answer within the bound arrives and silence still ends."""

    async def late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.25)
        await sends(OK)(reader, writer)

    pool = Pool(await raw_server(in_turn(sends(OK), late, sends())), 1)
    loop = asyncio.get_running_loop()
    await post(pool, read_timeout=0.3)  # its timer is due 0.3 s from now, and kept
    await asyncio.sleep(0.2)
    started = loop.time()
    await post(pool, read_timeout=0.3)  # answered after 0.25 s: the old timer fired meanwhile
    assert loop.time() - started >= 0.25
    started = loop.time()
    with pytest.raises(ReadTimeout):  # silent: ended at its own 0.3 s
        await pool.request("/echo", HEADERS, b"{}", 1.0, 0.3)
    assert 0.28 <= loop.time() - started < 0.6
    await pool.close()


async def test_an_idle_connection_that_closes_stops_its_timer(
    raw_server: Callable[[Answer], Awaitable[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timer left running would keep a closed connection (and its buffers) until it fires."""
    monkeypatch.setattr(client, "IDLE_SECONDS", 0.05)
    pool = Pool(await raw_server(sends(OK)), 1)
    await post(pool, read_timeout=30.0)
    [connection] = pool.idle
    timer = connection.timer
    assert timer is not None
    await asyncio.sleep(0.2)  # swept: closed while idle
    assert connection.closed and not pool.idle
    assert timer.cancelled() and connection.timer is None
    await pool.close()


async def test_refused_is_never_reached() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    pool = Pool(f"http://127.0.0.1:{port}/v1", 4)
    with pytest.raises(ConnectFailed):
        await pool.request("/echo", HEADERS, b"{}", 1.0, 5.0)
    assert pool.open == 0


def slow_app(delay: float, seen: list[tuple[str, str]]) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        seen.append((request.path, str(peer)))
        await request.read()
        await asyncio.sleep(delay)
        return web.json_response({"path": request.path})

    app = web.Application()
    app.router.add_post("/v1/echo", handle)
    return app


async def test_the_pool_holds_at_most_its_size_and_a_wait_is_bounded_by_the_connect_timeout(
    app_server: Callable[[web.Application], Awaitable[str]],
) -> None:
    seen: list[tuple[str, str]] = []
    pool = Pool(await app_server(slow_app(0.3, seen)), 2)
    answers = await asyncio.gather(*(post(pool) for _ in range(5)))  # 2 at once: 3 rounds of 0.3 s
    assert [body for _, body in answers] == [b'{"path": "/v1/echo"}'] * 5
    assert len({peer for _, peer in seen}) == 2 and pool.open == 2 and len(pool.idle) == 2

    held = [await pool.request("/echo", HEADERS, b"{}", 1.0, 5.0) for _ in range(2)]
    with pytest.raises(ConnectTimeout):  # both busy for longer than 0.2 s
        await pool.request("/echo", HEADERS, b"{}", 0.2, 5.0)
    waiting = asyncio.ensure_future(post(pool))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    held[0].release()  # its body was not read: closed, and its place opens a new connection
    assert (await waiting)[1] == b'{"path": "/v1/echo"}'
    held[1].release()
    assert pool.open <= 2 and not pool.waiters
    await pool.close()


async def test_idle_connections_are_closed(
    app_server: Callable[[web.Application], Awaitable[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client, "IDLE_SECONDS", 0.1)
    pool = Pool(await app_server(slow_app(0, [])), 4)
    await asyncio.gather(post(pool), post(pool))
    assert len(pool.idle) == 2
    await asyncio.sleep(0.3)
    assert not pool.idle and pool.open == 0 and pool.sweeper is None


class Upload:
    """A streamed body of `pieces` pieces of 64 KiB; counts how many were taken."""

    content_type = "application/octet-stream"

    def __init__(self, pieces: int) -> None:
        self.pieces = pieces
        self.sent = 0

    @property
    def length(self) -> int:
        return self.pieces * 65536

    async def chunks(self) -> AsyncIterator[bytes]:
        for _ in range(self.pieces):
            self.sent += 1
            yield b"x" * 65536


async def test_a_streamed_upload_is_sent_whole_and_an_early_answer_closes_the_connection(
    app_server: Callable[[web.Application], Awaitable[str]],
) -> None:
    async def count(request: web.Request) -> web.Response:
        return web.json_response({"read": len(await request.read())})

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": "too large"}, status=413)  # without reading the body

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/count", count)
    app.router.add_post("/v1/refuse", refuse)
    pool = Pool(await app_server(app), 4)
    upload = Upload(64)  # 4 MiB
    async with asyncio.timeout(10):
        with await pool.request("/count", {}, upload, 1.0, 5.0) as response:
            assert await body_of(response) == b'{"read": 4194304}'
    assert upload.sent == 64 and len(pool.idle) == 1

    big = Upload(1024)  # 64 MiB: far more than the socket buffers take before the answer
    async with asyncio.timeout(10):
        with await pool.request("/refuse", {}, big, 1.0, 5.0) as response:
            assert response.status == 413
            assert await body_of(response) == b'{"error": "too large"}'
    assert big.sent < 1024
    assert pool.open == 0 and not pool.idle  # the refused upload's connection was closed, not reused
    await pool.close()


async def test_reading_pauses_above_the_high_water_mark(
    app_server: Callable[[web.Application], Awaitable[str]],
) -> None:
    size = 8 * 1024 * 1024

    async def large(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        for _ in range(size // 65536):
            await response.write(b"y" * 65536)
        return response

    app = web.Application()
    app.router.add_post("/v1/large", large)
    pool = Pool(await app_server(app), 4)
    response = await pool.request("/large", HEADERS, b"{}", 1.0, 5.0)
    connection = next(iter(pool.connections))
    received, peak = 0, 0
    while piece := await response.read():
        received += len(piece)
        peak = max(peak, connection.buffered + len(piece))
        await asyncio.sleep(0.001)  # a slow reader: the upstream has to wait
    response.release()
    assert received == size
    assert peak <= client.HIGH_WATER + 512 * 1024  # the buffer, plus at most one socket read
    assert len(pool.idle) == 1
    await pool.close()


class Transport:
    """Stands for a connected socket's transport: counts the pauses and resumptions of reading."""

    def __init__(self) -> None:
        self.pauses = 0
        self.resumes = 0

    def write(self, data: bytes) -> None:
        pass

    def pause_reading(self) -> None:
        self.pauses += 1

    def resume_reading(self) -> None:
        self.resumes += 1

    def abort(self) -> None:
        pass


async def test_a_piece_a_read_is_waiting_for_does_not_pause_reading() -> None:
    """Pausing for a piece the waiting read takes at the loop's next turn would only be undone then."""
    connection = client.Connection(Pool("http://127.0.0.1:9/v1", 1))
    transport = Transport()
    connection.connection_made(cast("asyncio.Transport", transport))
    piece = client.HIGH_WATER + 1
    exchange = asyncio.ensure_future(connection.exchange(b"POST / HTTP/1.1\r\n\r\n", b"", 5.0))
    await asyncio.sleep(0)  # the request is sent
    connection.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (3 * piece))
    response = await exchange
    reading = asyncio.ensure_future(response.read())
    await asyncio.sleep(0)  # the read waits for a piece
    connection.data_received(b"a" * piece)
    assert transport.pauses == 0
    connection.data_received(b"b" * piece)  # no read waits: more than HIGH_WATER kept
    assert transport.pauses == 1
    assert await reading == b"a" * piece
    assert await response.read() == b"b" * piece and transport.resumes == 1
    reading = asyncio.ensure_future(response.read())
    await asyncio.sleep(0)
    connection.data_received(b"c" * piece)  # the last piece, for a waiting read again
    assert await reading == b"c" * piece and await response.read() == b""
    assert transport.pauses == 1 and connection.reusable
    connection.connection_lost(None)


async def test_a_connection_paused_by_an_answer_left_unread_reads_the_next_one(
    raw_server: Callable[[Answer], Awaitable[str]],
) -> None:
    big = b"z" * (client.HIGH_WATER + 65536)  # received whole in a read or two, reading paused
    answers = [b"HTTP/1.1 503 Busy\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)]
    answers.append(OK)

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answers.pop(0))
        await writer.drain()

    pool = Pool(await raw_server(answer), 1)
    connection = None
    with await pool.request("/echo", HEADERS, b"{}", 1.0, 5.0) as response:
        assert response.status == 503
        connection = next(iter(pool.connections))
        await until_true(lambda: connection.complete)
        assert connection.paused  # released unread (as failover does with a 503)
    async with asyncio.timeout(3):  # left paused, it would never hear the answer (nor time out)
        response, body = await post(pool, read_timeout=1.0)
    assert (response.status, body) == (200, b"{}")
    assert pool.connections == {connection}  # the same connection served both
    await pool.close()


async def until_true(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not within 5 s")


async def test_header_values_cannot_break_lines(
    app_server: Callable[[web.Application], Awaitable[str]],
) -> None:
    pool = Pool(await app_server(slow_app(0, [])), 4)
    with pytest.raises(ValueError, match="line break"):
        await pool.request("/echo", {"Authorization": "Bearer k\r\nX-Evil: 1"}, b"{}", 1.0, 5.0)
    assert pool.open == 0
    await pool.close()


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for `localhost`, made by the openssl command line tool."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command (Debian: openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_checks_the_upstreams_certificate_for_its_name(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    serving.load_cert_chain(cert, key)
    runner = web.AppRunner(slow_app(0, []))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=serving)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with pytest.raises(ConnectFailed):  # the system's authorities do not know it: never reached
            await Pool(f"https://localhost:{port}/v1", 4).request("/echo", HEADERS, b"{}", 1.0, 5.0)
        trusting = ssl.create_default_context(cafile=str(cert))
        monkeypatch.setattr(client, "_tls_context", lambda: trusting)
        pool = Pool(f"https://localhost:{port}/v1", 4)
        assert (await post(pool))[1] == b'{"path": "/v1/echo"}'
        assert (await post(pool))[1] == b'{"path": "/v1/echo"}'
        assert pool.open == 1
        await pool.close()
    finally:
        await runner.cleanup()


def test_exchanges_under_uvloop() -> None:
    """The gateway runs on uvloop (whose transports are not asyncio's classes)."""
    uvloop = pytest.importorskip("uvloop")

    async def exchanges() -> None:
        runner = web.AppRunner(slow_app(0, []))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        pool = Pool(f"http://127.0.0.1:{runner.addresses[0][1]}/v1", 4)
        for _ in range(3):
            assert (await post(pool))[1] == b'{"path": "/v1/echo"}'
        with await pool.request("/echo", {}, Upload(16), 1.0, 5.0) as response:
            assert await body_of(response) == b'{"path": "/v1/echo"}'
        assert pool.open == 1
        await pool.close()
        await runner.cleanup()

    uvloop.run(exchanges())
