"""The outbox journal on its own: what it writes reads back, one process per file, and files of
workers that no longer exist are adopted by worker 0."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from gateway.config import ConfigError, StoreSettings, parse_settings
from gateway.limits.calls import Check, compile_settle
from gateway.limits.journal import Journal, JournalError
from gateway.limits.kinds import KIND_BY_NAME
from gateway.limits.store import Reservation
from policies.cost import Cost

COST = Cost(images=1, text_in_tokens=20, image_out_tokens=272, nano_usd=8_804_000)


def reservation(rid: str) -> Reservation:
    return Reservation(rid, rid.partition(".")[0], "team", "gpt-image-1.5", date(2026, 12, 6), COST, ())


def settle(rid: str) -> object:
    """A call with every field set, so that one the journal did not carry would show."""
    check = Check("tenant", KIND_BY_NAME["usd_per_day"], "igw:{team}:k", 50, 8_804_000, 86400, 7, 8, True)
    return compile_settle(
        "team",
        rid,
        date(2026, 12, 6),
        (check,),
        actual=COST,
        ledger=[("requests:m", 1)],
        settings=StoreSettings(),
        degraded=True,
        unledger=[("requests:m", 1), ("nano_usd:m", 9_000_000)],
    )


async def test_rows_read_back_as_written_and_a_drop_removes_one(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.open(reservation("a.1"))
    journal.open(reservation("b.2"))
    journal.put(settle("b.2"), "settle")  # replaces b's open row
    journal.open(reservation("c.3"))
    journal.drop("c.3")
    await journal.close()

    again = Journal(tmp_path)
    rows = again.read()
    await again.close()
    assert [(r.id, r.state) for r in rows] == [("a.1", "open"), ("b.2", "settle")]
    assert rows[0].reservation == reservation("a.1")
    assert rows[1].call == settle("b.2")


async def test_one_file_per_process(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    with pytest.raises(JournalError, match="in use by another running gateway"):
        Journal(tmp_path)
    await journal.close()
    await Journal(tmp_path, index=1).close()  # another worker's file is its own


async def test_worker_zero_adopts_the_files_of_workers_that_are_gone(tmp_path: Path) -> None:
    for index in (1, 2, 3):
        journal = Journal(tmp_path, index=index, workers=4)
        journal.open(reservation(f"r{index}.x"))
        await journal.close()
    first = Journal(tmp_path, index=0, workers=2)  # the worker count went down from 4 to 2
    assert sorted(r.id for r in first.read()) == ["r2.x", "r3.x"]
    assert not (tmp_path / "outbox-2.sqlite3").exists()
    assert not (tmp_path / "outbox-3.sqlite3").exists()
    await first.close()


def test_an_outbox_path_needs_the_redis_store() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_settings("store: {backend: memory, outbox_path: /tmp/x}", environ={})
    assert "store.outbox_path: the durable outbox needs store.backend: redis" in str(raised.value)
