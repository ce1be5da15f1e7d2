"""In Chromium: the demo page's feed picker (`GET /api/feeds`), on a broker with the orders
feeds file. The messages view itself: tests/system/test_browser.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.async_api import BrowserContext, expect

from tests.support.browser import TIMEOUT_MS, browser, context
from tests.support.database import Database
from tests.support.feeds import Scratch, orders_shop
from tests.support.processes import BrokerProcess

__all__ = ["browser", "context"]  # fixtures, imported for pytest

StartBroker = Callable[..., BrokerProcess]

expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture
def shop(database: Database, tmp_path: Path) -> Iterator[tuple[Scratch, Path]]:
    with orders_shop(database, tmp_path) as made:
        yield made


async def test_the_picker_shows_only_where_there_are_other_feeds(
    context: BrowserContext, start_broker: StartBroker, shop: tuple[Scratch, Path]
) -> None:
    plain = start_broker()
    page = await context.new_page()
    await page.goto(plain.base_url + "/")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#feed-field")).to_be_hidden()  # messages alone: no picker
    await expect(page.locator("#session")).to_be_visible()

    scratch, config = shop
    broker = start_broker(DATABASE_URL=scratch.url, BROKER_CONFIG=str(config))
    await page.goto(broker.base_url + "/")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#feed option")).to_have_text(["messages", "orders"])
    await expect(page.locator("#feed")).to_have_value("messages")
    await expect(page.locator("#send")).to_be_visible()

    await page.select_option("#feed", "orders")
    filters = page.locator("#feed-filters input")
    await expect(filters).to_have_count(3)
    names = await filters.evaluate_all("inputs => inputs.map(input => input.name)")
    assert names == ["customer_id", "status", "region"]
    for hidden in ("#session", "#robot", "#messages-view", "#send"):
        await expect(page.locator(hidden)).to_be_hidden()
    await expect(page.locator("#changes-view")).to_be_visible()
    assert parse_qs(urlsplit(page.url).query) == {"feed": ["orders"]}
    unlabelled = await page.evaluate(
        """() => [...document.querySelectorAll('input, textarea, select')]
            .filter(control => control.labels.length === 0).map(control => control.id)"""
    )
    assert unlabelled == []

    # Back to messages: the session field and the conversation again.
    await page.select_option("#feed", "messages")
    await expect(page.locator("#session")).to_be_visible()
    await expect(page.locator("#changes-view")).to_be_hidden()
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    assert "feed" not in parse_qs(urlsplit(page.url).query)


async def test_a_feed_in_the_url_the_broker_lacks_is_said_not_streamed(
    context: BrowserContext, start_broker: StartBroker
) -> None:
    broker = start_broker()
    page = await context.new_page()
    streams: list[str] = []
    page.on("request", lambda r: streams.append(r.url) if "/api/sse/" in r.url else None)
    await page.goto(broker.base_url + "/?feed=invoices")
    await expect(page.locator("#status")).to_have_attribute("data-state", "failed")
    await expect(page.locator("#error")).to_have_text(
        "No feed invoices on this broker: pick one and Connect."
    )
    assert streams == []
