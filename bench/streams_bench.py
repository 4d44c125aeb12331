"""Benchmark: many SSE streams held open through one gateway process (issue 14's figures).

Starts a Redis server, a slow upstream (a process of its own: every stream sends its first partial
image, then waits until told to finish with a completed event carrying usage; JSON answers come at
once), a `gateway serve` process with the Redis store, and client processes that open `--streams`
streams through the gateway (each reads its first event, then waits for the end). Prints:

- the gateway's resident memory before (RSS_0, warmed up) and with N streams open (RSS_N), and
  the memory per open stream, (RSS_N - RSS_0) / N;
- the latency of new JSON requests (a new connection each, every 20 ms) while they are open;
- the gateway's CPU while the streams are only held (lease renewals, timers);
- after the upstream finishes them: how many streams ended whole (completed event and usage
  received), and the gateway's own count of in-flight requests and streams (both back to 0).

    .venv/bin/python bench/streams_bench.py [--streams 10000] [--checkout DIR]

`--checkout DIR` runs the gateway of another checkout (with its own .venv) to compare before
and after with the same clients and upstream. The process raises its file limit (as root, the hard
limit too), which the gateway and client processes inherit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
from tests.support.config import TENANT_KEY, config_dict  # noqa: E402
from tests.support.held_upstreams import PARTIAL, USAGE  # noqa: E402
from tests.support.processes import GatewayProcess, free_port  # noqa: E402
from tests.support.redis_servers import RedisServer  # noqa: E402

AUTH = {"Authorization": f"Bearer {TENANT_KEY}"}
STREAM = {**PAYLOAD, "stream": True, "partial_images": 1}
COMPLETED = (
    b"event: image_generation.completed\n"
    b'data: {"type":"image_generation.completed","b64_json":"AA==","usage":'
    + json.dumps(USAGE).encode()
    + b"}\n\n"
)
PER_CLIENT_PROCESS = 5000  # streams one client process opens
OPENING = 200  # streams a client process has being opened at once


# --- the slow upstream (its own process) --------------------------------------------------------


async def upstream_main(port: int) -> None:
    """Streams: a partial image, then nothing until SIGUSR1, then the completed event and the end.
    JSON requests: answered at once."""
    from aiohttp import web

    finish = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, finish.set)

    async def generations(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"created": 1, "data": [{"b64_json": "AA=="}], "usage": USAGE})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(PARTIAL)
        await finish.wait()
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


async def clients_main(url: str, count: int, prompt_chars: int) -> None:
    """Open `count` streams; print `open K` as they get their first event, then `done OK BAD`."""
    opened = ok = 0
    payload = {**STREAM, "prompt": _prompt(prompt_chars)}
    gate = asyncio.Semaphore(OPENING)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> None:
            nonlocal opened, ok
            async with gate:
                resp = await session.post(f"{url}/v1/images/generations", json=payload, headers=AUTH)
                first = await resp.content.readuntil(b"\n\n") if resp.status == 200 else b""
            opened += 1
            if opened % 500 == 0 or opened == count:
                print(f"open {opened}", flush=True)
            rest = await resp.read()
            ok += resp.status == 200 and first == PARTIAL and rest == COMPLETED

        results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    errors = [type(r).__name__ for r in results if isinstance(r, BaseException)]
    print(f"done {ok} {count - ok} {sorted(set(errors))}", flush=True)


# --- the bench ------------------------------------------------------------------------------------


async def probe(url: str, ops_url: str, seconds: float) -> list[float]:
    """A new JSON request every 20 ms for `seconds`, each on a new connection; latencies in ms."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            started = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/images/generations", json=PAYLOAD, headers=AUTH) as resp:
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

        await asyncio.gather(*(one(PAYLOAD) for _ in range(200)))


async def gauges(ops_url: str) -> dict[str, float]:
    names = (
        "gateway_in_flight_requests",
        "gateway_open_streams",
        "gateway_connections_open",
        "gateway_connections_closed_total",
        "gateway_load_shed_total",
        "gateway_store_errors_total",
    )
    async with aiohttp.ClientSession() as session, session.get(f"{ops_url}/metrics") as resp:
        text = await resp.text()
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.split("{")[0] in names and (float(value) or "errors" not in name):  # errors: when any
            found[name] = found.get(name, 0) + float(value)
    return found


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


def gateway_config(upstream_url: str, redis_url: str, streams: int, lease_ttl: int | None) -> dict[str, Any]:
    store: dict[str, Any] = {"backend": "redis", "url": redis_url}
    if lease_ttl is not None:
        store["lease_ttl_seconds"] = lease_ttl
    config = config_dict(upstream_url, store=store, limits=UNBOUND)
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
    upstream_port = free_port()
    upstream = spawn("upstream", "--port", str(upstream_port))
    assert await line(upstream) == "ready"
    config = gateway_config(f"http://127.0.0.1:{upstream_port}/v1", redis.url, args.streams, args.lease_ttl)
    gateway = GatewayProcess(config, workdir, checkout=checkout)
    url, ops_url = gateway.url, gateway.ops_url
    clients: list[subprocess.Popen[str]] = []
    try:
        await gateway.start(timeout=30)
        assert gateway.process is not None
        pid = gateway.process.pid
        await warm_up(url)
        alone = await probe(url, ops_url, 3)
        rss_0 = rss_mib(pid)
        print(
            f"checkout {checkout or ROOT}, file limit {limit}, streams {args.streams}, prompt {len(_prompt(args.prompt_chars))} chars"
        )
        print(f"probe, nothing open:         {summary(alone)}   gateway RSS_0 {rss_0:.1f} MiB")

        started = time.perf_counter()
        counts = [
            min(PER_CLIENT_PROCESS, args.streams - first)
            for first in range(0, args.streams, PER_CLIENT_PROCESS)
        ]
        clients += [
            spawn("clients", "--url", url, "--count", str(count), "--prompt-chars", str(args.prompt_chars))
            for count in counts
        ]
        opening = asyncio.ensure_future(asyncio.gather(*map(_until_open, clients, counts)))
        during_opening = []
        while not opening.done():
            during_opening += await probe(url, ops_url, 1)
        await opening
        took = time.perf_counter() - started
        print(f"probe, while opening:        {summary(during_opening)}   (all open in {took:.1f} s)")

        await asyncio.sleep(2)
        cpu_before, held_from = cpu_seconds(pid), time.perf_counter()
        await asyncio.sleep(10)
        held_cpu = (cpu_seconds(pid) - cpu_before) / (time.perf_counter() - held_from)
        rss_n = rss_mib(pid)
        held = await probe(url, ops_url, 10)
        print(f"probe, {args.streams} streams open: {summary(held)}")
        print(
            f"gateway RSS_N {rss_n:.1f} MiB: {(rss_n - rss_0) * 1024 / args.streams:.2f} KiB per open stream;"
            f" CPU while only holding them {held_cpu * 100:.1f}% of a core; gauges {await gauges(ops_url)}"
        )

        upstream.send_signal(signal.SIGUSR1)
        finished = [await line(c) for c in clients]
        for _ in range(50):
            if not (now := await gauges(ops_url)).get("gateway_in_flight_requests"):
                break
            await asyncio.sleep(0.2)
        whole = sum(int(f.split()[1]) for f in finished)
        print(f"streams ended whole: {whole}/{args.streams} ({finished}); gauges after: {now}")
        if whole != args.streams:
            raise SystemExit("some streams did not end whole")
    finally:
        for client in clients:
            client.kill()
        gateway.stop(60)
        upstream.terminate()
        upstream.wait(10)
        redis.stop()
    lines = gateway.log_lines()
    bad = [entry for entry in lines if TENANT_KEY in entry or "Traceback" in entry]
    print(f"gateway log: {len(lines)} lines, {len(bad)} with a key or a traceback")


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
        "--lease-ttl",
        type=int,
        default=None,
        help="store.lease_ttl_seconds (15: the held streams' concurrency leases are renewed every 5 s)",
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "upstream":
        asyncio.run(upstream_main(args.port))
    elif args.role == "clients":
        asyncio.run(clients_main(args.url, args.count, args.prompt_chars))
    else:
        asyncio.run(bench(args))


if __name__ == "__main__":
    main()
