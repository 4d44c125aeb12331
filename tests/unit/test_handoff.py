"""The supervisor's dealer (gateway/process/handoff.py) through real sockets: connections wait for a worker
with room instead of being dropped when every worker's channel is full."""

from __future__ import annotations

import contextlib
import socket
import time

from gateway.process.handoff import Dealer


def test_a_connection_waits_for_room_in_a_full_channel_instead_of_being_dropped() -> None:
    dealer = Dealer("127.0.0.1", 0, workers=1)
    worker = dealer.worker_ends[0].dup()  # the worker's end, as a forked worker would hold it
    # A tiny channel: a handful of connections fill it while the worker takes none.
    for end in dealer._ends:
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    dealer.start()
    clients = [socket.create_connection(("127.0.0.1", dealer.port)) for _ in range(40)]
    try:
        time.sleep(0.5)  # the dealer has filled the channel and waits for room
        handed: list[int] = []
        deadline = time.monotonic() + 10
        worker.settimeout(0.2)
        while len(handed) < len(clients) and time.monotonic() < deadline:
            try:
                _, fds, _, _ = socket.recv_fds(worker, 1, 1)
            except TimeoutError:
                continue
            handed += fds
        assert len(handed) == len(clients)  # before: the channel's worth, the rest closed unserved
        for client in clients:
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):  # raised: open, nothing sent, as it should be
                assert client.recv(1) != b"", "the supervisor closed a connection it did not hand"
    finally:
        dealer.stop()
        for fd in handed:
            socket.socket(fileno=fd).close()
        for client in clients:
            client.close()
        worker.close()
