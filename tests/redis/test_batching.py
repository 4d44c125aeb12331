"""The script batcher (gateway/limits/batching.py) on the lean connection against a real Redis: a
batch written from the flush callback itself, each caller its own reply or error, NOSCRIPT
retried, close waiting for what was written, a lost connection failing every call of the batch, a
call on an idle connection written at once."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.limits.batching import EvalBatcher
from gateway.limits.resp import RespConnection
from gateway.limits.scripts import Script
from tests.support.redis_servers import RedisServer

pytestmark = pytest.mark.redis


def script(name: str, source: bytes) -> Script:
    return Script(name, source, hashlib.sha1(source).hexdigest())


INCR = script("incr", b"return redis.call('INCR', KEYS[1])")
FAIL = script("fail", b"return redis.error_reply('NOPE no such thing')")


async def batcher_on(server: RedisServer) -> tuple[EvalBatcher, Redis, RespConnection]:
    client = Redis.from_url(server.url)
    lean = RespConnection.for_url(server.url, connect_timeout=0.5, reply_timeout=2.0)
    assert lean is not None
    for script in (INCR, FAIL):
        await client.script_load(script.source)
    await lean.execute(b"*1\r\n$4\r\nPING\r\n", 1)  # connected, as the engine is after start
    return EvalBatcher(client, asyncio.Semaphore(128), lean), client, lean


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


async def test_a_noscript_reply_loads_the_script_and_runs_the_call_again(redis_server_factory) -> None:
    batcher, client, _ = await batcher_on(redis_server_factory())
    await client.script_flush()
    assert await asyncio.gather(batcher.evalsha(INCR, ["k"], []), batcher.evalsha(INCR, ["k"], [])) in (
        [1, 2],
        [2, 1],
    )
    assert await batcher.evalsha(INCR, ["k"], []) == 3
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
