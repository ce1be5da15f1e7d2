"""The `capture` scenario: what NOTIFY's commit lock costs the writers, and the WAL, with a
broker attached and delivering.

- pgbench INSERT rate on `messages` (one row per transaction, synchronous_commit on) at 4, 16
  and 32 writers with no capture (trigger disabled), NOTIFY capture and WAL capture
  (`BROKER_CAPTURE=wal`: no trigger, the table's inserts decoded from the WAL by the broker's
  `SlotStream`). In each phase a broker process of that mode is attached with one stream per
  pgbench client's session, and every row must be delivered (its stats' `eventsDelivered`).
  `wal-recvlogical` is the WAL floor with pgsse taken out: the same slot and pgoutput options
  read by PostgreSQL's own `pg_recvlogical` on the broker's CPU, writing to /dev/null (no
  broker, no SSE client, nothing delivered). Per writer count the phases run mirrored
  (none, notify, wal, wal-recvlogical, then the reverse), so a machine drifting in speed
  (other work on it) weighs on every mode alike; each mode's rate is the mean of its two
  runs, and ratios are to none's mean.
- In each phase, the CPU of PostgreSQL's processes by role (the walsender, pgbench's
  backends, the broker's backends, the server's own), of pgbench, the SSE clients, the broker
  or pg_recvlogical, and of each CPU whole (`pgcpu.py`), as shares of one core.
- Delivery latency at 500 rows/s, commit returned -> event read by an SSE client, through a
  broker in each mode.
- The slot during a 30 s reader outage: the wal broker killed (-9) while a writer goes on at
  200 rows/s; the slot's lag in bytes and seconds each second, then how long a new broker
  takes to drain it (every row delivered, the slot confirmed up to the WAL at its start).

pgbench is a subprocess, the broker a process pinned like the other scenarios' brokers.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg

from broker.database import drop_capture, migrate
from broker.feeds.wal import parse_lsn, slot_lag
from broker.slots import PUBLICATION
from tests.bench.analysis import deliveries
from tests.bench.client import StreamSpec
from tests.bench.harness import BROKER_CPU, BrokerProcess, pinning_available
from tests.bench.pgcpu import CpuWindow, mean_shares
from tests.bench.scenarios import Context, open_all, target
from tests.bench.writer import Writer

WRITERS = (4, 16, 32)
MODES = ("none", "notify", "wal", "wal-recvlogical")
DELIVERING = ("notify", "wal")  # modes whose phases deliver every row through a broker
SLOT = "pgsse_bench"
LATENCY_RATE = 500  # rows/s
OUTAGE_SECONDS = 30
OUTAGE_RATE = 200  # rows/s written during the outage
INSERT = "INSERT INTO messages (session_id, content) VALUES ('bench-' || :client_id, 'hello');\n"


def capture(ctx: Context) -> dict[str, Any]:
    seconds = ctx.pick(10, 4)
    url = ctx.database.url
    script = ctx.workdir / "insert.sql"
    script.write_text(INSERT)
    rates: dict[str, dict[str, Any]] = {}
    try:
        for writers in WRITERS:
            runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
            for mode in [*MODES, *reversed(MODES)]:
                phase = _phase(ctx, mode, writers, seconds, script)
                runs[mode].append(phase)
                print(f"   {writers} writers, {mode}: {_brief(phase)}", flush=True)
            rates[str(writers)] = _figures(runs)
            print(f"   {writers} writers: {_summary(rates[str(writers)])}", flush=True)
        latency = {mode: _latency(ctx, mode, ctx.pick(10, 4)) for mode in ("notify", "wal")}
        print(f"   latency: {latency}", flush=True)
        outage = _outage(ctx, ctx.pick(OUTAGE_SECONDS, 10))
        print(f"   outage: {outage}", flush=True)
    finally:
        _switch(url, "notify")
        drop_capture(url, SLOT)  # NOTIFY trigger back, slot dropped
    return {
        "seconds_per_phase": seconds,
        "order": "per writer count: " + " ".join([*MODES, *reversed(MODES)]),
        "inserts": rates,
        "latency": latency,
        "outage": outage,
        "targets": [
            target(
                f"wal capture >= 0.9 of no capture at {n} writers",
                rates[str(n)]["wal"]["ratio"],
                (rates[str(n)]["wal"]["ratio"] or 0) >= 0.9,
            )
            for n in (16, 32)
        ]
        + [
            target(
                "wal delivery p99 at 500 rows/s <= 50 ms",
                latency["wal"].get("p99"),
                (latency["wal"].get("p99") or 1e9) <= 50,
            ),
            target(
                "every row delivered in every phase",
                None,
                all(
                    row[mode]["delivered"] == row[mode]["rows"]
                    for row in rates.values()
                    for mode in DELIVERING
                ),
            ),
        ],
    }


def _switch(url: str, mode: str) -> None:
    """The database for `mode`: the messages trigger disabled, NOTIFY, or WAL (its slot, the
    table in its publication, no trigger)."""
    migrate(url, capture="wal" if mode == "wal" else "notify", slot=SLOT)
    with psycopg.connect(url, autocommit=True) as conn:
        if mode != "wal":  # wal mode has no trigger on the table
            state = "DISABLE" if mode == "none" else "ENABLE"
            conn.execute(f"ALTER TABLE messages {state} TRIGGER trigger_notify_new_message")
        if mode == "wal":  # the other phases' WAL: decoded now, not during this phase
            conn.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_lsn())", (SLOT,))
        conn.execute("VACUUM ANALYZE messages")
        conn.execute("CHECKPOINT")


def _broker(ctx: Context, mode: str, name: str) -> BrokerProcess:
    env = {"BROKER_CAPTURE": "wal", "BROKER_CAPTURE_SLOT": SLOT} if mode == "wal" else {}
    return ctx.broker(name, extra_env=env).start()


def _phase(ctx: Context, mode: str, writers: int, seconds: int, script: Path) -> dict[str, Any]:
    if mode == "wal-recvlogical":
        return _recvlogical_phase(ctx, writers, seconds, script)
    return _attached_phase(ctx, mode, writers, seconds, script)


def _attached_phase(
    ctx: Context, mode: str, writers: int, seconds: int, script: Path
) -> dict[str, Any]:
    """pgbench with a broker of `mode` attached, a stream per pgbench session open."""
    url = ctx.database.url
    _switch(url, mode)
    broker = _broker(ctx, mode, f"capture-{mode}-{writers}")
    client = ctx.client(broker, processes=1)
    try:
        open_all(client, [StreamSpec(f"bench-{n}") for n in range(writers)])
        window = CpuWindow(
            url,
            {"broker": [broker.pid], "sse_clients": [p.pid for p in client.processes]},
        )
        before_id, before_sent = _max_id(url), _delivered(broker)
        tps = _pgbench(ctx, writers, seconds, script, window)
        inserted = _max_id(url) - before_id
        delivered = 0
        if mode != "none":
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                delivered = _delivered(broker) - before_sent
                if delivered >= inserted:
                    break
                time.sleep(0.2)
        client.close()
    finally:
        client.terminate()
        broker.stop()
    if mode == "wal":
        _wait_slot_idle(url)
    return {"tps": tps, "rows": inserted, "delivered": delivered, "cpu": window.shares()}


def _recvlogical_phase(ctx: Context, writers: int, seconds: int, script: Path) -> dict[str, Any]:
    """pgbench while `pg_recvlogical` reads the slot on the broker's CPU: the WAL capture's
    cost with pgsse's part taken out (the walsender's decoding and sending remain).

    It asks for what the broker's `SlotStream` asks (pgoutput, protocol 1, the publication,
    logical messages) and writes it to /dev/null; `-F 0` reports each position as flushed
    once written, `-s 1` sends a status update every second (and whenever the server asks)."""
    url = ctx.database.url
    _switch(url, "wal")
    argv = [
        str(ctx.database.server.placement.bin_dir / "pg_recvlogical"),
        "--dbname",
        url,
        "--slot",
        SLOT,
        "--start",
        "--plugin",
        "pgoutput",
        "--option",
        "proto_version=1",
        "--option",
        f"publication_names={PUBLICATION}",
        "--option",
        "messages=true",
        "--file",
        "/dev/null",
        "--fsync-interval",
        "0",
        "--status-interval",
        "1",
        "--no-loop",
    ]
    taskset = shutil.which("taskset")
    if taskset and pinning_available():
        argv = [taskset, "-c", str(BROKER_CPU), *argv]  # taskset execs: same pid
    log = (ctx.workdir / f"recvlogical-{writers}.log").open("ab")
    reader = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        if not _wait_slot(url, active=True):
            raise RuntimeError(f"pg_recvlogical did not start reading; log: {log.name}")
        window = CpuWindow(url, {"recvlogical": [reader.pid]})
        before_id = _max_id(url)
        tps = _pgbench(ctx, writers, seconds, script, window)
        inserted = _max_id(url) - before_id
        if reader.poll() is not None:
            raise RuntimeError(f"pg_recvlogical exited {reader.returncode}; log: {log.name}")
    finally:
        if reader.poll() is None:
            reader.send_signal(signal.SIGINT)  # its clean end: a last status, then exit
            try:
                reader.wait(10)
            except subprocess.TimeoutExpired:
                reader.kill()
                reader.wait(5)
        log.close()
    _wait_slot_idle(url)
    return {"tps": tps, "rows": inserted, "delivered": None, "cpu": window.shares()}


def _wait_slot(url: str, active: bool, timeout: float = 15.0) -> bool:
    """Wait until the slot is read (`active`) or free again (its walsender gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (SLOT,)
            ).fetchone()
        if row is not None and bool(row[0]) == active:
            return True
        time.sleep(0.05)
    return False


def _wait_slot_idle(url: str) -> None:
    if not _wait_slot(url, active=False):
        raise RuntimeError(f"slot {SLOT} still read 15 s after its reader stopped")


def _figures(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each mode's mean rate over its runs, its ratio to none's, rows and deliveries summed,
    the mean CPU shares, the walsender's and the writers' backends' CPU per row, the
    `cpu_ratio`, and each run's rate and CPU."""
    row: dict[str, Any] = {}
    for mode, phases in runs.items():
        tps = round(sum(phase["tps"] for phase in phases) / len(phases))
        cpu = mean_shares([phase["cpu"] for phase in phases])
        delivered = [phase["delivered"] for phase in phases]
        row[mode] = {
            "tps": tps,
            "runs": [phase["tps"] for phase in phases],
            "rows": sum(phase["rows"] for phase in phases),
            "delivered": None if None in delivered else sum(delivered),
            "cpu": cpu,
            "walsender_us_per_row": _per_row(cpu, "walsender", tps, 1e6),
            "walsender_wakeups_per_row": _per_row(cpu, "walsender_wakeups_per_s", tps),
            "writer_backends_us_per_row": _per_row(cpu, "writer_backends", tps, 1e6),
            "cpu_ratio": _cpu_ratio(cpu),
            "phases": [{"tps": phase["tps"], "cpu": phase["cpu"]} for phase in phases],
        }
    floor = row["none"]["tps"]
    for mode in MODES[1:]:
        row[mode]["ratio"] = round(row[mode]["tps"] / floor, 2) if floor else None
    return row


def _cpu_ratio(cpu: dict[str, Any]) -> float | None:
    """The ratio to none if the capture cost the writers only the CPU 1 time its own
    processes took (the walsender, the broker's backends, the SSE clients): the writers'
    share (their backends and pgbench) over that plus the capture's. Measured inside one
    phase, so the machine's drift between phases does not enter it; the measured ratio
    below it is what the capture costs the writers besides (their own work slower per row
    beside a walsender, or drift)."""
    writers = (cpu.get("writer_backends") or 0.0) + (cpu.get("pgbench") or 0.0)
    capture = sum(cpu.get(key) or 0.0 for key in ("walsender", "pgsse_backends", "sse_clients"))
    return round(writers / (writers + capture), 2) if writers else None


def _per_row(cpu: dict[str, Any], key: str, tps: float, scale: float = 1.0) -> float | None:
    """A per-second figure of `cpu` per row written (times `scale`)."""
    value = cpu.get(key)
    return round(value * scale / tps, 3 if scale == 1.0 else 1) if tps and value else None


def _brief(phase: dict[str, Any]) -> str:
    cpu = phase["cpu"]
    return (
        f"{phase['tps']} rows/s, delivered {phase['delivered']} of {phase['rows']};"
        f" CPU 1 busy {cpu.get('cpu1_busy')}, walsender {cpu.get('walsender')},"
        f" writers' backends {cpu.get('writer_backends')}, pgbench {cpu.get('pgbench')},"
        f" pgsse backends {cpu.get('pgsse_backends')}, SSE clients {cpu.get('sse_clients')},"
        f" rest {cpu.get('cpu1_rest')}; walsender wake-ups/s {cpu.get('walsender_wakeups_per_s')}"
    )


def _summary(row: dict[str, Any]) -> str:
    return "  ".join(
        f"{mode} {row[mode]['tps']} {row[mode]['runs']}"
        + (f" ({row[mode]['ratio']})" if mode != "none" else "")
        for mode in MODES
    )


def _delivered(broker: BrokerProcess) -> int:
    return int(broker.stats()["counters"]["eventsDelivered"])


def _pgbench(ctx: Context, writers: int, seconds: int, script: Path, window: CpuWindow) -> float:
    """pgbench's rows/s; `window` measures the CPU inside the run, its first and last
    fifth (at most a second each) left out."""
    binary = ctx.database.server.placement.bin_dir / "pgbench"
    argv = [
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
    ]
    bench = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        margin = min(1.0, seconds / 5)
        time.sleep(margin)  # a measurement window inside the run, not a synchronisation
        window.processes["pgbench"] = [bench.pid]
        window.start()
        time.sleep(seconds - 2 * margin)
        window.stop()
        out, err = bench.communicate(timeout=seconds + 60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(5)
    if bench.returncode != 0:
        raise RuntimeError(f"pgbench exited {bench.returncode}: {out[-500:]} {err[-500:]}")
    found = re.search(r"tps = ([0-9.]+)", out)
    assert found, out + err
    return round(float(found.group(1)))


def _max_id(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()
    return int(row[0]) if row else 0


def _latency(ctx: Context, mode: str, seconds: int) -> dict[str, Any]:
    """Commit returned -> event read, at LATENCY_RATE rows/s over 10 sessions."""
    _switch(ctx.database.url, mode)
    broker = _broker(ctx, mode, f"capture-latency-{mode}")
    client = ctx.client(broker, processes=1)
    sessions = [f"lat-{n}" for n in range(10)]
    try:
        open_all(client, [StreamSpec(name) for name in sessions])
        writes = Writer(ctx.database.url, sessions, rate=LATENCY_RATE, duration=seconds).run()
        client.wait_delivered(writes.last_id_by_session(sessions), timeout=30)
        records, _ = client.close()
    finally:
        client.terminate()
        broker.stop()
    if mode == "wal":
        _wait_slot_idle(ctx.database.url)
    figures = deliveries(records, writes, sessions)
    return {
        "rows": figures.get("rows"),
        "completeness_percent": figures.get("completeness_percent"),
        **(figures.get("latency_ms") or {}),
    }


def _outage(ctx: Context, seconds: int) -> dict[str, Any]:
    """The wal broker killed for `seconds` while a writer goes on; the slot's lag meanwhile,
    and how long a new broker takes to drain it."""
    url = ctx.database.url
    _switch(url, "wal")
    broker = _broker(ctx, "wal", "capture-outage-1")
    writer = Writer(url, ["outage"], rate=OUTAGE_RATE, duration=seconds + 15).start()
    time.sleep(writer.delay + 3)
    assert broker.process is not None
    broker.process.send_signal(signal.SIGKILL)
    broker.process.wait(10)
    samples = []
    began = time.monotonic()
    while (elapsed := time.monotonic() - began) < seconds:
        lag = asyncio.run(_lag(url))
        samples.append({"s": round(elapsed, 1), "bytes": lag.bytes, "seconds": lag.seconds})
        time.sleep(max(0.0, len(samples) - (time.monotonic() - began)))
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    target_lsn = parse_lsn(str(row[0]))
    restarted = time.monotonic()
    second = _broker(ctx, "wal", "capture-outage-2")
    ready = time.monotonic() - restarted
    drained = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with psycopg.connect(url, autocommit=True) as conn:
                found = conn.execute(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
                    " WHERE slot_name = %s",
                    (SLOT,),
                ).fetchone()
            if found and parse_lsn(str(found[0])) >= target_lsn:
                drained = time.monotonic() - restarted
                break
            time.sleep(0.05)
        writer.join()
        routed = int(second.stats()["counters"]["messagesRouted"])
    finally:
        second.stop()
    last = samples[-1] if samples else {}
    return {
        "outage_s": seconds,
        "rows_per_s": OUTAGE_RATE,
        "lag_at_end": last,
        "lag_samples": samples,
        "new_reader_ready_s": round(ready, 2),
        "drained_s": None if drained is None else round(drained, 2),
        "rows_routed_by_new_reader": routed,
    }


async def _lag(url: str) -> Any:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await slot_lag(conn, SLOT)
