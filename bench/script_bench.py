"""Benchmark: what reserve.lua and settle.lua cost Redis itself, per call, at the peer bench's plan.

    .venv/bin/python bench/script_bench.py [-n 2000] [--reps 3] [--checkout DIR ...] [--instructions]

Every request runs both scripts on the one Redis that serves every gateway process of an
organisation: reserve on the request's critical path (a burst's reserves queue behind each other
there), settle after the answer. This bench starts a throw-away redis-server and, for each checkout
in turn (this one, then each --checkout, alternating for --reps rounds), a child process with that
checkout's own `gateway` package and Python serves N requests through its `LimitStore`, sixteen at
once (reserve the wave, then settle it), for the peer bench's tenant (eight limits: seven tenant
limits and an end user's requests per minute, none binding; the settle moves the token and USD
counters by the estimate's error). Warm-up requests come first.

Reported per script and checkout:
* `µs/call`: the server's time per call, median and mean over every call (SLOWLOG, each call timed
  by Redis itself; it is wall time, so a busy machine adds noise: compare checkouts in the same run).
* with --instructions, Redis runs under valgrind (callgrind) and the instructions it executes to
  read, run and answer each call are counted instead (processInputBuffer, which is all of a
  command's work but the socket write): the same from run to run within ~0.1%, busy machine or not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PLAN_LIMITS = {
    "requests_per_minute": 10**8,
    "images_per_minute": 10**8,
    "tokens_per_minute": 10**8,
    "tokens_per_day": 10**15,
    "usd_per_day": 8 * 10**6,
    "usd_per_month": 8 * 10**6,
    "concurrent_requests": 10**6,
}
WAVE = 16  # requests at once, as the peer bench's SSE load


# --- the child: one checkout's store serving N requests ---------------------------------------------


async def serve(url: str, n: int, warmup: int, callgrind_pid: int | None) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry

    from gateway.config import KeySettings, Limits, StoreSettings, TenantSettings
    from gateway.limits import LimitPlan, create_store
    from gateway.limits.scripts import RESERVE, SETTLE
    from gateway.telemetry.metrics import Metrics
    from policies.cost import Cost

    tenant = TenantSettings(
        policy="p",
        keys=[KeySettings(hash="sha256:" + "b" * 64)],
        limits=Limits(**PLAN_LIMITS),
        user_limits=Limits(requests_per_minute=10**8),
    )
    estimate = Cost(images=1, text_in_tokens=40, image_out_tokens=4160, nano_usd=167_000_000)
    actual = Cost(images=1, text_in_tokens=38, image_out_tokens=4160, nano_usd=166_900_000)
    store: Any = create_store(
        StoreSettings(backend="redis", url=url, timeout_ms=60_000), Metrics(CollectorRegistry())
    )
    await store.start()
    plan = LimitPlan.build("bench", tenant, tenant.keys[0], 0, "user")

    def dump(label: str) -> None:
        if callgrind_pid is not None:
            subprocess.run(
                ["callgrind_control", f"--dump={label}", str(callgrind_pid)], check=True, capture_output=True
            )

    async def reserve(i: int) -> Any:
        admission = await store.reserve(plan, estimate, request_id=f"s{os.getpid()}-{i}", model="gpt-image-1")
        assert admission.allowed and admission.reservation is not None
        return admission.reservation

    async def settle(reservation: Any) -> None:
        assert await store.settle(reservation, actual, outcome="ok")

    for first in range(-warmup, n, WAVE):
        if first == 0:
            dump("warmup")
        reservations = await asyncio.gather(*(reserve(i) for i in range(first, first + WAVE)))
        if first >= 0:
            dump("reserve")
        await asyncio.gather(*(settle(r) for r in reservations))
        if first >= 0:
            dump("settle")
    await store.close()
    return {"reserve": RESERVE.sha, "settle": SETTLE.sha, "calls": (n + WAVE - 1) // WAVE * WAVE}


def child(args: argparse.Namespace) -> None:
    from gateway.process.server import run  # uvloop, as the gateway runs

    result = run(serve(args.url, args.n, args.warmup, args.callgrind_pid))
    print(json.dumps(result))


# --- the parent: one Redis, the checkouts in turn ---------------------------------------------------


def run_child(checkout: Path, url: str, n: int, warmup: int, callgrind_pid: int | None) -> dict[str, Any]:
    command = [
        str(checkout / ".venv" / "bin" / "python"),
        str(Path(__file__).resolve()),
        "--child",
        "--url",
        url,
        "-n",
        str(n),
        "--warmup",
        str(warmup),
    ]
    if callgrind_pid is not None:
        command += ["--callgrind-pid", str(callgrind_pid)]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run(command, cwd=checkout, env=env, check=True, capture_output=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def redis(port: int, *args: str) -> str:
    done = subprocess.run(["redis-cli", "-p", str(port), *args], check=True, capture_output=True, text=True)
    return done.stdout


def slowlog_durations(port: int) -> dict[str, list[int]]:
    """µs of every EVALSHA in the slow log (all of them: it logs every call here), by SHA."""
    import redis as redis_py

    client = redis_py.Redis(port=port)
    try:
        entries = client.slowlog_get(1_000_000)
        client.slowlog_reset()
    finally:
        client.close()
    by_sha: dict[str, list[int]] = {}
    for entry in reversed(entries):  # oldest first
        command = entry["command"].split()
        if command and command[0].upper() == b"EVALSHA":
            by_sha.setdefault(command[1].decode(), []).append(int(entry["duration"]))
    return by_sha


def callgrind_dumps(directory: Path, seen: set[Path]) -> dict[str, int]:
    """Instructions per dump label, over the dumps not read before."""
    totals: dict[str, int] = {}
    for path in sorted(directory.glob("callgrind.out.*")):
        if path in seen:
            continue
        seen.add(path)
        label, total = "", 0
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("desc: Trigger: dump "):
                label = line.removeprefix("desc: Trigger: dump ").strip()
            elif line.startswith("totals:"):
                total = int(line.split()[1])
        totals[label] = totals.get(label, 0) + total
    return totals


def start_redis(directory: Path, port: int, instructions: bool) -> subprocess.Popen[bytes]:
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if not instructions:  # every call in the slow log, with its duration
        argv += ["--slowlog-log-slower-than", "0", "--slowlog-max-len", "1000000"]
    else:
        argv = [
            "valgrind",
            "--tool=callgrind",
            "--toggle-collect=processInputBuffer",
            f"--callgrind-out-file={directory}/callgrind.out",
            *argv,
        ]
    process = subprocess.Popen(argv, cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            if "PONG" in redis(port, "ping"):
                return process
        except subprocess.CalledProcessError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("redis-server did not start")


def parent(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.support.redis_servers import free_port

    checkouts = [ROOT, *(Path(c).resolve() for c in args.checkout)]
    directory = Path(tempfile.mkdtemp(prefix="script-bench-"))
    port = free_port()
    server = start_redis(directory, port, args.instructions)
    url = f"redis://127.0.0.1:{port}/0"
    pid = server.pid if args.instructions else None
    results: dict[Path, dict[str, list[float]]] = {c: {} for c in checkouts}
    seen: set[Path] = set()
    try:
        for rep in range(args.reps):
            for checkout in checkouts:
                slowlog_durations(port)  # forget what came before
                shas = run_child(checkout, url, args.n, args.warmup, pid)
                row = results[checkout]
                if args.instructions:
                    time.sleep(1)  # the last dump is written
                    counted = callgrind_dumps(directory, seen)
                    for script in ("reserve", "settle"):
                        per_call = counted.get(script, 0) / shas["calls"]
                        row.setdefault(f"{script} k instructions/call", []).append(per_call / 1e3)
                else:
                    durations = slowlog_durations(port)
                    for script in ("reserve", "settle"):
                        measured = durations.get(shas[script], [])[args.warmup :]
                        row.setdefault(f"{script} µs/call median", []).append(statistics.median(measured))
                        row.setdefault(f"{script} µs/call mean", []).append(statistics.fmean(measured))
                line = "  ".join(f"{name} {values[-1]:8.1f}" for name, values in row.items())
                print(f"rep {rep}  {line}  {checkout}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(directory, ignore_errors=True)
    print("\nmedians over the reps")
    for checkout, row in results.items():
        line = "  ".join(f"{name} {statistics.median(values):8.1f}" for name, values in row.items())
        print(f"  {line}  {checkout}")


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=2000, help="requests per checkout and rep")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--checkout", action="append", default=[], help="another checkout (with its .venv)")
    parser.add_argument("--instructions", action="store_true", help="count Redis's instructions (valgrind)")
    parser.add_argument("--warmup", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--callgrind-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
    else:
        if args.instructions and args.n == 2000:
            args.n = 256  # ~50 times slower under valgrind
        parent(args)


if __name__ == "__main__":
    cli()
