"""In Chromium, from PostgreSQL to the page: `useSSE` (and `MessageStream`) show an edit and a
recall of a message in place, live and after a reconnect that resumed across them.

The broker under test serves a database of its own whose feeds file declares the messages
feed's updates and deletes; rows are written, edited and deleted with plain SQL, as an
application would. The React fixture is tests/browser/react.html (test_browser.py says more).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from playwright.async_api import BrowserContext, expect

from tests.support.browser import (
    FIXTURES,
    TIMEOUT_MS,
    app_origin,
    browser,
    context,
    missing,
    shown_ids,
    wait_for_streams,
)
from tests.support.database import Database
from tests.support.feeds import Scratch, chat_database
from tests.support.processes import BrokerProcess

__all__ = ["app_origin", "browser", "context"]  # fixtures, imported for pytest

expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture
def chat(database: Database, tmp_path: Path) -> Iterator[tuple[Scratch, Path]]:
    """A database of its own with the messages feed's changes captured, and the feeds file."""
    with chat_database(database, tmp_path) as chat:
        yield chat


async def sql(scratch: Scratch, statement: str, *params: object) -> str:
    """Run one statement off the event loop; the id it returns, if any."""
    rows = await asyncio.to_thread(scratch.query, statement, params)
    return str(rows[0][0]) if rows else ""


async def test_use_sse_shows_an_edit_and_a_recall_in_place(
    context: BrowserContext,
    start_broker: Callable[..., BrokerProcess],
    chat: tuple[Scratch, Path],
    app_origin: str,
) -> None:
    if not (FIXTURES / "node_modules" / "react" / "umd").is_dir():
        missing("React is not installed in tests/browser (make test installs it; needs npm)")
    scratch, config = chat
    broker = start_broker(
        DATABASE_URL=scratch.url, BROKER_CONFIG=str(config), BROKER_CORS_ORIGINS=app_origin
    )
    page = await context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    await page.goto(
        f"{app_origin}/react.html?{urlencode({'baseUrl': broker.base_url, 'sessionId': 'chat'})}"
    )
    hook, component = page.locator("#hook-messages li"), page.locator("section.pgsse-stream")
    await expect(page.locator("#connected")).to_have_text("true")
    await wait_for_streams(broker, 1)

    insert = "INSERT INTO messages (session_id, content) VALUES ('chat', %s) RETURNING id"
    ids = [await sql(scratch, insert, text) for text in ("first", "secnd", "third")]
    await expect(hook).to_have_text(["first", "secnd", "third"])

    # An edit replaces the message where it stands; a recall removes it.
    await sql(scratch, "UPDATE messages SET content = 'second' WHERE id = %s", int(ids[1]))
    await expect(hook).to_have_text(["first", "second", "third"])
    await expect(component.locator(f"li[data-id='{ids[1]}']")).to_contain_text("second")
    await sql(scratch, "DELETE FROM messages WHERE id = %s", int(ids[0]))
    await expect(hook).to_have_text(["second", "third"])
    await expect(component.locator("li.pgsse-message")).to_have_count(2)
    assert await shown_ids(page, "#hook-messages li") == ids[1:]

    # Away across an edit, a recall and a new message: the reconnect resumes with all three.
    await page.click("#disconnect")
    await expect(page.locator("#connected")).to_have_text("false")
    await sql(scratch, "UPDATE messages SET content = 'third, edited' WHERE id = %s", int(ids[2]))
    await sql(scratch, "DELETE FROM messages WHERE id = %s", int(ids[1]))
    fourth = await sql(scratch, insert, "fourth")
    await page.click("#connect")
    await expect(page.locator("#connected")).to_have_text("true")
    await expect(hook).to_have_text(["third, edited", "fourth"])
    assert await shown_ids(page, "#hook-messages li") == [ids[2], fourth]
    assert await page.evaluate("window.received") == [*ids, fourth]  # each message once
    assert console_errors == []
