"""Measure the quota store: script calls, client CPU and wall time per reserve and per settle.

    .venv/bin/python -m bench.store_bench [--url redis://127.0.0.1:PORT/0] [-n 2000] [--cluster]
                                          [--outbox DIR] [--instructions]

Without --url it starts a throw-away redis-server (or, with --cluster, a three-master cluster)
on free ports (never the shared 6379). A
request carries a realistic plan: seven tenant limits, one key limit, two end-user limits.
Script calls (one per reserve, one per settle; the client batches those of one loop turn into
one write) and the server's own cost per call come from INFO commandstats. With --outbox, the
Redis store is measured a second time with its durable outbox journalled under DIR (what
`store.outbox_path` costs per request: the CPU of this process, the SQLite writer thread included).

With --instructions, the Redis store's work per request is counted instead of timed: the bench runs
again under valgrind (callgrind, instrumentation on only while measuring) and N requests are served
as the gateway serves them, four at a time (reserve, its rate-limit headers, hold, settle).
Instruction counts agree within about 0.5% from run to run, on a busy machine too, so a change to
the store can be judged by them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from gateway.config import KeySettings, Limits, StoreSettings, TenantSettings
from gateway.limits import LimitPlan, create_store
from gateway.limits.limiter import LimitStore
from gateway.process.server import run  # uvloop, as the gateway itself runs
from gateway.telemetry.metrics import Metrics
from policies.cost import Cost

TENANT = TenantSettings(
    policy="p",
    keys=[KeySettings(hash="sha256:" + "b" * 64, name="ops", limits=Limits(requests_per_minute=10**6))],
    limits=Limits(
        requests_per_minute=10**6,
        images_per_minute=10**6,
        tokens_per_minute=10**8,
        tokens_per_day=10**12,
        usd_per_day=10**6,
        usd_per_month=8 * 10**6,
        concurrent_requests=10**6,
    ),
    user_limits=Limits(requests_per_minute=10**6, tokens_per_day=10**12),
)
ESTIMATE = Cost(images=1, text_in_tokens=40, image_out_tokens=4160, nano_usd=167_000_000)
ACTUAL = Cost(images=1, text_in_tokens=38, image_out_tokens=4160, nano_usd=166_900_000)


class ScriptCalls:
    """Counts the script calls a standalone Redis ran (INFO commandstats): what each request costs
    the store, whatever the client batches into one write."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def count(self) -> int:
        raw = Redis.from_url(self.url)
        try:
            stats = await raw.info("commandstats")
        finally:
            await raw.aclose()
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


class Meter:
    """Client CPU and wall time accumulated over the phases measured."""

    def __init__(self, label: str) -> None:
        self.label, self.cpu, self.wall, self.ops = label, 0.0, 0.0, 0
        self._cpu0 = self._wall0 = 0.0

    def __enter__(self) -> Meter:
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *_: object) -> None:
        self.cpu += time.process_time() - self._cpu0
        self.wall += time.perf_counter() - self._wall0

    def row(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "cpu_us": self.cpu / self.ops * 1e6,
            "wall_us": self.wall / self.ops * 1e6,
        }


CHUNK = 64  # requests in flight between a reserve and its settle: leases stay realistic


async def bench(store: LimitStore, n: int, counter: ScriptCalls | None) -> list[dict[str, Any]]:
    plans = [LimitPlan.build("bench", TENANT, TENANT.keys[0], 0, f"user{i % 50}") for i in range(n)]
    for i in range(50):  # warm up: connections, scripts, caches
        admission = await store.reserve(plans[i], ESTIMATE, request_id=f"w{i}", model="gpt-image-1.5")
        assert admission.reservation is not None
        await store.settle(admission.reservation, ACTUAL, outcome="ok")
    reserve, settle = Meter("reserve"), Meter("settle")
    sent = await counter.count() if counter else 0
    for first in range(0, n, CHUNK):
        chunk = plans[first : first + CHUNK]
        reservations = []
        with reserve:
            for i, p in enumerate(chunk, first):
                admission = await store.reserve(p, ESTIMATE, request_id=f"r{i}", model="gpt-image-1.5")
                assert admission.allowed and admission.reservation is not None
                reservations.append(admission.reservation)
        with settle:
            for reservation in reservations:
                assert await store.settle(reservation, ACTUAL, outcome="ok")
    reserve.ops = settle.ops = n
    results = [reserve.row(), settle.row()]
    if counter:
        calls = await counter.count() - sent
        results.append({"label": "script calls per request (reserve+settle)", "value": calls / n})

    async def one(i: int) -> None:
        admission = await store.reserve(plans[i], ESTIMATE, request_id=f"c{i}", model="gpt-image-1.5")
        assert admission.reservation is not None
        await store.settle(admission.reservation, ACTUAL, outcome="ok")

    both = Meter(f"reserve+settle, {CHUNK} in flight")
    with both:
        for first in range(0, n, CHUNK):
            await asyncio.gather(*(one(i) for i in range(first, min(n, first + CHUNK))))
    both.ops = n
    results.append(both.row())
    return results


async def _callgrind(state: str) -> None:
    """Switch callgrind's instrumentation of this process on or off (the loop runs meanwhile)."""
    control = await asyncio.create_subprocess_exec(
        "callgrind_control", f"--instr={state}", str(os.getpid()), stdout=subprocess.DEVNULL
    )
    await control.wait()


async def count_instructions(url: str, n: int) -> None:
    """The measured part of --instructions, run under callgrind: n requests, four at a time."""
    store = create_store(
        StoreSettings(backend="redis", url=url, timeout_ms=2000), Metrics(CollectorRegistry())
    )
    assert isinstance(store, LimitStore)
    await store.start()
    plan = LimitPlan.build("bench", TENANT, TENANT.keys[0], 0, "user")

    async def one(i: int) -> None:
        admission = await store.reserve(plan, ESTIMATE, request_id=f"i{i:08d}", model="gpt-image-1.5")
        assert admission.allowed and admission.reservation is not None
        admission.render()  # its rate-limit headers, as the pipeline has them rendered
        store.hold(admission.reservation)
        await asyncio.sleep(0)  # the relay
        assert await store.settle(admission.reservation, ACTUAL, outcome="ok")

    for turn in range(-10, n // 4):  # ten turns warm up: connections, scripts, caches
        if turn == 0:
            await _callgrind("on")
        await asyncio.gather(*(one(4 * turn + i) for i in range(4)))
    await _callgrind("off")
    await store.close()


def instructions(url: str, n: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="store-bench-callgrind-"))
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={directory}/callgrind.out",
            sys.executable,
            "-m",
            "bench.store_bench",
            "--url",
            url,
            "-n",
            str(n),
            "--callgrind-child",
        ],
        check=True,
        capture_output=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    total = sum(
        int(line.split()[1])
        for path in directory.glob("callgrind.out*")
        for line in path.read_text().splitlines()
        if line.startswith("totals:")
    )
    shutil.rmtree(directory, ignore_errors=True)
    print(f"redis store: {total / (n // 4 * 4) / 1e3:.1f} k instructions per request (reserve, hold, settle)")


async def server_usec_per_call(url: str) -> float | None:
    raw = Redis.from_url(url)
    try:
        stats = await raw.info("commandstats")
    finally:
        await raw.aclose()
    evalsha = stats.get("cmdstat_evalsha")
    return float(evalsha["usec_per_call"]) if evalsha else None


def report(title: str, results: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    for row in results:
        if "value" in row:
            print(f"  {row['label']}: {row['value']:.2f}")
        else:
            print(
                f"  {row['label']:<32} client CPU {row['cpu_us']:8.1f} µs/op   wall {row['wall_us']:8.1f} µs/op"
            )


async def main(args: argparse.Namespace) -> None:
    metrics = Metrics(CollectorRegistry())
    memory = create_store(StoreSettings(), metrics)
    assert isinstance(memory, LimitStore)
    report("memory store", await bench(memory, args.n, None))

    settings = StoreSettings(backend="redis", url=args.url, cluster=args.cluster, timeout_ms=2000)
    counter = None if args.cluster else ScriptCalls(args.url)
    store = create_store(settings, Metrics(CollectorRegistry()))
    assert isinstance(store, LimitStore)
    await store.start()
    try:
        report(
            f"redis store ({'cluster' if args.cluster else 'standalone'} at {args.url})",
            await bench(store, args.n, counter),
        )
    finally:
        await store.close()
    if not args.cluster:
        print(
            f"  redis server time per EVALSHA (INFO commandstats): {await server_usec_per_call(args.url)} µs"
        )
    if args.outbox:
        durable = create_store(
            settings.model_copy(update={"outbox_path": args.outbox}), Metrics(CollectorRegistry())
        )
        assert isinstance(durable, LimitStore)
        await durable.start()
        try:
            report(f"redis store, durable outbox in {args.outbox}", await bench(durable, args.n, None))
        finally:
            await durable.close()


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a Redis to use (default: start one on a free port)")
    parser.add_argument("--cluster", action="store_true", help="--url is a Redis Cluster node")
    parser.add_argument("-n", type=int, default=2000, help="requests per measurement")
    parser.add_argument("--outbox", help="also measure with the durable outbox journalled in this directory")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions per request (valgrind) instead"
    )
    parser.add_argument("--callgrind-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.callgrind_child:
        run(count_instructions(args.url, args.n))
        return
    if args.instructions and args.n == 2000:
        args.n = 800  # ~50 times slower under valgrind

    def measure() -> None:
        if args.instructions:
            instructions(args.url, args.n)
        else:
            run(main(args))

    if args.url:
        measure()
        return
    from tests.support.redis_servers import RedisClusterNodes, RedisServer

    directory = Path(tempfile.mkdtemp(prefix="store-bench-"))
    server = RedisClusterNodes(directory).start() if args.cluster else RedisServer(directory).start()
    try:
        args.url = server.url
        measure()
    finally:
        server.stop()


if __name__ == "__main__":
    cli()
