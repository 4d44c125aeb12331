"""Benchmark: the gateway's instructions per request, counted by valgrind (callgrind), not timed.

CPU time per request on a shared 2-core box moves by 30% from one run to the next (other processes,
frequency, caches); the number of instructions the gateway process executes for a request does not
(runs agree within 1%). So a change to the hot path can be judged here, A against B, even on a busy
machine; `bench/gateway_bench.py` and the peer bench then say what it is worth in milliseconds.

Starts the mock upstream and a Redis server, then `gateway serve` (Redis store, five limits, info
logging: one access-log line per request) under `valgrind --tool=callgrind` with instrumentation
off; after a warm-up it is switched on for N requests (JSON, or SSE with two partial images), and
the user-space instructions counted are divided by N. Kernel work (the system calls) is not counted.

    .venv/bin/python bench/instructions_bench.py [--requests 200] [--kind json sse]
        [--checkout DIR ...]   # another checkout (with its own .venv) to compare with this one
        [--image-bytes 65536] [--partial-interval-ms 20]   # the peer bench's images and pacing

Needs valgrind (Debian: apt-get install valgrind). A request takes ~50x longer under valgrind: keep N
in the hundreds.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import SMALL, UNBOUND, load, mock_and_redis  # noqa: E402
from tests.support.config import TENANT_KEY, config_dict  # noqa: E402
from tests.support.processes import GatewayProcess  # noqa: E402

KINDS = {
    "json": SMALL,
    "sse": {**SMALL, "stream": True, "partial_images": 2},
}


def callgrind_total(out_dir: Path) -> int:
    """The instructions counted in every dump callgrind wrote (one file per thread and dump)."""
    total = 0
    for path in out_dir.glob("callgrind.out*"):
        for line in path.read_text().splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    return total


async def count(checkout: Path, kind: str, requests: int, redis_url: str, mock_url: str) -> float:
    workdir = Path(tempfile.mkdtemp(prefix="instructions-bench-"))
    config = config_dict(mock_url, mock_url, store={"backend": "redis", "url": redis_url}, limits=UNBOUND)
    config["server"] = {"log_level": "info"}
    wrapper = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={workdir}/callgrind.out",
    ]
    gateway = GatewayProcess(config, workdir, checkout=checkout, wrapper=wrapper)
    try:
        await gateway.start(timeout=300)
        assert gateway.process is not None
        pid = str(gateway.process.pid)
        url, auth = f"{gateway.url}/v1/images/generations", {"Authorization": f"Bearer {TENANT_KEY}"}
        payload = KINDS[kind]
        await load(url, auth, payload, 50, 4)  # warm-up: imports, pools, caches
        subprocess.run(["callgrind_control", "--instr=on", pid], check=True, capture_output=True)
        await load(url, auth, payload, requests, 4)
        subprocess.run(["callgrind_control", "--instr=off", pid], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "--dump", pid], check=True, capture_output=True)
        gateway.stop(timeout=60)
        return callgrind_total(workdir) / requests
    finally:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.stop(timeout=60)
        shutil.rmtree(workdir, ignore_errors=True)


async def bench(args: argparse.Namespace) -> None:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    checkouts = [ROOT, *(Path(c).resolve() for c in args.checkout)]
    async with mock_and_redis("instructions-bench", args.image_bytes, args.partial_interval_ms) as (
        mock_url,
        redis_url,
    ):
        for rep in range(1, args.reps + 1):
            for kind in args.kind:
                for checkout in checkouts:
                    per_request = await count(checkout, kind, args.requests, redis_url, mock_url)
                    print(
                        f"rep {rep}  {kind:<4}  {per_request / 1e6:6.3f} M instructions/request  {checkout}"
                    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--kind", nargs="+", choices=sorted(KINDS), default=["json", "sse"])
    parser.add_argument("--checkout", action="append", default=[], help="another checkout to count too")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--image-bytes", type=int, default=None, help="the mock's base64 image size")
    parser.add_argument(
        "--partial-interval-ms", type=float, default=0.0, help="the mock's pause between events"
    )
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
