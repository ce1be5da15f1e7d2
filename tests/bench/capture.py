"""The `capture` scenario: what NOTIFY's commit lock costs the writers, and the WAL.

- pgbench INSERT rate on `messages` (one row per transaction, synchronous_commit on) at 4, 16
  and 32 writers with no capture (trigger disabled), the trigger alone (payload built and
  signed, handed to nobody: what a transport adds is the rest), NOTIFY capture (today's
  trigger, one connection LISTENing and draining) and WAL capture (the emit trigger, read by
  a `SlotReader` polling, `wal`, or a `SlotStream`, `stream`, each confirming what it read).
  The modes run one after the other for each writer count, so a load change on the machine
  hits them alike; ratios are to no capture.
- Delivery latency at 500 rows/s, commit returned -> payload read, through both WAL readers
  and through LISTEN, in this process (one clock).
- An idle `SlotReader`: polls per second, the time of one empty poll, and its backend's CPU.

The drainers run in threads of this process; pgbench is a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from broker.database import drop_capture, migrate, sql_dir
from broker.feeds.wal import SlotReader
from broker.feeds.walstream import SlotStream
from broker.slots import PREFIX, capture_step, wal_trigger_sql
from tests.bench.scenarios import Context, target

WRITERS = (4, 16, 32)
MODES = ("none", "trigger", "notify", "wal", "stream")
SLOT = "pgsse_bench"
CHANNEL = "pgsse_messages"
LATENCY_RATE = 500  # rows/s
INSERT = "INSERT INTO messages (session_id, content) VALUES ('bench-' || :client_id, 'hello');\n"


def capture(ctx: Context) -> dict[str, Any]:
    seconds = ctx.pick(10, 4)
    url = ctx.database.url
    migrate(url, "wal", SLOT)  # the slot; the trigger is switched per phase below
    script = ctx.workdir / "insert.sql"
    script.write_text(INSERT)
    rates: dict[str, dict[str, Any]] = {}
    try:
        for writers in WRITERS:
            row: dict[str, Any] = {}
            for mode in MODES:
                _switch(url, mode)
                row[mode] = _pgbench_phase(ctx, url, mode, writers, seconds, script)
                print(f"   {writers} writers, {mode}: {row[mode]}", flush=True)
            floor = row["none"]["tps"]
            for mode in MODES[1:]:
                row[mode]["ratio"] = round(row[mode]["tps"] / floor, 2) if floor else None
            rates[str(writers)] = row
        _switch(url, "wal")
        latency = {mode: _latency(url, mode, ctx.pick(10, 4)) for mode in ("wal", "stream")}
        _switch(url, "notify")
        latency["notify"] = _latency(url, "notify", ctx.pick(10, 4))
        idle = _idle_cost(url, ctx.pick(5, 2))
    finally:
        drop_capture(url, SLOT)  # NOTIFY trigger back, slot dropped
        _switch(url, "notify")
    return {
        "inserts": rates,
        "latency": latency,
        "idle_poll": idle,
        "targets": [
            target(
                f"{mode} capture >= 0.9 of no capture at {n} writers",
                rates[str(n)][mode]["ratio"],
                (rates[str(n)][mode]["ratio"] or 0) >= 0.9,
            )
            for mode in ("wal", "stream")
            for n in (16, 32)
        ]
        + [
            target(
                f"{mode} delivery p99 at 500 rows/s <= 50 ms",
                latency[mode].get("p99_ms"),
                (latency[mode].get("p99_ms") or 1e9) <= 50,
            )
            for mode in ("wal", "stream")
        ],
    }


def _switch(url: str, mode: str) -> None:
    """The messages trigger for `mode`: disabled, NOTIFY, or logical messages."""
    notify_sql = (sql_dir() / "002_notify.sql").read_text()
    with psycopg.connect(url, autocommit=True) as conn:
        if mode == "none":
            conn.execute("ALTER TABLE messages DISABLE TRIGGER trigger_notify_new_message")
            return
        conn.execute("ALTER TABLE messages ENABLE TRIGGER trigger_notify_new_message")
        function = wal_trigger_sql(notify_sql) if mode in ("wal", "stream") else notify_sql
        if mode == "trigger":  # the payload built and signed, handed to nobody
            step = capture_step("notify", PREFIX, "payload")
            function = notify_sql.replace(step, "NULL;")
        conn.execute(function.encode())
        conn.execute("VACUUM ANALYZE messages")
        conn.execute("CHECKPOINT")


def _pgbench_phase(
    ctx: Context, url: str, mode: str, writers: int, seconds: int, script: Path
) -> dict[str, Any]:
    drainer = Drainer(url, mode) if mode in ("notify", "wal", "stream") else None
    before = _max_id(url)
    if drainer is not None:
        drainer.start()
    try:
        tps = _pgbench(ctx, writers, seconds, script)
        inserted = _max_id(url) - before
        delivered = drainer.wait_for(inserted, 30.0) if drainer is not None else None
    finally:
        if drainer is not None:
            drainer.stop()
    return {"tps": tps, "rows": inserted, "delivered": delivered}


def _pgbench(ctx: Context, writers: int, seconds: int, script: Path) -> float:
    binary = ctx.database.server.placement.bin_dir / "pgbench"
    done = subprocess.run(
        [
            str(binary),
            "-n",
            "-M",
            "prepared",
            "-c",
            str(writers),
            "-j",
            str(min(writers, 4)),
            "-T",
            str(seconds),
            "-f",
            str(script),
            ctx.database.url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    found = re.search(r"tps = ([0-9.]+)", done.stdout)
    assert found, done.stdout + done.stderr
    return round(float(found.group(1)))


def _max_id(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()
    return int(row[0]) if row else 0


class Drainer:
    """A thread reading every payload of `mode` (LISTEN, or the slot) and counting it; with
    `stamp`, the time each row's id was read."""

    def __init__(self, url: str, mode: str, stamp: Callable[[int], None] | None = None):
        self.url = url
        self.mode = mode
        self.stamp = stamp
        self.count = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"the {self.mode} drainer did not start")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        if self.error is not None:
            raise self.error

    def wait_for(self, count: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.count < count and time.monotonic() < deadline and self.error is None:
            time.sleep(0.05)
        return self.count

    def _run(self) -> None:
        try:
            if self.mode == "notify":
                self._listen()
            elif self.mode == "stream":
                asyncio.run(self._stream_slot())
            else:
                asyncio.run(self._read_slot())
        except BaseException as exc:  # reported by stop()
            self.error = exc
            self._ready.set()

    def _take(self, payload: str) -> None:
        self.count += 1
        if self.stamp is not None:
            self.stamp(int(json.loads(payload[64:])["id"]))

    def _listen(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            self._ready.set()
            while not self._stop.is_set():
                for note in conn.notifies(timeout=0.2):
                    self._take(note.payload)

    async def _read_slot(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            reader = SlotReader(conn, SLOT)
            while await reader.poll():  # what an earlier phase left
                await reader.confirm()
            self._ready.set()
            while not self._stop.is_set():
                batch = await reader.poll()
                if not batch:
                    await asyncio.sleep(0.01)
                    continue
                for payload in batch:
                    self._take(payload)
                await reader.confirm()

    async def _stream_slot(self) -> None:
        async with SlotStream(self.url, SLOT) as stream:
            self._ready.set()
            while not self._stop.is_set():
                try:
                    async with asyncio.timeout(0.2):
                        batch = await stream.next()
                except TimeoutError:
                    continue
                for payload in batch:
                    self._take(payload)
                await stream.confirm()


def _latency(url: str, mode: str, seconds: int) -> dict[str, Any]:
    """Commit returned -> payload read, at LATENCY_RATE rows/s, one row per transaction."""
    committed: dict[int, float] = {}
    read: dict[int, float] = {}
    drainer = Drainer(url, mode, stamp=lambda row: read.__setitem__(row, time.perf_counter()))
    drainer.start()
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            interval = 1 / LATENCY_RATE
            start = time.perf_counter()
            for n in range(seconds * LATENCY_RATE):
                delay = start + n * interval - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                row = conn.execute(
                    "INSERT INTO messages (session_id, content) VALUES ('lat', 'x') RETURNING id"
                ).fetchone()
                assert row is not None
                committed[int(row[0])] = time.perf_counter()
        deadline = time.monotonic() + 30
        while not committed.keys() <= read.keys() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        drainer.stop()
    samples = sorted((read[row] - at) * 1000 for row, at in committed.items() if row in read)
    if not samples:
        return {"rows": len(committed), "read": 0}

    def pct(p: float) -> float:
        return round(samples[min(len(samples) - 1, int(p * len(samples)))], 2)

    return {
        "rows": len(committed),
        "read": len(samples),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(samples[-1], 2),
    }


def _idle_cost(url: str, seconds: int) -> dict[str, Any]:
    """An idle SlotReader's polls: how many, how long each, and its backend's CPU."""

    async def run() -> dict[str, Any]:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            reader = SlotReader(conn, SLOT)
            while await reader.poll():
                await reader.confirm()
            pid = conn.info.backend_pid
            cpu_before = _cpu_seconds(pid)
            began = time.perf_counter()
            spent = 0.0
            polls = 0
            while time.perf_counter() - began < seconds:
                t = time.perf_counter()
                assert not await reader.poll()
                spent += time.perf_counter() - t
                polls += 1
                await asyncio.sleep(reader.poll_seconds)  # as next() waits
            elapsed = time.perf_counter() - began
            cpu = _cpu_seconds(pid) - cpu_before
        return {
            "poll_seconds": reader.poll_seconds,
            "polls_per_s": round(polls / elapsed, 1),
            "poll_ms": round(spent / polls * 1000, 3),
            "backend_cpu_percent": round(cpu / elapsed * 100, 2),
        }

    return asyncio.run(run())


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
