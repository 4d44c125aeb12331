"""Benchmark: where a request's time goes between its bytes arriving and its first bytes leaving.

Starts the mock upstream, a Redis server and `gateway serve` (Redis store, unbinding limits, info
logging) with bench/critical_path/sitecustomize.py loaded, which stamps each request's way through
the gateway in memory; sends N requests, C at once (JSON, or SSE with two partial images, each read
to its end), stops the gateway and prints, per segment of the critical path, the median and 90th
percentile over the requests:

    arrival -> handler -> reserve -> admitted -> forward -> upstream head -> first bytes

(arrival: the last client bytes read before the handler started, with C = 1 only) and what else ran
inside a request's critical path: another request's settlement or access-log line, garbage
collections (their time). `--checkout DIR` runs another checkout's gateway too, with the same stamps.

    .venv/bin/python bench/critical_path_bench.py [--kind json sse] [--requests 2000]
        [--concurrency 1] [--checkout DIR ...] [--image-bytes 65536] [--partial-interval-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import os
import shutil
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import SMALL, UNBOUND, mock_and_redis  # noqa: E402
from tests.support.config import TENANT_KEY, config_dict  # noqa: E402
from tests.support.processes import GatewayProcess  # noqa: E402

STAMPS = ROOT / "bench" / "critical_path"  # its sitecustomize.py, loaded by the gateway
KINDS = {"json": SMALL, "sse": {**SMALL, "stream": True, "partial_images": 2}}
PATH = ("handler", "reserve", "admitted", "forward", "upstream_head", "first_bytes")
ELSEWHERE = ("settle", "settled", "access_log")  # another request's, inside this one's path


async def load(url: str, payload: dict[str, object], requests: int, concurrency: int) -> None:
    queue = iter(range(requests))
    headers = {"Authorization": f"Bearer {TENANT_KEY}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            for _ in queue:
                async with session.post(url, json=payload, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{resp.status}: {(await resp.text())[:200]}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def analyse(log: Path, requests: int, concurrency: int) -> dict[str, list[float]]:
    """Per segment, its durations in microseconds; per kind of other work, its count per request."""
    stamps = [(int(t), name, int(key)) for t, name, key in (line.split() for line in log.open())]
    requests_seen: list[dict[str, int]] = []
    current: dict[int, dict[str, int]] = {}
    last_arrival = 0
    for t, name, key in stamps:
        if name == "client_bytes":
            last_arrival = t
        elif name == "handler":
            current[key] = {"handler": t, "arrival": last_arrival}
            requests_seen.append(current[key])
        elif key in current:
            current[key].setdefault(name, t)
    measured = [r for r in requests_seen[-requests:] if all(point in r for point in PATH)]
    segments: dict[str, list[float]] = defaultdict(list)
    steps = (("arrival", "handler"), *itertools.pairwise(PATH), ("handler", "first_bytes"))
    for r in measured:
        for a, b in steps:
            if a != "arrival" or concurrency == 1:
                segments[f"{a} -> {b}"].append((r[b] - r[a]) / 1000)
    # what else ran between a request's handler and its first bytes: others' work, collections
    times = [t for t, _, _ in stamps]
    for r in measured:
        inside: dict[str, float] = defaultdict(float)
        collecting = 0
        for t, name, key in stamps[
            bisect.bisect_left(times, r["handler"]) : bisect.bisect_left(times, r["first_bytes"])
        ]:
            if name in ELSEWHERE and current.get(key) is not r:
                inside[name] += 1
            elif name.startswith("gc_start"):
                collecting = t
            elif name.startswith("gc_stop") and collecting:
                inside["gc_us"] += (t - collecting) / 1000
        for name in (*ELSEWHERE, "gc_us"):
            segments[f"inside: {name}"].append(inside[name])
    return segments


async def run(checkout: Path, args: argparse.Namespace, kind: str, redis_url: str, mock_url: str) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="critical-path-bench-"))
    config = config_dict(mock_url, mock_url, store={"backend": "redis", "url": redis_url}, limits=UNBOUND)
    config["server"] = {"log_level": "info"}
    log = workdir / "stamps.txt"
    python_path = os.pathsep.join(filter(None, [str(STAMPS), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": python_path, "CRITICAL_PATH_LOG": str(log)}
    gateway = GatewayProcess(config, workdir, env, checkout=checkout)
    try:
        await gateway.start()
        url = f"{gateway.url}/v1/images/generations"
        await load(url, KINDS[kind], 100, args.concurrency)  # warm-up: imports, pools, caches
        await load(url, KINDS[kind], args.requests, args.concurrency)
        gateway.stop()
        segments = analyse(log, args.requests, args.concurrency)
        print(f"{kind} x{args.requests} at {args.concurrency}, {checkout}")
        for name, values in segments.items():
            values.sort()
            p90 = values[int(len(values) * 0.9)]
            print(
                f"  {name:<28} p50 {statistics.median(values):8.1f}  p90 {p90:8.1f}  mean {statistics.mean(values):8.1f}"
            )
    finally:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def bench(args: argparse.Namespace) -> None:
    async with mock_and_redis("critical-path-bench", args.image_bytes, args.partial_interval_ms) as (
        mock_url,
        redis_url,
    ):
        for kind in args.kind:
            for checkout in [ROOT, *(Path(c).resolve() for c in args.checkout)]:
                await run(checkout, args, kind, redis_url, mock_url)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kind", nargs="+", choices=sorted(KINDS), default=["json"])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--checkout", action="append", default=[], help="another checkout to stamp too")
    parser.add_argument("--image-bytes", type=int, default=None, help="the mock's base64 image size")
    parser.add_argument("--partial-interval-ms", type=int, default=0, help="the mock's pace between partials")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
