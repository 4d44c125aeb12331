"""A fuzzer of the HTTP layer: malformed requests, compressed and truncated bodies, slow and idle
connections, sent through raw sockets to a running gateway while a probe times well-formed requests.

Every case carries the tenant key and a marker prompt, so a response or log line that quotes the
request is caught. `run` returns what the gateway answered, for the test and the benchmark to judge.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

from tests.support.config import TENANT_KEY

PROMPT = "zebra umbrella quartz lighthouse"  # a marker: must never appear in a response or a log line
KEY = TENANT_KEY.encode()
BODY = orjson.dumps({"model": "gpt-image-1.5", "prompt": PROMPT, "quality": "low"})
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")
_NASTY = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\x00",
    b" ",
    b":",
    b"\t",
    b"\xff",
    b"\x80",
    b"\xc3",
    b'"',
    b"{",
    b"}",
    b"0",
]


@dataclass
class Case:
    kind: str
    parts: list[bytes]
    pause: float = 0.0  # between parts
    abort: bool = False  # reset the connection after sending, instead of reading the answer


@dataclass
class Outcome:
    case: Case
    statuses: list[int]
    leaked: bool  # the key or the prompt came back in the response


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    probe_ms: list[float] = field(default_factory=list)

    def by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes:
            counts[outcome.case.kind] = counts.get(outcome.case.kind, 0) + 1
        return counts

    def server_errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if any(s >= 500 for s in o.statuses)]


def head(
    *,
    method: bytes = b"POST",
    target: bytes = b"/v1/images/generations",
    version: bytes = b"HTTP/1.1",
    headers: list[bytes] | None = None,
    length: int | None = len(BODY),
) -> bytes:
    lines = [method + b" " + target + b" " + version, b"Host: gateway", b"Authorization: Bearer " + KEY]
    lines.append(b"Content-Type: application/json")
    if length is not None:
        lines.append(b"Content-Length: " + str(length).encode())
    lines += headers or []
    return b"\r\n".join(lines) + b"\r\n\r\n"


def valid() -> bytes:
    return head() + BODY


def mutated(rng: random.Random) -> Case:
    data = bytearray(valid())
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data))
        what = rng.choice(_NASTY) if rng.random() < 0.8 else bytes([rng.randrange(256)])
        op = rng.randrange(3)
        if op == 0:
            data[at : at + 1] = what
        elif op == 1:
            data[at:at] = what
        else:
            del data[at : at + rng.randint(1, 8)]
    return Case("mutated", [bytes(data)])


HEADERS = [
    b"Content-Length: 5",
    b"Content-Length: -1",
    b"Content-Length: +10",
    b"Content-Length: 99999999999999999999",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: xchunked",
    b"Content-Encoding: gzip",
    b"Content-Encoding: deflate",
    b"Content-Encoding: br",
    b"Content-Encoding: gzip, gzip",
    b"Content-Encoding: identity",
    b"Expect: 100-continue",
    b"Connection: Upgrade\r\nUpgrade: websocket",
    b"Authorization : Bearer " + KEY,
    b"Authorization: Bearer \xff\xfe" + KEY,
    b"Authorization: Bearer " + KEY * 300,
    b"X-Folded: a\r\n " + KEY,
    b"X-Long: " + b"a" * 20000,
    b"X-Request-Id: ../../etc/passwd",
    b"X-Request-Id: " + KEY,
    b"Bad Header: x",
    b": empty name",
    b"X-Nul: a\x00b",
    b"Host: second",
    *[b"X-Many-%d: v" % i for i in range(3)],
]


def odd_headers(rng: random.Random) -> Case:
    extra = rng.sample(HEADERS, rng.randint(1, 3))
    if rng.random() < 0.1:
        extra += [b"X-N%d: v" % i for i in range(200)]
    return Case("headers", [head(headers=extra) + BODY])


def odd_request_line(rng: random.Random) -> Case:
    method = rng.choice([b"POST", b"GET", b"PUT", b"post", b"P0ST", b"CONNECT", b"TRACE", b"", b"POST POST"])
    target = rng.choice(
        [
            b"/v1/images/generations",
            b"http://evil/v1/images/generations",
            b"*",
            b"/v1/images/generations?x=" + KEY,
            b"/v1/images/%00",
            b"/" + b"a" * 10000,
            b"/v1/images/generations#frag",
            b"",
        ]
    )
    version = rng.choice([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"http/1.1", b"HTTP/1.1x", b""])
    return Case("request_line", [head(method=method, target=target, version=version) + BODY])


def chunked(rng: random.Random) -> Case:
    sizes = [
        b"%x" % len(BODY),
        b"ffffffffffffffffffff",
        b"-1",
        b"zz",
        b"%x;ext=1" % len(BODY),
        b"%x " % len(BODY),
        b"0x10",
    ]
    size = rng.choice(sizes)
    tail = rng.choice(
        [b"\r\n0\r\n\r\n", b"0\r\n\r\n", b"\r\n0\r\nTrailer: " + KEY + b"\r\n\r\n", b"\r\n", b""]
    )
    start = head(headers=[b"Transfer-Encoding: chunked"], length=None)
    body = size + b"\r\n" + BODY + tail
    parts = [start, body] if rng.random() < 0.5 else [start + body]
    return Case("chunked", parts, pause=0.05)


@functools.cache
def gzip_bomb(mib: int) -> bytes:
    """`mib` MiB of zeros, gzipped (about a thousandth of the size)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join([*(compressor.compress(zeros) for _ in range(mib)), compressor.flush()])


def compressed(rng: random.Random) -> Case:
    if rng.random() < 0.5:
        payload = gzip_bomb(rng.choice([1, 16, 64]))
    else:
        payload = bytes(rng.randrange(256) for _ in range(rng.randint(1, 2000)))
    encoding = rng.choice([b"gzip", b"deflate", b"br", b"zstd", b"GZIP", b"x-gzip"])
    return Case(
        "compressed", [head(headers=[b"Content-Encoding: " + encoding], length=len(payload)) + payload]
    )


def truncated(rng: random.Random) -> Case:
    data = valid()
    cut = rng.randrange(1, len(data))
    return Case("truncated", [data[:cut]], abort=rng.random() < 0.5)


def deep_or_odd_json(rng: random.Random) -> Case:
    depth = rng.choice([100, 990, 1023, 1025, 5000])
    bodies = [
        b'{"prompt": "' + PROMPT.encode() + b'", "size": ' + b"[" * depth + b"]" * depth + b"}",
        b'{"prompt": "' + PROMPT.encode() + b'\xff\xfe"}',
        b'\xef\xbb\xbf{"prompt": "' + PROMPT.encode() + b'"}',
        b'{"prompt": "' + PROMPT.encode() + b'", "n": 1e999}',
        b'{"prompt": "' + PROMPT.encode() + b'", "n": 123456789012345678901234567890}',
        b'{"prompt": "' + PROMPT.encode() + b'", "prompt": 1}',
        b"[" + BODY + b"]",
    ]
    body = rng.choice(bodies)
    return Case("json", [head(length=len(body)) + body])


def slow(rng: random.Random) -> Case:
    data = valid()
    pieces = [data[i : i + 1] for i in range(min(40, len(data)))] + [data[40:]]
    return Case("slow", pieces, pause=rng.choice([0.005, 0.02]))


def idle(rng: random.Random) -> Case:
    data = valid()
    return Case("idle", [b"" if rng.random() < 0.5 else data[: rng.randrange(1, 60)]])


def pipelined(rng: random.Random) -> Case:
    second = mutated(rng).parts[0]
    return Case("pipelined", [valid() + second])


GENERATORS: list[Callable[[random.Random], Case]] = [
    mutated,
    mutated,
    mutated,
    odd_headers,
    odd_headers,
    odd_request_line,
    chunked,
    compressed,
    truncated,
    deep_or_odd_json,
    slow,
    idle,
    pipelined,
]


def cases(count: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    return [rng.choice(GENERATORS)(rng) for _ in range(count)]


async def send(port: int, case: Case, read_timeout: float) -> Outcome:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return Outcome(case, [], False)
    received = b""
    try:
        for part in case.parts:
            writer.write(part)
            await writer.drain()
            if case.pause:
                await asyncio.sleep(case.pause)
        if case.abort:
            writer.transport.abort()
            return Outcome(case, [], False)
        async with asyncio.timeout(read_timeout):
            while chunk := await reader.read(65536):
                received += chunk
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
    statuses = [int(m.group(1)) for m in _STATUS.finditer(received)]
    return Outcome(case, statuses, KEY in received or PROMPT.encode() in received)


async def probe(url: str, stop: asyncio.Event, every: float, latencies: list[float]) -> None:
    """A well-formed generation every `every` seconds until `stop`; each one's latency in ms."""
    headers = {"Authorization": f"Bearer {TENANT_KEY}"}
    payload = {"model": "gpt-image-1.5", "prompt": "a probe", "quality": "low"}
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            started = time.perf_counter()
            async with session.post(f"{url}/v1/images/generations", json=payload, headers=headers) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(every)


async def run(url: str, port: int, all_cases: list[Case], *, concurrency: int, read_timeout: float) -> Report:
    report = Report()
    stop = asyncio.Event()
    prober = asyncio.create_task(probe(url, stop, 0.05, report.probe_ms))
    queue = iter(all_cases)

    async def worker() -> None:
        for case in queue:
            report.outcomes.append(await send(port, case, read_timeout))

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        stop.set()
        await prober
    return report
