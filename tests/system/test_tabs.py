"""One connection per browser, in Chromium: the tabs of an origin share one stream.

Every page is tests/browser/tabs.html on a frontend origin of its own (`app_origin`), its
stream cross-origin to a real broker on HTTP/1.1, where Chromium opens at most 6 connections
per host. The client elects a leader tab with Web Locks and fans events out over a
BroadcastChannel (client/src/shared.js); these tests read what each tab received
(`window.tab`) and what the broker holds (its stats).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pytest
from playwright.async_api import BrowserContext, Page, expect

from tests.support.browser import TIMEOUT_MS, app_origin, browser, context, insert, wait_for_streams
from tests.support.database import Database
from tests.support.processes import BrokerProcess
from tests.support.security import mint, new_secret

__all__ = ["app_origin", "browser", "context"]  # fixtures, imported for pytest

expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture
def broker(start_broker: Callable[..., BrokerProcess], app_origin: str) -> BrokerProcess:
    """A broker that lets the tabs' origin read its streams."""
    return start_broker(BROKER_CORS_ORIGINS=app_origin)


async def open_tab(
    context: BrowserContext, app_origin: str, broker: BrokerProcess, *sessions: str, **params: str
) -> Page:
    """A tab of tabs.html on `sessions`, once all its clients are connected."""
    page = await context.new_page()
    query = urlencode([("baseUrl", broker.base_url), *(("sessionId", s) for s in sessions)])
    await page.goto(f"{app_origin}/tabs.html?{query}&{urlencode(params)}")
    await expect(page.locator("#status")).to_have_text("connected")
    return page


async def received(page: Page) -> list[str]:
    ids: list[str] = await page.evaluate("window.tab.received")
    return ids


async def until_received(page: Page, ids: list[str], timeout_ms: float = TIMEOUT_MS) -> None:
    """Until `page` has received every id of `ids` (as a set: order is checked by callers)."""
    await page.wait_for_function(
        "ids => ids.every((id) => window.tab.received.includes(id))", arg=ids, timeout=timeout_ms
    )


async def test_eight_tabs_get_every_row_over_one_stream(
    context: BrowserContext,
    broker: BrokerProcess,
    database: Database,
    session_id: str,
    app_origin: str,
) -> None:
    # Tabs 7 and 8 would wait forever for a connection with one stream each (HTTP/1.1).
    pages = [await open_tab(context, app_origin, broker, session_id) for _ in range(8)]
    await wait_for_streams(broker, 1)
    rows = [await insert(database, session_id, f"row {n}") for n in range(20)]
    for page in pages:
        await until_received(page, rows)
        assert await received(page) == rows  # each once, in order
    stats = broker.stats()
    assert stats["totalConnections"] == 1
    assert stats["channels"] == {f"session_messages:{session_id}": 1}
    print(f"\n8 tabs: the broker held {stats['totalConnections']} stream")


async def test_closing_the_leader_hands_over_with_every_row_once_in_every_tab(
    context: BrowserContext,
    broker: BrokerProcess,
    database: Database,
    session_id: str,
    app_origin: str,
) -> None:
    # The first tab asks for the lock first: it leads.
    leader = await open_tab(context, app_origin, broker, session_id)
    others = [await open_tab(context, app_origin, broker, session_id) for _ in range(3)]
    await wait_for_streams(broker, 1)
    rows: list[str] = []
    a_third_written = asyncio.Event()

    async def write() -> None:
        for n in range(60):
            rows.append(await insert(database, session_id, f"row {n}"))
            if n == 20:
                a_third_written.set()
            await asyncio.sleep(0.02)  # a writer's pace, spanning the handover

    writer = asyncio.create_task(write())
    await asyncio.wait_for(a_third_written.wait(), 10)
    await leader.close()
    await writer
    for page in others:
        await until_received(page, rows)
        got = await received(page)
        assert sorted(got, key=int) == rows and len(got) == len(rows)  # every row, once
    await wait_for_streams(broker, 1)


async def test_one_tab_of_three_sessions_holds_one_stream_and_gets_each_row_once(
    context: BrowserContext,
    broker: BrokerProcess,
    database: Database,
    session_id: str,
    app_origin: str,
) -> None:
    sessions = [f"{session_id}-{n}" for n in range(3)]
    page = await open_tab(context, app_origin, broker, *sessions, clients="split")
    await wait_for_streams(broker, 1)
    assert broker.stats()["channels"] == {f"session_messages:{s}": 1 for s in sessions}
    await insert(database, session_id + "-elsewhere", "for nobody here")
    rows = [await insert(database, s, f"for {s}") for s in sessions]
    await until_received(page, rows)
    assert await received(page) == rows


async def test_after_ten_seconds_offline_the_tab_catches_up_within_a_second(
    context: BrowserContext,
    broker: BrokerProcess,
    database: Database,
    session_id: str,
    app_origin: str,
) -> None:
    page = await open_tab(context, app_origin, broker, session_id)
    before = await insert(database, session_id, "before")
    await until_received(page, [before])

    # The network goes; the open stream goes with it (Chromium's offline mode only refuses new
    # requests, so the broker restarts meanwhile to cut it). The retries fail and back off
    # (the defaults: 0.5 s, then 3 s doubling) until the network is back.
    await context.set_offline(True)
    gone = time.perf_counter()
    await asyncio.to_thread(broker.stop)
    await expect(page.locator("#status")).not_to_have_text("connected")
    await asyncio.to_thread(broker.start)
    during = [await insert(database, session_id, f"while offline {n}") for n in range(5)]
    await asyncio.sleep(10 - (time.perf_counter() - gone))  # the outage lasts ten seconds
    await context.set_offline(False)
    back = time.perf_counter()
    await until_received(page, during, timeout_ms=5000)
    caught_up = time.perf_counter() - back
    assert await received(page) == [before, *during]
    print(f"\ncaught up {caught_up * 1e3:.0f} ms after a 10 s outage")
    assert caught_up < 1.0


async def test_a_token_expiring_mid_stream_is_renewed_with_no_gap_and_no_duplicate(
    context: BrowserContext,
    start_broker: Callable[..., BrokerProcess],
    database: Database,
    session_id: str,
    app_origin: str,
) -> None:
    secret = new_secret()
    broker = start_broker(BROKER_CORS_ORIGINS=app_origin, BROKER_AUTH_SECRET=secret)
    page = await context.new_page()

    async def token() -> Any:
        await asyncio.sleep(0.05)  # an app backend's round trip
        return mint(secret, [session_id], ttl=1)  # the broker allows 5 s of clock skew more

    await page.expose_function("mintToken", token)
    query = urlencode({"baseUrl": broker.base_url, "sessionId": session_id, "token": "mint"})
    await page.goto(f"{app_origin}/tabs.html?{query}")
    await expect(page.locator("#status")).to_have_text("connected")
    rows: list[str] = []
    while await page.evaluate("window.tab.tokens") < 2:  # the first token expired
        rows.append(await insert(database, session_id, f"row {len(rows)}"))
        await asyncio.sleep(0.1)
    rows += [await insert(database, session_id, f"row {len(rows) + n}") for n in range(3)]
    await until_received(page, rows)
    assert await received(page) == rows
    errors = await page.evaluate("window.tab.errors")
    assert any(error.startswith("token expired") for error in errors), errors


async def test_tabs_without_web_locks_or_sharing_hold_a_stream_each(
    context: BrowserContext,
    broker: BrokerProcess,
    database: Database,
    session_id: str,
    app_origin: str,
) -> None:
    opted_out = [await open_tab(context, app_origin, broker, session_id, shared="false")]
    opted_out.append(await open_tab(context, app_origin, broker, session_id, shared="false"))
    await wait_for_streams(broker, 2)
    # A browser without the Web Locks API: every tab falls back to a stream of its own.
    await context.add_init_script(
        "Object.defineProperty(Navigator.prototype, 'locks', { get: () => undefined })"
    )
    fallback = [await open_tab(context, app_origin, broker, session_id) for _ in range(2)]
    await wait_for_streams(broker, 4)
    row = await insert(database, session_id, "for every tab")
    for page in opted_out + fallback:
        await until_received(page, [row])
        assert await received(page) == [row]
        assert await page.evaluate("window.tab.clients[0].shared") is False


async def test_a_seventh_stream_on_http_1_1_is_reported_stalled_then_connects(
    context: BrowserContext, broker: BrokerProcess, session_id: str, app_origin: str
) -> None:
    tabs = [
        await open_tab(context, app_origin, broker, session_id, shared="false") for _ in range(6)
    ]
    seventh = await context.new_page()
    query = urlencode({"baseUrl": broker.base_url, "sessionId": session_id, "shared": "false"})
    await seventh.goto(f"{app_origin}/tabs.html?{query}")
    # Chromium holds the 7th connection to the host back: no answer, no error.
    await expect(seventh.locator("#status")).to_have_text("stalled", timeout=8000)
    hint = await seventh.evaluate("window.tab.clients[0].error.message")
    assert "6 connections per host" in hint and "shared: true" in hint
    assert broker.stats()["totalConnections"] == 6
    await tabs[0].close()  # frees a connection: the held request goes out
    await expect(seventh.locator("#status")).to_have_text("connected")
