"""Benchmark: what several targets per route cost, and what a failover adds.

Starts `gateway mock-upstream` and `gateway serve` as separate processes, then drives three routes
to the same mock with the same load, one after the other, and reports for each the gateway's CPU
time per request (user + system, from /proc) and p50/p99 latency:

- `one-target`: a route with one upstream (the baseline);
- `two-targets`: a route with two healthy targets (the failover machinery, never failing over);
- `refused-first`: the first target refuses connections on every request (never ejected here,
  so each request pays the refused attempt), the second serves: a failover's added latency.

With `--provider-limits` both upstreams carry a provider quota, so every attempt also reserves and
settles against it in the store.

    .venv/bin/python bench/failover_bench.py [--requests 2000] [--concurrency 16] [--store memory|redis]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import SMALL, cpu_seconds, load, report, start_mock, wait_http  # noqa: E402
from tests.support.config import TENANT_KEY, UPSTREAM_KEY, config_dict  # noqa: E402
from tests.support.processes import GatewayProcess, free_port  # noqa: E402
from tests.support.redis_servers import RedisServer  # noqa: E402

NEVER_BINDING = {"requests_per_minute": 10**8, "tokens_per_minute": 10**8, "images_per_minute": 10**8}


def routes() -> dict[str, Any]:
    one = {"upstream": "openai", "model": "gpt-image-1.5"}
    return {
        "gpt-image-1.5": {"upstream": "openai"},
        "one-target": {**one, "catalog": "gpt-image-1.5"},
        "two-targets": {
            "targets": [one, {"upstream": "second", "model": "gpt-image-1.5"}],
            "catalog": "gpt-image-1.5",
        },
        "refused-first": {
            "targets": [{"upstream": "dead", "model": "gpt-image-1.5"}, one],
            "catalog": "gpt-image-1.5",
        },
    }


async def bench(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="failover-bench-"))
    mock_port = free_port()
    mock = start_mock(mock_port)
    redis: RedisServer | None = None
    store: dict[str, object] = {"backend": "memory"}
    if args.store == "redis":
        redis = RedisServer(workdir).start()
        store = {"backend": "redis", "url": redis.url}
    url = f"http://127.0.0.1:{mock_port}/v1"
    extra = {"limits": NEVER_BINDING} if args.provider_limits else {}
    upstreams = {
        "openai": {"base_url": url, "api_key": UPSTREAM_KEY, "flavor": "openai", **extra},
        "second": {"base_url": url, "api_key": UPSTREAM_KEY, "flavor": "openai", **extra},
        # nothing listens there; never ejected, so every request pays the refused attempt
        "dead": {
            "base_url": f"http://127.0.0.1:{free_port()}/v1",
            "flavor": "openai",
            "eject_after_failures": 10**9,
        },
        "digitalocean": {"base_url": url, "api_key": UPSTREAM_KEY},
    }
    config = config_dict(url, store=store, upstreams=upstreams, routes=routes(), server={"log_level": "info"})
    gateway = GatewayProcess(config, workdir)
    try:
        await wait_http(f"{url}/models")
        await gateway.start()
        assert gateway.process is not None
        pid = gateway.process.pid
        gateway_url = f"{gateway.url}/v1/images/generations"
        auth = {"Authorization": f"Bearer {TENANT_KEY}"}
        print(
            f"store={args.store} provider_limits={args.provider_limits} "
            f"requests={args.requests} concurrency={args.concurrency}"
        )
        for route in ("one-target", "two-targets", "refused-first"):
            payload = {**SMALL, "model": route}
            await load(gateway_url, auth, payload, 200, args.concurrency)  # warm up
        results = {}
        for turn in range(args.rounds):
            order = ("one-target", "two-targets", "refused-first")
            for route in order if turn % 2 == 0 else order[::-1]:
                payload = {**SMALL, "model": route}
                before = cpu_seconds(pid)
                stats = report(
                    route, *await load(gateway_url, auth, payload, args.requests, args.concurrency)
                )
                cpu_ms = (cpu_seconds(pid) - before) * 1000 / args.requests
                print(f"{'':<10} gateway CPU per request {cpu_ms:.3f} ms")
                results.setdefault(route, []).append((cpu_ms, stats["p50_ms"], stats["p99_ms"]))
        base = results["one-target"]
        for route in ("two-targets", "refused-first"):
            cpu = min(r[0] for r in results[route]) - min(r[0] for r in base)
            p50 = min(r[1] for r in results[route]) - min(r[1] for r in base)
            print(
                f"{route} vs one-target (best of {args.rounds}): CPU {cpu:+.3f} ms/request, p50 {p50:+.2f} ms"
            )
    finally:
        gateway.stop()
        for process in [mock]:
            process.terminate()
            process.wait()
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--store", choices=["memory", "redis"], default="memory")
    parser.add_argument("--provider-limits", action="store_true")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
