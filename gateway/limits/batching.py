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

A server that has forgotten the scripts (restart, failover, SCRIPT FLUSH) answers NOSCRIPT. Those
calls run once more, as EVAL with the script's source, and what that answers is final: a call that
fails again fails its caller. Every script is loaded again ahead of them (SCRIPT LOAD, in the same
write), not only theirs: were only a reserve run again, the settle script would still be missing,
and a later settle answered NOSCRIPT would be overtaken by the next reserve written behind it. On the lean
connection they are written again from the callback that reads their replies, in reply order, on
the same connection: behind the batches written before (which answer NOSCRIPT in their turn and
run again behind them), ahead of anything made later, which parks until every call run again has
its reply. So the calls still reach Redis in the order they were made. On a pooled or cluster
connection the batch's own task loads every script, then runs them again in one write: in order
within the batch (batches
there keep no order among themselves anyway). One overtaking is out of reach everywhere: if
another client puts the scripts back while calls are in flight, a call that reaches Redis after
that runs at once, ahead of the earlier ones answered NOSCRIPT. With `server.workers` above one,
that client is usually another worker recovering at the same moment: after a flush or a restart,
a settle and its client's next reserve may then meet in the wrong order once (a spurious 429, or a
settle charged a moment late); closing it would take EVAL with the source on every call.

A caller that gives up (its timeout) cancels only its own future; the batch is sent regardless,
and its reply is dropped. `close` waits (briefly) for batches in flight and the calls run again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import chain
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from gateway.limits.resp import RespConnection, command, repeating_command, resolve
from gateway.limits.scripts import ALL, Script

Arg = str | int | bytes  # a script argument (bytes: the checks, packed)
CLOSE_WAIT = 0.5  # seconds: at shutdown, after the outbox has had its turn


@dataclass(slots=True)
class _Call:
    script: Script
    keys: Sequence[str]
    args: Sequence[Arg]
    future: asyncio.Future[Any]

    def by_sha(self) -> tuple[Any, ...]:
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)

    def by_source(self) -> tuple[Any, ...]:
        """The call run again after NOSCRIPT: EVAL caches the script as it runs it."""
        return ("EVAL", self.script.source, len(self.keys), *self.keys, *self.args)


Command = Callable[[_Call], tuple[Any, ...]]  # a call as a command: _Call.by_sha or _Call.by_source


class EvalBatcher:
    def __init__(
        self,
        client: Any,
        in_flight: asyncio.Semaphore,
        lean: RespConnection | None = None,
        scripts: Sequence[Script] = ALL,
    ) -> None:
        self._client = client
        self._scripts = scripts  # loaded again, all of them, once the server has forgotten them
        # their SCRIPT LOADs, made once: written ahead of the calls run again after NOSCRIPT
        self._reload = b"".join([command("SCRIPT", "LOAD", script.source) for script in scripts])
        self._in_flight = in_flight
        self._lean = lean
        self._queue: list[_Call] = []
        # what close waits for: batches being sent (tasks) or written (their last reply)
        self._sending: set[asyncio.Future[Any]] = set()
        self._closed = False
        # the calls' loop, taken on the first call: asyncio.get_running_loop() costs a getpid()
        # system call on Python 3.11, twice a request here
        self._loop: asyncio.AbstractEventLoop | None = None
        # lean batches made while the connection was not ready, or calls were being run again
        # after NOSCRIPT, in order: written once it is ready and they are answered
        self._parked: list[list[_Call]] = []
        self._running_again = 0  # lean writes of calls run again after NOSCRIPT, still unanswered

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
        elif self._parked or self._running_again or not self._write(batch):
            self._parked.append(batch)
            if len(self._parked) == 1 and not self._running_again:
                self._start(self._write_parked())

    def _write(self, batch: list[_Call], again: bool = False) -> bool:
        """Write `batch` on the lean connection now; False (nothing written) if it is not ready.
        `again`: calls answered NOSCRIPT, run again by their script's source."""
        assert self._lean is not None and self._loop is not None
        written: asyncio.Future[None] = self._loop.create_future()  # for `close`
        if again:
            payload, answered = self._reload + _pack(batch, _Call.by_source), self._answered_again
            replies = len(self._scripts) + len(batch)
        else:
            payload, answered, replies = _pack(batch), self._answered, len(batch)
        if not self._lean.send(payload, replies, partial(answered, batch, written)):
            return False
        self._sending.add(written)
        return True

    async def _write_parked(self) -> None:
        """Connect, then write the parked batches; if the connection cannot be made, each of their
        calls fails with why."""
        assert self._lean is not None
        try:
            await self._lean.connected()
        except BaseException as exc:
            parked, self._parked = self._parked, []
            _fail(chain.from_iterable(parked), exc)
            return
        self._unpark()

    def _unpark(self) -> None:
        """Write the parked batches in the order they were made, unless calls run again are still
        owed their replies (the last of those replies writes them); if the connection is lost
        again, the rest wait for the next one."""
        while self._parked and not self._running_again:
            if not self._write(self._parked[0]):
                self._start(self._write_parked())
                return
            del self._parked[0]

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    def _answered(
        self, batch: list[_Call], written: asyncio.Future[None], replies: list[Any] | BaseException
    ) -> None:
        """A batch written on the lean connection: its replies, or the exception that lost it. The
        calls answered NOSCRIPT are written again at once, in order, so that nothing made later
        (and not written yet) goes before them."""
        self._replied(written)
        if isinstance(replies, BaseException):  # the connection was lost: every call fails with it
            _fail(batch, replies)
        elif lost := _settle(batch, replies):
            if self._write(lost, again=True):
                self._running_again += 1
            else:
                _fail(lost, RedisConnectionError("the connection to Redis was lost"))

    def _answered_again(
        self, batch: list[_Call], written: asyncio.Future[None], replies: list[Any] | BaseException
    ) -> None:
        """Calls run again on the lean connection: what they answer is final (an error fails its
        caller, whatever it is). Once none is owed, the batches parked meanwhile are written."""
        self._replied(written)
        self._running_again -= 1
        self._unpark()
        _answer(batch, replies if isinstance(replies, BaseException) else replies[len(self._scripts) :])

    def _replied(self, written: asyncio.Future[None]) -> None:
        """A lean write has all its replies: `close` no longer waits for it."""
        self._sending.discard(written)
        if not written.done():  # (a cancelled `close` may have cancelled it)
            written.set_result(None)

    async def _send(self, batch: list[_Call]) -> None:
        try:
            async with self._in_flight:
                lost = _settle(batch, await self._execute(batch, _Call.by_sha))
                if lost:  # the server forgot the scripts: all of them back, then these run again
                    await self._load_everywhere()
                    _answer(lost, await self._execute(lost, _Call.by_source))
        except BaseException as exc:
            _fail(batch, exc)

    async def _load_everywhere(self) -> None:
        """Every script loaded again, as well as can be: a cluster loads each on every primary, and
        one primary unreachable (the failover that lost the scripts) must not fail the calls of the
        others, which run by their source anyway."""
        for script in self._scripts:
            with contextlib.suppress(RedisError):
                await self._client.script_load(script.source)

    async def _execute(self, batch: list[_Call], command: Command) -> list[Any]:
        pool = getattr(self._client, "connection_pool", None)
        if pool is not None:
            return await _on_one_connection(pool, _pack(batch, command), len(batch))
        pipe = self._client.pipeline(transaction=False)  # a cluster: it routes each call's slot
        for call in batch:
            pipe.execute_command(*command(call))
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def close(self, wait: float = CLOSE_WAIT) -> None:
        """Refuse new calls, send what is queued, wait up to `wait` seconds for the batches in
        flight (and the calls they run again), then close (what is still unanswered on the lean
        connection fails at once)."""
        self._closed = True
        if self._queue:
            self._flush()
        if self._sending:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait
            # until none is left: a batch answered NOSCRIPT writes its calls again as it ends
            while self._sending and (left := deadline - loop.time()) > 0:
                await asyncio.wait(set(self._sending), timeout=left)
        if self._lean is not None:
            await self._lean.close()
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)


def _settle(batch: list[_Call], replies: list[Any]) -> list[_Call]:
    """Each caller its reply (an error reply as its exception), but for the calls answered
    NOSCRIPT: returned, in order, to be run again."""
    lost = []
    for call, reply in zip(batch, replies, strict=True):
        if isinstance(reply, NoScriptError):
            lost.append(call)
        else:
            resolve(call.future, reply)
    return lost


def _answer(calls: list[_Call], replies: list[Any] | BaseException) -> None:
    """Each call its reply, whatever it is; or all of them the exception that lost them."""
    if isinstance(replies, BaseException):
        _fail(calls, replies)
        return
    for call, reply in zip(calls, replies, strict=True):
        resolve(call.future, reply)


def _fail(calls: Iterable[_Call], exc: BaseException) -> None:
    """Each call fails with `exc`, the reason its batch was lost or could not be sent; a
    cancellation goes on up (the task sending them is being cancelled)."""
    for call in calls:
        resolve(call.future, exc)
    if isinstance(exc, asyncio.CancelledError):
        raise exc


async def _on_one_connection(pool: Any, payload: bytes, count: int) -> list[Any]:
    """Send a standalone server a whole batch (`payload`, `count` commands) in one write and read
    the replies in order.

    What redis-py's pipeline does, without its per-call bookkeeping (command stack, response
    callbacks, retry wrapper, per-argument encoders), which cost more CPU than the calls
    themselves. An error reply is that call's result; anything else leaves the connection in an
    unknown state: it is dropped.
    """
    connection = await pool.get_connection()
    try:
        await connection.send_packed_command(payload)
        replies: list[Any] = []
        for _ in range(count):
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


def _pack(batch: list[_Call], command: Command = _Call.by_sha) -> bytes:
    return b"".join([repeating_command(*command(call)) for call in batch])
