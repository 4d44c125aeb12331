"""Coalescing EVALSHA calls: the scripts asked for during one event-loop turn go to Redis together.

Under load many requests reserve and settle at once. Calls queue for the rest of the current loop
turn and then go as one write: each script is still atomic on its own, and each caller gets its
own reply or its own error. The batch is flushed on the very next loop iteration, never on a
timer. A call that finds the lean connection owing nothing (no batch in flight: a gateway serving
one request at a time) is written at once, without that loop iteration: the calls made later in
the same turn queue behind it as a batch of their own.

How a batch is sent: on the lean pipelined connection (`resp.py`) for a plain `redis://` server;
else on one redis-py pooled connection (TLS, unix sockets); for a cluster, as a redis-py cluster
pipeline, which routes each call to its slot's node.

On the lean connection, when it is connected, a batch is written from the flush callback itself
and the connection settles the calls as it reads the last reply: no task, no coroutine, and the
callers wake in the loop turn after the reply arrives, not a turn later. Those writes are not counted by the
engine's in-flight bound (which bounds pooled connections; the lean one is a single pipelined
socket, whose calls its own reply timeout fails). Batches made while it is not connected (at
start, after a lost connection) are parked, in order, and one task writes them all once it is; until
then every later batch parks behind them, so that calls reach Redis in the order they were made:
a settle before the next request's reserve (`Store.settles_in_order`). On a pooled or cluster
connection a task sends each batch.

A caller that gives up (its timeout) cancels only its own future; the batch is sent regardless,
and its reply is dropped. `close` waits (briefly) for batches in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import chain
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from gateway.limits.resp import RespConnection, repeating_command, resolve
from gateway.limits.scripts import Script

Arg = str | int | bytes  # a script argument (bytes: the checks, packed)
CLOSE_WAIT = 0.5  # seconds: at shutdown, after the outbox has had its turn


@dataclass(slots=True)
class _Call:
    script: Script
    keys: Sequence[str]
    args: Sequence[Arg]
    future: asyncio.Future[Any]

    def argv(self) -> tuple[Any, ...]:
        return (self.script.sha, len(self.keys), *self.keys, *self.args)


class EvalBatcher:
    def __init__(self, client: Any, in_flight: asyncio.Semaphore, lean: RespConnection | None = None) -> None:
        self._client = client
        self._in_flight = in_flight
        self._lean = lean
        self._queue: list[_Call] = []
        # what close waits for: batches being sent (tasks) or written (their last reply), retries
        self._sending: set[asyncio.Future[Any]] = set()
        self._closed = False
        # the calls' loop, taken on the first call: asyncio.get_running_loop() costs a getpid()
        # system call on Python 3.11, twice a request here
        self._loop: asyncio.AbstractEventLoop | None = None
        # lean batches made while the connection was not ready, in order: written once it is
        self._parked: list[list[_Call]] = []

    def evalsha(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> asyncio.Future[Any]:
        """The reply of `script` on `keys` and `args`, sent with whatever else this loop turn asks
        (or at once, when the lean connection owes nothing). One event loop per batcher."""
        loop = self._loop or self._bind()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(RedisConnectionError("the store is closed"))
            return future
        self._queue.append(_Call(script, keys, args, future))
        if len(self._queue) == 1:
            if self._lean is not None and not self._parked and self._lean.owes_nothing():
                self._flush()  # nothing in flight to batch behind: written now, a loop turn sooner
            else:
                loop.call_soon(self._flush)
        return future

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        if not batch:  # `close` sent them before this turn came
            return
        if self._lean is None:
            self._start(self._send(batch))
        elif self._parked or not self._write(batch):
            self._parked.append(batch)
            if len(self._parked) == 1:
                self._start(self._write_parked())

    def _write(self, batch: list[_Call]) -> bool:
        """Write `batch` on the lean connection now; False (nothing written) if it is not ready."""
        assert self._lean is not None and self._loop is not None
        written: asyncio.Future[None] = self._loop.create_future()  # for `close`
        if not self._lean.send(_pack_batch(batch), len(batch), partial(self._answered, batch, written)):
            return False
        self._sending.add(written)
        return True

    async def _write_parked(self) -> None:
        """Connect, then write the parked batches in the order they were made; if the connection
        cannot be made, each of their calls fails with why."""
        assert self._lean is not None
        try:
            await self._lean.connected()
        except BaseException as exc:
            parked, self._parked = self._parked, []
            _fail(chain.from_iterable(parked), exc)
            return
        parked, self._parked = self._parked, []
        for i, batch in enumerate(parked):
            if not self._write(batch):  # lost again already: the rest wait for the next connection
                self._parked = parked[i:] + self._parked
                self._start(self._write_parked())
                return

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    def _answered(
        self, batch: list[_Call], written: asyncio.Future[None], replies: list[Any] | BaseException
    ) -> None:
        """A batch written on the lean connection: its replies, or the exception that lost it."""
        self._sending.discard(written)
        if not written.done():  # (a cancelled `close` may have cancelled it)
            written.set_result(None)
        if isinstance(replies, BaseException):  # the connection was lost: every call fails with it
            _fail(batch, replies)
            return
        self._settle(batch, replies)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            async with self._in_flight:
                replies = await self._execute(batch)
        except BaseException as exc:
            _fail(batch, exc)
            return
        self._settle(batch, replies)

    def _settle(self, batch: list[_Call], replies: list[Any]) -> None:
        """Each caller its reply (an error reply as its exception); NOSCRIPT is retried after
        loading the script (a task)."""
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):
                self._start(self._reload_and_retry(call))
            else:
                resolve(call.future, reply)

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        pool = getattr(self._client, "connection_pool", None)
        if pool is not None:
            return await _on_one_connection(pool, batch)
        pipe = self._client.pipeline(transaction=False)  # a cluster: it routes each call's slot
        for call in batch:
            pipe.execute_command("EVALSHA", *call.argv())
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def _reload_and_retry(self, call: _Call) -> None:
        """The server lost its scripts (restart, SCRIPT FLUSH): load this one and run the call again."""
        try:
            await self._client.script_load(call.script.source)
            reply = await self._client.execute_command("EVALSHA", *call.argv())
        except Exception as exc:
            resolve(call.future, exc)
        else:
            resolve(call.future, reply)

    async def close(self, wait: float = CLOSE_WAIT) -> None:
        """Refuse new calls, send what is queued, wait up to `wait` seconds for the batches in
        flight, then close (what is still unanswered on the lean connection fails at once)."""
        self._closed = True
        if self._queue:
            self._flush()
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=wait)
        if self._lean is not None:
            await self._lean.close()
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)


def _fail(calls: Iterable[_Call], exc: BaseException) -> None:
    """Each call fails with `exc`, the reason its batch was lost or could not be sent; a
    cancellation goes on up (the task sending them is being cancelled)."""
    for call in calls:
        resolve(call.future, exc)
    if isinstance(exc, asyncio.CancelledError):
        raise exc


async def _on_one_connection(pool: Any, batch: list[_Call]) -> list[Any]:
    """Send a standalone server the whole batch in one write and read the replies in order.

    What redis-py's pipeline does, without its per-call bookkeeping (command stack, response
    callbacks, retry wrapper, per-argument encoders), which cost more CPU than the calls
    themselves. An error reply is that call's result; anything else leaves the connection in an
    unknown state: it is dropped.
    """
    connection = await pool.get_connection()
    try:
        await connection.send_packed_command(_pack_batch(batch))
        replies: list[Any] = []
        for _ in batch:
            try:
                replies.append(await connection.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        await pool.release(connection)


def _pack_evalsha(call: _Call) -> bytes:
    return repeating_command("EVALSHA", *call.argv())


def _pack_batch(batch: list[_Call]) -> bytes:
    return b"".join([_pack_evalsha(call) for call in batch])
