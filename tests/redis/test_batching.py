"""The script batcher (gateway/limits/batching.py) against a real Redis: on the lean connection, a
batch written from the flush callback itself, each caller its own reply or error, close waiting
for what was written, a lost connection failing every call of the batch, a call on an idle
connection written at once; on every connection, calls run again after NOSCRIPT in the order they
were made."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.limits.batching import EvalBatcher
from gateway.limits.resp import RespConnection
from gateway.limits.scripts import Script
from tests.support.redis_servers import RedisClusterNodes, RedisServer

pytestmark = pytest.mark.redis


def script(name: str, source: bytes) -> Script:
    return Script(name, source, hashlib.sha1(source).hexdigest())


INCR = script("incr", b"return redis.call('INCR', KEYS[1])")
FAIL = script("fail", b"return redis.error_reply('NOPE no such thing')")
PUSH = script("push", b"return redis.call('RPUSH', KEYS[1], ARGV[1])")
PUSH_TOO = script("push too", b"return redis.call('RPUSH', KEYS[1], ARGV[1]) -- another script")
# Keeps Redis busy for ARGV[1] ms: the replies of what was written after it come that much later.
SLOW = script(
    "slow",
    b"local function ms() local t = redis.call('TIME') return t[1] * 1000 + t[2] / 1000 end\n"
    b"local until_ms = ms() + tonumber(ARGV[1]) while ms() < until_ms do end return 1",
)


async def batcher_on(
    server: RedisServer, *, connected: bool = True, scripts: tuple[Script, ...] = (INCR, FAIL, PUSH, SLOW)
) -> tuple[EvalBatcher, Redis, RespConnection]:
    """A batcher on `server`'s lean connection, connected as the engine is after start (or not yet:
    its first call connects), knowing `scripts` (all loaded again after NOSCRIPT)."""
    client = Redis.from_url(server.url)
    lean = RespConnection.for_url(server.url, connect_timeout=0.5, reply_timeout=2.0)
    assert lean is not None
    for script in (INCR, FAIL, PUSH, SLOW):
        await client.script_load(script.source)
    if connected:
        await lean.execute(b"*1\r\n$4\r\nPING\r\n", 1)
    return EvalBatcher(client, asyncio.Semaphore(128), lean, scripts), client, lean


async def test_a_batch_on_the_connected_lean_connection_needs_no_task(redis_server_factory) -> None:
    batcher, client, _ = await batcher_on(redis_server_factory())
    calls = [
        batcher.evalsha(INCR, ["k"], []),
        batcher.evalsha(FAIL, ["k"], []),
        batcher.evalsha(INCR, ["k"], []),
    ]
    tasks = len(asyncio.all_tasks())
    await asyncio.sleep(0)  # the flush: written now
    assert len(asyncio.all_tasks()) == tasks
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], ResponseError) and "NOPE" in str(results[1])
    await batcher.close()
    await client.aclose()


async def test_a_call_on_an_idle_connection_is_written_at_once(redis_server_factory) -> None:
    batcher, client, lean = await batcher_on(redis_server_factory())
    assert lean.owes_nothing()
    first = batcher.evalsha(INCR, ["k"], [])
    assert not lean.owes_nothing()  # written already: its reply is owed
    second = batcher.evalsha(INCR, ["k"], [])  # queued behind it, for the turn's end
    assert await asyncio.gather(first, second) == [1, 2]
    assert lean.owes_nothing()
    await batcher.close()
    await client.aclose()


@pytest.mark.parametrize("connected", ["at start", "after a lost connection"])
@pytest.mark.parametrize("turns", [0, 1, 2, 3])
async def test_calls_made_while_connecting_reach_redis_in_the_order_they_were_made(
    redis_server_factory, connected: str, turns: int
) -> None:
    """A call made while the lean connection is (re)connecting waits for it; one made once it is
    connected, while the first has not been written yet, must not overtake it (a settle and the
    next request's reserve: `Store.settles_in_order`)."""
    batcher, client, lean = await batcher_on(redis_server_factory(), connected=connected != "at start")
    expected = []
    if connected == "after a lost connection":
        await batcher.evalsha(PUSH, ["order"], ["before"])
        expected.append(b"before")
        lean._protocol.abort()  # type: ignore[union-attr]  # Redis restarted, or the network
        await asyncio.sleep(0.01)
    settle = batcher.evalsha(PUSH, ["order"], ["settle"])  # no connection: parked
    for _ in range(10_000):  # the connection is made...
        if lean._ready() is not None:
            break
        await asyncio.sleep(0)
    for _ in range(turns):  # ...and a few turns go by before the next call
        await asyncio.sleep(0)
    reserve = batcher.evalsha(PUSH, ["order"], ["reserve"])
    await asyncio.gather(settle, reserve)
    assert await client.lrange("order", 0, -1) == [*expected, b"settle", b"reserve"]
    await batcher.close()
    await client.aclose()


async def test_calls_parked_for_a_connection_that_cannot_be_made_each_fail(redis_server_factory) -> None:
    server = redis_server_factory()
    batcher, client, _ = await batcher_on(server, connected=False)
    server.stop()
    first = batcher.evalsha(PUSH, ["k"], ["a"])
    await asyncio.sleep(0)
    second = batcher.evalsha(PUSH, ["k"], ["b"])
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert all(isinstance(result, RedisConnectionError) for result in results), results
    await batcher.close()
    await client.aclose()


async def test_calls_after_a_script_flush_reach_redis_in_the_order_they_were_made(
    redis_server_factory,
) -> None:
    """Redis forgot the scripts: every call of the batches written meanwhile answers NOSCRIPT, and
    runs again; calls made meanwhile must not overtake them (a settle and the next request's
    reserve), nor one another. A call that fails once run again fails its caller."""
    batcher, client, _ = await batcher_on(redis_server_factory())
    await client.script_flush()
    made, calls = [], []
    for turn in range(5):  # the first call written at once, the rest in one batch a turn
        for i in range(4):
            made.append(f"{turn}.{i}".encode())
            calls.append(batcher.evalsha(PUSH, ["order"], [made[-1]]))
        calls.append(batcher.evalsha(FAIL, ["order"], []))
        await asyncio.sleep(0)
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert await client.lrange("order", 0, -1) == made
    assert [r for r in results if not isinstance(r, ResponseError)] == list(range(1, len(made) + 1))
    assert all("NOPE" in str(r) for r in results if isinstance(r, ResponseError))
    assert await batcher.evalsha(PUSH, ["order"], [b"after"]) == len(made) + 1  # the script is back
    await batcher.close()
    await client.aclose()


async def test_a_call_made_during_the_recovery_waits_for_the_batches_written_before_it(
    redis_server_factory,
) -> None:
    """`a` answers NOSCRIPT and runs again while the batch written behind it is still unanswered
    (Redis busy with `slow`): its `c` will answer NOSCRIPT too and run again, after `a`. `d`, made
    meanwhile, must wait for that, or it would run between the two (`a`'s run again has put the
    script back by then)."""
    batcher, client, _ = await batcher_on(redis_server_factory())
    await client.script_flush()
    await client.script_load(SLOW.source)
    a = batcher.evalsha(PUSH, ["order"], ["a"])  # written at once
    time.sleep(0.02)  # noqa: ASYNC251 (the loop blocked: Redis answers `a` alone, unread yet)
    slow, c = batcher.evalsha(SLOW, [], [200]), batcher.evalsha(PUSH, ["order"], ["c"])
    await asyncio.sleep(0.05)  # written, then a's NOSCRIPT read and a run again; Redis still busy
    d = batcher.evalsha(PUSH, ["order"], ["d"])
    assert await asyncio.gather(a, slow, c, d) == [1, 1, 2, 3]
    assert await client.lrange("order", 0, -1) == [b"a", b"c", b"d"]
    await batcher.close()
    await client.aclose()


async def test_a_call_run_again_on_a_connection_lost_fails_and_later_ones_go_on_the_next(
    redis_server_factory,
) -> None:
    batcher, client, lean = await batcher_on(redis_server_factory())
    await client.script_flush()
    slow = batcher.evalsha(SLOW, [], [300])
    while not batcher._running_again:  # noqa: ASYNC110 (NOSCRIPT read, run again: Redis busy with it)
        await asyncio.sleep(0.005)
    after = batcher.evalsha(PUSH, ["order"], ["after"])
    await asyncio.sleep(0.01)
    lean._protocol.abort()  # type: ignore[union-attr]
    with pytest.raises(RedisConnectionError):
        await slow
    assert await after == 1
    await batcher.close()
    await client.aclose()


@pytest.mark.parametrize("connection", ["lean", "pooled"])
async def test_after_a_script_flush_every_script_is_back_not_only_those_run_again(
    redis_server_factory, connection: str
) -> None:
    """Only a reserve (PUSH) runs again after the flush: the settle script (PUSH_TOO) must be back
    too, or a settle answered NOSCRIPT would be overtaken by the next reserve written behind it."""
    batcher, client, _ = await batcher_on(redis_server_factory(), scripts=(PUSH, PUSH_TOO))
    if connection == "pooled":
        await batcher.close()
        batcher = EvalBatcher(client, asyncio.Semaphore(128), None, (PUSH, PUSH_TOO))
    await client.script_flush()
    assert await batcher.evalsha(PUSH, ["order"], ["a"]) == 1  # answered NOSCRIPT, run again
    settle = batcher.evalsha(PUSH_TOO, ["order"], ["settle"])
    reserve = batcher.evalsha(PUSH, ["order"], ["reserve"])  # in the same write
    assert await asyncio.gather(settle, reserve) == [2, 3]
    assert await client.lrange("order", 0, -1) == [b"a", b"settle", b"reserve"]
    await batcher.close()
    await client.aclose()


async def test_close_waits_for_calls_run_again(redis_server_factory) -> None:
    batcher, client, _ = await batcher_on(redis_server_factory())
    await client.script_flush()
    call = batcher.evalsha(SLOW, [], [100])  # answered NOSCRIPT, then run again for 0.1 s
    await batcher.close()
    assert call.done() and call.result() == 1
    await client.aclose()


@pytest.mark.parametrize("connection", ["pooled", "cluster"])
async def test_a_batch_after_a_script_flush_runs_again_in_order_through_redis_py(
    request: pytest.FixtureRequest, connection: str
) -> None:
    """TLS and unix sockets (one pooled connection a batch) and a cluster (a pipeline): batches may
    overtake one another there (`calls_in_order` is False), but a batch's calls stay in order."""
    client: Any
    if connection == "pooled":
        server: RedisServer = request.getfixturevalue("redis_server_factory")()
        client = Redis.from_url(server.url)
    else:
        cluster: RedisClusterNodes = request.getfixturevalue("redis_cluster")
        client = RedisCluster.from_url(cluster.url)
    batcher = EvalBatcher(client, asyncio.Semaphore(128), None)
    await client.script_flush()
    made = [f"{i}".encode() for i in range(50)]
    calls = [batcher.evalsha(PUSH, ["{t}:order"], [item]) for item in made]
    failed = batcher.evalsha(FAIL, ["{t}:order"], [])
    assert await asyncio.gather(*calls) == list(range(1, len(made) + 1))
    with pytest.raises(ResponseError, match="NOPE"):
        await failed
    assert await client.lrange("{t}:order", 0, -1) == made
    await client.delete("{t}:order")
    await batcher.close()
    await client.aclose()


async def test_close_waits_for_a_written_batch(redis_server_factory) -> None:
    server = redis_server_factory()
    batcher, client, _ = await batcher_on(server)
    server.cli("CLIENT", "PAUSE", "200", "ALL")
    call = batcher.evalsha(INCR, ["k"], [])
    await asyncio.sleep(0.05)  # written, unanswered while Redis is paused
    await batcher.close()
    assert call.done() and call.result() == 1
    await client.aclose()


async def test_a_lost_connection_fails_every_call_of_a_written_batch(redis_server_factory) -> None:
    server = redis_server_factory()
    batcher, client, _ = await batcher_on(server)
    server.cli("CLIENT", "PAUSE", "5000", "ALL")
    calls = [batcher.evalsha(INCR, ["k"], []) for _ in range(3)]
    await asyncio.sleep(0.05)  # written, unanswered while Redis is paused
    server.stop()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(result, RedisConnectionError) for result in results)
    await batcher.close()
    await client.aclose()
