"""A real headless Chromium for the usage page's tests, driven by Playwright for Python.

Playwright's own browser download needs the internet, so the tests drive the system's Chromium
(Debian's `chromium`, installed by `make system-deps`) by its path; `GATEWAY_TEST_CHROMIUM`
names another. Where neither Playwright nor a browser is installed, the tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Root in a container has no user namespace for Chromium's sandbox; the rest keeps a loaded CI quiet.
_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-extensions",
    "--no-first-run",
]


def chromium_path() -> str | None:
    named = os.environ.get("GATEWAY_TEST_CHROMIUM")
    if named:
        return named
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


@asynccontextmanager
async def headless_chromium() -> AsyncIterator[Any]:
    """A launched browser (playwright.async_api.Browser), closed on exit; skips the test when none
    can be found."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install -e '.[dev]')")
    path = chromium_path()
    if path is None:
        pytest.skip(
            "No Chromium found for the browser tests: `make system-deps` installs Debian's chromium "
            "(as root), or set GATEWAY_TEST_CHROMIUM to a Chromium or Chrome binary"
        )
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=path, headless=True, args=_ARGS)
        try:
            yield browser
        finally:
            await browser.close()
