"""In Chromium: the demo page at `GET /`, the JS client and the React hook, on real brokers.

The demo page is served by the broker under test. The React fixture (tests/browser/react.html,
React from the npm-installed UMD builds) is served by a static server of the test's own, on
another origin, so its streams are cross-origin, as for a frontend on another port. The npm
package itself, packed and installed as an app gets it: tests/system/test_client_package.py. Last,
the browser's own EventSource through the shipped nginx configuration across a rolling restart.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from playwright.async_api import BrowserContext, Page, expect

from tests.support.browser import (
    FIXTURES,
    ROOT,
    TIMEOUT_MS,
    app_origin,
    browser,
    context,
    insert,
    item,
    missing,
    shown_ids,
    stream_requests,
    wait_for_streams,
)
from tests.support.database import Database
from tests.support.nginx import Nginx
from tests.support.processes import BrokerProcess
from tests.support.sse import SSEClient

__all__ = ["app_origin", "browser", "context"]  # fixtures, imported for pytest

SCREENSHOT = ROOT / "docs" / "screenshot.png"

expect.set_options(timeout=TIMEOUT_MS)


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
    # No maxReconnectAttempts: the page's default, Infinity, never gives up.
    page = await open_demo(
        context, broker, session_id, reconnectInterval=100, maxReconnectInterval=400
    )
    before = await insert(database, session_id, "before the restart")
    await expect(item(page, before)).to_be_visible()

    await asyncio.to_thread(broker.stop)
    await expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")
    await page.wait_for_function(
        "() => Number(document.getElementById('reconnects').textContent) >= 3"
    )
    await expect(page.locator("#error")).to_have_text(
        re.compile(r"^could not connect: reconnecting \(attempt \d+\)$")
    )
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
    # The raw events carry the times and the port of this run: left out of the picture.
    await page.locator(".raw").evaluate("section => { section.hidden = true; }")

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


async def test_demo_opens_on_the_readme_session_asking_for_recent_history(
    context: BrowserContext, start_broker: Callable[..., BrokerProcess]
) -> None:
    broker = start_broker()
    page = await context.new_page()
    requests = stream_requests(page)
    await page.goto(broker.base_url + "/")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    # The README publishes to session 123; a bare URL opens on it, and says so in the URL.
    await expect(page.locator("#session")).to_have_value("123")
    assert parse_qs(urlsplit(page.url).query) == {"sessionId": ["123"]}
    assert len(requests) == 1
    assert parse_qs(urlsplit(requests[0]).query) == {"sessionId": ["123"], "history": ["50"]}


async def test_demo_opens_with_the_last_50_messages_then_live_ones(
    context: BrowserContext,
    start_broker: Callable[..., BrokerProcess],
    database: Database,
    session_id: str,
) -> None:
    broker = start_broker()
    stored = [await insert(database, session_id, f"stored {n}") for n in range(55)]
    await insert(database, session_id + "-other", "another session's row")

    page = await open_demo(context, broker, session_id)
    # The last 50, oldest first, and no "No messages yet" over a session that has rows.
    await expect(page.locator("#messages li")).to_have_count(50)
    assert await shown_ids(page) == stored[5:]
    await expect(page.locator("#count")).to_have_text("50")
    await expect(page.locator("#empty")).to_be_hidden()
    live = await insert(database, session_id, "live")
    await expect(item(page, live)).to_be_visible()
    assert await shown_ids(page) == [*stored[5:], live]


# ---------------------------------------------------------------------------------------------
# The client's own guarantees, with a scripted EventSource in place of the network


# The page's `setTimeout` is replaced by one that records the delay asked for and runs the
# reconnect at once (as a microtask): thousands of attempts take milliseconds.
SCRIPTED = """
    const { createSSEClient: create } = await import('/static/sse-client.js');
    // A stream of its own (no tab sharing), and no stall timer among the delays recorded.
    const createSSEClient = (options) => create({ shared: false, stallTimeout: 0, ...options });
    const sources = [];
    class ScriptedEventSource {
        constructor(url) { this.url = url; this.closed = false; sources.push(this); }
        close() { this.closed = true; }
    }
    const delays = [];
    const realSetTimeout = window.setTimeout;
    window.setTimeout = (run, ms) => { delays.push(ms); queueMicrotask(run); return 1; };
    const settle = () => new Promise((resolve) => realSetTimeout(resolve, 0));
    const fail = async () => { sources.at(-1).onerror(); await settle(); };
    const send = (body, id = '') =>
        sources.at(-1).onmessage({ data: JSON.stringify(body), lastEventId: id });
"""


async def run_scripted(context: BrowserContext, app_origin: str, body: str) -> Any:
    """What `body`, run in a page after SCRIPTED's set-up, returns."""
    page = await context.new_page()
    await page.goto(app_origin + "/")
    return await page.evaluate("async () => {" + SCRIPTED + body + "}")


async def test_client_keeps_messages_unique_ordered_bounded_and_resumes_from_last_id(
    context: BrowserContext, app_origin: str
) -> None:
    result = await run_scripted(
        context,
        app_origin,
        """
        const reported = [];
        let tokens = 0;
        const client = createSSEClient({
            baseUrl: 'http://broker.test/', sessionId: 's 1', robotId: 'r1', maxMessages: 3,
            token: () => `t${++tokens}`, reconnectInterval: 20, EventSource: ScriptedEventSource,
            onMessage: (m) => reported.push(m.id),
        });
        const message = (id) => send({ type: 'message', data: { id: String(id) } }, String(id));
        const ids = () => client.messages.map(m => m.id);
        client.connect();
        send({ type: 'connected', sessionId: 's 1' });
        for (const id of [5, 3, 5, 4, 10, 9, 2]) message(id);
        const held = ids();
        const lastId = client.lastEventId;
        send({ type: 'error', error: 'slow consumer: reconnect to resume' });
        const afterError = { connected: client.connected, closed: sources[0].closed,
                             attempts: client.reconnectAttempts,
                             error: client.error && client.error.message };
        await settle();
        send({ type: 'connected' });
        const reconnected = { connected: client.connected, attempts: client.reconnectAttempts,
                              error: client.error };  // null
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
        """,
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
        "error": "slow consumer: reconnect to resume: reconnecting (attempt 1)",
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


async def test_client_with_infinite_attempts_never_gives_up_backing_off_capped_with_jitter(
    context: BrowserContext, app_origin: str
) -> None:
    result = await run_scripted(
        context,
        app_origin,
        """
        const run = async (options, failures) => {
            delays.length = 0;
            const client = createSSEClient({ EventSource: ScriptedEventSource, ...options });
            client.connect();
            const opened = sources.length;
            // Past attempt 1025, where 2 ** attempt is Infinity and 0 * Infinity is NaN.
            for (let n = 0; n < failures; n++) {
                sources.at(-1).onerror();
                await null;  // the reconnect, queued as a microtask, opens the next stream
            }
            await settle();
            const state = { status: client.status, error: client.error.message,
                            attempts: client.reconnectAttempts, streams: sources.length - opened,
                            delays: delays.map(String) };
            client.disconnect();
            return state;
        };
        return {
            default: await run({ reconnectInterval: 100, maxReconnectInterval: 1000 }, 1100),
            explicit: await run({ reconnectInterval: 0, maxReconnectAttempts: Infinity }, 1100),
        };
        """,
    )
    for state in result.values():
        assert state["status"] == "reconnecting"
        assert state["attempts"] == 1100
        assert state["streams"] == 1100
        assert state["error"] == "could not connect: reconnecting (attempt 1100)"
    delays = [float(delay) for delay in result["default"]["delays"]]
    assert len(delays) == 1100
    # Attempt n waits a random time in [d/2, d]: d = 500 ms at most for the first, then
    # 100 ms doubling, capped at 1000 ms.
    assert 50 <= delays[0] <= 100 and 50 <= delays[1] <= 100 and 100 <= delays[2] <= 200
    assert all(500 <= delay <= 1000 for delay in delays[5:])
    assert len(set(delays)) > 1000  # jittered: no two clients come back in step
    assert result["explicit"]["delays"] == ["0"] * 1100  # never NaN


async def test_client_asks_for_history_only_when_it_has_no_resume_point(
    context: BrowserContext, app_origin: str
) -> None:
    urls = await run_scripted(
        context,
        app_origin,
        """
        const client = createSSEClient({ sessionId: 's', history: 50, reconnectInterval: 0,
                                         EventSource: ScriptedEventSource });
        client.connect();
        await fail();  // nothing received yet: history again
        send({ type: 'connected' });
        send({ type: 'message', data: { id: '7' } }, '7');
        await fail();  // from now on, resume after the last row received
        client.disconnect();
        client.connect();
        createSSEClient({ sessionId: 's', history: 5, lastEventId: '9',
                          EventSource: ScriptedEventSource }).connect();
        return sources.map((source) => source.url);
        """,
    )
    base = "/api/sse/messages?sessionId=s"
    assert urls == [
        base + "&history=50",
        base + "&history=50",
        base + "&lastEventId=7",
        base + "&lastEventId=7",
        base + "&lastEventId=9",
    ]


async def test_client_refuses_bad_options_naming_them(
    context: BrowserContext, app_origin: str
) -> None:
    outcomes = await run_scripted(
        context,
        app_origin,
        """
        const cases = [
            { maxReconnectAttempts: Infinity }, { maxMessages: Infinity }, { history: 1000 },
            { maxReconnectAttempts: -1 }, { maxReconnectAttempts: '5' },
            { reconnectInterval: NaN }, { maxReconnectInterval: Infinity },
            { maxMessages: 1.5 }, { history: 0 }, { history: 1001 }, { history: '50' },
        ];
        return cases.map((options) => {
            try {
                createSSEClient(options);
                return 'ok';
            } catch (error) {
                return `${error.name}: ${error.message}`;
            }
        });
        """,
    )
    attempts = "maxReconnectAttempts must be an integer >= 0 or Infinity"
    history = "history must be an integer from 1 to 1000, or null"
    assert outcomes == ["ok", "ok", "ok"] + [
        f"TypeError: pgsse-client: {message}"
        for message in [
            f"{attempts}, not -1",
            f'{attempts}, not "5"',
            "reconnectInterval must be a number of ms >= 0, not NaN",
            "maxReconnectInterval must be a number of ms >= 0, not Infinity",
            "maxMessages must be an integer >= 0 or Infinity, not 1.5",
            f"{history}, not 0",
            f"{history}, not 1001",
            f'{history}, not "50"',
        ]
    ]


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
        missing("React is not installed in tests/browser (make test installs it; needs npm)")
    broker = start_broker(BROKER_CORS_ORIGINS=app_origin)
    page = await context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    query = urlencode({"baseUrl": broker.base_url, "sessionId": session_id})
    await page.goto(f"{app_origin}/react.html?{query}")
    component = page.locator("section.pgsse-stream")

    await expect(page.locator("#connected")).to_have_text("true")
    await expect(component.locator(".pgsse-status")).to_have_text("Connected")
    # StrictMode mounted each twice, and the hook and the component share the tab's stream.
    await wait_for_streams(broker, 1)

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


# ---------------------------------------------------------------------------------------------
# Behind the shipped nginx configuration


STREAMS = 5
NATIVE_STREAMS = """([url, count]) => {
    // Plain EventSources, no client library: what a page that uses the browser's own gets.
    window.native = Array.from({length: count}, () => {
        const state = {ids: [], opens: 0, connected: 0, errors: 0, closed: false};
        const source = new EventSource(url);
        source.onopen = () => { state.opens += 1; };
        source.onerror = () => {
            state.errors += 1;
            if (source.readyState === EventSource.CLOSED) state.closed = true;  // gave up
        };
        source.onmessage = (event) => {
            const type = JSON.parse(event.data).type;
            if (type === "message") state.ids.push(Number(event.lastEventId));
            if (type === "connected") state.connected += 1;
        };
        return state;
    });
}"""


async def test_rolling_restart_behind_nginx_keeps_every_native_event_source(
    context: BrowserContext,
    start_broker: Callable[..., BrokerProcess],
    database: Database,
    session_id: str,
) -> None:
    """docs/deployment.md's rolling restart (one instance, ready again, then the next) behind
    deploy/nginx, with the browser's own `EventSource`, which never reconnects after an HTTP
    error such as nginx's `502 no live upstreams`. With `max_fails=1 fail_timeout=5s` the
    first instance was still marked failed when the second went down, and the streams that
    reconnected then got the 502 and stopped for good; none may, and none may lose a row."""
    brokers = [start_broker(BROKER_RETRY_MS="300") for _ in range(2)]
    nginx = Nginx.render([broker.port for broker in brokers]).start()
    try:
        page = await context.new_page()
        await page.goto(f"http://127.0.0.1:{nginx.port}/healthz")  # the pool's origin
        url = f"/api/sse/messages?{urlencode({'sessionId': session_id})}"
        # 5: over HTTP/1.1 Chromium opens at most 6 connections to an origin.
        await page.evaluate(NATIVE_STREAMS, [url, STREAMS])
        await page.wait_for_function("window.native.every(s => s.connected === 1)")
        expected = [await insert(database, session_id, "before")]
        # Every stream has a last id before the first restart, to resume from.
        await page.wait_for_function(
            "first => window.native.every(s => s.ids[0] === first)", arg=int(expected[0])
        )

        for restarts, broker in enumerate(brokers * 2, 1):  # twice round: restarts close together
            broker.stop()  # SIGTERM: its streams get `error` and reconnect through nginx
            expected.append(await insert(database, session_id, f"while {broker.port} is down"))
            await asyncio.to_thread(broker.start)  # returns once /readyz answers 200
            expected.append(await insert(database, session_id, f"after restart {restarts}"))
        expected.append(await insert(database, session_id, "end"))

        wanted = [int(row) for row in expected]
        await page.wait_for_function(
            "([n, last]) => window.native.every(s => s.closed || s.ids.at(-1) === last)",
            arg=[len(wanted), wanted[-1]],
            timeout=30_000,
        )
        streams = await page.evaluate("window.native")
        access = (nginx.run_dir / "access.log").read_text()
    finally:
        nginx.stop()
        nginx.remove()
    assert [s["closed"] for s in streams] == [False] * STREAMS, "an EventSource gave up"
    # The status nginx answered each request with (the field after the request line); not a
    # byte count that happens to be 502, nor an upstream it tried first (`upstream_status`).
    statuses = re.findall(r'(?m)^\S+ \[[^]]+\] "[^"]*" (\d{3}) ', access)
    assert statuses and "502" not in statuses, access
    for state in streams:
        assert state["ids"] == wanted
    reconnects = sum(state["opens"] for state in streams) - STREAMS
    assert reconnects >= STREAMS  # each was on an instance that restarted at least once
    print(f"\nrolling restart of 2 instances, twice round: {reconnects} reconnects, no 502")


async def test_demo_watches_all_sessions_with_ids_raw_events_and_the_curl_line(
    context: BrowserContext,
    start_broker: Callable[..., BrokerProcess],
    database: Database,
    session_id: str,
) -> None:
    broker = start_broker(BROKER_HEARTBEAT_SECONDS="1")
    page = await context.new_page()
    requests = stream_requests(page)
    await page.goto(f"{broker.base_url}/?all=1")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    await expect(page.locator("#all")).to_be_checked()
    assert parse_qs(urlsplit(requests[0]).query) == {"history": ["50"]}  # the global stream
    await expect(page.locator("#curl")).to_have_value(
        f"curl -N '{broker.base_url}/api/sse/messages'"
    )

    rows = [await insert(database, f"{session_id}-{n}", f"row {n}") for n in range(2)]
    for n, row in enumerate(rows):
        await expect(item(page, row).locator(".tag.id")).to_have_text(f"#{row}")
        await expect(item(page, row).locator(".tag.session")).to_have_text(f"{session_id}-{n}")
    events = page.locator("#events li")
    await expect(events.first).to_have_text(re.compile(r"connected: session \(all\)$"))
    for n, row in enumerate(rows):
        logged = f"message: id {row} · session {session_id}-{n}"
        await expect(page.locator("#events li", has_text=logged)).to_have_count(1)
    await expect(page.locator("#events li[data-type='heartbeat']").first).to_be_visible()

    # One session again: the curl line follows.
    await page.fill("#session", session_id + "-1")
    await page.set_checked("#all", False)
    await page.click("#connect")
    await expect(page.locator("#curl")).to_have_value(
        f"curl -N '{broker.base_url}/api/sse/messages?sessionId={session_id}-1'"
    )
    await expect(page.locator("#messages li")).to_have_count(1)
    assert await shown_ids(page) == [rows[1]]
    assert parse_qs(urlsplit(page.url).query) == {"sessionId": [f"{session_id}-1"]}
