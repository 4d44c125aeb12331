"""A burst from outside: real `gateway serve` processes on one Redis, an upstream that holds every
request it gets until told to answer, and thousands of requests sent at once from this process
over connections opened first.

Holding the admitted requests makes admission exact to check: a concurrency limit of N must let
exactly N through, whatever the burst's size and however long its decisions take.

Used by the burst tests (tests/e2e/test_burst.py) and by `bench/burst_bench.py`, which prints the
figures the tests only bound.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.config import TENANT_KEY, config_dict
from tests.support.held_upstreams import HeldUpstream
from tests.support.processes import GatewayProcess

LOW = {"model": "gpt-image-1.5", "prompt": "a lighthouse at dusk", "size": "1024x1024", "quality": "low"}


@dataclass
class BurstResult:
    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    # Seconds from the burst's start to each answer that was not an admission (its decision).
    decided: list[float] = field(default_factory=list)
    took: float = 0.0  # until every request was decided

    @property
    def admitted(self) -> int:
        return self.statuses[200]

    def p99_decision(self) -> float:
        ordered = sorted(self.decided)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0


def gateway_config(upstream_url: str, redis_url: str, limits: dict[str, Any], **store: Any) -> dict[str, Any]:
    return config_dict(
        upstream_url,
        store={"backend": "redis", "url": redis_url, **store},
        limits=limits,
        server={"log_level": "warning"},
    )


async def start_gateways(config: dict[str, Any], directory: Path, count: int) -> list[GatewayProcess]:
    gateways = [GatewayProcess(config, directory) for _ in range(count)]
    await asyncio.gather(*(gateway.start() for gateway in gateways))
    return gateways


async def burst(urls: list[str], size: int, upstream: HeldUpstream) -> BurstResult:
    """`size` requests at once, spread over `urls`, on connections opened before the burst; the
    upstream is released once every request is decided (answered, or held there)."""
    result = BurstResult()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def warm(i: int) -> None:
            async with session.get(f"{urls[i % len(urls)]}/healthz") as resp:
                await resp.read()

        await asyncio.gather(*(warm(i) for i in range(size)))
        started = time.perf_counter()

        async def one(i: int) -> None:
            url = f"{urls[i % len(urls)]}/v1/images/generations"
            headers = {"Authorization": f"Bearer {TENANT_KEY}"}
            async with session.post(url, json=LOW, headers=headers) as resp:
                if resp.status != 200:
                    result.decided.append(time.perf_counter() - started)
                body = await resp.json(content_type=None)
                result.statuses[resp.status] += 1
                if resp.status != 200:
                    result.codes[str(body["error"]["code"])] += 1

        requests = asyncio.gather(*(one(i) for i in range(size)))
        while len(result.decided) + upstream.holding < size and not requests.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        result.took = time.perf_counter() - started
        upstream.release()
        await requests
    return result
