"""Measure what the durable outbox's journal (`store.outbox_path`) costs per request.

    .venv/bin/python -m bench.journal_bench [-n 10000] [--in-flight 64]

Each request does what the store does with a journal: `open` its reservation at admission (the
realistic plan of store_bench: ten checks) and `drop` it at settlement, `--in-flight` at a time,
each lasting a millisecond. The same loop without a journal is the baseline; the difference is the
journal's CPU per request (encoding on the event loop, plus the SQLite writer thread: both in this
process's CPU time), and the number of transactions (one fsync each) tells how well it batches.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import date
from pathlib import Path

from bench.store_bench import ESTIMATE, TENANT
from gateway.limits import LimitPlan
from gateway.limits.calls import compile_checks
from gateway.limits.journal import Journal
from gateway.limits.store import Reservation
from gateway.process.server import run  # uvloop, as the gateway itself runs

REQUEST_SECONDS = 0.001


async def measure(journal: Journal | None, n: int, in_flight: int) -> tuple[float, float]:
    """CPU and wall microseconds per request."""
    checks = compile_checks(
        LimitPlan.build("bench", TENANT, TENANT.keys[0], 0, "user1"), ESTIMATE, date.today()
    )

    async def one(i: int) -> None:
        reservation = Reservation(f"r{i}", f"r{i}", "bench", "gpt-image-1.5", date.today(), ESTIMATE, checks)
        if journal is not None:
            journal.open(reservation)
        await asyncio.sleep(REQUEST_SECONDS)
        if journal is not None:
            journal.drop(reservation.id)

    cpu, wall = time.process_time(), time.perf_counter()
    for first in range(0, n, in_flight):
        await asyncio.gather(*(one(i) for i in range(first, min(n, first + in_flight))))
    if journal is not None:
        await journal.flush()
    return (time.process_time() - cpu) / n * 1e6, (time.perf_counter() - wall) / n * 1e6


async def main(args: argparse.Namespace) -> None:
    base_cpu, base_wall = await measure(None, args.n, args.in_flight)
    journal = Journal(Path(tempfile.mkdtemp(prefix="journal-bench-")))
    commits = 0
    commit = journal._commit

    def counted(changes: dict[str, object]) -> None:
        nonlocal commits
        commits += 1
        commit(changes)  # type: ignore[arg-type]

    journal._commit = counted  # type: ignore[method-assign]
    cpu, wall = await measure(journal, args.n, args.in_flight)
    await journal.close()
    print(f"{args.n} requests, {args.in_flight} in flight, {REQUEST_SECONDS * 1000:.0f} ms each")
    print(f"  without journal  CPU {base_cpu:7.1f} µs/request   wall {base_wall:7.1f} µs/request")
    print(f"  with journal     CPU {cpu:7.1f} µs/request   wall {wall:7.1f} µs/request")
    print(f"  journal cost     CPU {cpu - base_cpu:7.1f} µs/request")
    print(f"  transactions (one fsync each): {commits}, {2 * args.n / max(commits, 1):.1f} changes each")


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=10_000, help="requests")
    parser.add_argument("--in-flight", type=int, default=64, help="requests at a time")
    run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
