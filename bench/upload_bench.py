"""Benchmark: edits through the gateway against calling the mock upstream directly, on this machine.

Starts `gateway mock-upstream` and `gateway serve` as separate processes and reports:
- the gateway's peak RSS growth (VmHWM) for one edit uploading `--upload-mb` MB in three images
  (the upload is spooled and streamed: the figure should not grow with the upload);
- the peak RSS growth for the same upload at a third and two thirds of the size (flat in size?);
- the gateway's CPU time per edit (from /proc, user + system) for `--requests` edits of a 1 MB
  image, the mock's own CPU per edit called directly (for scale), and the client's p50 latency,
  direct and through the gateway.

    .venv/bin/python bench/upload_bench.py [--upload-mb 40] [--requests 200] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import cpu_seconds, percentile, start_mock, wait_http  # noqa: E402
from gateway.mock_upstream.images import ImageSpec, render_b64  # noqa: E402
from tests.support.config import TENANT_KEY, UPSTREAM_KEY, config_dict  # noqa: E402
from tests.support.processes import GatewayProcess, free_port, peak_rss_kib  # noqa: E402


def png(size: int, variant: int = 0) -> bytes:
    """A real 1024x1024 png padded to about `size` bytes (a chunk decoders skip)."""
    return base64.b64decode(render_b64(ImageSpec(1024, 1024, "png", False, variant, size * 4 // 3)))


def form(images: list[bytes]) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("model", "gpt-image-1.5")
    data.add_field("prompt", "the same scene at night")
    data.add_field("quality", "low")
    data.add_field("size", "1024x1024")
    for index, image in enumerate(images):
        data.add_field("image[]", image, filename=f"in{index}.png", content_type="image/png")
    return data


async def edit(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], images: list[bytes]
) -> float:
    started = time.perf_counter()
    async with session.post(url, data=form(images), headers=headers) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {(await resp.text())[:200]}")
    return time.perf_counter() - started


async def load(
    url: str, headers: dict[str, str], images: list[bytes], requests: int, concurrency: int
) -> list[float]:
    latencies: list[float] = []
    queue = iter(range(requests))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            for _ in queue:
                latencies.append(await edit(session, url, headers, images))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def rss_growth(gateway: GatewayProcess, headers: dict[str, str], total: int) -> tuple[float, float]:
    """The gateway's peak RSS (MiB) before one edit of three images adding up to `total` bytes, and
    how much that edit grew it."""
    assert gateway.process is not None
    images = [png(total // 3, variant) for variant in range(3)]
    async with aiohttp.ClientSession() as session:
        baseline = peak_rss_kib(gateway.process.pid)
        await edit(session, f"{gateway.url}/v1/images/edits", headers, images)
    return baseline / 1024, (peak_rss_kib(gateway.process.pid) - baseline) / 1024


async def bench(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="upload-bench-"))
    mock_port = free_port()
    mock = start_mock(mock_port)
    limits = {"requests_per_minute": 10**8, "tokens_per_minute": 10**8, "concurrent_requests": 10**6}
    config = config_dict(f"http://127.0.0.1:{mock_port}/v1", store={"backend": "memory"}, limits=limits)
    config["server"] = {"log_level": "info"}
    gateway = GatewayProcess(config, workdir)
    tenant = {"Authorization": f"Bearer {TENANT_KEY}"}
    upstream = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
    try:
        await wait_http(f"http://127.0.0.1:{mock_port}/v1/models")
        await gateway.start()
        assert gateway.process is not None
        pid = gateway.process.pid
        one_mb = [png(2**20)]
        gateway_url, direct_url = (
            f"{gateway.url}/v1/images/edits",
            f"http://127.0.0.1:{mock_port}/v1/images/edits",
        )
        await load(gateway_url, tenant, one_mb, 20, args.concurrency)  # warm up: every path touched once
        await load(direct_url, upstream, one_mb, 20, args.concurrency)

        total = args.upload_mb * 1_000_000
        for fraction in (3, 2, 1):  # a third, two thirds, all of it: does the growth follow the size?
            size = total * (4 - fraction) // 3
            peak, growth = await rss_growth(gateway, tenant, size)
            print(
                f"upload {size / 1e6:5.1f} MB in 3 images: gateway peak RSS {peak:5.1f} MiB before,"
                f" grew by {growth:5.1f} MiB"
            )

        mock_before = cpu_seconds(mock.pid)
        direct = await load(direct_url, upstream, one_mb, args.requests, args.concurrency)
        mock_ms = (cpu_seconds(mock.pid) - mock_before) * 1000 / args.requests
        cpu_before = cpu_seconds(pid)
        through = await load(gateway_url, tenant, one_mb, args.requests, args.concurrency)
        cpu_ms = (cpu_seconds(pid) - cpu_before) * 1000 / args.requests
        print(f"1 MB edits x{args.requests}, concurrency {args.concurrency}:")
        print(
            f"  direct   p50 {percentile(direct, 0.5) * 1000:7.2f} ms   mean {statistics.mean(direct) * 1000:7.2f} ms"
        )
        print(
            f"  gateway  p50 {percentile(through, 0.5) * 1000:7.2f} ms   mean {statistics.mean(through) * 1000:7.2f} ms"
        )
        print(f"  gateway CPU per edit: {cpu_ms:.2f} ms (user + system)")
        print(f"  mock upstream CPU per edit, called directly: {mock_ms:.2f} ms (for scale)")
    finally:
        gateway.stop()
        mock.terminate()
        mock.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--upload-mb", type=int, default=40)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
