"""Benchmark: the gateway against calling the mock upstream directly, on this machine.

Starts `gateway mock-upstream` and `gateway serve` (memory or Redis store) as separate processes,
drives both with the same aiohttp load at a given concurrency, and reports:
- requests per second, p50/p99 latency direct and through the gateway, and the difference;
- the gateway's CPU time per request (from /proc, user + system), the figure to hold under 1 ms;
- SSE time to first event, direct and through the gateway;
- the gateway's peak RSS before and after relaying large bodies (n=10 multi-MB images).

    .venv/bin/python bench/gateway_bench.py [--requests 2000] [--concurrency 16] [--store memory|redis]
        [--trace]   # every request traced, its spans exported to a local OTLP receiver

(bench/tracing_bench.py compares tracing off and on in the same run.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.config import TENANT_KEY, UPSTREAM_KEY, config_dict  # noqa: E402
from tests.support.otlp_receiver import OtlpReceiver, serve  # noqa: E402
from tests.support.processes import GatewayProcess, free_port, peak_rss_kib  # noqa: E402
from tests.support.redis_servers import RedisServer  # noqa: E402

SMALL = {"model": "gpt-image-1.5", "prompt": "a small red square", "size": "1024x1024", "quality": "low"}
TICKS = os.sysconf("SC_CLK_TCK")
UNBOUND = {  # limits high enough never to bind, within what the store keeps exact (settings.Limits)
    "requests_per_minute": 10**8,
    "tokens_per_minute": 10**8,
    "tokens_per_day": 10**15,
    "usd_per_day": 8 * 10**6,
    "concurrent_requests": 10**6,
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def wait_http(url: str, within: float = 10) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(int(within / 0.05)):
            try:
                async with session.get(url) as resp:
                    if resp.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def start_mock(port: int, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "mock-upstream",
            "--port",
            str(port),
            "--api-key",
            UPSTREAM_KEY,
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@asynccontextmanager
async def mock_and_redis(
    prefix: str, image_bytes: int | None = None, partial_interval_ms: int = 0
) -> AsyncIterator[tuple[str, str]]:
    """The mock upstream (its images `image_bytes` long in base64, its partial images
    `partial_interval_ms` apart, where given) and a Redis server: their URLs, for a gateway."""
    mock_port = free_port()
    extra = []
    if image_bytes is not None:
        extra += ["--image-bytes", str(image_bytes)]
    if partial_interval_ms:
        extra += ["--partial-interval-ms", str(partial_interval_ms)]
    mock = start_mock(mock_port, *extra)
    redis_dir = Path(tempfile.mkdtemp(prefix=f"{prefix}-redis-"))
    redis = RedisServer(redis_dir).start()
    try:
        await wait_http(f"http://127.0.0.1:{mock_port}/v1/models")
        yield f"http://127.0.0.1:{mock_port}/v1", redis.url
    finally:
        mock.terminate()
        mock.wait()
        redis.stop()
        shutil.rmtree(redis_dir, ignore_errors=True)


async def load(
    url: str,
    headers: dict[str, str],
    payload: dict[str, object],
    requests: int,
    concurrency: int,
    *,
    before_close: Callable[[], object] | None = None,
) -> tuple[list[float], float]:
    """`requests` POSTs over `concurrency` keep-alive connections; `before_close` runs while they
    are still open."""
    latencies: list[float] = []
    queue = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for _ in queue:
                started = time.perf_counter()
                async with session.post(url, json=payload, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{resp.status}: {(await resp.text())[:200]}")
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        if before_close is not None:
            before_close()
        return latencies, elapsed


async def first_event(url: str, headers: dict[str, str], samples: int) -> list[float]:
    payload = {**SMALL, "stream": True, "partial_images": 1}
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(samples):
            started = time.perf_counter()
            async with session.post(url, json=payload, headers=headers) as resp:
                await resp.content.readuntil(b"\n\n")
                times.append(time.perf_counter() - started)
                await resp.read()
    return times


def report(label: str, latencies: list[float], elapsed: float) -> dict[str, float]:
    stats = {
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }
    print(
        f"{label:<10} {stats['rps']:8.0f} req/s   p50 {stats['p50_ms']:7.2f} ms   p99 {stats['p99_ms']:7.2f} ms"
    )
    return stats


async def bench(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    mock_port, big_port = free_port(), free_port()
    mocks = [start_mock(mock_port), start_mock(big_port, "--image-bytes", str(args.image_mb * 1024 * 1024))]
    redis: RedisServer | None = None
    store: dict[str, object] = {"backend": "memory"}
    if args.store == "redis":
        redis = RedisServer(workdir).start()
        store = {"backend": "redis", "url": redis.url}
    config = config_dict(
        f"http://127.0.0.1:{mock_port}/v1", f"http://127.0.0.1:{big_port}/v1", store=store, limits=UNBOUND
    )
    config["routes"]["big"] = {
        "upstream": "digitalocean",
        "model": "gpt-image-1.5",
        "catalog": "gpt-image-1.5",
    }
    config["upstreams"]["digitalocean"]["flavor"] = "openai"
    config["upstreams"]["digitalocean"]["api_key"] = UPSTREAM_KEY
    config["server"] = {
        "log_level": args.log_level
    }  # info: one access-log line per request, as in production
    receiver = OtlpReceiver()
    collector = None
    if args.trace:
        collector, endpoint = await serve(receiver)
        config["telemetry"] = {"endpoint": endpoint, "sampler": "always_on"}
    gateway = GatewayProcess(config, workdir)
    try:
        await wait_http(f"http://127.0.0.1:{mock_port}/v1/models")
        await wait_http(f"http://127.0.0.1:{big_port}/v1/models")
        await gateway.start()
        assert gateway.process is not None
        pid = gateway.process.pid
        direct_url = f"http://127.0.0.1:{mock_port}/v1/images/generations"
        gateway_url = f"{gateway.url}/v1/images/generations"
        upstream_auth = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
        tenant_auth = {"Authorization": f"Bearer {TENANT_KEY}"}
        tracing = "tracing on (every request)" if args.trace else "tracing off"
        print(f"store={args.store} requests={args.requests} concurrency={args.concurrency} {tracing}")

        await load(gateway_url, tenant_auth, SMALL, 200, args.concurrency)  # warm up both paths
        await load(direct_url, upstream_auth, SMALL, 200, args.concurrency)
        direct = report(
            "direct", *await load(direct_url, upstream_auth, SMALL, args.requests, args.concurrency)
        )
        cpu_before = cpu_seconds(pid)
        via = report("gateway", *await load(gateway_url, tenant_auth, SMALL, args.requests, args.concurrency))
        cpu_ms = (cpu_seconds(pid) - cpu_before) * 1000 / args.requests
        print(
            f"added      p50 {via['p50_ms'] - direct['p50_ms']:+.2f} ms   p99 {via['p99_ms'] - direct['p99_ms']:+.2f} ms"
        )
        print(f"gateway CPU per request: {cpu_ms:.3f} ms")

        direct_ttfe = await first_event(direct_url, upstream_auth, args.stream_samples)
        via_ttfe = await first_event(gateway_url, tenant_auth, args.stream_samples)
        print(
            f"SSE first event: direct p50 {statistics.median(direct_ttfe) * 1000:.2f} ms, "
            f"gateway p50 {statistics.median(via_ttfe) * 1000:.2f} ms "
            f"(added {(statistics.median(via_ttfe) - statistics.median(direct_ttfe)) * 1000:+.2f} ms)"
        )

        rss_before = peak_rss_kib(pid)
        big = {**SMALL, "model": "big", "n": 10}
        big_latencies, _ = await load(gateway_url, tenant_auth, big, args.big_requests, 2)
        rss_after = peak_rss_kib(pid)
        body_mb = args.image_mb * 10 * 4 / 3
        print(
            f"large bodies: {args.big_requests} x ~{body_mb:.0f} MB relayed, "
            f"peak RSS {rss_before / 1024:.1f} MiB -> {rss_after / 1024:.1f} MiB "
            f"(p50 {statistics.median(big_latencies) * 1000:.0f} ms)"
        )
    finally:
        gateway.stop()
        for process in [*mocks]:
            process.terminate()
            process.wait()
        if redis is not None:
            redis.stop()
        if collector is not None:
            print(f"spans received: {len(receiver.spans)}")
            await collector.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--store", choices=["memory", "redis"], default="memory")
    parser.add_argument("--stream-samples", type=int, default=50)
    parser.add_argument("--big-requests", type=int, default=4)
    parser.add_argument("--image-mb", type=int, default=3, help="raw MB per image before base64")
    parser.add_argument("--log-level", choices=["info", "warning"], default="info")
    parser.add_argument("--trace", action="store_true", help="trace every request (OTLP to a local receiver)")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
