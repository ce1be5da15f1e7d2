"""In Chromium: the browser package applies edits, recalls, feed changes and resets.

The events come from a real SSE server of the test's own (a socket serving the bytes the test
writes, in the broker's wire format) rather than the broker: this proves what the client does
with each event independently of how the broker produces it (its end-to-end tests send them
from PostgreSQL). The page, tests/browser/feeds.html, holds useSSE, MessageStream and useFeed
from /static/ (client/src) with React's UMD build, on the tab's one shared connection.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import queue
import select
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.async_api import BrowserContext, Page, expect

from tests.support.browser import FIXTURES, TIMEOUT_MS, AppFiles, browser, context, missing

__all__ = ["browser", "context"]  # fixtures, imported for pytest

expect.set_options(timeout=TIMEOUT_MS)

CLOSE = None  # what `push` sends to end the open streams of a path


class EventServer(AppFiles):
    """The fixture files as AppFiles serves them, and `/api/sse/<feed>` streams that write
    what the test pushes (server.push)."""

    server: FixedEvents

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if not path.startswith("/api/sse/"):
            super().do_GET()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(b"retry: 100\n\n")
        self.wfile.flush()
        outbox: queue.Queue[bytes | None] = self.server.open(path, self.path)
        try:
            while not self.gone():
                try:
                    chunk = outbox.get(timeout=0.05)
                except queue.Empty:
                    continue
                if chunk is None:
                    break
                self.wfile.write(chunk)
                self.wfile.flush()
        except OSError:
            pass  # the browser went away
        finally:
            self.server.closed(path, outbox)

    def gone(self) -> bool:
        """The browser closed the stream (a closed tab): its socket reads as at its end."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""


class FixedEvents(http.server.ThreadingHTTPServer):
    """A real SSE server on 127.0.0.1 whose streams send what the test pushes, and the
    requests it was sent (with their query: the client's resume point)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EventServer)
        self.lock = threading.Condition()
        self.streams: dict[str, list[queue.Queue[bytes | None]]] = {}
        self.requests: list[str] = []

    def open(self, path: str, target: str) -> queue.Queue[bytes | None]:
        outbox: queue.Queue[bytes | None] = queue.Queue()
        with self.lock:
            self.requests.append(target)
            self.streams.setdefault(path, []).append(outbox)
            self.lock.notify_all()
        return outbox

    def closed(self, path: str, outbox: queue.Queue[bytes | None]) -> None:
        with self.lock:
            if outbox in self.streams.get(path, []):
                self.streams[path].remove(outbox)
            self.lock.notify_all()

    def wait_streams(self, path: str, count: int, timeout: float = 10) -> None:
        with self.lock:
            if not self.lock.wait_for(lambda: len(self.streams.get(path, [])) == count, timeout):
                raise AssertionError(f"{path}: {self.streams.get(path)} open streams, not {count}")

    def wait_requests(self, path: str, count: int, timeout: float = 10) -> None:
        def made() -> int:
            return sum(urlsplit(target).path == path for target in self.requests)

        with self.lock:
            if not self.lock.wait_for(lambda: made() >= count, timeout):
                raise AssertionError(f"{path}: {made()} requests, not {count}")

    def push(self, path: str, *events: tuple[int | None, dict[str, Any]] | None) -> None:
        """Writes each event (SSE id, body) to the one open stream of `path`; CLOSE ends it."""
        self.wait_streams(path, 1)
        with self.lock:
            (outbox,) = self.streams[path]
        for event in events:
            if event is CLOSE:
                outbox.put(None)
                continue
            sse_id, body = event
            head = b"" if sse_id is None else b"id: %d\n" % sse_id
            outbox.put(head + b"data: " + json.dumps(body).encode() + b"\n\n")


@pytest.fixture
def events() -> Iterator[FixedEvents]:
    if not (FIXTURES / "node_modules" / "react" / "umd").is_dir():
        missing("React is not installed in tests/browser (make test installs it; needs npm)")
    server = FixedEvents()
    thread = threading.Thread(target=server.serve_forever, name="sse-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        with server.lock:
            for outboxes in server.streams.values():
                for outbox in outboxes:
                    outbox.put(None)
        server.shutdown()
        server.server_close()
        thread.join(5)


MESSAGES = "/api/sse/messages"
ORDERS = "/api/sse/orders"


def message(sse_id: int, kind: str, message_id: str, **fields: Any) -> tuple[int, dict[str, Any]]:
    data = {"id": message_id, "sessionId": "s1", "robotId": None, **fields}
    if kind != "message_deleted":
        data = {
            "content": "",
            "isFromBot": False,
            "isHuman": True,
            "intent": None,
            "createdAt": "2026-12-07T17:00:00.000Z",
            **data,
        }
    return sse_id, {"type": kind, "data": data, "timestamp": "2026-12-07T17:00:00.000Z"}


def change(
    sse_id: int, op: str, row_id: int, old: dict[str, Any] | None = None, **fields: Any
) -> tuple[int, dict[str, Any]]:
    data = {"id": row_id, "customer_id": "42", "status": "open", **fields}
    body: dict[str, Any] = {"type": op, "feed": "orders", "data": data}
    if old is not None:
        body["old"] = old
    return sse_id, {**body, "timestamp": "2026-12-07T17:00:00.000Z"}


CONNECTED = (None, {"type": "connected", "message": "SSE connected", "timestamp": "x"})
RESET = (None, {"type": "reset", "reason": "history expired"})


async def mark(page: Page, selector: str) -> None:
    """Tags the DOM node: still tagged later, it was updated in place, not replaced."""
    await page.locator(selector).evaluate("node => { node.dataset.mark = 'kept'; }")


async def open_page(context: BrowserContext, events: FixedEvents) -> tuple[Page, list[str]]:
    """feeds.html once its two streams are open; the console's errors, as they come."""
    page = await context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    await page.goto(f"http://127.0.0.1:{events.server_address[1]}/feeds.html")
    await page.wait_for_function("window.joined === true")
    # StrictMode mounted each hook twice: one shared stream per feed all the same.
    await asyncio.to_thread(events.wait_streams, MESSAGES, 1)
    await asyncio.to_thread(events.wait_streams, ORDERS, 1)
    return page, errors


async def test_use_sse_and_message_stream_show_edits_and_recalls_in_place(
    context: BrowserContext, events: FixedEvents
) -> None:
    page, errors = await open_page(context, events)
    hook = page.locator("#hook-messages li")
    component = page.locator("section.pgsse-stream li.pgsse-message")

    events.push(
        MESSAGES,
        CONNECTED,
        message(1, "message", "1", content="one"),
        message(2, "message", "2", content="two"),
        message(5, "message", "5", content="five"),
    )
    await expect(page.locator("#chat-connected")).to_have_text("true")
    await expect(hook).to_have_text(["one", "two", "five"])
    await expect(component).to_have_count(3)
    await mark(page, "#hook-messages li[data-id='1']")
    await mark(page, "section.pgsse-stream li[data-id='1']")

    events.push(
        MESSAGES,
        message(6, "message_updated", "1", content="one, edited"),
        message(7, "message_deleted", "2"),
        # Edited into another session: it leaves this one.
        message(8, "message_updated", "5", content="moved", sessionId="s2"),
        # A message not held (older than the list): reported, not added.
        message(9, "message_updated", "99", content="old one"),
        RESET,
    )
    await expect(hook).to_have_text(["one, edited"])
    await expect(page.locator("section.pgsse-stream li .pgsse-content")).to_have_text(
        ["one, edited"]
    )
    # The same nodes, changed in place: the edit did not re-create the items.
    await expect(page.locator("#hook-messages li[data-mark='kept']")).to_have_text("one, edited")
    await expect(page.locator("section.pgsse-stream li[data-mark='kept']")).to_have_count(1)

    # A dropped stream resumes after the last change's position; a change replayed is not
    # applied or reported twice.
    events.push(MESSAGES, CLOSE)
    await asyncio.to_thread(events.wait_requests, MESSAGES, 2)
    assert events.requests[-1].endswith("?sessionId=s1&lastEventId=9")
    events.push(
        MESSAGES,
        CONNECTED,
        message(6, "message_updated", "1", content="one, edited"),
        message(10, "message_updated", "1", content="one, edited twice"),
    )
    await expect(hook).to_have_text(["one, edited twice"])
    log = await page.evaluate(
        "window.log.filter(entry => !['insert', 'update', 'delete', "
        "'feed reset'].includes(entry[0]))"
    )
    assert log == [
        ["message", "1"],
        ["message", "2"],
        ["message", "5"],
        ["updated", "1", "one, edited"],
        ["deleted", "2"],
        ["updated", "5", "moved"],
        ["updated", "99", "old one"],
        ["reset", "history expired"],
        ["updated", "1", "one, edited twice"],
    ]
    assert errors == []


async def test_use_feed_upserts_by_key_removes_and_reloads_after_a_reset(
    context: BrowserContext, events: FixedEvents
) -> None:
    page, errors = await open_page(context, events)
    rows = page.locator("#orders li")
    assert [url for url in events.requests if url.startswith(ORDERS)] == [
        f"{ORDERS}?customer_id=42&status=open"
    ]

    events.push(
        ORDERS,
        CONNECTED,
        change(20, "insert", 1, total=10),
        change(21, "insert", 2, total=20),
    )
    await expect(rows).to_have_text(["1:10", "2:20"])
    await mark(page, "#orders li[data-id='1']")
    events.push(
        ORDERS,
        change(22, "update", 1, total=15),
        change(22, "update", 1, total=999),  # the same position again: ignored
        # Out of this client's filters: the row leaves.
        change(23, "update", 2, old={"status": "open"}, status="closed", total=20),
        change(24, "insert", 3, total=30),
        change(25, "delete", 3),
    )
    await expect(rows).to_have_text(["1:15"])
    await expect(page.locator("#orders li[data-mark='kept']")).to_have_text("1:15")

    # A reset clears the rows and asks the app to refetch; a change arriving meanwhile is
    # newer than the fetched rows, and stays.
    events.push(ORDERS, RESET)
    await expect(rows).to_have_count(0)
    events.push(ORDERS, change(26, "update", 4, total=41))
    await expect(rows).to_have_text(["4:41"])
    await page.evaluate(
        "window.answer([{ id: 1, customer_id: '42', status: 'open', total: 99 },"
        " { id: 4, customer_id: '42', status: 'open', total: 40 }])"
    )
    await expect(rows).to_have_text(["4:41", "1:99"])

    # Resume by position, on the feed's own stream only.
    events.push(ORDERS, CLOSE)
    await asyncio.to_thread(events.wait_requests, ORDERS, 2)
    assert events.requests[-1] == f"{ORDERS}?customer_id=42&status=open&lastEventId=26"
    assert [url for url in events.requests if url.startswith(MESSAGES)] == [
        f"{MESSAGES}?sessionId=s1"
    ]
    log = await page.evaluate("window.log.filter(entry => !['message'].includes(entry[0]))")
    assert log == [
        ["insert", 1],
        ["insert", 2],
        ["update", 1, None],
        ["update", 2, {"status": "open"}],
        ["insert", 3],
        ["delete", 3],
        ["feed reset", "history expired"],
        ["update", 4, None],
    ]
    assert errors == []


async def test_tabs_share_one_stream_per_feed_and_the_next_leader_resumes_it(
    context: BrowserContext, events: FixedEvents
) -> None:
    leader, leader_errors = await open_page(context, events)  # first to ask: it leads
    other, errors = await open_page(context, events)
    # Two tabs, each with a chat and a feed: still one stream of each on the server.
    assert sorted(urlsplit(url).path for url in events.requests) == [MESSAGES, ORDERS]
    events.push(ORDERS, CONNECTED, change(30, "insert", 1, total=10))
    events.push(MESSAGES, CONNECTED, message(3, "message", "3", content="hello"))
    for page in (leader, other):
        await expect(page.locator("#orders li")).to_have_text(["1:10"])
        await expect(page.locator("#hook-messages li")).to_have_text(["hello"])
        await expect(page.locator("#feed-connected")).to_have_text("true")
    # Feed events reach the feed's clients only, and messages the chat's.
    assert sorted(await other.evaluate("window.log")) == [["insert", 1], ["message", "3"]]

    await leader.close()
    await asyncio.to_thread(events.wait_requests, ORDERS, 2)
    await asyncio.to_thread(events.wait_requests, MESSAGES, 2)
    orders = [url for url in events.requests if urlsplit(url).path == ORDERS]
    assert orders[-1] == f"{ORDERS}?customer_id=42&status=open&lastEventId=30"
    events.push(ORDERS, CONNECTED, change(30, "insert", 1, total=10), change(31, "delete", 1))
    await expect(other.locator("#orders li")).to_have_count(0)
    assert await other.evaluate("window.log.slice(2)") == [["delete", 1]]
    assert leader_errors == [] and errors == []
