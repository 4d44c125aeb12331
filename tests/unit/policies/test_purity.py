"""`policies/` stays pure: importing it loads nothing of the gateway, aiohttp or redis."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import policies.capabilities, policies.catalog, policies.cost, policies.engine, policies.rules, policies.tenant
policies.catalog.load_catalog()
banned = sorted(m for m in sys.modules if m.split(".")[0] in {"gateway", "aiohttp", "redis", "multidict", "yarl"})
print(",".join(banned))
"""


def test_policies_import_nothing_from_the_gateway_aiohttp_or_redis() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "", f"policies/ pulled in: {result.stdout.strip()}"
