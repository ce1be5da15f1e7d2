"""Chromium for tests, and what the browser tests share: fixtures, helpers, the fixture files.

Playwright drives Debian's Chromium (`/usr/bin/chromium`; browsers are never downloaded). The
async API is used because the tests share pytest-asyncio's running loop. Without Chromium, or
without the npm packages `make test` installs, a test skips, unless `CI` is set: CI installs
both, so there it fails instead.

Import the fixtures into a test module by name (`from tests.support.browser import browser,
context`).
"""

from __future__ import annotations

import asyncio
import http.server
import os
import posixpath
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Browser, BrowserContext, Locator, Page, async_playwright

from tests.support.database import Database
from tests.support.processes import BrokerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "broker" / "static"  # the demo page
CLIENT = ROOT / "client"  # the npm package; its src/ is served under /static/ too
FIXTURES = ROOT / "tests" / "browser"  # React's UMD builds (npm), react.html
APP = FIXTURES / "app"  # a bundled TypeScript app using the packed pgsse-client
PACKAGE = APP / "node_modules" / "pgsse-client"
TIMEOUT_MS = 10_000


def missing(what: str) -> NoReturn:
    """Skip, or fail with CI set (.ci/run installs everything these tests need)."""
    if os.environ.get("CI"):
        pytest.fail(f"{what}, but CI is set: .ci/run must provide it")
    pytest.skip(f"{what}; CI runs these tests")


def chromium() -> str:
    if not CHROMIUM.exists():
        missing(f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)")
    return str(CHROMIUM)


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    executable = chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, timeout=30_000
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


def item(page: Page, message_id: str, list_selector: str = "#messages") -> Locator:
    return page.locator(f"{list_selector} li[data-id='{message_id}']")


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


def packed_client() -> Path:
    """The pgsse-client package as installed from its packed tarball by `make test`; fails
    when it is older than client/ (a stale tarball would test yesterday's code)."""
    if not (PACKAGE / "package.json").is_file():
        missing("pgsse-client is not installed from its tarball (make test packs it; needs npm)")
    sources = sorted(path.name for path in (CLIENT / "src").iterdir())
    packed = sorted(path.name for path in (PACKAGE / "src").iterdir())
    stale = sources != packed or any(
        (CLIENT / "src" / name).read_bytes() != (PACKAGE / "src" / name).read_bytes()
        for name in sources
    )
    if stale:
        pytest.fail(f"{PACKAGE} differs from client/src: run `make test` to pack it again")
    return PACKAGE


class AppFiles(http.server.SimpleHTTPRequestHandler):
    """A frontend on its own origin: `/static/...` as the broker serves it (client/src, then
    broker/static), the rest from tests/browser (react.html, node_modules); `/` is empty."""

    def translate_path(self, path: str) -> str:
        path = posixpath.normpath(urlsplit(path).path)
        if path.startswith("/static/"):
            relative = path.removeprefix("/static/")
            roots = [CLIENT / "src", STATIC]
        else:
            relative = path.lstrip("/")
            roots = [FIXTURES]
        for root in roots:
            file = (root / relative).resolve()
            if file.is_relative_to(root) and file.is_file():
                return str(file)
        return str(roots[0] / "missing")

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
    """The origin of a real static server for the React fixtures. A real server on 127.0.0.1,
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
