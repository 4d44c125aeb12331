"""The outbox's durable side: what this process still owes the store, on local disk (SQLite).

One row per reservation id, in one of three states: `open` (admitted, not settled yet: the
request is running), `settle` or `release` (a call the store has not taken yet). A process
killed at any moment (OOM, `kill -9`, node loss with a persistent volume) leaves these rows
behind, and the next process to open the journal replays them: settle and release calls as
they were, open reservations settled at their estimate (the upstream may have generated; no
usage will ever come). Replaying is exactly once because settle.lua's settled marker makes a
repeated call change nothing.

Writes never wait on the disk: `open`, `put` and `drop` only note the change, and one background
task writes every change noted so far in one transaction (group commit: one fsync per batch,
however many requests it holds), in a thread so the event loop never blocks on the disk. What a
kill can miss is the last batch, a few milliseconds: an admission not written yet (its estimate
then stays charged until its lease expires, as without a journal), or a deferred settlement not
written yet (its open row is replayed instead: billed at the estimate rather than the usage). A
row is dropped only after the store took its call, so nothing the store lacks is ever forgotten.

Files: `outbox-<n>.sqlite3` under `store.outbox_path`, one per process (`n` is the worker
index; a single process is 0), each locked (flock) while its process lives, so two gateways
cannot share one by mistake. Worker 0 also adopts the files of workers beyond the configured
count (the worker count went down since they were written).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
from dataclasses import dataclass, fields
from datetime import date
from pathlib import Path
from typing import Any, Literal

import orjson

from gateway.limits.calls import Check, SettleCall
from gateway.limits.kinds import KIND_BY_NAME
from gateway.limits.store import Reservation
from gateway.logs import get_logger
from policies.cost import Cost

log = get_logger("gateway.limits")

State = Literal["open", "settle", "release"]
_SCHEMA = "CREATE TABLE IF NOT EXISTS owed (id TEXT PRIMARY KEY, state TEXT NOT NULL, body BLOB NOT NULL)"


class JournalError(Exception):
    """The journal cannot be opened: the directory is not writable, or another process holds it."""


@dataclass(frozen=True, slots=True)
class Owed:
    """One row read back at start-up: a call to deliver, or a reservation nobody settled."""

    id: str
    state: State
    call: SettleCall | None
    reservation: Reservation | None


def journal_file(directory: Path, index: int) -> Path:
    return directory / f"outbox-{index}.sqlite3"


class Journal:
    def __init__(self, directory: Path, index: int = 0, workers: int = 1) -> None:
        self.path = journal_file(directory, index)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._lock = _lock(self.path.with_suffix(".lock"))
            self._db = _connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"store.outbox_path {str(directory)!r}: {exc}") from exc
        if index == 0:
            self._adopt(directory, workers)
        self._changes: dict[str, tuple[State, bytes] | None] = {}
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    # --- start-up ------------------------------------------------------------------------------

    def read(self) -> list[Owed]:
        """Every row, in the order written: what the last process left undone."""
        rows = self._db.execute("SELECT id, state, body FROM owed ORDER BY rowid").fetchall()
        return [_decode(row_id, state, body) for row_id, state, body in rows]

    def _adopt(self, directory: Path, workers: int) -> None:
        """Take over the rows of journals whose worker no longer exists, then remove them."""
        for index in range(workers, 1024):
            other = journal_file(directory, index)
            if not other.exists():
                continue
            with contextlib.closing(sqlite3.connect(other)) as db:
                db.execute(_SCHEMA)
                rows = db.execute("SELECT id, state, body FROM owed ORDER BY rowid").fetchall()
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO owed VALUES (?, ?, ?)", rows)
            for leftover in (other, Path(f"{other}-wal"), Path(f"{other}-shm"), other.with_suffix(".lock")):
                leftover.unlink(missing_ok=True)
            log.info("outbox_adopted", file=str(other), rows=len(rows))

    # --- changes -------------------------------------------------------------------------------

    def open(self, reservation: Reservation) -> None:
        """An admitted request is running: settled at its estimate if this process dies first."""
        self._note(reservation.id, ("open", orjson.dumps(_reservation_row(reservation))))

    def put(self, call: SettleCall, state: State) -> None:
        """`call` waits for the store (replaces the reservation's open row)."""
        self._note(call.reservation_id, (state, orjson.dumps(_call_row(call))))

    def drop(self, reservation_id: str) -> None:
        """Nothing is owed for this reservation any more (the store took it, or it was given up)."""
        self._note(reservation_id, None)

    def _note(self, reservation_id: str, change: tuple[State, bytes] | None) -> None:
        if self._closed:
            return
        self._changes[reservation_id] = change
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        """Write batches until nothing is left; changes noted meanwhile make the next batch."""
        try:
            while self._changes:
                changes, self._changes = self._changes, {}
                await asyncio.to_thread(self._commit, changes)
        except Exception:  # a full or failing disk: said; the process goes on as without a journal
            log.exception("outbox_journal_failed", path=str(self.path))
            self._closed = True
        finally:
            self._writer = None

    def _commit(self, changes: dict[str, tuple[State, bytes] | None]) -> None:
        puts = [(key, *change) for key, change in changes.items() if change is not None]
        drops = [(key,) for key, change in changes.items() if change is None]
        with self._db:  # one transaction, one fsync
            if drops:
                self._db.executemany("DELETE FROM owed WHERE id = ?", drops)
            if puts:
                self._db.executemany("INSERT OR REPLACE INTO owed VALUES (?, ?, ?)", puts)

    async def flush(self) -> None:
        """Wait until every change noted so far is on disk."""
        while self._writer is not None:
            await asyncio.shield(self._writer)

    async def close(self) -> None:
        await self.flush()
        self._closed = True
        self._db.close()
        os.close(self._lock)

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM owed").fetchone()[0])


def _connect(path: Path) -> sqlite3.Connection:
    # The connection is used by one thread at a time (the writer task, or start-up and shutdown).
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # a committed batch survives a power cut, not just a kill
    db.execute(_SCHEMA)
    db.isolation_level = "DEFERRED"
    return db


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(f"{path.with_suffix('.sqlite3')} is in use by another running gateway") from None
    return fd


# Rows are compact JSON arrays of plain values: written for every admitted request, they must be
# cheap to encode (orjson on tuples, no dataclass walking).
_COST_FIELDS = tuple(f.name for f in fields(Cost))


def _check_row(check: Check) -> tuple[Any, ...]:
    c = check
    return (c.scope, c.kind.name, c.key, c.limit, c.cost, c.window_s, c.end_us, c.expire_at, c.shadow)


def _check_from(row: list[Any]) -> Check:
    return Check(row[0], KIND_BY_NAME[row[1]], *row[2:])


def _reservation_row(r: Reservation) -> tuple[Any, ...]:
    estimate = tuple(getattr(r.estimate, name) for name in _COST_FIELDS)
    checks = [_check_row(check) for check in r.checks]
    return (r.id, r.request_id, r.tenant, r.model, r.day, estimate, checks, r.shadow, r.degraded)


def _reservation_from(row: list[Any]) -> Reservation:
    rid, request_id, tenant, model, day, estimate, checks, shadow, degraded = row
    return Reservation(
        rid,
        request_id,
        tenant,
        model,
        date.fromisoformat(day),
        Cost(*estimate),
        tuple(_check_from(c) for c in checks),
        shadow,
        degraded,
    )


_CALL_FIELDS = tuple(f.name for f in fields(SettleCall))


def _call_row(call: SettleCall) -> tuple[Any, ...]:
    """Every field of the call, in declaration order (a field added later is carried too)."""
    return tuple(
        [_check_row(c) for c in call.checks] if name == "checks" else getattr(call, name)
        for name in _CALL_FIELDS
    )


def _call_from(row: list[Any]) -> SettleCall:
    values = {name: _tupled(value) for name, value in zip(_CALL_FIELDS, row, strict=True)}
    values["day"] = date.fromisoformat(values["day"])
    values["checks"] = tuple(_check_from(list(c)) for c in row[_CALL_FIELDS.index("checks")])
    return SettleCall(**values)


def _tupled(value: Any) -> Any:
    """JSON arrays back to the tuples the calls hold (`actuals`, ledger pairs)."""
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _decode(row_id: str, state: str, body: bytes) -> Owed:
    data = orjson.loads(body)
    if state == "open":
        return Owed(row_id, "open", None, _reservation_from(data))
    return Owed(row_id, "release" if state == "release" else "settle", _call_from(data), None)
