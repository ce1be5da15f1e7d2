"""The npm package `pgsse-client` as an application gets it: packed, installed, compiled, run.

`make test` packs client/ (`npm pack`) and installs the tarball into tests/browser/app, a small
React 19 + TypeScript app holding the original guide's examples as written (src/ChatPage.tsx,
src/StreamPage.tsx). These tests read the packed files only: they prove the tarball holds what
the broker serves, that the guide's examples and every `tsx` example of the docs type-check
under `tsc --strict` against its declarations, and that the app, bundled by esbuild, renders
rows inserted in PostgreSQL in Chromium. The demo page runs on the packed files too.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tarfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from playwright.async_api import BrowserContext, ConsoleMessage, Route, expect

from tests.support.browser import (
    APP,
    CLIENT,
    ROOT,
    TIMEOUT_MS,
    browser,
    context,
    insert,
    item,
    packed_client,
    wait_for_streams,
)
from tests.support.database import Database
from tests.support.processes import BrokerProcess

__all__ = ["browser", "context"]  # fixtures, imported for pytest

expect.set_options(timeout=TIMEOUT_MS)

DOCS = [ROOT / "README.md", ROOT / "docs" / "browser.md", CLIENT / "README.md"]
TSX_BLOCK = re.compile(r"^```tsx\n(.*?)^```", re.MULTILINE | re.DOTALL)
GUIDE_SESSION = "chat-session-123"  # StreamPage.tsx's, as the guide writes it


def node_tool(name: str) -> str:
    packed_client()  # skips or fails without `make test`'s npm install
    return str(APP / "node_modules" / ".bin" / name)


def run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=APP, capture_output=True, text=True, timeout=timeout)


def test_tarball_holds_the_files_the_broker_serves(broker: BrokerProcess) -> None:
    package = packed_client()
    with tarfile.open(APP / "pgsse-client.tgz") as tarball:
        packed = {name.removeprefix("package/") for name in tarball.getnames()}
    sources = {f"src/{path.name}" for path in (CLIENT / "src").iterdir()}
    assert packed == {"package.json", "README.md", *sources}
    assert {"src/sse-client.js", "src/sse-client.d.ts", "src/react.js"} <= sources

    # One copy of the client: /static/ serves the very bytes an app installs.
    for name in sorted(sources):
        with urllib.request.urlopen(f"{broker.base_url}/static/{name[4:]}", timeout=5) as answer:
            assert answer.read() == (package / name).read_bytes(), name


def test_node_resolves_both_entry_points_to_what_the_declarations_name() -> None:
    script = """
        const client = await import('pgsse-client');
        const react = await import('pgsse-client/react');
        console.log(JSON.stringify({
            client: Object.keys(client).sort(), react: Object.keys(react).sort(),
            useSSE: typeof react.useSSE, MessageStream: typeof react.MessageStream }));
    """
    result = run(["node", "--input-type=module", "-e", script], timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "client": ["SSEError", "STATUS_TEXT", "compareIds", "createSSEClient"],
        "react": [
            "MessageStream",
            "createMessageStream",
            "createUseFeed",
            "createUseSSE",
            "useFeed",
            "useSSE",
        ],
        "useSSE": "function",
        "MessageStream": "function",
    }


def test_guide_and_docs_examples_type_check_under_tsc_strict() -> None:
    """src/ (the guide's pages, and src/misuse.ts: what the types must refuse) and every
    `tsx` block of the docs, compiled together against the packed declarations."""
    tsc = node_tool("tsc")
    generated = APP / "src" / "from-docs"
    shutil.rmtree(generated, ignore_errors=True)
    generated.mkdir()
    try:
        blocks = 0
        for doc in DOCS:
            for n, block in enumerate(TSX_BLOCK.findall(doc.read_text())):
                name = str(doc.relative_to(ROOT).with_suffix("")).replace("/", "-")
                (generated / f"{name}-{n}.tsx").write_text(block)
                blocks += 1
        assert blocks >= 3, "the docs show the package in tsx examples"
        result = run([tsc, "-p", "tsconfig.json"])
    finally:
        shutil.rmtree(generated, ignore_errors=True)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_bundled_guide_app_renders_rows_inserted_in_postgresql(
    context: BrowserContext,
    start_broker: Callable[..., BrokerProcess],
    database: Database,
    session_id: str,
    tmp_path: Path,
) -> None:
    esbuild = node_tool("esbuild")
    development = '--define:process.env.NODE_ENV="development"'
    bundle = run(
        [
            esbuild,
            "src/main.tsx",
            "--bundle",
            "--format=esm",
            f"--outdir={tmp_path}",
            development,
            "--log-level=warning",
        ]
    )
    assert bundle.returncode == 0 and bundle.stderr == "", bundle.stderr
    shutil.copy(APP / "index.html", tmp_path / "index.html")

    # The app is served from the broker's own origin, as the guide's frontend reaches the
    # broker (no baseUrl): Playwright hands out the two files, the broker serves the rest.
    broker = start_broker()
    page = await context.new_page()

    async def app_file(route: Route) -> None:
        await route.fulfill(path=tmp_path / route.request.url.split("/app/")[1].split("?")[0])

    await page.route(f"{broker.base_url}/app/*", app_file)
    logged: list[Any] = []
    errors: list[str] = []

    async def console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)
        elif message.type == "log" and message.args:
            logged.append(await message.args[0].json_value())

    page.on("console", console)
    await page.goto(f"{broker.base_url}/app/index.html?sessionId={session_id}")

    chat = page.locator("#chat")
    stream = page.locator("section.pgsse-stream")
    await expect(chat.locator("#chat-status")).to_have_text("connected")
    await expect(stream.locator(".pgsse-status")).to_have_text("Connected")
    # StrictMode mounted each twice, and both pages ride on the tab's one shared stream.
    await wait_for_streams(broker, 1)
    channels = broker.stats()["channels"]
    assert channels == {f"session_messages:{s}": 1 for s in sorted([session_id, GUIDE_SESSION])}

    mine = await insert(database, session_id, "for the chat page", is_from_bot=True)
    guide = await insert(database, GUIDE_SESSION, "for the component", intent="greet")
    await expect(item(page, mine, "#chat-messages")).to_have_text("for the chat page")
    await expect(item(page, mine, "#chat-messages")).to_have_class("bot")
    await expect(stream.locator(f"li[data-id='{guide}'] .pgsse-content")).to_have_text(
        "for the component"
    )
    await expect(chat.locator("#chat-events li")).to_have_text(
        [f"connected {session_id}", f"message {mine}"]
    )
    # Each page sees its own session only.
    await expect(item(page, guide, "#chat-messages")).to_have_count(0)
    await expect(stream.locator(f"li[data-id='{mine}']")).to_have_count(0)

    # onNewMessage={(m) => console.log(m)}: `m` is the event's `data`, in the contract's shape.
    assert len(logged) == 1
    assert set(logged[0]) == {
        "id",
        "sessionId",
        "robotId",
        "content",
        "isFromBot",
        "isHuman",
        "intent",
        "createdAt",
    }
    assert logged[0]["id"] == guide and logged[0]["sessionId"] == GUIDE_SESSION
    assert logged[0]["content"] == "for the component" and logged[0]["intent"] == "greet"
    assert logged[0]["isFromBot"] is False and logged[0]["isHuman"] is True
    assert logged[0]["robotId"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", logged[0]["createdAt"])

    await page.click("#chat-connect")  # Disconnect
    await expect(chat.locator("#chat-status")).to_have_text("disconnected")
    # The shared stream is reopened (resuming) for the component's session alone.
    await asyncio.to_thread(
        broker.wait_until,
        lambda: broker.stats()["channels"] == {f"session_messages:{GUIDE_SESSION}": 1},
        10,
        "the shared stream without the chat's session",
    )
    assert errors == []


async def test_packed_client_drives_the_demo_page(
    context: BrowserContext,
    start_broker: Callable[..., BrokerProcess],
    database: Database,
    session_id: str,
) -> None:
    package = packed_client()
    broker = start_broker()
    page = await context.new_page()
    served: list[str] = []

    async def from_tarball(route: Route) -> None:
        name = route.request.url.rsplit("/", 1)[1].split("?")[0]
        packed = package / "src" / name
        if not packed.is_file():
            await route.continue_()  # the demo's own files
            return
        served.append(name)
        await route.fulfill(path=packed, content_type="text/javascript")

    await page.route(f"{broker.base_url}/static/*", from_tarball)
    await page.goto(f"{broker.base_url}/?sessionId={session_id}")
    await expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    row = await insert(database, session_id, "through the packed client")
    await expect(item(page, row).locator(".content")).to_have_text("through the packed client")
    assert sorted(served) == ["connection.js", "rows.js", "shared.js", "sse-client.js"]
