"""Measure what the usage page costs: the admin API answers it reads, against the number of tenants,
and the per-request cost of counting requests by decision.

    .venv/bin/python -m bench.admin_bench [--url redis://127.0.0.1:PORT/0] [--tenants 10,100,1000]

Without --url it starts a throw-away redis-server on a free port (never the shared 6379). For each
tenant count it serves the gateway (memory store, then Redis) on loopback with that many tenants,
each with seven tenant limits and one key limit, and times `GET /admin/tenants` (what the page
loads every 30 seconds) and `GET /admin/activity`: the median and the worst of several calls.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.app import create_app
from gateway.config import Settings
from gateway.process.server import run  # uvloop, as the gateway itself runs
from gateway.telemetry.activity import Activity

TOKEN = "bench-admin-token"
LIMITS = {
    "requests_per_minute": 600,
    "images_per_minute": 300,
    "tokens_per_minute": 2_000_000,
    "tokens_per_day": 50_000_000,
    "usd_per_day": 500,
    "usd_per_month": 5000,
    "concurrent_requests": 40,
}
CALLS = 15


def settings(tenants: int, store: dict[str, Any]) -> Settings:
    return Settings.model_validate(
        {
            "admin": {"token": TOKEN},
            "store": store,
            "policies": {"open": {}},
            "tenants": {
                f"team-{i:04d}": {
                    "policy": "open",
                    "keys": [
                        {"hash": f"sha256:{i:064x}", "name": "ops", "limits": {"requests_per_minute": 60}}
                    ],
                    "limits": LIMITS,
                }
                for i in range(tenants)
            },
        }
    )


async def time_calls(url: str, path: str) -> tuple[float, float, int]:
    """Median and worst milliseconds of CALLS calls (after one warm-up), and the answer's size."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    times: list[float] = []
    size = 0
    async with aiohttp.ClientSession() as http:
        for i in range(CALLS + 1):
            started = time.perf_counter()
            async with http.get(url + path, headers=headers) as response:
                assert response.status == 200, await response.text()
                size = len(await response.read())
            if i:
                times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), max(times), size


async def serve_and_measure(config: Settings) -> list[tuple[str, float, float, int]]:
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/admin"
    try:
        return [(path, *await time_calls(url, path)) for path in ("/tenants", "/activity")]
    finally:
        await runner.cleanup()


async def main(args: argparse.Namespace) -> None:
    for label, store in (("memory", {"backend": "memory"}), ("redis", {"backend": "redis", "url": args.url})):
        for count in args.tenants:
            for path, median, worst, size in await serve_and_measure(settings(count, store)):
                print(
                    f"  {label:<6} {count:>5} tenants  GET /admin{path:<9}  median {median:8.1f} ms"
                    f"   worst {worst:8.1f} ms   {size / 1024:8.1f} KiB"
                )
    activity = Activity()
    per_call = min(timeit.repeat(lambda: activity.count(200), number=100_000, repeat=5)) / 100_000
    print(f"  Activity.count (the request middleware's share): {per_call * 1e9:.0f} ns per request")


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a Redis to use (default: start one on a free port)")
    parser.add_argument("--tenants", default="10,100,1000", help="tenant counts, comma-separated")
    args = parser.parse_args()
    args.tenants = [int(n) for n in args.tenants.split(",")]
    if args.url:
        run(main(args))
        return
    from tests.support.redis_servers import RedisServer

    server = RedisServer(Path(tempfile.mkdtemp(prefix="admin-bench-"))).start()
    try:
        args.url = server.url
        run(main(args))
    finally:
        server.stop()


if __name__ == "__main__":
    cli()
