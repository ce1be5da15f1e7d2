"""The writer: INSERTs rows with plain SQL, as an application would, and times each commit.

Each writer process holds one autocommit connection and inserts one row per statement, so each
INSERT is its own transaction and fires the trigger once; the moment the statement returns is
after the commit, and that `time.monotonic()` is the row's commit time. With `batch` N, each
statement inserts N rows (one transaction, N notifications delivered together), all with the
statement's commit time. At a target rate the
schedule is open loop (row k is due at start + k / rate, late rows go at once); without one it
inserts as fast as the connection allows. Several connections in parallel (one process each)
find the database's own limit.
"""

from __future__ import annotations

import multiprocessing
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import psycopg

INSERT = (
    b"INSERT INTO messages (session_id, robot_id, content, intent)"
    b" VALUES (%s, %s, %s, %s) RETURNING id"
)
INSERT_MANY = (
    b"INSERT INTO messages (session_id, robot_id, content, intent)"
    b" SELECT %s, %s, %s, %s FROM generate_series(1, %s) RETURNING id"
)
# About the size of a chat line, with multi-byte characters as real traffic has.
CONTENT = "你好, this is a benchmark message of ordinary chat length: " + "x" * 40


@dataclass
class Writes:
    """The rows one or more writers committed: id, commit time and session index each."""

    ids: array[int] = field(default_factory=lambda: array("q"))
    commits: array[float] = field(default_factory=lambda: array("d"))
    sessions: array[int] = field(default_factory=lambda: array("l"))
    started: float = 0.0
    ended: float = 0.0
    errors: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def rate(self) -> float:
        """Rows committed per second over the writing window."""
        span = self.ended - self.started
        return len(self.ids) / span if span > 0 else 0.0

    def merge(self, other: Writes) -> None:
        self.ids.extend(other.ids)
        self.commits.extend(other.commits)
        self.sessions.extend(other.sessions)
        self.started = min(self.started or other.started, other.started)
        self.ended = max(self.ended, other.ended)
        self.errors += other.errors

    def commit_times(self) -> dict[int, float]:
        return dict(zip(self.ids, self.commits, strict=True))

    def last_id_by_session(self, sessions: list[str]) -> dict[str, int]:
        last: dict[str, int] = {}
        for row_id, index in zip(self.ids, self.sessions, strict=True):
            name = sessions[index]
            if row_id > last.get(name, 0):
                last[name] = row_id
        return last


@dataclass(frozen=True)
class WriterPlan:
    """What one writer process does. `rate` None: as fast as it can."""

    url: str
    sessions: list[str]
    rate: float | None
    duration: float
    max_rows: int
    start_at: float
    offset: int = 0
    stride: int = 1
    robot_id: str | None = "bench-robot"
    batch: int = 1  # rows per statement (and transaction)


def write(plan: WriterPlan) -> Writes:
    """Run one plan in this process (blocking)."""
    result = Writes()
    sessions = plan.sessions
    count = len(sessions)
    batch = plan.batch
    interval = batch / plan.rate if plan.rate else 0.0
    with psycopg.connect(plan.url, autocommit=True) as conn:
        cursor = conn.cursor()
        # Warm the prepared statement before the clock starts.
        warmup = ("bench-warmup", None, "warmup", None, *([1] if batch > 1 else []))
        cursor.execute(INSERT_MANY if batch > 1 else INSERT, warmup, prepare=True)
        delay = plan.start_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        started = time.monotonic()
        deadline = started + plan.duration
        result.started = started
        n = 0
        while len(result.ids) < plan.max_rows:
            if interval:
                due = started + n * interval
                if due >= deadline:
                    break
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
            elif time.monotonic() >= deadline:
                break
            index = (plan.offset + n * plan.stride) % count
            row = (sessions[index], plan.robot_id, CONTENT, "bench")
            try:
                if batch > 1:
                    cursor.execute(INSERT_MANY, (*row, batch), prepare=True)
                else:
                    cursor.execute(INSERT, row, prepare=True)
                ids = [int(found[0]) for found in cursor.fetchall()]
            except psycopg.Error:
                result.errors += 1
                if result.errors > 100:
                    break
                continue
            committed = time.monotonic()
            result.ids.extend(ids)
            result.commits.extend([committed] * len(ids))
            result.sessions.extend([index] * len(ids))
            n += 1
        result.ended = time.monotonic()
    return result


def _child(plan: WriterPlan, pipe: Connection) -> None:
    try:
        pipe.send(write(plan))
    finally:
        pipe.close()


class Writer:
    """`connections` writer processes sharing one plan: rows round robin over `sessions`.

    With a `rate`, each process takes rate / connections. Call `start`, then `join`.
    """

    def __init__(
        self,
        url: str,
        sessions: list[str],
        *,
        rate: float | None,
        duration: float,
        max_rows: int = 10_000_000,
        connections: int = 1,
        delay: float = 1.0,
        batch: int = 1,
    ) -> None:
        self.url = url
        self.sessions = sessions
        self.rate = rate
        self.duration = duration
        self.max_rows = max_rows
        self.connections = connections
        self.delay = delay
        self.batch = batch
        self._children: list[tuple[Any, Connection]] = []
        self.start_at = 0.0

    def start(self) -> Writer:
        """Start the processes; they begin writing together `delay` seconds from now."""
        context = multiprocessing.get_context("spawn")
        self.start_at = time.monotonic() + self.delay
        per_rate = self.rate / self.connections if self.rate else None
        per_rows = max(1, self.max_rows // self.connections)
        for index in range(self.connections):
            plan = WriterPlan(
                url=self.url,
                sessions=self.sessions,
                rate=per_rate,
                duration=self.duration,
                max_rows=per_rows,
                start_at=self.start_at,
                offset=index,
                stride=self.connections,
                batch=self.batch,
            )
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_child, args=(plan, send), daemon=True)
            process.start()
            send.close()
            self._children.append((process, receive))
        return self

    def join(self, timeout: float | None = None) -> Writes:
        """Wait for every process; the merged rows, in id order."""
        limit = timeout if timeout is not None else self.duration + self.delay + 60
        merged = Writes()
        deadline = time.monotonic() + limit
        for process, receive in self._children:
            if not receive.poll(max(0.1, deadline - time.monotonic())):
                process.terminate()
                raise TimeoutError("writer process did not finish in time")
            merged.merge(receive.recv())
            process.join(10)
        order = sorted(range(len(merged.ids)), key=merged.ids.__getitem__)
        merged.ids = array("q", (merged.ids[i] for i in order))
        merged.commits = array("d", (merged.commits[i] for i in order))
        merged.sessions = array("l", (merged.sessions[i] for i in order))
        return merged

    def run(self) -> Writes:
        return self.start().join()
