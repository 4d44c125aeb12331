"""Benchmark of the front door under hostile load (issue 12's figures), on this machine.

Starts `gateway mock-upstream` and `gateway serve` (memory store) as processes from a source tree
(this one, or another checkout with `--source`, to compare before and after), then measures, with a
probe sending one well-formed generation every 20 ms:

- the probe's latency alone, during 8 compressed "bombs" (500 KB of gzip inflating to 500 MiB each),
  and while 20,000 idle connections are open (with the gateway's resident memory then);
- the gateway's CPU time per request (user + system, from /proc) with deny patterns in the policy,
  the path that RE2 and prompt normalisation added to;
- with `--fuzz N`: N cases of tests/support/http_fuzz.py, their outcomes by kind and status.

    .venv/bin/python bench/front_door_bench.py [--source DIR] [--idle 20000] [--fuzz 20000]

The process raises its own file limit (and the gateway's, which inherits it) for the idle
connections; as root it raises the hard limit too.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import cpu_seconds, wait_http  # noqa: E402
from tests.support.config import TENANT_KEY, UPSTREAM_KEY, config_dict  # noqa: E402
from tests.support.http_fuzz import cases, gzip_bomb, run  # noqa: E402
from tests.support.processes import free_port  # noqa: E402

AUTH = {"Authorization": f"Bearer {TENANT_KEY}"}
PAYLOAD = {"model": "gpt-image-1.5", "prompt": "a quiet harbour at dawn, watercolour", "quality": "low"}
DENY = [r"\bnuclear\b", r"\bweapons?\b", "(a+)+$", r"credit\s*card", r"\bssn\b"]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def raise_file_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def summary(latencies: list[float]) -> str:
    if not latencies:
        return "no samples"
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return f"n={len(ordered)} p50 {statistics.median(ordered):.1f} ms  p99 {p99:.1f} ms  max {ordered[-1]:.1f} ms"


async def probe_while(url: str, work: Any) -> tuple[list[float], Any]:
    """Probe every 20 ms while `work` (an awaitable) runs; the probe's latencies and work's result."""
    latencies: list[float] = []
    task = asyncio.ensure_future(work)
    async with aiohttp.ClientSession() as session:
        while not task.done():
            started = time.perf_counter()
            async with session.post(f"{url}/v1/images/generations", json=PAYLOAD, headers=AUTH) as resp:
                await resp.read()
            latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.02)
    return latencies, await task


async def bombs(port: int, count: int, bomb: bytes) -> list[int]:
    async def one() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (
            f"POST /v1/images/generations HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {TENANT_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n\r\n"
        ).encode()
        writer.write(head + bomb)
        try:
            line = await asyncio.wait_for(reader.readline(), 120)
        finally:
            writer.close()
        return int(line.split()[1]) if line else 0

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def cpu_per_request(url: str, pid: int, requests: int, concurrency: int) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def load(n: int) -> None:
            queue = iter(range(n))

            async def worker() -> None:
                for _ in queue:
                    async with session.post(
                        f"{url}/v1/images/generations", json=PAYLOAD, headers=AUTH
                    ) as resp:
                        await resp.read()
                        assert resp.status == 200, resp.status

            await asyncio.gather(*(worker() for _ in range(concurrency)))

        await load(200)  # warm up
        before = cpu_seconds(pid)
        await load(requests)
        return (cpu_seconds(pid) - before) * 1000 / requests


_HOLDER = """
import asyncio, sys
async def main(port, count):
    writers = []
    for start in range(0, count, 500):
        batch = await asyncio.gather(
            *(asyncio.open_connection("127.0.0.1", port) for _ in range(min(500, count - start))),
            return_exceptions=True,
        )
        writers += [r[1] for r in batch if not isinstance(r, BaseException)]
    print(len(writers), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


async def hold_idle(
    port: int, count: int, per_process: int = 8000
) -> tuple[list[subprocess.Popen[str]], int]:
    """`count` idle connections, held by child processes (each process has its own file limit)."""
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(port), str(min(per_process, count - start))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for start in range(0, count, per_process)
    ]
    opened = 0
    for holder in holders:
        assert holder.stdout is not None
        opened += int(await asyncio.to_thread(holder.stdout.readline))
    return holders, opened


async def bench(args: argparse.Namespace) -> None:
    source = Path(args.source).resolve()
    current = (source / "gateway" / "front").is_dir()
    limit = raise_file_limit(2 * args.idle + 4096)
    print(f"source {source} ({'with' if current else 'without'} the front door), file limit {limit}")
    workdir = Path(tempfile.mkdtemp(prefix="front-door-bench-"))
    env = {**os.environ, "PYTHONPATH": str(source)}
    mock_port, port = free_port(), free_port()
    mock = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "mock-upstream",
            "--port",
            str(mock_port),
            "--api-key",
            UPSTREAM_KEY,
        ],
        cwd=source,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    limits = {"requests_per_minute": 10**8, "tokens_per_minute": 10**8, "concurrent_requests": 10**6}
    config = config_dict(
        f"http://127.0.0.1:{mock_port}/v1",
        policy={"default_model": "gpt-image-1.5", "deny_prompt_patterns": DENY},
        limits=limits,
    )
    server: dict[str, Any] = {"port": port, "log_level": "info"}
    if current:  # idle connections stay open for the measurement (default: closed after 10 s)
        server.update(ops_port=free_port(), header_timeout_seconds=600)  # max_connections: the default
    config["server"] = server
    config_path = workdir / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log = (workdir / "gateway.log").open("wb")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config_path)],
        cwd=source,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_http(f"http://127.0.0.1:{mock_port}/v1/models", within=30)
        await wait_http(f"{url}/healthz", within=30)
        pid = gateway.pid

        alone, _ = await probe_while(url, asyncio.sleep(3))
        print(f"probe alone:                  {summary(alone)}")

        bomb = gzip_bomb(args.bomb_mib)
        started = time.perf_counter()
        during, statuses = await probe_while(url, bombs(port, args.bombs, bomb))
        took = time.perf_counter() - started
        print(
            f"probe during {args.bombs} bombs:         {summary(during)}   "
            f"(bombs: {len(bomb) // 1024} KB -> {args.bomb_mib} MiB each, answered {sorted(statuses)} "
            f"in {took:.2f} s)"
        )

        rss_before = rss_mib(pid)
        started = time.perf_counter()
        holders, count = await hold_idle(port, args.idle)
        opened = time.perf_counter() - started
        await asyncio.sleep(1)
        rss_idle = rss_mib(pid)
        try:
            idle_probe, _ = await probe_while(url, asyncio.sleep(3))
            probed = summary(idle_probe)
        except aiohttp.ClientError as exc:
            probed = f"FAILED: {exc}"
        print(
            f"probe with {count} idle conns: {probed}   "
            f"(opened in {opened:.1f} s; gateway RSS {rss_before:.1f} -> {rss_idle:.1f} MiB)"
        )
        for holder in holders:
            holder.communicate("")
        await asyncio.sleep(2)

        cpu = await cpu_per_request(url, pid, args.requests, 16)
        print(f"gateway CPU per request ({len(DENY)} deny patterns): {cpu:.3f} ms")

        if args.fuzz and current:
            for mib in (1, 16, 64):
                gzip_bomb(mib)
            started = time.perf_counter()
            report = await run(url, port, cases(args.fuzz, seed=args.seed), concurrency=32, read_timeout=5)
            statuses_seen = collections.Counter(s for o in report.outcomes for s in o.statuses or [0])
            print(
                f"fuzz: {len(report.outcomes)} cases in {time.perf_counter() - started:.0f} s, by kind "
                f"{dict(sorted(report.by_kind().items()))}"
            )
            print(f"fuzz: statuses {dict(sorted(statuses_seen.items()))} (0: closed without an answer)")
            print(
                f"fuzz: 5xx {len(report.server_errors())}, responses quoting key or prompt "
                f"{sum(o.leaked for o in report.outcomes)}; probe {summary(report.probe_ms)}"
            )
    finally:
        gateway.terminate()
        gateway.wait(60)
        mock.terminate()
        mock.wait(10)
        log.close()
    lines = (workdir / "gateway.log").read_text(errors="replace").splitlines()
    bad = [line for line in lines if TENANT_KEY in line or "Traceback" in line or "zebra" in line]
    print(f"gateway log: {len(lines)} lines, {len(bad)} with a key, a prompt or a traceback")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", default=str(ROOT), help="the source tree whose gateway is measured")
    parser.add_argument("--idle", type=int, default=20000)
    parser.add_argument("--bombs", type=int, default=8)
    parser.add_argument("--bomb-mib", type=int, default=500)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--fuzz", type=int, default=0)
    parser.add_argument("--seed", type=int, default=12)
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
