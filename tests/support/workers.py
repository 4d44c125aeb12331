"""Looking at a `server.workers: N` gateway from outside, through /proc (Linux): its worker
processes, and which of them holds each client connection.

Used by the workers test (tests/e2e/test_workers.py) and `bench/workers_bench.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

_ESTABLISHED = "01"


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's child processes (its workers)."""
    children: list[int] = []
    for task in Path(f"/proc/{supervisor}/task").iterdir():
        children += [int(pid) for pid in (task / "children").read_text().split()]
    return sorted(children)


def connections_by_pid(pids: list[int], port: int) -> dict[int, int]:
    """How many established TCP connections to local `port` (clients of the listener) each of
    `pids` holds open."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == _ESTABLISHED:
                inodes.add(fields[9])
    held: dict[int, int] = {}
    for pid in pids:
        count = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:  # closed meanwhile
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                count += 1
        held[pid] = count
    return held
