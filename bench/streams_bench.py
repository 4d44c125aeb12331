"""Benchmark: many SSE streams held open through one gateway process (issue 14's figures).

Starts a Redis server, a slow upstream (a process of its own: every stream sends its first partial
image, then waits until it is told to finish with a completed event carrying usage; JSON answers
come at once; the probes below have one of their own, so its queue is not counted as the
gateway's), a `gateway serve` process with the Redis store, and client processes that keep
`--streams` streams open through the gateway (each reads its first event, then waits for the end,
and opens a new stream when one ends). The phases, each probed with new JSON requests (a new
connection each, every 20 ms), their latency p50/p99/max printed:

- opening: the N streams being opened (`--opening` at once per client process, 5,000 streams each);
- held: N streams open; also the gateway's RSS idle (RSS_0, warmed up) and with N open (RSS_N),
  the memory per open stream, (RSS_N - RSS_0) / N, and its CPU while only holding them;
- turnover: the upstream ends the oldest streams, `--turnover-rate` a second, and the clients open
  new ones in their place, for `--turnovers` times N streams; the gateway's CPU meanwhile and its RSS
  after each turnover;
- the end: the upstream finishes every stream; how many ended whole (completed event and usage
  received), and the gateway's own count of in-flight requests and streams (both back to 0).

For each phase, the gateway's garbage collections: how many full (generation 2) ones ran and the
longest pause of any generation, as bench/gc_watch/sitecustomize.py records them inside the gateway
(on any checkout); and what the gateway exports in `gateway_gc_pause_seconds`, where it does.

    .venv/bin/python bench/streams_bench.py [--streams 10000] [--turnovers 3] [--opening 200]
                                            [--checkout DIR]

`--checkout DIR` runs the gateway of another checkout (with its own .venv) to compare before
and after with the same clients and upstream. The process raises its file limit (as root, the hard
limit too), which the gateway and client processes inherit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.front_door_bench import PAYLOAD, raise_file_limit, rss_mib, summary  # noqa: E402
from bench.gateway_bench import UNBOUND, cpu_seconds  # noqa: E402
from gateway.process.server import run  # noqa: E402
from tests.support.config import TENANT_KEY, config_dict  # noqa: E402
from tests.support.held_upstreams import PARTIAL, USAGE  # noqa: E402
from tests.support.processes import GatewayProcess, free_port  # noqa: E402
from tests.support.redis_servers import RedisServer  # noqa: E402

AUTH = {"Authorization": f"Bearer {TENANT_KEY}"}
STREAM = {**PAYLOAD, "stream": True, "partial_images": 1}
PROBE = {**PAYLOAD, "model": "gpt-image-2"}  # routed to an upstream of its own (gateway_config)
COMPLETED = (
    b"event: image_generation.completed\n"
    b'data: {"type":"image_generation.completed","b64_json":"AA==","usage":'
    + json.dumps(USAGE).encode()
    + b"}\n\n"
)
PER_CLIENT_PROCESS = 5000  # streams one client process opens
GC_WATCH = Path(__file__).resolve().parent / "gc_watch"  # its sitecustomize.py, loaded by the gateway


# --- the slow upstream (its own process) --------------------------------------------------------


async def upstream_main(port: int, turnover_rate: int) -> None:
    """Streams: a partial image, then nothing until they are ended: after SIGUSR2, the oldest
    `turnover_rate` a second; at SIGUSR1, all of them (and any new one at once). Then the completed
    event and the end. JSON requests: answered at once."""
    from aiohttp import web

    # It holds every stream too: its own full collections (as long as the gateway's were) would
    # delay the probe's answers and count as the gateway's. A bench run leaves little garbage.
    gc.disable()

    waiting: collections.deque[asyncio.Event] = collections.deque()  # the open streams, oldest first
    ending_all = asyncio.Event()
    turning_over: list[asyncio.Task[None]] = []

    async def turn_over() -> None:
        while True:
            await asyncio.sleep(0.05)
            for _ in range(min(len(waiting), round(turnover_rate * 0.05))):
                waiting.popleft().set()

    def end_all() -> None:
        ending_all.set()
        while waiting:
            waiting.popleft().set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, end_all)
    loop.add_signal_handler(signal.SIGUSR2, lambda: turning_over.append(loop.create_task(turn_over())))

    async def generations(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"created": 1, "data": [{"b64_json": "AA=="}], "usage": USAGE})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(PARTIAL)
        if not ending_all.is_set():
            ended = asyncio.Event()
            waiting.append(ended)
            await ended.wait()
        await response.write(COMPLETED)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/images/generations", generations)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


# --- the clients (processes of their own) --------------------------------------------------------


async def clients_main(url: str, count: int, prompt_chars: int, at_once: int) -> None:
    """Keep `count` streams open, `at_once` being opened at a time: print `open K` as the first ones
    get their first event, open a new stream in place of each that ends until SIGUSR1, then print
    `done OK BAD [errors]`."""
    opened = ok = bad = 0
    errors: set[str] = set()
    replacing = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, replacing.set)
    payload = {**STREAM, "prompt": _prompt(prompt_chars)}
    gate = asyncio.Semaphore(at_once)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> bool:
            """One stream, to its end: whether it came whole."""
            nonlocal opened
            async with gate:
                resp = await session.post(f"{url}/v1/images/generations", json=payload, headers=AUTH)
                first = await resp.content.readuntil(b"\n\n") if resp.status == 200 else b""
            if opened < count:
                opened += 1
                if opened % 500 == 0 or opened == count:
                    print(f"open {opened}", flush=True)
            rest = await resp.read()
            return resp.status == 200 and first == PARTIAL and rest == COMPLETED

        async def keep_one_open() -> None:
            nonlocal ok, bad
            while True:
                try:
                    whole = await one()
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    whole = False
                    errors.add(type(exc).__name__)
                ok, bad = ok + whole, bad + (not whole)
                if replacing.is_set():
                    return

        await asyncio.gather(*(keep_one_open() for _ in range(count)))
    print(f"done {ok} {bad} {sorted(errors)}", flush=True)


# --- the bench ------------------------------------------------------------------------------------


async def probe(url: str, ops_url: str, seconds: float) -> list[float]:
    """A new JSON request every 20 ms for `seconds`, each on a new connection; latencies in ms."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            started = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/images/generations", json=PROBE, headers=AUTH) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"probe answered {resp.status}: {(await resp.text())[:200]}")
            except aiohttp.ClientError as exc:
                raise RuntimeError(f"probe failed: {exc!r}; gauges {await gauges(ops_url)}") from exc
            latencies.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(0.02)
    return latencies


async def warm_up(url: str) -> None:
    """Every code path the streams take, once per pooled connection, before RSS_0 is read."""
    async with aiohttp.ClientSession() as session:

        async def one(payload: dict[str, Any]) -> None:
            async with session.post(f"{url}/v1/images/generations", json=payload, headers=AUTH) as resp:
                await resp.read()

        await asyncio.gather(*(one(payload) for payload in [PAYLOAD, PROBE] * 100))


GAUGES = (
    "gateway_in_flight_requests",
    "gateway_open_streams",
    "gateway_connections_open",
    "gateway_connections_closed_total",
    "gateway_load_shed_total",
    "gateway_store_errors_total",
)


async def gauges(ops_url: str, names: tuple[str, ...] = GAUGES) -> dict[str, float]:
    """The gateway's series of these names, by label set (an error counter only when not 0)."""
    async with aiohttp.ClientSession() as session, session.get(f"{ops_url}/metrics") as resp:
        text = await resp.text()
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.split("{")[0] in names and (float(value) or "errors" not in name):
            found[name] = found.get(name, 0) + float(value)
    return found


class GcLog:
    """The gateway's garbage collections as bench/gc_watch records them: per phase, the full ones
    and the longest pause."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.since = time.time()

    def phase(self) -> str:
        """What was recorded since the last call."""
        until, since, self.since = time.time(), self.since, time.time()
        pauses = []  # (seconds, CPU seconds, generation)
        if self.path.exists():
            for entry in self.path.read_text().splitlines():
                at, generation, seconds, cpu = entry.split()
                if since <= float(at) < until:
                    pauses.append((float(seconds), float(cpu), int(generation)))
        full = sum(1 for *_, generation in pauses if generation == 2)
        wall, cpu, generation = max(pauses, default=(0.0, 0.0, 0))
        return f"GC: {full} full, longest pause {wall * 1000:.1f} ms ({cpu * 1000:.1f} ms CPU, generation {generation})"


def _prompt(chars: int) -> str:
    """A prompt of `chars` characters (the default payload's when 0)."""
    return str(PAYLOAD["prompt"]) if not chars else ("a lighthouse on a cliff at dusk, " * chars)[:chars]


def spawn(role: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, *args], stdout=subprocess.PIPE, text=True, env=env
    )


async def line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    return (await asyncio.to_thread(process.stdout.readline)).strip()


def gateway_config(
    upstream_url: str, probes_url: str, redis_url: str, streams: int, lease_ttl: int | None
) -> dict[str, Any]:
    """The streams go to the slow upstream; the probes (model gpt-image-2) to one of their own, so
    that their latency is the gateway's, not that of the slow upstream's queue."""
    store: dict[str, Any] = {"backend": "redis", "url": redis_url}
    if lease_ttl is not None:
        store["lease_ttl_seconds"] = lease_ttl
    config = config_dict(upstream_url, store=store, limits=UNBOUND)
    config["upstreams"]["probes"] = {**config["upstreams"]["openai"], "base_url": probes_url}
    config["routes"]["gpt-image-2"] = {"upstream": "probes"}
    for upstream in config["upstreams"].values():
        # room for every stream in the pool and in the one tenant's share of it
        upstream.update(max_connections=streams + 256, max_connections_per_tenant=streams + 256)
    config["server"] = {"log_level": "info"}
    return config


async def bench(args: argparse.Namespace) -> None:
    checkout = Path(args.checkout).resolve() if args.checkout else None
    limit = raise_file_limit(3 * args.streams + 4096)
    room = (limit - 64) // 2 - 100  # a client and an upstream descriptor a stream; probes, Redis
    if args.streams > room:
        print(f"the file limit {limit} holds at most {room} streams in one process: measuring {room}")
        args.streams = room
    workdir = Path(tempfile.mkdtemp(prefix="streams-bench-"))
    redis = RedisServer(workdir).start()
    upstream_port, probes_port = free_port(), free_port()
    upstream = spawn("upstream", "--port", str(upstream_port), "--turnover-rate", str(args.turnover_rate))
    probes_upstream = spawn("upstream", "--port", str(probes_port), "--turnover-rate", "0")
    assert await line(upstream) == "ready" and await line(probes_upstream) == "ready"
    config = gateway_config(
        *(f"http://127.0.0.1:{port}/v1" for port in (upstream_port, probes_port)),
        redis.url,
        args.streams,
        args.lease_ttl,
    )
    gc_log = GcLog(workdir / "gc.log")
    python_path = os.pathsep.join(filter(None, [str(GC_WATCH), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": python_path, "STREAMS_BENCH_GC_LOG": str(gc_log.path)}
    gateway = GatewayProcess(config, workdir, env, checkout=checkout)
    url, ops_url = gateway.url, gateway.ops_url
    clients: list[subprocess.Popen[str]] = []
    try:
        await gateway.start(timeout=30)
        assert gateway.process is not None
        pid = gateway.process.pid
        await warm_up(url)
        gc_log.phase()
        alone = await probe(url, ops_url, 3)
        rss_0 = rss_mib(pid)
        print(
            f"checkout {checkout or ROOT}, file limit {limit}, streams {args.streams}, prompt {len(_prompt(args.prompt_chars))} chars"
        )
        print(f"probe, nothing open:  {summary(alone)}   gateway RSS_0 {rss_0:.1f} MiB; {gc_log.phase()}")

        started = time.perf_counter()
        counts = [
            min(PER_CLIENT_PROCESS, args.streams - first)
            for first in range(0, args.streams, PER_CLIENT_PROCESS)
        ]
        clients += [
            spawn(
                "clients",
                *("--url", url, "--count", str(count), "--prompt-chars", str(args.prompt_chars)),
                *("--opening", str(args.opening)),
            )
            for count in counts
        ]
        opening = asyncio.ensure_future(asyncio.gather(*map(_until_open, clients, counts)))
        during_opening = []
        while not opening.done():
            during_opening += await probe(url, ops_url, 1)
        await opening
        took = time.perf_counter() - started
        print(
            f"probe, while opening: {summary(during_opening)}   (all open in {took:.1f} s); {gc_log.phase()}"
        )

        await asyncio.sleep(2)
        cpu_before, held_from = cpu_seconds(pid), time.perf_counter()
        await asyncio.sleep(10)
        held_cpu = (cpu_seconds(pid) - cpu_before) / (time.perf_counter() - held_from)
        rss_n = rss_mib(pid)
        held = await probe(url, ops_url, 10)
        print(f"probe, {args.streams} open: {summary(held)}; {gc_log.phase()}")
        print(
            f"gateway RSS_N {rss_n:.1f} MiB: {(rss_n - rss_0) * 1024 / args.streams:.2f} KiB per open stream;"
            f" CPU while only holding them {held_cpu * 100:.1f}% of a core; gauges {await gauges(ops_url)}"
        )

        if args.turnovers:
            upstream.send_signal(signal.SIGUSR2)  # the oldest streams end, the clients open new ones
            during_turnover, rss_after = [], []
            cpu_before, turnover_from = cpu_seconds(pid), time.perf_counter()
            for _ in range(args.turnovers):
                during_turnover += await probe(url, ops_url, args.streams / args.turnover_rate)
                rss_after.append(f"{rss_mib(pid):.1f}")
            turnover_cpu = (cpu_seconds(pid) - cpu_before) / (time.perf_counter() - turnover_from)
            print(
                f"probe, turnover ({args.turnover_rate} streams/s, {args.turnovers} x {args.streams}):"
                f" {summary(during_turnover)}; {gc_log.phase()}; gateway CPU {turnover_cpu * 100:.0f}% of a core"
            )
            print(f"gateway RSS after each turnover: {', '.join(rss_after)} MiB (RSS_N {rss_n:.1f})")

        for client in clients:
            client.send_signal(signal.SIGUSR1)  # no new streams from here
        upstream.send_signal(signal.SIGUSR1)
        finished = [await line(c) for c in clients]
        for _ in range(50):
            if not (now := await gauges(ops_url)).get("gateway_in_flight_requests"):
                break
            await asyncio.sleep(0.2)
        whole, bad = (sum(int(f.split()[i]) for f in finished) for i in (1, 2))
        print(f"streams ended whole: {whole}/{whole + bad} ({finished}); gauges after: {now}")
        exported = await gauges(ops_url, ("gateway_gc_pause_seconds_count", "gateway_gc_pause_seconds_sum"))
        print(f"gateway_gc_pause_seconds: {exported or 'not exported by this checkout'}")
        if bad:
            raise SystemExit("some streams did not end whole")
    finally:
        for client in clients:
            client.kill()
        gateway.stop(60)
        for process in (upstream, probes_upstream):
            process.terminate()
            process.wait(10)
        redis.stop()
    lines = gateway.log_lines()
    bad_lines = [entry for entry in lines if TENANT_KEY in entry or "Traceback" in entry]
    print(f"gateway log: {len(lines)} lines, {len(bad_lines)} with a key or a traceback")


async def _until_open(client: subprocess.Popen[str], count: int) -> None:
    while True:
        text = await line(client)
        if not text or text.startswith("done"):
            raise RuntimeError(f"a client process stopped before its streams were open: {text!r}")
        if int(text.split()[1]) >= count:
            return


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument(
        "--checkout", default=None, help="another checkout (with its .venv) whose gateway runs"
    )
    parser.add_argument(
        "--role", choices=["bench", "upstream", "clients"], default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument("--prompt-chars", type=int, default=0, help="each stream's prompt length (0: short)")
    parser.add_argument(
        "--opening", type=int, default=200, help="streams each client process has being opened at once"
    )
    parser.add_argument(
        "--lease-ttl",
        type=int,
        default=None,
        help="store.lease_ttl_seconds (15: the held streams' concurrency leases are renewed every 5 s)",
    )
    parser.add_argument(
        "--turnovers", type=int, default=3, help="how many times N streams end and are replaced (0: none)"
    )
    parser.add_argument(
        "--turnover-rate", type=int, default=200, help="streams ended (and opened) a second in turnover"
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "upstream":
        run(upstream_main(args.port, args.turnover_rate))  # on uvloop, as the gateway
    elif args.role == "clients":
        asyncio.run(clients_main(args.url, args.count, args.prompt_chars, args.opening))
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
