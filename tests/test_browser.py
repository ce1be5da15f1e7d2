"""In Chromium: the JS client, the demo page at `GET /` and the React hook, on real brokers.

Playwright drives Debian's Chromium (`/usr/bin/chromium`; browsers are never downloaded).
Without it these tests skip, unless `CI` is set: CI installs Chromium, so there they must run.
The async API is used because the tests share pytest-asyncio's running loop.

The demo page is served by the broker under test. The React fixture (tests/browser/react.html,
React from the npm-installed UMD builds) is served by a static server of the test's own, on
another origin, so its streams are cross-origin, as for a frontend on another port.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import posixpath
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from playwright.async_api import (
    Browser,
    BrowserContext,
    Locator,
    Page,
    async_playwright,
    expect,
)

from tests.conftest import Database
from tests.support.processes import BrokerProcess
from tests.support.sse import SSEClient

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "broker" / "static"
FIXTURES = ROOT / "tests" / "browser"
SCREENSHOT = ROOT / "docs" / "screenshot.png"
TIMEOUT_MS = 10_000

if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(
        f"Chromium is not installed at {CHROMIUM} (apt-get install chromium); CI runs these",
        allow_module_level=True,
    )

expect.set_options(timeout=TIMEOUT_MS)

# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def context(browser: Browser) -> AsyncIterator[BrowserContext]:
    """A fresh browser profile; an uncaught exception in any of its pages fails the test."""
    context = await browser.new_context(
        viewport={"width": 860, "height": 900}, locale="en-GB", timezone_id="UTC"
    )
    context.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    context.on("weberror", lambda error: errors.append(str(error.error)))
    yield context
    await context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


async def insert(database: Database, session_id: str, content: str, **columns: Any) -> str:
    """INSERT a row with plain SQL off the event loop; its id as the page shows it."""
    return str(await asyncio.to_thread(database.insert, session_id, content, **columns))


async def wait_for_streams(broker: BrokerProcess, count: int) -> None:
    """Until the broker counts `count` open streams (its stats), at most 10 s."""
    await asyncio.to_thread(
        broker.wait_until,
        lambda: broker.stats()["totalConnections"] == count,
        10,
        f"{count} open streams",
    )


def demo_url(broker: BrokerProcess, session_id: str, **params: Any) -> str:
    return f"{broker.base_url}/?{urlencode({'sessionId': session_id, **params})}"


async def open_demo(
    context: BrowserContext, broker: BrokerProcess, session_id: str, **params: Any
) -> Page:
    """The demo page on `session_id`, once its stream is connected."""
    page = await context.new_page()
    await page.goto(demo_url(broker, session_id, **params))
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    return page


def item(page: Page, message_id: str) -> Locator:
    return page.locator(f"#messages li[data-id='{message_id}']")


async def shown_ids(page: Page, selector: str = "#messages li") -> list[str]:
    ids: list[str] = await page.locator(selector).evaluate_all(
        "items => items.map(item => item.dataset.id)"
    )
    return ids


def stream_requests(page: Page) -> list[str]:
    """The URLs of the SSE requests `page` makes from now on."""
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url) if "/api/sse/messages" in r.url else None)
    return urls


class AppFiles(http.server.SimpleHTTPRequestHandler):
    """A frontend on its own origin: `/static/...` from broker/static, the rest from
    tests/browser (react.html, node_modules); `/` is an empty page."""

    def translate_path(self, path: str) -> str:
        path = posixpath.normpath(urlsplit(path).path)
        if path.startswith("/static/"):
            root, relative = STATIC, path.removeprefix("/static/")
        else:
            root, relative = FIXTURES, path.lstrip("/")
        file = (root / relative).resolve()
        return str(file) if file.is_relative_to(root) else str(root / "missing")

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/":
            body = b"<!doctype html><title>app</title>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def app_origin() -> Iterator[str]:
    """The origin of a real static server for the React fixture. A real server on 127.0.0.1,
    not `page.route`: Chromium lets only a page of the loopback address space open streams to
    the loopback broker (Local Network Access), as for a dev server on localhost:3000."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AppFiles)
    thread = threading.Thread(target=server.serve_forever, name="app-files", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# ---------------------------------------------------------------------------------------------
# Acceptance 1-5: the demo page served by the broker


async def test_sql_row_appears_within_a_second_on_its_session_only(
    context: BrowserContext,
    start_broker: Callable[..., BrokerProcess],
    database: Database,
    session_id: str,
) -> None:
    broker = start_broker()
    page = await open_demo(context, broker, session_id)

    other = await insert(database, session_id + "-b", "for session B")
    started = time.perf_counter()
    mine = await insert(database, session_id, "for session A", robot_id="r1", is_from_bot=True)
    await expect(item(page, mine)).to_be_visible(timeout=1000)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0

    # B's row was committed first, so had it been routed here it would be shown already.
    assert await shown_ids(page) == [mine]
    await expect(item(page, other)).to_have_count(0)
    shown = item(page, mine)
    await expect(shown.locator(".content")).to_have_text("for session A")
    await expect(shown).to_have_class(re.compile(r"\bbot\b"))
    await expect(shown.locator("time")).to_have_text(re.compile(r"^\d\d:\d\d:\d\d$"))
    print(f"\nSQL INSERT -> shown in Chromium: {elapsed * 1e3:.0f} ms")


async def test_message_sent_from_one_page_appears_once_in_both(
    context: BrowserContext,
    start_broker: Callable[..., BrokerProcess],
    database: Database,
    session_id: str,
) -> None:
    broker = start_broker()
    sender = await open_demo(context, broker, session_id)
    watcher = await open_demo(context, broker, session_id)

    async def send(content: str, as_bot: bool = False, intent: str = "") -> str:
        await sender.fill("#content", content)
        await sender.set_checked("#as-bot", as_bot)
        await sender.fill("#intent", intent)
        async with sender.expect_response(lambda r: r.url.endswith("/api/messages")) as info:
            await sender.click("#send-button")
        response = await info.value
        assert response.status == 201
        body = await response.json()
        assert body["success"] is True
        assert body["data"]["content"] == content
        assert body["data"]["isFromBot"] is as_bot and body["data"]["isHuman"] is not as_bot
        message_id: str = body["data"]["id"]
        return message_id

    first = await send("hello from the form, 你好")
    second = await send("and a bot answer", as_bot=True, intent="greet")
    await expect(sender.locator("#send-status")).to_have_text(f"Sent as message {second}.")
    await expect(sender.locator("#content")).to_have_value("")

    for page in (sender, watcher):
        await expect(item(page, second)).to_be_visible()
        assert await shown_ids(page) == [first, second]
        await expect(item(page, first)).to_have_class(re.compile(r"\bhuman\b"))
        await expect(item(page, second)).to_have_class(re.compile(r"\bbot\b"))
        await expect(item(page, second).locator(".intent")).to_have_text("greet")
    count = "SELECT count(*) FROM messages WHERE session_id = %s"
    rows = await asyncio.to_thread(database.query, count, (session_id,))
    assert rows[0][0] == 2


async def test_page_resumes_after_broker_restart_with_every_row_once_in_order(
    context: BrowserContext,
    start_broker: Callable[..., BrokerProcess],
    database: Database,
    session_id: str,
) -> None:
    broker = start_broker()
    page = await open_demo(
        context,
        broker,
        session_id,
        reconnectInterval=100,
        maxReconnectInterval=1000,
        maxReconnectAttempts=100,
    )
    before = await insert(database, session_id, "before the restart")
    await expect(item(page, before)).to_be_visible()

    await asyncio.to_thread(broker.stop)
    await expect(page.locator("#status")).not_to_have_attribute("data-state", "connected")
    await expect(page.locator("#reconnects")).not_to_have_text("0")
    during = [await insert(database, session_id, f"while down {n}") for n in range(5)]
    await asyncio.to_thread(broker.start)

    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#reconnects")).to_have_text("0")
    await expect(page.locator("#error")).to_be_hidden()
    await expect(page.locator("#messages li")).to_have_count(6)
    assert await shown_ids(page) == [before, *during]
    contents = await page.locator("#messages .content").all_text_contents()
    assert contents == ["before the restart", *(f"while down {n}" for n in range(5))]


async def test_client_retries_through_503_and_gives_up_when_attempts_run_out(
    context: BrowserContext,
    start_broker: Callable[..., BrokerProcess],
    database: Database,
    session_id: str,
) -> None:
    broker = start_broker(BROKER_MAX_CONNECTIONS="1")
    holder = await SSEClient.open(broker.port, params={"sessionId": session_id + "-holder"})
    assert holder.status == 200
    try:
        page = await context.new_page()
        attempts = stream_requests(page)
        await page.goto(
            demo_url(
                broker,
                session_id,
                reconnectInterval=100,
                maxReconnectInterval=400,
                maxReconnectAttempts=100,
            )
        )
        await page.wait_for_function(
            "() => Number(document.getElementById('reconnects').textContent) >= 3"
        )
        await expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")
    finally:
        await holder.close()

    # The slot is free: the next attempt gets it.
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#reconnects")).to_have_text("0")
    assert len(attempts) >= 4
    row = await insert(database, session_id, "through the cap")
    await expect(item(page, row)).to_be_visible()

    # Now `page` holds the only slot: a client allowed 2 retries tries 3 times, then stops.
    late = await context.new_page()
    late_attempts = stream_requests(late)
    await late.goto(
        demo_url(
            broker,
            session_id,
            reconnectInterval=50,
            maxReconnectInterval=100,
            maxReconnectAttempts=2,
        )
    )
    await expect(late.locator("#error")).to_have_text(
        "could not connect: gave up after 2 reconnect attempts"
    )
    await expect(late.locator("#status")).to_have_attribute("data-state", "failed")
    await expect(late.locator("#status")).to_have_text("Connection failed")
    await expect(late.locator("#error")).to_have_attribute("role", "alert")
    await expect(late.locator("#reconnects")).to_have_text("2")
    assert len(late_attempts) == 3
    assert await late.evaluate("window.pgsse.client.reconnecting") is False
    # No attempt follows: waiting well past the longest retry delay (100 ms) is the only way
    # to observe an absence.
    await late.wait_for_timeout(500)
    assert len(late_attempts) == 3
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")


async def test_demo_disconnect_connect_and_clear(
    context: BrowserContext,
    start_broker: Callable[..., BrokerProcess],
    database: Database,
    session_id: str,
) -> None:
    broker = start_broker()
    page = await open_demo(context, broker, session_id)
    first = await insert(database, session_id, "first")
    await expect(item(page, first)).to_be_visible()

    await page.click("#disconnect")
    await expect(page.locator("#status")).to_have_attribute("data-state", "idle")
    await wait_for_streams(broker, 0)
    missed = await insert(database, session_id, "sent while disconnected")
    await page.click("#connect")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(item(page, missed)).to_be_visible()
    assert await shown_ids(page) == [first, missed]
    await wait_for_streams(broker, 1)

    await page.click("#clear")
    await expect(page.locator("#messages li")).to_have_count(0)
    await expect(page.locator("#count")).to_have_text("0")
    after = await insert(database, session_id, "after the clear")
    await expect(item(page, after)).to_be_visible()
    assert await shown_ids(page) == [after]


async def test_demo_page_screenshot_accessible_and_phone_sized(
    context: BrowserContext,
    start_broker: Callable[..., BrokerProcess],
    database: Database,
) -> None:
    # A fixed session and fixed times make the same picture on every run, so the committed
    # docs/screenshot.png only changes when the page does. The session is still fresh: the
    # test cluster is new for every test session and no other test uses this id.
    session = "support-1042"
    broker = start_broker()
    page = await open_demo(context, broker, session)
    bot = {"robot_id": "support-bot", "is_from_bot": True, "is_human": False}
    conversation: list[tuple[str, dict[str, Any]]] = [
        ("Hi! Has my order #1042 shipped yet?", {}),
        (
            "It left the warehouse this morning and should arrive on Thursday.",
            {**bot, "intent": "order_status"},
        ),
        ("Great. Can I still change the delivery address?", {"intent": "change_address"}),
        (
            "Of course. Reply with the new address and I will update the courier.",
            {**bot, "intent": "change_address"},
        ),
        ("12 Rue de la Paix, Paris. Thanks, that was quick!", {}),
    ]
    # Latin text only: Debian's Chromium comes with no CJK or emoji font, and the screenshot
    # is made wherever the tests run.
    start = datetime(2026, 1, 5, 9, 41, 7, tzinfo=UTC)
    ids = [
        await insert(database, session, text, created_at=start + timedelta(seconds=23 * n), **cols)
        for n, (text, cols) in enumerate(conversation)
    ]
    await expect(page.locator("#messages li")).to_have_count(len(ids))
    assert await shown_ids(page) == ids
    await page.fill("#content", "One more question about the invoice…")
    await page.set_viewport_size({"width": 860, "height": 720})

    SCREENSHOT.parent.mkdir(exist_ok=True)
    await page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Bot and human messages look different; each shows its time.
    styles = await page.evaluate(
        """() => Object.fromEntries(['bot', 'human'].map(kind => {
            const style = getComputedStyle(document.querySelector('#messages li.' + kind));
            return [kind, [style.backgroundColor, style.alignSelf]];
        }))"""
    )
    assert styles["bot"][0] != styles["human"][0]
    assert styles["bot"][1] != styles["human"][1]
    await expect(page.locator("#messages time")).to_have_text([re.compile(r"\d\d:\d\d:\d\d")] * 5)
    # Accessible: every control is labelled, the list is a polite live region.
    unlabelled = await page.evaluate(
        """() => [...document.querySelectorAll('input, textarea, select')]
            .filter(control => control.labels.length === 0).map(control => control.id)"""
    )
    assert unlabelled == []
    await expect(page.locator("#messages")).to_have_attribute("aria-live", "polite")
    await expect(page.locator("#status")).to_have_attribute("role", "status")

    # A phone-sized viewport: nothing scrolls sideways, the send button stays reachable.
    await page.set_viewport_size({"width": 360, "height": 740})
    overflow = await page.evaluate(
        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow == 0
    box = await page.locator("#send-button").bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360


# ---------------------------------------------------------------------------------------------
# The client's own guarantees, with a scripted EventSource in place of the network


async def test_client_keeps_messages_unique_ordered_bounded_and_resumes_from_last_id(
    context: BrowserContext, app_origin: str
) -> None:
    page = await context.new_page()
    await page.goto(app_origin + "/")
    result = await page.evaluate(
        """async () => {
        const { createSSEClient } = await import('/static/sse-client.js');
        const sources = [];
        class ScriptedEventSource {
            constructor(url) { this.url = url; this.closed = false; sources.push(this); }
            close() { this.closed = true; }
        }
        const reported = [];
        let tokens = 0;
        const client = createSSEClient({
            baseUrl: 'http://broker.test/', sessionId: 's 1', robotId: 'r1', maxMessages: 3,
            token: () => `t${++tokens}`, reconnectInterval: 20, EventSource: ScriptedEventSource,
            onMessage: (m) => reported.push(m.id),
        });
        const send = (body, id = '') => sources.at(-1).onmessage(
            { data: JSON.stringify(body), lastEventId: id });
        const message = (id) => send({ type: 'message', data: { id: String(id) } }, String(id));
        const ids = () => client.messages.map(m => m.id);
        const until = async (condition) => {
            for (let i = 0; i < 200 && !condition(); i++) await new Promise(r => setTimeout(r, 10));
        };
        client.connect();
        send({ type: 'connected', sessionId: 's 1' });
        for (const id of [5, 3, 5, 4, 10, 9, 2]) message(id);
        const held = ids();
        const lastId = client.lastEventId;
        send({ type: 'error', error: 'slow consumer: reconnect to resume' });
        const afterError = { connected: client.connected, closed: sources[0].closed,
                             attempts: client.reconnectAttempts, error: client.error };
        await until(() => sources.length === 2);
        send({ type: 'connected' });
        const reconnected = { connected: client.connected, attempts: client.reconnectAttempts,
                              error: client.error };
        message(10);  // replayed again: not shown twice
        message(11);
        const afterReplay = ids();
        client.clearMessages();
        message(11);  // a row received before the clear does not come back
        const afterClear = ids();
        client.disconnect();
        client.connect();
        return { held, lastId, afterError, reconnected, afterReplay, afterClear, reported,
                 urls: sources.map(s => s.url), closed: sources.map(s => s.closed) };
    }"""
    )
    # Unique and in id order (10 after 9, though a shorter string), the oldest dropped beyond
    # maxMessages (3 and 4); 2, older than all of a full history, is reported but not kept.
    assert result["held"] == ["5", "9", "10"]
    assert result["reported"] == ["5", "3", "4", "10", "9", "2", "11"]
    # The resume point is the last id received (the broker's delivery order), not the largest.
    assert result["lastId"] == "2"
    assert result["afterError"] == {
        "connected": False,
        "closed": True,
        "attempts": 1,
        "error": "slow consumer: reconnect to resume: reconnecting (attempt 1 of 5)",
    }
    assert result["reconnected"] == {"connected": True, "attempts": 0, "error": None}
    assert result["afterReplay"] == ["9", "10", "11"]
    assert result["afterClear"] == []
    base = "http://broker.test/api/sse/messages?sessionId=s+1&robotId=r1"
    assert result["urls"] == [
        base + "&token=t1",
        base + "&lastEventId=2&token=t2",
        base + "&lastEventId=11&token=t3",
    ]
    assert result["closed"] == [True, True, False]


# ---------------------------------------------------------------------------------------------
# Acceptance 6: the React hook and component, React from tests/browser/node_modules


async def test_react_hook_and_component_stream_resume_and_clean_up(
    context: BrowserContext,
    start_broker: Callable[..., BrokerProcess],
    database: Database,
    session_id: str,
    app_origin: str,
) -> None:
    if not (FIXTURES / "node_modules" / "react" / "umd").is_dir():
        if os.environ.get("CI"):
            pytest.fail("React is not installed: run `npm install --prefix tests/browser`")
        pytest.skip("React is not installed: run `npm install --prefix tests/browser`")
    broker = start_broker(BROKER_CORS_ORIGINS=app_origin)
    page = await context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    query = urlencode({"baseUrl": broker.base_url, "sessionId": session_id})
    await page.goto(f"{app_origin}/react.html?{query}")
    component = page.locator("section.pgsse-stream")

    await expect(page.locator("#connected")).to_have_text("true")
    await expect(component.locator(".pgsse-status")).to_have_text("Connected")
    # StrictMode mounted each stream twice: still one stream for the hook, one for the component.
    await wait_for_streams(broker, 2)

    first = await insert(database, session_id, "first")
    second = await insert(database, session_id, "second", is_from_bot=True)
    await expect(page.locator("#hook-messages li")).to_have_text(["first", "second"])
    await expect(component.locator("li.pgsse-message")).to_have_count(2)
    await expect(component.locator(f"li[data-id='{second}']")).to_have_class(re.compile("bot"))

    # clearMessages empties the hook's list only.
    await page.click("#clear")
    await expect(page.locator("#hook-messages li")).to_have_count(0)

    # A manual disconnect/connect resumes from the last id: nothing lost, nothing repeated.
    await page.click("#disconnect")
    await expect(page.locator("#connected")).to_have_text("false")
    await wait_for_streams(broker, 1)
    missed = await insert(database, session_id, "sent while disconnected")
    await expect(component.locator(f"li[data-id='{missed}']")).to_be_visible()
    await page.click("#connect")
    await expect(page.locator("#connected")).to_have_text("true")
    await expect(page.locator("#attempts")).to_have_text("0")
    await expect(page.locator("#hook-messages li")).to_have_text(["sent while disconnected"])
    assert await shown_ids(page, "#hook-messages li") == [missed]
    assert await shown_ids(page, "section.pgsse-stream li") == [first, second, missed]
    assert await page.evaluate("window.received") == [first, second, missed]

    # Unmounting closes both streams.
    await page.click("#unmount")
    await wait_for_streams(broker, 0)
    assert console_errors == []
