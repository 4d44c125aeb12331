"""The C heap's settings (gateway/process/heap.py): a large body's pieces reuse the heap instead of growing
and trimming it, unless the operator set glibc's own variables."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gateway.process.heap import OPERATOR_VARIABLES

# Relaying a 1.5 MiB answer, as uvloop delivers it: seven pieces of up to 256,000 bytes, freed
# once sent; the page faults of a second round of 200 such answers.
CHURN = """
import resource, sys
from gateway.process.heap import keep_heap
print(keep_heap())
def relay():
    for _ in range(200):
        pieces = [bytes(256_000) for _ in range(7)]
        del pieces
relay()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
relay()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def churn(**env: str) -> tuple[str, int]:
    clean = {
        name: value
        for name, value in os.environ.items()
        if name not in OPERATOR_VARIABLES and name != "GLIBC_TUNABLES"
    }
    out = subprocess.run(
        [sys.executable, "-c", CHURN], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_pieces_reuse_the_heap_without_page_faults() -> None:
    kept, faults = churn()
    assert kept == "True"
    assert faults < 100  # without the settings: tens of thousands (34,400 here)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_TRIM_THRESHOLD_": "131072"},  # glibc's default, fixed
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
    ],
)
def test_the_operators_own_malloc_settings_are_left_as_they_are(env: dict[str, str]) -> None:
    kept, faults = churn(**env)
    assert kept == "False"
    assert faults > 1000  # what the settings avoid, shown with the operator's choice
