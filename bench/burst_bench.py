"""Benchmark: bursts against real gateway processes on one Redis, for the figures the burst tests
only bound: how many were admitted (exactness), shed, refused, and how long decisions took.

Starts a Redis server, an upstream that holds what it receives until every request is decided
(tests/support/burst.py), and `gateway serve` processes with a concurrency limit; sends each burst
at once over connections opened first; prints one line per burst.

    .venv/bin/python bench/burst_bench.py [--processes 1 3] [--sizes 2000 4000 8000]
        [--mode fail_open fail_closed] [--limit 100] [--max-pending 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.burst import HeldUpstream, burst, gateway_config, start_gateways  # noqa: E402
from tests.support.redis_servers import RedisServer  # noqa: E402


async def one(processes: int, size: int, mode: str, limit: int, max_pending: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="burst-bench-"))
    redis = RedisServer(directory).start()
    upstream = HeldUpstream()
    await upstream.start()
    config = gateway_config(upstream.url, redis.url, {"concurrent_requests": limit}, on_unavailable=mode)
    config["server"]["max_pending_admissions"] = max_pending
    gateways = await start_gateways(config, directory, processes)
    try:
        result = await burst([gateway.url for gateway in gateways], size, upstream)
    finally:
        for gateway in gateways:
            await asyncio.to_thread(gateway.stop)
        await upstream.stop()
        redis.stop()
    outages = sum(1 for g in gateways for line in g.log_lines() if "store_unavailable" in line)
    print(
        f"processes={processes} burst={size} mode={mode} admitted={result.admitted} (limit {limit})"
        f" refused={result.codes['rate_limit_exceeded']} shed={result.codes['overloaded']}"
        f" store_503={result.codes['service_unavailable']} store_outages_logged={outages}"
        f" p99_decision={result.p99_decision() * 1000:.0f}ms all_decided={result.took:.2f}s",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000, 8000])
    parser.add_argument("--mode", nargs="+", default=["fail_open", "fail_closed"])
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--max-pending", type=int, default=1024)
    args = parser.parse_args()
    for processes in args.processes:
        for size in args.sizes:
            for mode in args.mode:
                await one(processes, size, mode, args.limit, args.max_pending)


if __name__ == "__main__":
    asyncio.run(main())
