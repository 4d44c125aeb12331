"""A lean, pipelined connection to a standalone Redis for the hot path: the script calls.

redis-py spends about 75 µs of CPU on one PING (connection pool, locks, per-call timeouts, retry
wrappers, stream readers); this protocol writes a whole batch with one `transport.write` and
matches the replies in order (Redis answers in order) with hiredis's parser: about 6 µs. Every
admitted request makes two script calls, so this is most of what the store costs the gateway.

Only plain `redis://` TCP URLs (with an optional user, password and db) are served here;
anything else (TLS, unix sockets) and every other command (script loading, the ledger, SCAN)
stays with redis-py, as does Redis Cluster.

One connection is opened on first use and again after it is lost. A caller that gives up waiting
leaves its place in the queue, so the replies still line up. A write's replies are handed over as
the last of them is read (`send`'s callback), in the same loop turn: the batcher settles its
callers from there, with no future of its own to wake it a turn later.

What counts as "Redis did not answer" is judged here, from what is Redis's alone. Time spent
before the write (batching, waiting for a turn) is not Redis's, and neither is the event loop's
own lag: a busy loop reads late what Redis answered on time. So:

- a connection is suspect when its oldest unanswered command was written more than
  `reply_timeout` ago AND nothing at all has been read from it for that long, checked only after
  the loop has polled the socket once more (`after_io_turn`: whatever Redis had sent by then
  has been read);
- a suspect connection is put to a health check: a new connection, proven with PING. If that
  fails too, Redis is unreachable: the connection is dropped and everything queued on it fails
  (the store is down). If it answers, Redis is alive and busy (a long batch, a loaded machine):
  the calls keep waiting, up to `give_up_after` from their write, after which the connection is
  dropped all the same (a connection lost in the network while new ones work);
- connecting is bounded by `connect_timeout`, the handshake's replies like any other reply.

Error replies and a closed or reset connection fail at once, as they come.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError


def command(*args: str | int | bytes) -> bytes:
    """One command in RESP: an array of bulk strings (hiredis encodes it, in C)."""
    # hiredis's stub says a one-element tuple where it takes any length
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


# Encodings of recent arguments of `repeating_command` (at most this many; all dropped when full).
ENCODINGS_KEPT = 4096
_encodings: dict[str | int | bytes, bytes] = {}


def repeating_command(*args: str | int | bytes) -> bytes:
    """`command` for commands whose arguments mostly repeat from call to call (a script's SHA, a
    plan's keys and settings): each argument's encoding is looked up in a memo, and only new ones
    are encoded. hiredis spends ~1.4k instructions on every argument (its str(), a copy, a sprintf
    of its length); a look-up costs a tenth of that. Arguments are str, int (in decimal, as
    hiredis writes them: not a bool) or bytes; the memo tells them apart (1, "1" and b"1" are three
    keys), and keeps what the commands carry: no passwords here (AUTH is sent with `command`).
    A bool or a float is refused when it is new, but one equal to a kept int (True == 1, 2.0 == 2)
    takes that int's encoding, which Redis reads as the same integer: checking each argument's
    class would cost more than the memo saves on it, and no caller passes either.
    A new argument costs about twice what hiredis spends on it: where nothing repeats (thousands of
    tenants' plans interleaved) this costs more than `command`, about 2% of a request."""
    return b"*%d\r\n%b" % (len(args), b"".join([_encodings.get(arg) or _encode(arg) for arg in args]))


def _encode(arg: str | int | bytes) -> bytes:
    if isinstance(arg, bytes):
        data = arg
    elif isinstance(arg, str):
        data = arg.encode()
    elif isinstance(arg, int) and not isinstance(arg, bool):  # (True == 1: it would be 1's key)
        data = b"%d" % arg
    else:  # a float too: 1.0 == 1
        raise TypeError(f"a command's argument is str, int or bytes, not {type(arg).__name__}")
    encoded = b"$%d\r\n%b\r\n" % (len(data), data)
    if len(_encodings) >= ENCODINGS_KEPT:
        _encodings.clear()
    _encodings[arg] = encoded
    return encoded


def _reply(value: Any) -> Any:
    """hiredis's reply, with error replies as redis-py's exceptions (NOSCRIPT as NoScriptError)."""
    if isinstance(value, hiredis.ReplyError):
        message = str(value)
        return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)
    return value


def after_io_turn(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Call `callback` once the loop has polled its sockets again and run what they delivered.

    Two hops through the ready queue: asyncio polls before running the callbacks a turn found
    ready, and uvloop (libuv) runs them before polling; after two turns, both have polled once
    since this call, whatever called it (a timer or a ready callback)."""
    loop.call_soon(loop.call_soon, callback)


# What a write's replies are handed to: the replies in order (error replies as exceptions), or the
# exception that lost the connection.
Done = Callable[[list[Any] | BaseException], None]


class _Owed:
    """The replies one write is owed, and who gets them (once, when the last one is read)."""

    __slots__ = ("count", "done", "replies", "written_at")

    def __init__(self, written_at: float, count: int, done: Done) -> None:
        self.written_at = written_at
        self.count = count
        self.done = done
        self.replies: list[Any] = []


def resolve(future: asyncio.Future[Any], outcome: Any) -> None:
    """Give `future` its outcome: an exception (an error reply, a lost connection) is raised to its
    caller, anything else is its result; nothing if the caller gave up already."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class _Protocol(asyncio.Protocol):
    def __init__(self, reply_timeout: float, give_up_after: float) -> None:
        self._parser = hiredis.Reader()
        self._waiting: deque[_Owed] = deque()  # the writes still owed replies, oldest first
        self._transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self._loop = asyncio.get_running_loop()
        self._reply_timeout = reply_timeout
        self._give_up_after = give_up_after
        self._last_read = self._loop.time()
        self._watching = False
        # Called when the connection turns suspect; None: a suspect connection fails at once.
        self.on_suspect: Callable[[_Protocol], None] | None = None
        self._checking = False
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        self._parser.feed(data)
        while (reply := self._parser.gets()) is not False:
            if not self._waiting:  # nothing was asked (e.g. "max number of clients"): not ours
                self.abort()
                return
            owed = self._waiting[0]
            owed.replies.append(_reply(reply))
            if len(owed.replies) == owed.count:
                self._waiting.popleft()
                owed.done(owed.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = RedisConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}")
        while self._waiting:
            self._waiting.popleft().done(self.lost)

    def send(self, payload: bytes, replies: int, done: Done) -> None:
        """Write `payload` (`replies` commands); `done` gets their replies once all are read."""
        if self.lost is not None or self._transport is None:
            raise self.lost or RedisConnectionError("not connected to Redis")
        now = self._loop.time()
        self._waiting.append(_Owed(now, replies, done))
        self._transport.write(payload)
        if not self._watching:
            self._watching = True
            self._loop.call_at(now + self._reply_timeout, self._watch)

    def owes_nothing(self) -> bool:
        return not self._waiting

    def request(self, payload: bytes, replies: int) -> asyncio.Future[list[Any]]:
        """`send`, with the replies as a future's result."""
        future: asyncio.Future[list[Any]] = self._loop.create_future()
        self.send(payload, replies, partial(resolve, future))
        return future

    def _suspect_at(self) -> float | None:
        """When the connection turns suspect if nothing is read before; None: nothing is owed."""
        if not self._waiting:
            return None
        return max(self._waiting[0].written_at, self._last_read) + self._reply_timeout

    def _watch(self) -> None:
        suspect_at = self._suspect_at()
        if suspect_at is None or self.lost is not None:
            self._watching = False
        elif self._loop.time() < suspect_at:
            self._loop.call_at(suspect_at, self._watch)
        else:
            after_io_turn(self._loop, self._confirm)

    def _confirm(self) -> None:
        """Suspect when last looked: still so once the loop has read what the socket holds?"""
        suspect_at = self._suspect_at()
        now = self._loop.time()
        if suspect_at is None or self.lost is not None or now < suspect_at:
            self._watch()
            return
        written_at = self._waiting[0].written_at
        give_up_at = written_at + self._give_up_after
        if self.on_suspect is None or now >= give_up_at:
            self.fail(f"no reply from Redis within {min(now - written_at, self._give_up_after):.3g} s")
            return
        if not self._checking:
            self._checking = True
            self.on_suspect(self)
        self._loop.call_at(give_up_at, self._watch)

    def alive(self) -> None:
        """The health check found Redis answering: the calls queued here keep waiting."""
        self._checking = False
        self._last_read = self._loop.time()

    def fail(self, reason: str) -> None:
        """Drop the connection: it may be dead without having been closed. connection_lost (called
        soon) fails every waiter with `reason`."""
        if self.lost is None:
            self.lost = RedisConnectionError(reason)
        self._watching = False
        self.abort()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class RespConnection:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None,
        password: str | None,
        db: int,
        connect_timeout: float,
        reply_timeout: float,
        give_up_after: float | None = None,
    ) -> None:
        self._address = (host, port)
        # Every new connection is proven before it carries a call: a refusal (wrong password, too
        # many clients) then fails the connection, never a settlement.
        self._hello: list[bytes] = []
        if password:
            self._hello.append(command("AUTH", *([username] if username else []), password))
        if db:
            self._hello.append(command("SELECT", db))
        self._hello.append(command("PING"))
        self._connect_timeout = connect_timeout
        self._reply_timeout = reply_timeout
        self._give_up_after = give_up_after if give_up_after is not None else max(2.0, 10 * reply_timeout)
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self._checks: set[asyncio.Task[None]] = set()
        self._closed = False

    @staticmethod
    def for_url(url: str, *, connect_timeout: float, reply_timeout: float) -> RespConnection | None:
        """A connection for a plain `redis://` URL; None for anything this module does not speak."""
        if not url.startswith("redis://"):
            return None
        options = parse_url(url)
        if set(options) - {"host", "port", "db", "username", "password"}:
            return None
        return RespConnection(
            options.get("host") or "localhost",
            int(options.get("port") or 6379),
            username=options.get("username"),
            password=options.get("password"),
            db=int(options.get("db") or 0),
            connect_timeout=connect_timeout,
            reply_timeout=reply_timeout,
        )

    async def execute(self, payload: bytes, replies: int) -> list[Any]:
        """Write `payload` (`replies` commands) and return their replies, error replies included.

        No timer of the caller's: the connection itself fails the call if Redis stops answering."""
        protocol = await self.connected()
        return await protocol.request(payload, replies)

    def send(self, payload: bytes, replies: int, done: Done) -> bool:
        """Write `payload` now, without a coroutine; `done` is called with its replies as the last
        one is read (in order, error replies as exceptions), or with the exception that lost the
        connection. False, and nothing written, when there is no connection ready (or it is
        closed): `execute` connects first."""
        protocol = self._ready()
        if protocol is None:
            return False
        protocol.send(payload, replies, done)
        return True

    async def connected(self) -> _Protocol:
        """The connection, once connected (connecting if need be); raise if it cannot be, or is
        closed."""
        if self._closed:
            raise RedisConnectionError("the connection to Redis is closed")
        return self._ready() or await self._connect()

    def owes_nothing(self) -> bool:
        """Connected, and every reply of what was written has been read: nothing is in flight."""
        protocol = self._ready()
        return protocol is not None and protocol.owes_nothing()

    def _ready(self) -> _Protocol | None:
        protocol = self._protocol
        if self._closed or protocol is None or protocol.lost is not None:
            return None
        return protocol

    async def _connect(self) -> _Protocol:
        # Callers that find the connection down together share one attempt.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done():
                self._connecting = None

    async def _open(self) -> _Protocol:
        protocol = await self._proven()
        if self._closed:
            protocol.abort()
            raise RedisConnectionError("the connection to Redis is closed")
        protocol.on_suspect = self._check
        self._protocol = protocol
        return protocol

    async def _proven(self) -> _Protocol:
        """A new connection that has answered its handshake (AUTH, SELECT, PING)."""
        loop = asyncio.get_running_loop()
        opening = asyncio.current_task()
        assert opening is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            if not opening.done():
                expired = True
                opening.cancel()

        deadline = loop.call_later(self._connect_timeout, after_io_turn, loop, expire)
        try:
            _, protocol = await loop.create_connection(
                lambda: _Protocol(self._reply_timeout, self._give_up_after), *self._address
            )
        except asyncio.CancelledError:
            if not expired:
                raise
            late = f"no answer within {self._connect_timeout:g} s"
            raise RedisConnectionError(f"cannot connect to Redis at {self._address}: {late}") from None
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to Redis at {self._address}: {exc!r}") from exc
        finally:
            deadline.cancel()
        try:
            for hello in self._hello:
                [reply] = await protocol.request(hello, 1)
                if isinstance(reply, ResponseError):
                    raise RedisConnectionError(f"Redis refused the connection: {reply}")
        except BaseException as exc:
            protocol.abort()  # whatever went wrong, no half-open connection is left behind
            if isinstance(exc, RedisConnectionError):
                raise RedisConnectionError(f"cannot connect to Redis at {self._address}: {exc}") from None
            raise
        return protocol

    def _check(self, protocol: _Protocol) -> None:
        """`protocol` is suspect: does Redis answer a new connection?"""
        task = asyncio.get_running_loop().create_task(self._health_check(protocol))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _health_check(self, protocol: _Protocol) -> None:
        try:
            probe = await self._proven()
        except RedisConnectionError as exc:
            protocol.fail(f"no reply from Redis within {self._reply_timeout:g} s; a new connection: {exc}")
            return
        probe.abort()
        protocol.alive()

    async def close(self) -> None:
        """Close for good: later calls fail as a store failure."""
        self._closed = True
        for check in list(self._checks):
            check.cancel()
        if self._protocol is not None:
            self._protocol.abort()
            self._protocol = None
