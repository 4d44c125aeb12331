"""Benchmark: how `server.workers: 2` spreads connections and work over its worker processes.

Starts Redis, `gateway mock-upstream`, and two gateways on the same Redis: one with one process
(`workers: 1`) and one with `workers: 2`. Then, alternating between the two in the same run, drives
each with a keep-alive client holding K connections (each trial opens new ones) and prints, per
worker process: the client connections it holds (read from /proc), the requests it answered (its
own Prometheus multiprocess file), its CPU time per request (user + system, and each, from /proc)
and how often per request its event loop slept and was woken (its voluntary context switches).

    .venv/bin/python bench/workers_bench.py [--connections 2 4 16 64] [--trials 5] [--requests 2000]
        [--twins] [--checkout DIR]

The trap it looks for: workers sharing one accepting socket, where whichever process wakes first
takes most connections; with SO_REUSEPORT the kernel spreads connections over the workers' own
sockets by a hash of the client's address and port, so a few connections often share one worker.
Since issue 14 the supervisor accepts and deals connections to the workers in turn (handoff.py);
`--checkout DIR` runs another checkout's gateway (with its own .venv) for a before/after.

A worker of `workers: 2` driven over K connections holds K/2 of them and, where the client, the
upstream and Redis share the machine's cores, answers about half the requests a second that one
process over K does: an idler process batches less and sleeps more between requests (more wakeups,
each a few tens of microseconds of CPU on a virtual machine). So the summary also sets each
`workers: 2` figure beside the `workers: 1` one at the same connections per process, where both were
run (`--connections 1 2 4 8`). `--twins` also drives two
`workers: 1` gateways at once, K/2 connections each: two busy processes share the machine's cores
and caches whether or not they are workers, and a worker that costs what a twin costs does no more
per request than a process of its own would.
"""

from __future__ import annotations

import argparse
import asyncio
import operator
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import astuple, dataclass, field
from pathlib import Path

from prometheus_client.multiprocess import MultiProcessCollector

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gateway_bench import SMALL, TICKS, UNBOUND, load, start_mock, wait_http  # noqa: E402
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


@dataclass(frozen=True)
class Usage:
    """What a process has used so far: CPU seconds in user space and in the kernel, and how many
    times its main thread (the event loop) slept and was woken, or was preempted by another process
    wanting the CPU."""

    user: float = 0.0
    system: float = 0.0
    woken: int = 0
    preempted: int = 0

    @classmethod
    def of(cls, pid: int) -> Usage:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        return cls(
            int(stat[11]) / TICKS,
            int(stat[12]) / TICKS,
            int(status["voluntary_ctxt_switches"]),
            int(status["nonvoluntary_ctxt_switches"]),
        )

    def __add__(self, other: Usage) -> Usage:
        return Usage(*map(operator.add, astuple(self), astuple(other)))

    def __sub__(self, other: Usage) -> Usage:
        return Usage(*map(operator.sub, astuple(self), astuple(other)))

    @property
    def cpu(self) -> float:
        return self.user + self.system


@dataclass
class Trial:
    setup: str  # SINGLE, WORKERS or TWINS
    connections: int
    held: dict[int, int] = field(default_factory=dict)  # worker pid -> client connections
    answered: dict[int, float] = field(default_factory=dict)  # worker pid -> requests
    used: dict[int, Usage] = field(default_factory=dict)  # worker pid -> what it used
    supervisor_cpu: float = 0.0  # seconds: accepting and handing connections over (workers > 1)
    rps: float = 0.0

    def line(self) -> str:
        total = sum(self.answered.values())
        parts = [
            f"{self.held.get(pid, 0):>3} conns {self.answered[pid] / total:4.0%} of requests"
            f" {_per_request(self.used[pid], self.answered[pid])}"
            for pid in sorted(self.answered)
        ]
        overall = self.cpu * 1000 / total
        return (
            f"{self.setup:<13} conns={self.connections:<3} {self.rps:6.0f} req/s  CPU/req {overall:.3f} ms"
            f" (supervisor {self.supervisor_cpu * 1000:.0f} ms in all)  per process: {' | '.join(parts)}"
        )

    @property
    def cpu(self) -> float:
        """CPU seconds of every process of the gateway, the supervisor's included."""
        return sum(used.cpu for used in self.used.values()) + self.supervisor_cpu

    def workers_used(self) -> Usage:
        """What the serving processes used, added up (a supervisor's accepting left out)."""
        return sum(self.used.values(), Usage())


SINGLE, WORKERS, TWINS = "workers=1", "workers=2", "2 x workers=1"


def _per_request(used: Usage, requests: float) -> str:
    requests = max(requests, 1)
    return (
        f"{used.cpu * 1000 / requests:.3f} ms CPU/req (user {used.user * 1000 / requests:.3f},"
        f" sys {used.system * 1000 / requests:.3f}) {used.woken / requests:.2f} wakeups/req"
        f" {used.preempted / requests:.2f} preempted/req"
    )


async def trial(setup: str, gateways: list[GatewayProcess], connections: int, requests: int) -> Trial:
    """`requests` over `connections`, split evenly between `gateways`, driven at once."""
    result = Trial(setup, connections)
    share = len(gateways)
    each = requests // share  # requests driven at each gateway
    # each gateway's serving processes: its workers (its children, from /proc), or itself
    serving: dict[int, list[int]] = {}
    for gateway in gateways:
        assert gateway.process is not None
        serving[gateway.process.pid] = worker_pids(gateway.process.pid) or [gateway.process.pid]
    supervisors = [pid for pid, pids in serving.items() if pids != [pid]]
    pids = [pid for pids in serving.values() for pid in pids]
    workers = [pid for pid in pids if pid not in serving]  # a single process answers all `each`

    used_before = {pid: Usage.of(pid) for pid in pids}
    answered_before = {pid: requests_answered(pid) for pid in workers}  # from its metric file
    supervisor_before = {pid: Usage.of(pid).cpu for pid in supervisors}
    held: dict[int, int] = {}

    def drive(gateway: GatewayProcess) -> Awaitable[object]:
        assert gateway.process is not None
        pids = serving[gateway.process.pid]
        url = f"{gateway.url}/v1/images/generations"
        notice = lambda: held.update(connections_by_pid(pids, gateway.port))  # noqa: E731
        return load(url, AUTH, SMALL, each, connections // share, before_close=notice)

    started = time.perf_counter()
    await asyncio.gather(*map(drive, gateways))
    result.rps = each * share / (time.perf_counter() - started)
    result.supervisor_cpu = sum(Usage.of(pid).cpu - supervisor_before[pid] for pid in supervisors)
    for pid in pids:
        result.used[pid] = Usage.of(pid) - used_before[pid]
        result.answered[pid] = (
            requests_answered(pid) - answered_before[pid] if pid in answered_before else each
        )
        result.held[pid] = held.get(pid, 0)
    return result


async def bench(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="workers-bench-"))
    redis = RedisServer(workdir).start()
    mock_port = free_port()
    mock = start_mock(mock_port)
    store = {"backend": "redis", "url": redis.url}

    def gateway(workers: int) -> GatewayProcess:
        config = config_dict(
            f"http://127.0.0.1:{mock_port}/v1",
            store=store,
            limits=UNBOUND,
            server={"workers": workers, "log_level": args.log_level},
        )
        return GatewayProcess(
            config, workdir, checkout=Path(args.checkout).resolve() if args.checkout else None
        )

    # with --twins, another single process, driven at the same time as the first
    processes = [gateway(1), gateway(2), *([gateway(1)] if args.twins else [])]
    single, workers, *twin = processes
    setups = {SINGLE: [single], WORKERS: [workers]}
    if twin:
        setups[TWINS] = [single, *twin]
    try:
        await wait_http(f"http://127.0.0.1:{mock_port}/v1/models")
        for process in processes:
            await process.start()
        await asyncio.sleep(2)  # the second worker of `workers: 2` is up too
        for setup, gateways in setups.items():  # warm up every process
            await trial(setup, gateways, 16, 400)
        results: dict[tuple[str, int], list[Trial]] = {}
        for connections in args.connections:
            for _ in range(args.trials):
                for setup, gateways in setups.items():  # alternate A/B(/C)
                    if connections < len(gateways):
                        continue
                    done = await trial(setup, gateways, connections, args.requests)
                    results.setdefault((setup, connections), []).append(done)
                    print(done.line(), flush=True)
        summarise(results, args.requests)
    finally:
        for process in processes:
            if process.process is not None:  # started
                process.stop()
        mock.terminate()
        mock.wait()
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def summarise(results: dict[tuple[str, int], list[Trial]], requests: int) -> None:
    print("\nmedians over trials:")
    medians: dict[tuple[str, int], Usage] = {}
    for (setup, connections), trials in results.items():
        cpu = statistics.median(t.cpu * 1000 / requests for t in trials)
        columns = zip(*(astuple(t.workers_used()) for t in trials), strict=True)
        medians[setup, connections] = Usage(*map(statistics.median, columns))  # each column's own
        worst = statistics.median(max(t.answered.values()) / requests for t in trials)
        rps = statistics.median(t.rps for t in trials)
        one_took_all = sum(len([c for c in t.held.values() if c]) == 1 for t in trials)
        print(
            f"{setup:<13} conns={connections:<3} {rps:6.0f} req/s  CPU/req {cpu:.3f} ms"
            f"  busiest process's share of requests {worst:.0%}"
            f"  (trials where one process took every connection: {one_took_all if setup != SINGLE else '-'})"
            f"\n    serving processes only: {_per_request(medians[setup, connections], requests)}"
        )
    print("\nat the same connections per process (K for workers=1, 2K for the others):")
    for (setup, connections), alone in medians.items():
        others = [other for other in (WORKERS, TWINS) if (other, 2 * connections) in medians]
        if setup == SINGLE and others:
            print(f"  K={connections:<3} {SINGLE:<13}: {_per_request(alone, requests)}")
            for other in others:
                print(f"  {'':<5} {other:<13}: {_per_request(medians[other, 2 * connections], requests)}")


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
    parser.add_argument(
        "--twins",
        action="store_true",
        help="also drive two workers=1 gateways at once, K/2 connections each: what two busy"
        " processes cost each other on this machine, workers or not",
    )
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
