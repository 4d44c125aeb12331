"""Benchmark: the gateway's CPU per request with tracing off and on, same run, alternating.

Starts one mock upstream, a local OTLP/HTTP receiver (a real HTTP server decoding each export,
tests/support/otlp_receiver.py) and `gateway serve` processes on the same configuration but for
its `telemetry:` section: `off` without an endpoint (tracing off), `on` exporting every span to the
receiver (`sampler: always_on`, the sampler at 1.0), `on-10%` sampling one request in ten
(`parentbased_traceidratio`, 0.1), and with `--baseline DIR` the gateway of another checkout
(`main`: before tracing existed). Each round drives them in turn (the order rotating) with the same
load, waits for the batch processors to have exported, and reads each gateway's CPU time (/proc,
user + system) over its own load; the report gives every round and the medians.

    .venv/bin/python bench/tracing_bench.py [--requests 2000] [--concurrency 16] [--rounds 5] \
        [--baseline ../main]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import SMALL, cpu_seconds, load, percentile, start_mock, wait_http  # noqa: E402
from tests.support.config import TENANT_KEY, config_dict  # noqa: E402
from tests.support.otlp_receiver import OtlpReceiver, serve  # noqa: E402
from tests.support.processes import GatewayProcess, free_port  # noqa: E402

LIMITS = {"requests_per_minute": 10**8, "tokens_per_minute": 10**8, "concurrent_requests": 10**6}
EXPORT_DELAY_MS = 5000  # OpenTelemetry's default schedule delay (OTEL_BSP_SCHEDULE_DELAY)


async def measure(gateway: GatewayProcess, requests: int, concurrency: int) -> tuple[float, float]:
    """CPU milliseconds per request and p50 latency (ms) of one load on `gateway`."""
    assert gateway.process is not None
    url = f"{gateway.url}/v1/images/generations"
    before = cpu_seconds(gateway.process.pid)
    latencies, _ = await load(url, {"Authorization": f"Bearer {TENANT_KEY}"}, SMALL, requests, concurrency)
    await asyncio.sleep(EXPORT_DELAY_MS / 1000 + 1)  # the last spans exported, within the reading
    cpu_ms = (cpu_seconds(gateway.process.pid) - before) * 1000 / requests
    return cpu_ms, percentile(latencies, 0.5) * 1000


async def bench(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="tracing-bench-"))
    receiver = OtlpReceiver()
    runner, endpoint = await serve(receiver)
    mock_port = free_port()
    mock = start_mock(mock_port)
    base = config_dict(f"http://127.0.0.1:{mock_port}/v1", limits=LIMITS)
    base["server"] = {"log_level": args.log_level}
    tracing = {"endpoint": endpoint, "schedule_delay_ms": EXPORT_DELAY_MS}
    here = {"PYTHONPATH": str(ROOT)}
    gateways = {
        "off": GatewayProcess(base, workdir, here),
        "on": GatewayProcess({**base, "telemetry": {**tracing, "sampler": "always_on"}}, workdir, here),
        "on-10%": GatewayProcess(
            {**base, "telemetry": {**tracing, "sampler": "parentbased_traceidratio", "sampler_arg": 0.1}},
            workdir,
            here,
        ),
    }
    if args.baseline:
        gateways["main"] = GatewayProcess(base, workdir, {"PYTHONPATH": str(Path(args.baseline).resolve())})
    gateways = {name: gateway for name, gateway in gateways.items() if name in args.only or name == "off"}
    os.chdir(workdir)  # `python -m gateway` imports from PYTHONPATH, not from the current directory
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in gateways}
    try:
        await wait_http(f"http://127.0.0.1:{mock_port}/v1/models")
        for gateway in gateways.values():
            await gateway.start()
            await measure(gateway, 300, args.concurrency)  # warm up
        print(f"requests={args.requests} concurrency={args.concurrency} rounds={args.rounds}")
        for round_ in range(args.rounds):
            names = list(gateways)
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            for name in order:
                cpu_ms, p50 = await measure(gateways[name], args.requests, args.concurrency)
                results[name].append((cpu_ms, p50))
                print(f"round {round_ + 1} {name:<7} CPU {cpu_ms:.3f} ms/request   p50 {p50:.2f} ms")
        off = statistics.median(c for c, _ in results["off"])
        for name, rows in results.items():
            cpu = statistics.median(c for c, _ in rows)
            # Paired within each round (the machine's load drifts between rounds): the median of
            # this variant's CPU less `off`'s of the same round.
            paired = statistics.median(c - o for (c, _), (o, _) in zip(rows, results["off"], strict=True))
            print(
                f"median {name:<7} CPU {cpu:.3f} ms/request, against off in the same round"
                f" {paired:+.3f} ms ({paired / off * 100:+.1f}%)   p50 {statistics.median(p for _, p in rows):.2f} ms"
            )
        servers = [s for s in receiver.spans if s.kind == "SERVER"]
        print(f"spans received: {len(receiver.spans)} ({len(servers)} requests)")
    finally:
        for gateway in gateways.values():
            if gateway.process is not None:
                gateway.stop()
        mock.terminate()
        mock.wait()
        await runner.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--log-level", choices=["info", "warning"], default="info")
    parser.add_argument("--baseline", help="another checkout (e.g. ../main) whose gateway runs as `main`")
    parser.add_argument(
        "--only", type=lambda text: text.split(","), default=["on", "on-10%", "main"], help="e.g. main,on"
    )
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
