"""docs/browser.md's Python (httpx-sse) and Node (eventsource) consumers, run as written.

Each example is taken from the docs, run against a real broker, and must print every row once,
in order: live, across a broker restart (the client reconnects with `Last-Event-ID` itself),
across a quiet spell longer than httpx's default 5 s read timeout, and when started again with
the last id it printed.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.browser import FIXTURES, ROOT, missing
from tests.support.database import Database
from tests.support.processes import BrokerProcess

DOC = ROOT / "docs" / "browser.md"


def example(language: str, first_line: str) -> str:
    """The docs' code block of `language` that starts with `first_line`."""
    for block in re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), re.M | re.S):
        if block.startswith(first_line):
            return str(block)
    raise AssertionError(f"no {language} block starting {first_line!r} in {DOC}")


class Consumer:
    """A running example: its printed lines, read off its stdout by a thread."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def messages(self, count: int, timeout: float = 15.0) -> list[str]:
        """The ids of the next `count` messages printed (other lines are kept in `seen`)."""
        ids: list[str] = []
        deadline = time.monotonic() + timeout
        while len(ids) < count:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"got {ids}, wanted {count}; printed {self.seen}") from None
            self.seen.append(line)
            first = line.split(" ", 1)[0]
            if first.isdigit():
                ids.append(first)
        return ids

    def stop(self) -> None:
        if self.process.returncode is not None:
            return
        self.process.kill()
        self.process.wait(5)
        self.reader.join(5)  # to the end of its output
        if self.process.stdout is not None:
            self.process.stdout.close()


Start = Callable[[BrokerProcess, str, "str | None"], Consumer]


@pytest.fixture(params=["python", "node"])
def start_consumer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Start]:
    started: list[Consumer] = []
    if request.param == "python":
        script = tmp_path / "consume.py"
        script.write_text(example("python", "# consume.py"))
        argv, cwd = [sys.executable, str(script)], tmp_path
    else:
        if not (FIXTURES / "node_modules" / "eventsource").is_dir():
            missing("eventsource is not installed in tests/browser (make test installs it)")
        # Beside tests/browser/node_modules, where `import "eventsource"` resolves.
        script = FIXTURES / f".consume-{os.getpid()}-{id(tmp_path)}.mjs"
        script.write_text(example("js", "// consume.mjs"))
        argv, cwd = ["node", str(script)], FIXTURES

    def start(broker: BrokerProcess, session: str, last_event_id: str | None) -> Consumer:
        env = {"PGSSE_URL": broker.base_url, "PGSSE_SESSION": session}
        if last_event_id is not None:
            env["PGSSE_LAST_EVENT_ID"] = last_event_id
        consumer = Consumer(argv, env, cwd)
        started.append(consumer)
        return consumer

    try:
        yield start
    finally:
        for consumer in started:
            consumer.stop()
        if script.parent == FIXTURES:
            script.unlink(missing_ok=True)


def rows(database: Database, session: str, *contents: str) -> list[str]:
    return [str(database.insert(session, content)) for content in contents]


def test_docs_consumer_gets_every_row_once_across_restarts_and_resumes(
    start_consumer: Start, broker: BrokerProcess, database: Database, session_id: str
) -> None:
    consumer = start_consumer(broker, session_id, None)
    broker.wait_until(lambda: broker.stats()["totalConnections"] == 1, 15, "the consumer")
    first = rows(database, session_id, "one", "two")
    assert consumer.messages(2) == first

    broker.stop()  # the stream ends; the consumer retries until the broker is back
    missed = rows(database, session_id, "while the broker was down")
    broker.start()
    assert consumer.messages(1) == missed

    # Quiet for longer than httpx's default read timeout (5 s), heartbeats every 30 s.
    time.sleep(6)
    late = rows(database, session_id, "after a quiet spell")
    assert consumer.messages(1) == late
    consumer.stop()

    while_stopped = rows(database, session_id, "while the consumer was stopped")
    again = start_consumer(broker, session_id, late[0])
    assert again.messages(1) == while_stopped
    live = rows(database, session_id, "live again")
    assert again.messages(1) == live
    assert not [line for line in again.seen if line.split(" ", 1)[0] in first + missed + late]
