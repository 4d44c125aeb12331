"""The lean pipelined connection (gateway/limits/resp.py) against real Redis servers: credentials and
db from the URL, replies in order whatever callers give up, error replies, loss and reconnection."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from gateway.limits.resp import RespConnection, command
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.redis


def lean(url: str, reply_timeout: float = 2.0) -> RespConnection:
    connection = RespConnection.for_url(url, connect_timeout=0.5, reply_timeout=reply_timeout)
    assert connection is not None
    return connection


@pytest.mark.parametrize(
    "url",
    ["rediss://127.0.0.1:6380/0", "unix:///run/redis.sock", "redis://127.0.0.1:6379/0?ssl_cert_reqs=none"],
)
def test_only_plain_tcp_urls_are_spoken_here(url: str) -> None:
    assert RespConnection.for_url(url, connect_timeout=1, reply_timeout=1) is None


async def test_user_password_and_db_come_from_the_url(redis_server_factory) -> None:
    server: RedisServer = redis_server_factory()
    server.cli("ACL", "SETUSER", "gateway", "on", ">s3cret", "~*", "+@all")
    server.cli("CONFIG", "SET", "requirepass", "admin-pw")
    base = f"127.0.0.1:{server.port}"
    connection = lean(f"redis://gateway:s3cret@{base}/3")
    assert await connection.execute(command("SET", "k", "v") + command("GET", "k"), 2) == [b"OK", b"v"]
    on_db3 = server.cli("--user", "gateway", "--pass", "s3cret", "--no-auth-warning", "-n", "3", "GET", "k")
    assert on_db3.strip() == "v"
    await connection.close()
    with pytest.raises(RedisConnectionError, match="refused the connection"):
        await lean(f"redis://gateway:wrong@{base}/3").execute(command("PING"), 1)


async def test_error_replies_are_results_and_noscript_is_recognised(redis_server_factory) -> None:
    connection = lean(redis_server_factory().url)
    replies = await connection.execute(
        command("EVALSHA", "0" * 40, 0) + command("INCR", "k") + command("HSET", "k", "f", "v"), 3
    )
    assert isinstance(replies[0], NoScriptError)
    assert replies[1] == 1
    assert isinstance(replies[2], ResponseError) and "WRONGTYPE" in str(replies[2])
    await connection.close()


async def test_a_caller_that_gives_up_leaves_the_replies_in_order(redis_server_factory) -> None:
    server = redis_server_factory()
    connection = lean(server.url)
    await connection.execute(command("SET", "a", "1") + command("SET", "b", "2"), 2)
    server.cli("CLIENT", "PAUSE", "300", "ALL")
    first = asyncio.create_task(connection.execute(command("GET", "a"), 1))
    await asyncio.sleep(0.05)
    first.cancel()  # its reply, when it comes, belongs to nobody
    assert await connection.execute(command("GET", "b"), 1) == [b"2"]
    await connection.close()


async def test_a_lost_connection_fails_its_calls_and_the_next_call_reconnects(redis_server_factory) -> None:
    server = redis_server_factory()
    connection = lean(server.url)
    assert await connection.execute(command("PING"), 1) == [b"PONG"]
    server.stop()
    with pytest.raises(RedisConnectionError):
        await connection.execute(command("PING"), 1)
    with pytest.raises(RedisConnectionError, match="cannot connect"):
        await connection.execute(command("PING"), 1)
    server.start()
    assert await connection.execute(command("PING"), 1) == [b"PONG"]
    await connection.close()


async def test_an_overdue_reply_drops_the_connection_when_redis_answers_nobody(redis_server_factory) -> None:
    server = redis_server_factory()
    connection = lean(server.url, reply_timeout=0.2)
    assert await connection.execute(command("PING"), 1) == [b"PONG"]
    server.cli("CLIENT", "PAUSE", "900", "ALL")  # a new connection's PING gets no answer either
    started = time.perf_counter()
    with pytest.raises(RedisConnectionError, match=r"no reply from Redis within 0\.2 s; a new connection"):
        await connection.execute(command("PING"), 1)
    assert time.perf_counter() - started < 0.8  # the reply timeout, then the health check's
    await asyncio.sleep(0.9)
    assert await connection.execute(command("PING"), 1) == [b"PONG"]  # on a new connection
    await connection.close()


async def test_a_server_that_never_answers_the_handshake_leaves_no_connection_open() -> None:
    closed: list[bool] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the gateway gives up and closes
        closed.append(True)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connection = RespConnection.for_url(f"redis://127.0.0.1:{port}/0", connect_timeout=0.1, reply_timeout=1)
    assert connection is not None
    for _ in range(3):
        with pytest.raises(RedisConnectionError, match="cannot connect"):
            await connection.execute(command("PING"), 1)
    await asyncio.sleep(0.1)
    assert closed == [True, True, True]
    server.close()
    await server.wait_closed()


async def test_a_refused_connection_is_a_connection_failure_not_a_reply(redis_server_factory) -> None:
    server = redis_server_factory()
    first = lean(server.url)
    assert await first.execute(command("PING"), 1) == [b"PONG"]
    server.cli("CONFIG", "SET", "maxclients", "1")  # `first` holds the only slot
    with pytest.raises(RedisConnectionError, match=r"refused the connection: .*max number of clients"):
        await lean(server.url).execute(command("EVALSHA", "0" * 40, 0), 1)
    await first.close()
    with pytest.raises(RedisConnectionError, match="closed"):
        await first.execute(command("PING"), 1)  # closed for good: no reconnection


async def test_redis_busy_but_answering_keeps_the_calls_waiting(redis_server_factory) -> None:
    """Writes are held for 0.5 s, far past reply_timeout, but Redis answers a new connection's
    PING: it is alive, so the call is not failed (a store that answers is not down)."""
    server = redis_server_factory()
    connection = lean(server.url, reply_timeout=0.1)
    assert await connection.execute(command("PING"), 1) == [b"PONG"]
    server.cli("CLIENT", "PAUSE", "500", "WRITE")
    started = time.perf_counter()
    assert await connection.execute(command("SET", "k", "v"), 1) == [b"OK"]
    assert time.perf_counter() - started > 0.3
    await connection.close()


async def test_a_reply_owed_past_give_up_after_drops_the_connection(redis_server_factory) -> None:
    server = redis_server_factory()
    address = ("127.0.0.1", server.port)
    connection = RespConnection(
        *address,
        username=None,
        password=None,
        db=0,
        connect_timeout=0.5,
        reply_timeout=0.1,
        give_up_after=0.4,
    )
    assert await connection.execute(command("PING"), 1) == [b"PONG"]
    server.cli("CLIENT", "PAUSE", "1500", "WRITE")
    started = time.perf_counter()
    with pytest.raises(RedisConnectionError, match=r"no reply from Redis within 0\.4 s"):
        await connection.execute(command("SET", "k", "v"), 1)
    assert 0.35 < time.perf_counter() - started < 1.2
    await connection.close()


async def _blocked_loop_scenario(url: str) -> list[object]:
    """Replies that arrive on time while this process's loop is blocked for ten reply timeouts (a
    burst keeping it busy): a call, and a connect with its handshake, both succeed."""
    connection = lean(url, reply_timeout=0.05)
    assert await connection.execute(command("PING"), 1) == [b"PONG"]
    call = asyncio.ensure_future(connection.execute(command("ECHO", "x"), 1))
    await asyncio.sleep(0)  # the call is written
    time.sleep(0.5)  # noqa: ASYNC251 (the loop is busy elsewhere: nothing is read meanwhile)
    replies = await call
    await connection.close()
    fresh = RespConnection.for_url(url, connect_timeout=0.05, reply_timeout=0.05)
    assert fresh is not None
    connecting = asyncio.ensure_future(fresh.execute(command("ECHO", "y"), 1))
    await asyncio.sleep(0)  # the connect has begun
    time.sleep(0.5)  # noqa: ASYNC251
    replies += await connecting
    await fresh.close()
    return replies


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_a_busy_event_loop_is_not_mistaken_for_a_silent_redis(
    redis_server: RedisServer, loop: str
) -> None:
    if loop == "asyncio":
        replies = await _blocked_loop_scenario(redis_server.url)
    else:
        replies = await asyncio.to_thread(uvloop.run, _blocked_loop_scenario(redis_server.url))
    assert replies == [b"x", b"y"]
