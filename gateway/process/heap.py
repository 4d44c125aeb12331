"""The C heap's settings for a process that relays large bodies.

uvloop reads a socket into a new bytes object of up to 256,000 bytes, and a 1.5 MiB answer arrives
as about seven of them. glibc's malloc adapts its thresholds as it goes: a block freed from the top
of its heap beyond the trim threshold is given back to the kernel, and the next read grows the heap
again, each page touched anew a page fault. That was ~70 page faults per 1.5 MiB answer relayed,
and about a tenth of the gateway's CPU for it (2.97 -> 2.54 and 2.61 -> 2.36 ms per request in two
paired runs of the peer bench's 1.5 MiB scenario (`../shared/bench`), with the thresholds below set by the
environment; the page faults went to ~0).

So a serving process fixes them (`mallopt`): blocks below 32 MiB come from the heap, freed memory is
kept up to 32 MiB at its top, and the heap grows 4 MiB at a time. The price is memory the process
keeps instead of returning: at most 32 MiB at the heap's top, per process. An operator who sets
glibc's own variables (`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TOP_PAD_`, or
`glibc.malloc.*` in `GLIBC_TUNABLES`) keeps them: nothing is changed then. On a C library without
`mallopt` (musl) nothing is changed either.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from gateway.logs import get_logger

log = get_logger("gateway.heap")

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

SETTINGS = {
    M_MMAP_THRESHOLD: 32 * 1024 * 1024,
    M_TRIM_THRESHOLD: 32 * 1024 * 1024,
    M_TOP_PAD: 4 * 1024 * 1024,
}
OPERATOR_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_heap() -> bool:
    """Fix malloc's thresholds as above; whether they were set."""
    if any(name in os.environ for name in OPERATOR_VARIABLES) or "glibc.malloc." in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if not all(mallopt(param, value) == 1 for param, value in SETTINGS.items()):
        log.warning("heap_settings_refused")
        return False
    return True
