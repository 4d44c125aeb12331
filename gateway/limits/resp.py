"""A lean, pipelined connection to a standalone Redis for the hot path: the script calls.

redis-py spends about 75 µs of CPU on one PING (connection pool, locks, per-call timeouts, retry
wrappers, stream readers); this protocol writes a whole batch with one `transport.write` and
matches the replies in order (Redis answers in order) with hiredis's parser: about 6 µs. Every
admitted request makes two script calls, so this is most of what the store costs the gateway.

Only plain `redis://` TCP URLs (with an optional user, password and db) are served here;
anything else (TLS, unix sockets) and every other command (script loading, the ledger, SCAN)
stays with redis-py, as does Redis Cluster.

One connection is opened on first use and again after it is lost. A caller that gives up waiting
(`LimitStore`'s timeout) leaves its place in the queue, so the replies still line up; a batch
whose replies are overdue by `reply_timeout` drops the connection (it may be dead without a FIN),
failing everything queued on it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError


def command(*args: str | int) -> bytes:
    """One command in RESP: an array of bulk strings."""
    encoded = [arg.encode() if isinstance(arg, str) else b"%d" % arg for arg in args]
    return b"*%d\r\n" % len(encoded) + b"".join([b"$%d\r\n%b\r\n" % (len(e), e) for e in encoded])


def _reply(value: Any) -> Any:
    """hiredis's reply, with error replies as redis-py's exceptions (NOSCRIPT as NoScriptError)."""
    if isinstance(value, hiredis.ReplyError):
        message = str(value)
        return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)
    return value


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._parser = hiredis.Reader()
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        while (reply := self._parser.gets()) is not False:
            if not self._waiting:  # nothing was asked (e.g. "max number of clients"): not ours
                self.abort()
                return
            waiter = self._waiting.popleft()
            if not waiter.done():  # a caller that gave up still had its place in the queue
                waiter.set_result(_reply(reply))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = RedisConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}")
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(self.lost)

    def send(self, payload: bytes, replies: int) -> list[asyncio.Future[Any]]:
        if self.lost is not None or self._transport is None:
            raise self.lost or RedisConnectionError("not connected to Redis")
        loop = asyncio.get_running_loop()
        waiters = [loop.create_future() for _ in range(replies)]
        self._waiting.extend(waiters)
        self._transport.write(payload)
        return waiters

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
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
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
        """Write `payload` (`replies` commands) and return their replies, error replies included."""
        if self._closed:
            raise RedisConnectionError("the connection to Redis is closed")
        protocol = self._protocol
        if protocol is None or protocol.lost is not None:
            protocol = await self._connect()
        waiters = protocol.send(payload, replies)
        try:
            async with asyncio.timeout(self._reply_timeout):
                return [await waiter for waiter in waiters]
        except TimeoutError:
            protocol.abort()  # overdue: the connection may be dead without having been closed
            raise RedisConnectionError(f"no reply from Redis within {self._reply_timeout:g} s") from None

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
        loop = asyncio.get_running_loop()
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, protocol = await loop.create_connection(_Protocol, *self._address)
                for hello in self._hello:
                    [reply] = await asyncio.gather(*protocol.send(hello, 1))
                    if isinstance(reply, ResponseError):
                        raise RedisConnectionError(f"Redis refused the connection: {reply}")
        except BaseException as exc:
            if protocol is not None:
                protocol.abort()  # whatever went wrong, no half-open connection is left behind
            if isinstance(exc, (OSError, TimeoutError)):
                raise RedisConnectionError(f"cannot connect to Redis at {self._address}: {exc!r}") from exc
            raise
        if self._closed:
            protocol.abort()
            raise RedisConnectionError("the connection to Redis is closed")
        self._protocol = protocol
        return protocol

    async def close(self) -> None:
        """Close for good: later calls fail as a store failure."""
        self._closed = True
        if self._protocol is not None:
            self._protocol.abort()
            self._protocol = None
