"""Benchmark: how long `gateway serve` takes to exit after SIGTERM with long streams open, against
its shutdown_grace_seconds (the promise: within drain_delay + grace + shutdown.MARGIN_SECONDS).

Starts a Redis server, an upstream whose streams send one partial image and then hold, and one
gateway process; opens the streams, sends SIGTERM, and prints the time to exit, the exit status
and what is left in Redis (reservation records and leases: both must be zero).

    .venv/bin/python bench/shutdown_bench.py [--grace 3 30 120] [--streams 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.process.shutdown import MARGIN_SECONDS  # noqa: E402
from tests.support.burst import LOW  # noqa: E402
from tests.support.config import TENANT_KEY, config_dict  # noqa: E402
from tests.support.held_upstreams import EndlessStreams  # noqa: E402
from tests.support.processes import GatewayProcess  # noqa: E402
from tests.support.redis_servers import RedisServer  # noqa: E402


async def one(grace: float, streams: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="shutdown-bench-"))
    redis = RedisServer(directory).start()
    upstream = EndlessStreams()
    await upstream.start()
    config = config_dict(
        upstream.url,
        store={"backend": "redis", "url": redis.url},
        limits={"concurrent_requests": 100_000},
        server={"shutdown_grace_seconds": grace, "log_level": "warning"},
    )
    gateway = GatewayProcess(config, directory)
    await gateway.start()
    assert gateway.process is not None
    payload = {**LOW, "stream": True, "partial_images": 1}
    headers = {"Authorization": f"Bearer {TENANT_KEY}"}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def stream() -> None:
                async with session.post(
                    f"{gateway.url}/v1/images/generations", json=payload, headers=headers
                ) as r:
                    with contextlib.suppress(aiohttp.ClientError):
                        await r.read()

            tasks = [asyncio.create_task(stream()) for _ in range(streams)]
            while upstream.open < streams:  # noqa: ASYNC110 (a count kept by the upstream)
                await asyncio.sleep(0.05)
            sent = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(gateway.process.wait, grace + MARGIN_SECONDS + 60)
            took = time.monotonic() - sent
            await asyncio.gather(*tasks, return_exceptions=True)
        records = len(redis.cli("--scan", "--pattern", "igw:*:rsv:*").split())
        leases = int(redis.cli("ZCARD", "igw:{team}:lease:tenant"))
    finally:
        gateway.stop()
        await upstream.stop()
        redis.stop()
    print(
        f"grace={grace:g}s streams={streams} exited_after={took:.2f}s (bound {grace + MARGIN_SECONDS:g}s)"
        f" exit_status={code} records_left={records} leases_left={leases}",
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grace", type=float, nargs="+", default=[3, 30, 120])
    parser.add_argument("--streams", type=int, default=100)
    args = parser.parse_args()
    for grace in args.grace:
        await one(grace, args.streams)


if __name__ == "__main__":
    asyncio.run(main())
