"""The usage page (`/admin/ui`) in a real headless Chromium against the gateway on a real socket:
sign in with the admin token, see a tenant's budget change after a request made with the openai
SDK, download the ledger as CSV; a wrong token shows an error and no data."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import expect

from tests.e2e.conftest import Running, StartGateway, base_url
from tests.support.browser import headless_chromium
from tests.support.config import TENANT_KEY

ADMIN_TOKEN = "usage-page-admin-token-0123"
TIMEOUT_MS = 20_000  # a loaded 2-core CI machine is slow to start a browser, never this slow


@pytest.fixture
async def gateway(start_gateway: StartGateway, mock_openai: TestServer) -> Running:
    return await start_gateway(
        openai_url=base_url(mock_openai),
        admin={"token": ADMIN_TOKEN},
        limits={"requests_per_minute": 60, "usd_per_day": 50, "usd_per_month": 500},
    )


@pytest.fixture
async def page(gateway: Running) -> AsyncIterator[Any]:
    """A fresh browser tab on the usage page; the test fails on any script error or CSP violation,
    and on any URL that carries the admin token."""
    async with headless_chromium() as browser:
        context = await browser.new_context(accept_downloads=True)
        tab = await context.new_page()
        tab.set_default_timeout(TIMEOUT_MS)
        problems: list[str] = []
        urls: list[str] = []
        tab.on("pageerror", lambda error: problems.append(str(error)))
        tab.on(
            "console",
            lambda m: (
                problems.append(m.text)
                if m.type == "error" and not m.text.startswith("Failed to load resource")
                else None
            ),
        )
        tab.on("request", lambda r: urls.append(r.url))
        await tab.goto(f"{gateway.url}/admin/ui")
        yield tab
        await context.close()
        assert problems == []
        assert urls and not any(ADMIN_TOKEN in url for url in urls)


async def sign_in(page: Any, token: str) -> None:
    await page.fill("#token", token)
    await page.click("#login button[type=submit]")


def usd_left(page: Any, tenant: str, limit: str) -> Any:
    return page.locator(f'#tenants [data-tenant="{tenant}"] [data-limit="{limit}"]')


async def test_a_wrong_token_shows_an_error_and_no_data(page: Any) -> None:
    await sign_in(page, "not-the-token")
    error = page.locator("#error")
    await error.wait_for(state="visible")
    assert "token was refused" in await error.inner_text()
    assert await page.locator("#data").is_hidden()
    assert await page.locator("#tenants article").count() == 0
    assert await page.evaluate("sessionStorage.length") == 0
    assert await page.locator("#login").is_visible()


async def test_sign_in_see_the_budget_change_after_a_request_and_download_the_csv(
    page: Any, gateway: Running, tmp_path: Path
) -> None:
    await sign_in(page, ADMIN_TOKEN)
    budget = usd_left(page, "team", "usd_per_day")
    await budget.wait_for()
    assert (await budget.inner_text()).startswith("$50.00 left of $50.00")
    assert await page.locator("#activity td[data-decision=served]").inner_text() == "0"

    client = openai.AsyncOpenAI(base_url=gateway.v1, api_key=TENANT_KEY, max_retries=0)
    image = await client.images.generate(
        model="gpt-image-1.5", prompt="a lighthouse at dusk", size="1024x1024", quality="low"
    )
    assert image.usage is not None
    await client.close()

    await page.click("#refresh")
    # The locator is queried again until it holds: a refresh replaces the element, so a handle
    # taken before that refresh finished would never change (a race that failed once in CI).
    await expect(budget).not_to_have_text(re.compile(r"^\$50\.00 left"), timeout=20_000)
    left = await budget.inner_text()
    spent = 50 - float(left.split(" left", 1)[0].lstrip("$"))
    assert 0 < spent < 1
    assert "used $" in left and "resets in" in left
    assert await page.locator("#activity td[data-decision=served]").inner_text() == "1"
    spend_row = page.locator('#spend tr[data-tenant="team"][data-model="gpt-image-1.5"] td')
    _, _, today_usd, month_usd, images = await spend_row.all_inner_texts()
    assert today_usd == month_usd and abs(float(today_usd.lstrip("$")) - spent) < 0.0001
    assert images == "1"
    assert await page.locator("#daily-chart svg rect").count() == 30

    # The token is kept for the tab's session: a reload shows the data without asking again.
    assert await page.evaluate("Object.keys(sessionStorage)") == ["gateway-admin-token"]
    await page.reload()
    await budget.wait_for()
    assert await page.locator("#login").is_hidden(), await page.locator("#error").inner_text()

    async with page.expect_download() as download_info:
        await page.click("#csv")
    download = await download_info.value
    today = datetime.now(UTC).date()
    assert download.suggested_filename.endswith(f"-{today}.csv")
    saved = tmp_path / "usage.csv"
    await download.save_as(saved)
    rows = list(csv.DictReader(io.StringIO(saved.read_text())))
    assert [(r["tenant"], r["model"], r["day"]) for r in rows] == [
        ("team", "gpt-image-1.5", today.isoformat())
    ]
    assert abs(float(rows[0]["usd"]) - spent) < 0.0001

    await page.click("#signout")
    assert await page.locator("#login").is_visible()
    assert await page.evaluate("sessionStorage.length") == 0
