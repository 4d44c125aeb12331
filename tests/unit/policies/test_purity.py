"""`policies/` stays pure: importing it loads nothing of the gateway, aiohttp or redis."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import importlib, pkgutil, sys
import policies
for module in pkgutil.iter_modules(policies.__path__):
    importlib.import_module(f"policies.{module.name}")
assert {"engine", "cost", "catalog"} <= set(m.split(".")[-1] for m in sys.modules if m.startswith("policies."))
policies.catalog.load_catalog()
banned = sorted({m.split(".")[0] for m in sys.modules} & {"gateway", "aiohttp", "redis", "multidict", "yarl"})
print(",".join(banned))
"""


def test_policies_import_nothing_from_the_gateway_aiohttp_or_redis() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "", f"policies/ pulled in: {result.stdout.strip()}"
