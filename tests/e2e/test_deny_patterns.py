"""Deny patterns run in linear time on a normalised prompt, in a real gateway process."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from tests.e2e.conftest import base_url
from tests.support.config import TENANT_KEY, config_dict
from tests.support.processes import GatewayProcess

AUTH = {"Authorization": f"Bearer {TENANT_KEY}"}
POLICY = {"default_model": "gpt-image-1.5", "deny_prompt_patterns": ["(a+)+$", r"\bcat\b"]}


async def post(session: aiohttp.ClientSession, url: str, prompt: str) -> tuple[int, dict[str, object]]:
    body = {"prompt": prompt, "quality": "low"}
    async with session.post(f"{url}/v1/images/generations", json=body, headers=AUTH) as resp:
        return resp.status, await resp.json()


async def test_a_catastrophic_pattern_does_not_stall_the_gateway(mock_openai, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`(a+)+$` against 40 a's and a `!` takes hours with backtracking; with RE2 it is microseconds,
    and a request sent meanwhile is served at once."""
    gateway = GatewayProcess(config_dict(base_url(mock_openai), policy=POLICY), tmp_path)
    await gateway.start()
    try:
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            started = time.perf_counter()
            evil, normal = await asyncio.gather(
                post(session, gateway.url, "a" * 40 + "!"), post(session, gateway.url, "a dog")
            )
            elapsed = time.perf_counter() - started
            assert evil[0] == 200 and normal[0] == 200
            assert elapsed < 5, f"{elapsed:.1f} s for two requests"
            # the same word in disguise: full-width letters, a zero-width space, upper case
            for prompt in ("a ｃａｔ", "a c\u200bat", "A CAT", "a Ca\u00adt"):
                status, body = await post(session, gateway.url, prompt)
                assert status == 403, (prompt, body)
                assert body["error"]["code"] == "policy_violation"  # type: ignore[index]
    finally:
        assert gateway.stop() == 0
