"""Loaded at start by a gateway the streams bench runs (it is put first on PYTHONPATH): appends
every full garbage collection, and any collection longer than 5 ms, to $STREAMS_BENCH_GC_LOG as
`<unix time> <generation> <seconds> <CPU seconds>` (the CPU time the
collection took, which a busy machine's preemption does not inflate). It works on any checkout, so a before/after compares the same
measurement (a gateway that exports `gateway_gc_pause_seconds` is read as well)."""

from __future__ import annotations

import gc
import os
import time

_PATH = os.environ.get("STREAMS_BENCH_GC_LOG")


def _watch(phase: str, info: dict[str, int], started: list[float] = [0.0, 0.0]) -> None:  # noqa: B006
    now, cpu = time.perf_counter(), time.thread_time()
    if phase == "start":
        started[:] = now, cpu
        return
    took = now - started[0]
    if info["generation"] == 2 or took > 0.005:
        with open(_PATH, "a") as out:  # type: ignore[arg-type]
            out.write(f"{time.time():.3f} {info['generation']} {took:.6f} {cpu - started[1]:.6f}\n")


if _PATH:
    gc.callbacks.insert(0, _watch)
