"""Benchmark: how `server.workers: 2` spreads connections and work over its worker processes.

Starts Redis, `gateway mock-upstream`, and two gateways on the same Redis: one with one process
(`workers: 1`) and one with `workers: 2`. Then, alternating between the two in the same run, drives
each with a keep-alive client holding K connections (each trial opens new ones) and prints, per
worker process: the client connections it holds (read from /proc), the requests it answered (its
own Prometheus multiprocess file), and its CPU time per request (user + system, from /proc).

    .venv/bin/python bench/workers_bench.py [--connections 2 4 16 64] [--trials 5] [--requests 2000]

The trap it looks for: workers sharing one accepting socket, where whichever process wakes first
takes most connections; with SO_REUSEPORT the kernel spreads connections over the workers' own
sockets by a hash of the client's address and port, so a few connections often share one worker.
Since issue 14 the supervisor accepts and deals connections to the workers in turn (handoff.py);
`--checkout DIR` runs another checkout's gateway (with its own .venv) for a before/after.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.multiprocess import MultiProcessCollector

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import SMALL, UNBOUND, cpu_seconds, load, start_mock, wait_http  # noqa: E402
from tests.support.config import TENANT_KEY, config_dict  # noqa: E402
from tests.support.processes import GatewayProcess, free_port  # noqa: E402
from tests.support.redis_servers import RedisServer  # noqa: E402
from tests.support.workers import connections_by_pid, worker_pids  # noqa: E402

AUTH = {"Authorization": f"Bearer {TENANT_KEY}"}


def requests_answered(pid: int) -> float:
    """gateway_requests_total as counted by worker `pid` alone (its multiprocess file)."""
    directory = Path(f"/proc/{pid}/environ").read_bytes().split(b"PROMETHEUS_MULTIPROC_DIR=")[1]
    path = Path(directory.split(b"\0")[0].decode()) / f"counter_{pid}.db"
    if not path.exists():
        return 0.0
    return sum(
        sample.value
        for metric in MultiProcessCollector.merge([str(path)])
        for sample in metric.samples
        if sample.name == "gateway_requests_total"
    )


@dataclass
class Trial:
    workers: int
    connections: int
    held: dict[int, int] = field(default_factory=dict)  # worker pid -> client connections
    answered: dict[int, float] = field(default_factory=dict)  # worker pid -> requests
    cpu: dict[int, float] = field(default_factory=dict)  # worker pid -> CPU seconds
    supervisor_cpu: float = 0.0  # seconds: accepting and handing connections over (workers > 1)
    rps: float = 0.0

    def line(self) -> str:
        total = sum(self.answered.values())
        parts = [
            f"{self.held.get(pid, 0):>3} conns {self.answered[pid] / total:4.0%} of requests"
            f" {self.cpu[pid] * 1000 / max(self.answered[pid], 1):.3f} ms CPU/req"
            for pid in sorted(self.answered)
        ]
        overall = (sum(self.cpu.values()) + self.supervisor_cpu) * 1000 / total
        return (
            f"workers={self.workers} conns={self.connections:<3} {self.rps:6.0f} req/s  CPU/req {overall:.3f} ms"
            f" (supervisor {self.supervisor_cpu * 1000:.0f} ms in all)  per worker: {' | '.join(parts)}"
        )


async def trial(gateway: GatewayProcess, workers: int, connections: int, requests: int) -> Trial:
    assert gateway.process is not None
    pids = worker_pids(gateway.process.pid) if workers > 1 else [gateway.process.pid]
    result = Trial(workers, connections)

    def counted(pid: int) -> float:
        return requests_answered(pid) if workers > 1 else 0.0

    before = {pid: (cpu_seconds(pid), counted(pid)) for pid in pids}
    supervisor = cpu_seconds(gateway.process.pid) if workers > 1 else 0.0
    held: dict[int, int] = {}
    url = f"{gateway.url}/v1/images/generations"
    _, elapsed = await load(
        url,
        AUTH,
        SMALL,
        requests,
        connections,
        before_close=lambda: held.update(connections_by_pid(pids, gateway.port)),
    )
    result.rps = requests / elapsed
    result.supervisor_cpu = cpu_seconds(gateway.process.pid) - supervisor if workers > 1 else 0.0
    for pid in pids:
        cpu, answered = before[pid]
        result.cpu[pid] = cpu_seconds(pid) - cpu
        result.answered[pid] = counted(pid) - answered if workers > 1 else requests
        result.held[pid] = held.get(pid, 0)
    return result


async def bench(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="workers-bench-"))
    redis = RedisServer(workdir).start()
    mock_port = free_port()
    mock = start_mock(mock_port)
    store = {"backend": "redis", "url": redis.url}
    gateways = {
        workers: GatewayProcess(
            config_dict(
                f"http://127.0.0.1:{mock_port}/v1",
                store=store,
                limits=UNBOUND,
                server={"workers": workers, "log_level": args.log_level},
            ),
            workdir,
            checkout=Path(args.checkout).resolve() if args.checkout else None,
        )
        for workers in (1, 2)
    }
    try:
        await wait_http(f"http://127.0.0.1:{mock_port}/v1/models")
        for gateway in gateways.values():
            await gateway.start()
        await asyncio.sleep(2)  # the second worker of `workers: 2` is up too
        for workers, gateway in gateways.items():  # warm up every worker
            await trial(gateway, workers, 16, 400)
        results: dict[tuple[int, int], list[Trial]] = {}
        for connections in args.connections:
            for _ in range(args.trials):
                for workers, gateway in gateways.items():  # alternate A/B
                    done = await trial(gateway, workers, connections, args.requests)
                    results.setdefault((workers, connections), []).append(done)
                    print(done.line(), flush=True)
        print("\nmedians over trials:")
        for (workers, connections), trials in results.items():
            cpu = statistics.median(
                (sum(t.cpu.values()) + t.supervisor_cpu) * 1000 / args.requests for t in trials
            )
            worst = statistics.median(max(t.answered.values()) / args.requests for t in trials)
            rps = statistics.median(t.rps for t in trials)
            print(
                f"workers={workers} conns={connections:<3} {rps:6.0f} req/s  CPU/req {cpu:.3f} ms"
                f"  busiest worker's share of requests {worst:.0%}"
                f"  (trials where one worker took every connection: "
                f"{sum(len([c for c in t.held.values() if c]) == 1 for t in trials) if workers > 1 else '-'})"
            )
    finally:
        for gateway in gateways.values():
            gateway.stop()
        mock.terminate()
        mock.wait()
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, nargs="+", default=[2, 4, 16, 64])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument(
        "--checkout", default=None, help="another checkout (with its .venv) whose gateway runs"
    )
    parser.add_argument("--log-level", choices=["info", "warning"], default="info")
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
