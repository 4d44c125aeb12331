"""The Redis engine: every operation is one EVALSHA of its script, on a standalone server or a
Redis Cluster (all of a tenant's keys share its `{tenant}` hash tag, hence one slot).

The client never retries a command by itself: a reserve whose reply is lost may have been
applied, and running it again would charge twice. Failures become `StoreFailure` and the
`LimitStore` decides (on_unavailable for reserve; settle's own retries are safe because settle is
idempotent).

Timeouts. On the lean connection (plain `redis://`, the usual case) the connection itself judges
whether Redis answers: `timeout_ms` of silence with a reply owed, measured from the write and
proof against the event loop's own lag (resp.py), so the engine `times_its_calls` and a burst
that keeps this process busy is never mistaken for an outage. Through redis-py (TLS, unix
sockets, a cluster) the `LimitStore` bounds each call by `timeout_ms`, and a late reply may take
ten times that (at least 2 s) before its connection is dropped.

Script calls are coalesced per event-loop turn into pipelines (batching.py). At most
`MAX_IN_FLIGHT` batches or calls run at once, each on its own pooled connection; more wait their
turn within the same timeout. redis-py raises at once when its pool is exhausted, which under a
burst would turn into needless degraded decisions, and a wait is the better back-pressure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import date
from itertools import chain
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from gateway.config import StoreSettings
from gateway.limits.batching import Arg, EvalBatcher
from gateway.limits.calls import (
    LedgerHash,
    RenewCall,
    ReserveCall,
    ReserveReply,
    SettleCall,
    Status,
    StoreFailure,
    StoreRejected,
    record,
)
from gateway.limits.keys import LEDGER_PATTERN, ledger_key, parse_ledger_key
from gateway.limits.kinds import RATE_WINDOW_US
from gateway.limits.meters import Reading
from gateway.limits.resp import RespConnection, command
from gateway.limits.scripts import ALL, RENEW, RESERVE, SETTLE, Script

_STATUS: dict[int, Status] = {1: "admitted", 0: "rejected", 2: "peeked", -1: "wrong_day", -2: "settled"}
_READING_FIELDS = 5
# What "the store did not answer" looks like: RedisClusterException (no reachable node, slots not
# covered) is not a RedisError.
_FAILURES = (RedisError, RedisClusterException, OSError)
# Error replies of a store that is full, starting, failing over or busy: they pass, so a call is
# tried again (settlements through the outbox).
_PASSING_ERRORS = (
    "OOM",
    "BUSY",
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOREPLICAS",
)
MAX_IN_FLIGHT = 128


def _refused_for_good(message: str) -> bool:
    """An error raised while the script ran (Redis names the script in it), other than one of a
    store that is full or busy: the same call would fail again. Anything else (a refused
    connection, NOAUTH, NOPERM, too many clients) is about the connection, and passes."""
    return "script" in message and not message.startswith(_PASSING_ERRORS)


def _reply_timeout(settings: StoreSettings) -> float:
    """Through redis-py a caller gives up after timeout_ms (LimitStore decides what then), but the
    connection waits longer for the reply, so a call that ran late is read to its end instead of
    being cut off mid-reply (which would drop the connection and everything batched on it)."""
    return max(2.0, 10 * settings.timeout_ms / 1000)


def connect(settings: StoreSettings) -> Any:
    """A client for `settings.url`: RedisCluster when `cluster: true`, without automatic retries."""
    timeout = settings.timeout_ms / 1000
    options: dict[str, Any] = {
        "socket_timeout": _reply_timeout(settings),
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "max_connections": MAX_IN_FLIGHT,  # per node of a cluster
    }
    if settings.cluster:
        return RedisCluster.from_url(settings.url, **options)
    return Redis.from_url(settings.url, **options)


def lean_connection(settings: StoreSettings) -> RespConnection | None:
    """The pipelined connection for script calls, where `resp.py` speaks the URL (not a cluster)."""
    if settings.cluster:
        return None
    timeout = settings.timeout_ms / 1000
    return RespConnection.for_url(settings.url, connect_timeout=timeout, reply_timeout=timeout)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisEngine:
    def __init__(self, client: Any, lean: RespConnection | None = None) -> None:
        self._client = client
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._batcher = EvalBatcher(client, self._in_flight, lean)
        self._lean = lean

    @property
    def calls_in_order(self) -> bool:
        """On the lean connection, one socket in order; redis-py's pools (TLS, unix sockets) and a
        cluster may send a later call on a connection that is ready sooner."""
        return self._lean is not None

    @property
    def times_its_calls(self) -> bool:
        """Whether the engine itself fails a call that Redis does not answer (see the docstring)."""
        return self._lean is not None

    async def start(self) -> None:
        for script in ALL:
            await self._call(self._client.script_load, script.source)
        # Connected before the first request: a burst at start finds the connection ready.
        await self.ping()

    async def close(self) -> None:
        await self._batcher.close()
        await self._client.aclose()

    async def ping(self) -> None:
        """Readiness: on the connection the script calls use, where there is one."""
        if self._lean is None:
            await self._call(self._client.ping)
            return
        try:
            [reply] = await self._lean.execute(command("PING"), 1)
        except _FAILURES as exc:
            raise StoreFailure(f"ping: {type(exc).__name__}: {exc}") from exc
        if isinstance(reply, Exception):
            raise StoreFailure(f"ping: {reply}")

    async def _call(self, method: Any, *args: Any) -> Any:
        try:
            async with self._in_flight:
                return await method(*args)
        except _FAILURES as exc:
            raise StoreFailure(f"{type(exc).__name__}: {exc}") from exc

    async def _run(self, script: Script, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        try:
            return await self._batcher.evalsha(script, keys, args)
        except ResponseError as exc:
            if _refused_for_good(str(exc)):
                raise StoreRejected(f"{script.name}: {exc}") from exc
            raise StoreFailure(f"{script.name}: {exc}") from exc
        except _FAILURES as exc:
            raise StoreFailure(f"{script.name}: {type(exc).__name__}: {exc}") from exc

    async def reserve(self, call: ReserveCall) -> ReserveReply:
        shared = call.shared
        keys = [call.record_key, call.settled_key, shared.ledger_key, *shared.check_keys]
        args: list[Arg] = [
            call.reservation_id,
            call.mode,
            call.model,
            call.record_ttl_ms,
            call.ledger_expire_at,
            call.packed_numbers(),
            b"" if call.mode == "peek" else record(call.checks),  # a peek records nothing
        ]
        args.extend(chain.from_iterable(call.ledger))
        reply: list[int] = await self._run(RESERVE, keys, args)
        readings = tuple(
            [Reading(*reply[i : i + _READING_FIELDS]) for i in range(2, len(reply), _READING_FIELDS)]
        )
        return ReserveReply(_STATUS[reply[0]], reply[1], readings)

    async def settle(self, call: SettleCall) -> bool:
        keys = [call.record_key, call.settled_key, call.ledger_key, *[check.key for check in call.checks]]
        args: list[Arg] = [
            call.reservation_id,
            call.settled_ttl_ms,
            call.ledger_expire_at,
            RATE_WINDOW_US,
            call.packed_checks(),
            1 if call.degraded else 0,
            1 if call.unledger_if_recorded else 0,
            record(call.checks),
        ]
        recorded, unrecorded = call.ledger_moves()
        args.append(len(recorded))
        args.extend(chain.from_iterable(recorded))
        if call.unledger_if_recorded:
            args.extend(chain.from_iterable(unrecorded))
        return int(await self._run(SETTLE, keys, args)) != 0

    async def renew(self, call: RenewCall) -> int:
        keys = [call.record_key, *call.lease_keys]
        return int(await self._run(RENEW, keys, [call.reservation_id, call.lease_ttl_us, call.record_ttl_ms]))

    async def ledger(self, days: Sequence[date], tenant: str | None) -> list[LedgerHash]:
        if tenant is not None:
            wanted = [(tenant, day) for day in days]
        else:
            wanted = await self._scan_ledgers(set(days))
        pipe = self._client.pipeline(transaction=False)
        for name, day in wanted:
            pipe.hgetall(ledger_key(name, day))
        replies = await self._call(pipe.execute) if wanted else []
        return [
            (name, day, {_text(k): int(v) for k, v in counters.items()})
            for (name, day), counters in zip(wanted, replies, strict=True)
            if counters
        ]

    async def _scan_ledgers(self, days: set[date]) -> list[tuple[str, date]]:
        """Every tenant's ledger keys for `days` (SCAN visits every primary of a cluster)."""
        found: list[tuple[str, date]] = []
        try:
            async for key in self._client.scan_iter(match=LEDGER_PATTERN, count=1000):
                parsed = parse_ledger_key(_text(key))
                if parsed is not None and parsed[1] in days:
                    found.append(parsed)
        except _FAILURES as exc:
            raise StoreFailure(f"scan: {type(exc).__name__}: {exc}") from exc
        return found
