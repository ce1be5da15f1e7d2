"""The guide's Next.js pages (docs/browser.md, where the README sends a newcomer), verbatim, in
a real Next.js 16 app: `next build`, `next start`, then eight tabs of the chat page in Chromium,
on a broker that speaks HTTP/1.1.

tests/browser/next is the app around them (a root layout, package.json, tsconfig); the pages
are docs/browser.md's `tsx` blocks that start with `// app/...`, written into it before the build,
with the broker's address in place of `http://localhost:5001`. pgsse-client comes from the
tarball `make test` packs. Without npm (or before `make test` installed the app) this skips.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from playwright.async_api import BrowserContext, expect

from tests.support.browser import (
    CLIENT,
    FIXTURES,
    ROOT,
    TIMEOUT_MS,
    browser,
    context,
    insert,
    missing,
    packed_client,
    wait_for_streams,
)
from tests.support.database import Database
from tests.support.processes import BrokerProcess

__all__ = ["browser", "context"]  # fixtures, imported for pytest

NEXT_APP = FIXTURES / "next"
README_ADDRESS = "http://localhost:5001"
PAGE = re.compile(r"^```tsx\n(// (app/\S+\.tsx)\n.*?)^```", re.MULTILINE | re.DOTALL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, server: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until `next start` accepts connections on `port` (it exits: fail at once)."""
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, "next start exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"next start: nothing on port {port} after {timeout}s") from None
            time.sleep(0.1)


def installed() -> None:
    """Skip (fail under CI) without the app's packages; fail on a stale pgsse-client."""
    packed_client()
    if not (NEXT_APP / "node_modules" / "next").is_dir():
        missing("Next.js is not installed in tests/browser/next (make test installs it)")
    package = NEXT_APP / "node_modules" / "pgsse-client" / "src"
    stale = [
        path.name
        for path in (CLIENT / "src").iterdir()
        if not (package / path.name).is_file()
        or (package / path.name).read_bytes() != path.read_bytes()
    ]
    if stale:
        pytest.fail(f"{package} differs from client/src ({stale}): run `make test` to pack it")


@pytest.fixture
def next_app(
    start_broker: Callable[..., BrokerProcess],
) -> Iterator[tuple[str, BrokerProcess]]:
    """The guide's pages built and served by `next start`; its origin and the broker."""
    installed()
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    broker = start_broker(BROKER_CORS_ORIGINS=origin)
    pages = PAGE.findall((ROOT / "docs" / "browser.md").read_text())
    assert {path for _, path in pages} >= {"app/chat/[sessionId]/page.tsx", "app/support/page.tsx"}
    for block, path in pages:
        target = NEXT_APP / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.replace(README_ADDRESS, broker.base_url))
    env = {**os.environ, "NEXT_TELEMETRY_DISABLED": "1"}
    next_bin = str(NEXT_APP / "node_modules" / ".bin" / "next")
    shutil.rmtree(NEXT_APP / ".next", ignore_errors=True)
    build = subprocess.run(
        [next_bin, "build"], cwd=NEXT_APP, env=env, capture_output=True, text=True, timeout=300
    )
    assert build.returncode == 0, build.stdout + build.stderr
    server = subprocess.Popen(
        [next_bin, "start", "-H", "127.0.0.1", "-p", str(port)],
        cwd=NEXT_APP,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, server)
        yield origin, broker
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


async def test_readme_next_pages_eight_tabs_over_one_stream(
    next_app: tuple[str, BrokerProcess],
    context: BrowserContext,
    database: Database,
    session_id: str,
) -> None:
    origin, broker = next_app
    chats = []
    for _ in range(8):
        page = await context.new_page()
        await page.goto(f"{origin}/chat/{session_id}", timeout=30_000)
        await expect(page.locator("main p").first).to_have_text("connected", timeout=TIMEOUT_MS)
        chats.append(page)
    await wait_for_streams(broker, 1)  # eight tabs, one stream: no 7th tab left waiting

    support = await context.new_page()
    await support.goto(f"{origin}/support")
    await expect(support.locator(".pgsse-status")).to_have_text("Connected")
    await wait_for_streams(broker, 2)  # history={50}: the component has a stream of its own

    row = await insert(database, session_id, "from PostgreSQL to eight tabs")
    other = await insert(database, "123", "for the support page")
    for page in chats:
        await expect(page.locator("main li")).to_have_text(["from PostgreSQL to eight tabs"])
    await expect(support.locator(f"li[data-id='{other}'] .pgsse-content")).to_have_text(
        "for the support page"
    )
    assert row != other
