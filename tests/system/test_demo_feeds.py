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
from tests.support.security import (
    mint,
    new_secret,
    no_secret_in_logs,  # noqa: F401 -- autouse: no token or secret in any broker log
)

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
    await page.set_viewport_size({"width": 360, "height": 740})  # a phone: nothing sideways
    overflow = await page.evaluate(
        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow == 0

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


async def test_the_page_lists_a_feeds_changes_as_they_arrive_and_resumes(
    context: BrowserContext, start_broker: StartBroker, shop: tuple[Scratch, Path]
) -> None:
    scratch, config = shop
    broker = start_broker(DATABASE_URL=scratch.url, BROKER_CONFIG=str(config))
    page = await context.new_page()
    streams: list[str] = []
    page.on("request", lambda r: streams.append(r.url) if "/api/sse/" in r.url else None)
    await page.goto(broker.base_url + "/?feed=orders&customer_id=42")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#filter-customer_id")).to_have_value("42")
    await expect(page.locator("#curl")).to_have_value(
        f"curl -N '{broker.base_url}/api/sse/orders?customer_id=42'"
    )
    assert parse_qs(urlsplit(streams[0]).query) == {"customer_id": ["42"], "history": ["50"]}

    scratch.execute("INSERT INTO shop.orders (customer_id, status) VALUES ('43', 'open')")
    scratch.execute("INSERT INTO shop.orders (customer_id, status, total) VALUES ('42', 'open', 5)")
    scratch.execute("UPDATE shop.orders SET status = 'paid' WHERE customer_id = '42'")
    scratch.execute("DELETE FROM shop.orders WHERE customer_id = '42'")
    changes = page.locator("#changes li")
    await expect(changes).to_have_count(3)
    kinds = await changes.evaluate_all("items => items.map(item => item.dataset.type)")
    assert kinds == ["insert", "update", "delete"]
    status = (
        changes.nth(1).locator("dt", has_text="status").locator("xpath=following-sibling::dd[1]")
    )
    await expect(status).to_have_text("open → paid")
    await expect(page.locator("#changes-count")).to_have_text("3")
    await expect(page.locator("#events li[data-type='update']")).to_have_count(1)

    # Disconnect, a change meanwhile, Connect: it resumes after the last change shown.
    await page.click("#disconnect")
    await expect(page.locator("#status")).to_have_attribute("data-state", "idle")
    last = await changes.nth(2).get_attribute("data-id")
    scratch.execute("INSERT INTO shop.orders (customer_id, status) VALUES ('42', 'new')")
    await page.click("#connect")
    await expect(changes).to_have_count(4)
    await expect(changes.nth(3)).to_have_attribute("data-type", "insert")
    assert parse_qs(urlsplit(streams[-1]).query) == {"customer_id": ["42"], "lastEventId": [last]}


async def test_with_auth_a_token_link_opens_its_feed_and_a_refusal_says_why(
    context: BrowserContext, start_broker: StartBroker, shop: tuple[Scratch, Path]
) -> None:
    """Auth on and no admin token: `/api/feeds` is hidden (404), so the page takes the feed
    and its columns from the URL; the broker's 403 reason is shown, not a silent failure."""
    scratch, config = shop
    secret = new_secret()
    broker = start_broker(
        DATABASE_URL=scratch.url, BROKER_CONFIG=str(config), BROKER_AUTH_SECRET=secret
    )
    token = mint(secret, [], feeds={"orders": ["42"]})
    page = await context.new_page()
    await page.goto(f"{broker.base_url}/?feed=orders&customer_id=42&token={token}")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#feed option")).to_have_text(["messages", "orders"])
    scratch.execute("INSERT INTO shop.orders (customer_id, status) VALUES ('42', 'open')")
    await expect(page.locator("#changes li[data-type='insert']")).to_have_count(1)

    await page.fill("#filter-customer_id", "43")
    await page.click("#connect")
    await expect(page.locator("#status")).to_have_attribute("data-state", "failed")
    await expect(page.locator("#error")).to_have_text(
        "HTTP 403: token does not allow this key of feed orders"
    )
