"""Spreading the tenant port's connections evenly over worker processes (`server.workers: N`).

The supervisor listens on the tenant port and hands each accepted connection to the next worker
in turn (`Dealer`), passing the socket itself over a Unix socket pair (SCM_RIGHTS); a worker serves
what it is handed (`HandedSite`) exactly as if it had accepted it. So N connections land on the N
workers one each, however few they are. Workers that each accept on their own socket cannot
promise that: with SO_REUSEPORT the kernel places a connection by a hash of the client's address
and port, and a client holding two keep-alive connections has them on the same worker half of the
time (with one shared socket, whichever worker wakes first tends to take most of them). Only the
accept passes through the supervisor: requests go straight to the worker that holds the connection.

A worker that stops taking connections (draining, or gone) is skipped; a connection no worker takes
is closed. On SIGTERM the supervisor stops accepting after `server.drain_delay_seconds`: it closes
its listeners, then its ends of the channels. A worker closes its site at the same moment, but
first serves every connection handed to it: it reads its channel to the end that the supervisor's
close makes (waiting at most SUPERVISOR_WAIT for it; if the supervisor is still dealing, because
this worker alone was told to stop, it shuts the channel for reading, which makes the dealer skip
it, and reads what was queued before).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import select
import selectors
import signal
import socket
import threading
import time

from aiohttp import web

from gateway.logs import get_logger

log = get_logger("gateway.server")

_BACKLOG = 1024
_HAND_WAIT = 10.0  # seconds a connection waits for a worker with room before it is dropped
_ACCEPT_BACKOFF = 0.05  # seconds without accepting after accept() ran out of descriptors
# seconds a stopping worker waits for the supervisor to stop dealing (it stops at the same moment)
SUPERVISOR_WAIT = 1.0


class Dealer:
    """The supervisor's side: listens on (host, port) and deals connections to workers in turn."""

    def __init__(self, host: str, port: int, workers: int) -> None:
        """Binds the port (OSError when it cannot) and makes one channel per worker."""
        self.listeners = _listen(host, port)
        # SOCK_SEQPACKET: one message, one connection; never two merged or one split.
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(workers)]
        self._ends = [ours for ours, _ in pairs]
        self.worker_ends = [theirs for _, theirs in pairs]  # each worker inherits its own
        for end in self._ends:
            end.setblocking(False)  # a worker that stops reading is skipped, not waited for
        self._closed: set[int] = set()  # the workers whose channel is closed (draining or gone)
        self._wake, self._woken = socket.socketpair()
        self._thread = threading.Thread(target=self._deal, name="dealer", daemon=True)

    @property
    def port(self) -> int:
        return int(self.listeners[0].getsockname()[1])

    def start(self) -> None:
        for end in self.worker_ends:  # the workers have their copies now
            end.close()
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting: the listeners close (a connection still in their queue is refused), then
        the channels (each worker reads what its own still holds, then the end)."""
        with contextlib.suppress(OSError):
            self._wake.send(b"x")
        self._thread.join(timeout=5)

    def _deal(self) -> None:
        turns = itertools.cycle(range(len(self._ends)))
        with selectors.DefaultSelector() as selector:
            for listener in self.listeners:
                selector.register(listener, selectors.EVENT_READ)
            selector.register(self._woken, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._woken:
                        self._close()
                        return
                    self._accept(key.fileobj, turns)  # type: ignore[arg-type]

    def _accept(self, listener: socket.socket, turns: itertools.cycle[int]) -> None:
        try:
            connection, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # gone before it was accepted
        except OSError as exc:  # out of descriptors or buffers: let some go before trying again
            log.warning("accept_failed", error=exc.strerror)
            time.sleep(_ACCEPT_BACKOFF)
            return
        with connection:  # our copy closes once a worker has its own
            deadline = time.monotonic() + _HAND_WAIT
            while (handed := self._hand(connection, turns)) == "full" and time.monotonic() < deadline:
                # Every live worker's channel is full (all busy, or stalled by a collection): wait
                # for room without accepting more, so new connections queue in the kernel's
                # backlog, as they would without the supervisor, instead of being dropped.
                if not self._wait_for_room(deadline):
                    return  # stopping
            if handed != "handed":
                log.warning("connection_not_handed", reason="no worker took it")

    def _hand(self, connection: socket.socket, turns: itertools.cycle[int]) -> str:
        """Pass `connection` to the next worker that takes it: handed, full (some channel has no
        room now), or none (every worker is draining or gone)."""
        full = False
        for _ in range(len(self._ends)):
            turn = next(turns)
            if turn in self._closed:
                continue
            try:
                socket.send_fds(self._ends[turn], [b"c"], [connection.fileno()])
                return "handed"
            except BlockingIOError:
                full = True  # that worker is not keeping up: the next one
            except OSError:
                self._closed.add(turn)  # that worker is draining or gone: for good
        return "full" if full else "none"

    def _wait_for_room(self, deadline: float) -> bool:
        """Until a channel may take one more or `deadline`; False when the dealer is stopping."""
        live = [end for turn, end in enumerate(self._ends) if turn not in self._closed]
        readable, _, _ = select.select([self._woken], live, [], max(0.0, deadline - time.monotonic()))
        return not readable

    def _close(self) -> None:
        for sock in (*self.listeners, *self._ends, self._wake, self._woken):
            sock.close()


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address `host` resolves to (as aiohttp's TCPSite binds them)."""
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
            port = port or int(sock.getsockname()[1])  # port 0: every address on the same port
    except OSError:
        for sock in listeners:
            sock.close()
        raise
    return listeners


class HandedSite(web.BaseSite):
    """A worker's site: serves the connections the supervisor's `Dealer` hands it over `channel`."""

    __slots__ = ("_channel", "_ended", "_handing", "_stopping", "_supervisor_wait")

    def __init__(self, runner: web.BaseRunner, channel: socket.socket, *, supervisor_wait: float) -> None:
        """`supervisor_wait`: how long `stop` waits for the supervisor to stop dealing."""
        super().__init__(runner)
        self._channel = channel
        self._supervisor_wait = supervisor_wait
        self._ended: asyncio.Future[None] | None = None  # done at the channel's end
        self._handing: set[asyncio.Task[object]] = set()  # connections received, not yet set up
        self._stopping = False

    @property
    def name(self) -> str:
        return "handed connections"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._ended = loop.create_future()
        self._channel.setblocking(False)
        loop.add_reader(self._channel.fileno(), self._receive)

    async def stop(self) -> None:
        """Serve every connection handed over before the channel closes (see the module)."""
        self._stopping = True
        assert self._ended is not None
        if not self._ended.done():  # the supervisor closes its end once it has stopped dealing
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._ended), self._supervisor_wait)
        if not self._ended.done():  # still dealing: refuse more (the dealer skips us), take the rest
            self._channel.shutdown(socket.SHUT_RD)
            # Reading a shut channel reaches its end at once; bounded all the same, so the exit
            # bound holds whatever the kernel does.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._ended), self._supervisor_wait)
        if self._handing:
            await asyncio.wait(self._handing)
        await super().stop()

    def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self._channel, 1, 1)
            except BlockingIOError:
                return
            except OSError:
                message, fds = b"", []
            if not message:
                # The end: every connection handed over has been read. Unless this worker is
                # stopping, the supervisor is gone (killed): nothing more will come, and an orphan
                # must not keep the ops port answering ready. Shut down as on SIGTERM (ignored when
                # shutdown is under way already).
                loop.remove_reader(self._channel.fileno())
                self._channel.close()
                assert self._ended is not None
                self._ended.set_result(None)
                if not self._stopping:
                    log.info("supervisor_channel_closed")
                    os.kill(os.getpid(), signal.SIGTERM)
                return
            for fd in fds:
                os.set_inheritable(fd, False)  # received descriptors come without close-on-exec
                connection = socket.socket(fileno=fd)
                connection.setblocking(False)
                task = loop.create_task(loop.connect_accepted_socket(server, connection))
                self._handing.add(task)
                task.add_done_callback(self._set_up)

    def _set_up(self, task: asyncio.Task[object]) -> None:
        self._handing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("handed_connection_failed", error=type(task.exception()).__name__)


def inherit(fd: int) -> socket.socket:
    """A worker's end of its channel, from the descriptor it inherited."""
    channel = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    return channel
