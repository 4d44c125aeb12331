"""Spike: compile a set of the gateway's modules with mypyc, in place, for an A/B instruction count.

Not a build step of the project: it writes `<module>.cpython-*.so` files beside the sources (and a
`*__mypyc*.so` runtime at the top of the tree), which Python then imports instead of the `.py`
files. `--clean` removes them again. See bench/compile_spike.md for the findings.

    PYTHONPATH=. .venv/bin/python bench/compile_spike.py [--set hot|relay|limits|policies|...]
    PYTHONPATH=. .venv/bin/python bench/compile_spike.py --clean

It calls `mypyc.build.mypycify` and setuptools' `build_ext --inplace` itself instead of the `mypyc`
command: that command runs `setup()`, which makes the venv's setuptools 65 read pyproject.toml and
reject its SPDX `license = "Apache-2.0"` (setuptools >= 77 needed); a bare Distribution reads no
project configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Modules mypyc cannot compile as the code stands (mypy 2.4.1's mypyc), and why.
REFUSED = {
    "gateway/requests/uploads.py": "async generator (async for ... yield)",
    "gateway/upstreams/failover.py": "async generators (target iteration, @asynccontextmanager)",
    "gateway/upstreams/pools.py": "async generator under @asynccontextmanager",
    "policies/uploads.py": "a variable that is float then int (native representations differ)",
    "policies/frozen.py": "pydantic BaseModel subclass: generated C names an undeclared CPyModule_pydantic___main",
    "policies/sizes.py": "pydantic BaseModel subclass: generated C names an undeclared CPyModule_pydantic___main",
    "policies/rules.py": "pydantic models: compiles, but import fails (`x: int = Field(...)` type-checked as int)",
    "policies/entry.py": "pydantic models (as rules.py), and cached_property memos on them",
    "policies/catalog.py": "pydantic models (as rules.py)",
    "gateway/limits/calls.py": "dataclasses over a slotted mixin that declares `tenant: str`: import fails with"
    " 'non-default argument follows default argument' (the mixin's attributes become native fields)",
    "gateway/front/connections.py": "subclasses aiohttp's RequestHandler with __slots__: import fails with"
    ' "mypyc classes can\'t have __slots__"',
}

SETS = {
    "relay": [
        "gateway/relay/__init__.py",
        "gateway/relay/usage.py",
        "gateway/relay/json_scan.py",
        "gateway/relay/sse.py",
    ],
    "limits": ["gateway/limits/*.py"],
    "policies": ["policies/*.py"],
    "front": ["gateway/front/*.py", "gateway/requests/*.py"],
    "pipeline": [
        "gateway/pipeline.py",
        "gateway/errors.py",
        "gateway/routing.py",
        "gateway/runtime.py",
        "gateway/telemetry/metrics.py",
        "gateway/upstreams/*.py",
        "gateway/telemetry/*.py",
    ],
}
SETS["hot"] = [
    pattern for name in ("relay", "limits", "policies", "front", "pipeline") for pattern in SETS[name]
]


def modules(names: list[str]) -> list[str]:
    """The source files of the named sets, less __init__.py and the modules mypyc refuses."""
    found = {
        str(path.relative_to(ROOT))
        for name in names
        for pattern in SETS[name]
        for path in ROOT.glob(pattern)
        if path.name != "__init__.py"
    }
    return sorted(found - REFUSED.keys())


def clean() -> None:
    for package in ("gateway", "policies"):
        for path in (ROOT / package).rglob("*.so"):
            path.unlink()
    for path in ROOT.glob("*__mypyc*.so"):
        path.unlink()


def compile_in_place(paths: list[str]) -> None:
    from mypyc.build import mypycify  # mypy's compiler: only this spike needs it
    from setuptools import Distribution  # type: ignore[import-untyped]  # no stubs in the venv

    os.chdir(ROOT)
    # separate: one C file per module, so the two cores compile in parallel (one file is ~400k lines)
    extensions = mypycify(paths, opt_level=os.environ.get("MYPYC_OPT_LEVEL", "3"), separate=True)
    dist = Distribution({"name": "gateway-spike", "ext_modules": extensions})
    build = dist.get_command_obj("build_ext")
    build.inplace = True
    build.parallel = os.cpu_count()
    dist.run_command("build_ext")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--set", nargs="+", choices=sorted(SETS), default=["hot"])
    parser.add_argument("--clean", action="store_true", help="remove the compiled modules and stop")
    args = parser.parse_args()
    clean()
    if args.clean:
        return
    paths = modules(args.set)
    print(f"compiling {len(paths)} modules: {' '.join(paths)}", file=sys.stderr)
    compile_in_place(paths)


if __name__ == "__main__":
    main()
