"""The scenarios: each starts its own broker, drives load, and returns figures and targets.

Every loop here is bounded in count and in time; `--quick` shortens each one. The targets are
those of docs/benchmarks.md, for a 2-core machine with the broker alone on one core.

- `idle`: N streams on N sessions, opened in steps; broker RSS growth per stream, PostgreSQL
  backends held while they are open.
- `fanout`: 1000 subscribers on one session; rows at fixed rates (50/s is the headline), then
  a burst as fast as the writer can: deliveries/s, completeness, latency, memory.
- `spread`: 1000 subscribers on 1000 sessions, rows round robin at 500/s.
- `churn`: streams opened and closed at a steady rate (some resume with Last-Event-ID, some end
  with RST) while rows flow; RSS, open descriptors, threads and stats before and after.
- `relay`: the rows/s the database commits with the trigger and the writer alone, then the
  same with the broker relaying to one subscriber; then 100 rows per statement as fast as the
  writer can (many notifications per wake-up). Broker CPU per row relayed, for both, beside
  the floor's (`floor.py`); and the broker's system calls per row at 500 rows/s (`strace -c`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.feeds.listener import CHANNEL
from tests.bench import syscalls
from tests.bench.analysis import deliveries, summarize_records, trend
from tests.bench.client import LoadClient, StreamRecord, StreamSpec
from tests.bench.floor import FloorRelay
from tests.bench.harness import (
    BareListener,
    BrokerProcess,
    Database,
    Sampler,
    profiled,
    summarize_profile,
)
from tests.bench.writer import Writer, Writes

EVENT_BYTES_ESTIMATE = 420  # one encoded `message` event of the writer's rows
RELAY_BATCH = 100  # rows per statement in the relay's batch phase
TRACED_RATE = 500  # rows/s, one per statement, while strace counts the broker's system calls


@dataclass(frozen=True)
class Options:
    quick: bool = False
    client_processes: int = 2
    writer_connections: int = 1
    profile: bool = False
    native: bool = False


class Context:
    """What a scenario needs: the database, options, and where files go."""

    def __init__(self, options: Options, database: Database, workdir: Path, results: Path):
        self.options = options
        self.database = database
        self.workdir = workdir
        self.results = results
        self.profiles: dict[str, Any] = {}

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.options.quick else full

    def broker(self, name: str, **settings: Any) -> BrokerProcess:
        return BrokerProcess(self.database.url, self.workdir / f"broker-{name}.log", **settings)

    def client(self, broker: BrokerProcess, processes: int | None = None) -> LoadClient:
        return LoadClient(broker.port, processes or self.options.client_processes)

    @contextmanager
    def profile(self, broker: BrokerProcess, name: str, seconds: float) -> Iterator[None]:
        """With `--profile`, py-spy samples the broker during the block (up to `seconds`)."""
        if not self.options.profile:
            yield
            return
        out = self.results / f"profile-{name}.txt"
        with profiled(broker.pid, out, seconds, native=self.options.native) as path:
            yield
        if path is not None and path.exists():
            self.profiles[name] = {"file": str(path.name), **summarize_profile(path)}


def per_cpu_second(figures: dict[str, Any], cpu: dict[str, Any]) -> float | None:
    """Deliveries per second of broker CPU: the per-core figure, robust to a busy machine."""
    seconds = cpu.get("broker_cpu_seconds")
    delivered = figures.get("delivered")
    return round(delivered / seconds) if seconds and delivered else None


def cpu_us_per_row(figures: dict[str, Any], cpu: dict[str, Any]) -> float | None:
    """Broker CPU microseconds per row delivered (to one subscriber: per row relayed)."""
    seconds = cpu.get("broker_cpu_seconds")
    delivered = figures.get("delivered")
    return round(seconds * 1e6 / delivered, 1) if seconds and delivered else None


def bottleneck(window: dict[str, Any]) -> str:
    """What most likely limited a phase, from the CPU shares of its window."""
    broker = window.get("broker_cpu") or 0.0
    if broker >= 0.9:
        return "broker CPU (saturated)"
    others = window.get("cpu0_others") or 0.0
    if others >= 0.2:
        return f"CPU 0 shared: other processes took {others:.0%} of it"
    if (window.get("cpu1_busy") or 0.0) >= 0.95:
        return "load CPU 1 saturated (clients, PostgreSQL, writer, others)"
    return "none: idle CPU left"


def target(description: str, value: Any, ok: bool | None) -> dict[str, Any]:
    return {"target": description, "value": value, "ok": ok}


def open_all(client: LoadClient, specs: list[StreamSpec]) -> dict[str, Any]:
    """Open every stream or fail the scenario: its figures would mean nothing otherwise."""
    opened = client.open(specs)
    if opened["opened"] != len(specs):
        raise RuntimeError(f"only {opened['opened']} of {len(specs)} streams opened: {opened}")
    return opened


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wait_streams_closed(broker: BrokerProcess, timeout: float = 30.0) -> bool:
    return wait_for(lambda: broker.stats()["totalConnections"] == 0, timeout)


def idle(ctx: Context) -> dict[str, Any]:
    total = ctx.pick(15_000, 2_000)
    steps = ctx.pick([1_000, 5_000, 10_000, 15_000], [500, 2_000])
    broker = ctx.broker("idle", max_connections=total + 1_000).start()
    client = ctx.client(broker)
    try:
        time.sleep(1)
        base = broker.status()
        base_fds = broker.open_fds()
        base_backends = ctx.database.backends()
        points = []
        requested = opened = failed = 0
        for step in steps:
            specs = [StreamSpec(f"idle-{index}") for index in range(requested, step)]
            with ctx.profile(broker, "idle-connect", 20) if step == steps[-1] else _nothing():
                result = client.open(specs, reconnect=False, timeout=240)
            requested = step
            opened += result["opened"]
            failed += result["failed"]
            time.sleep(2)
            status = broker.status()
            points.append(
                {
                    "streams": step,
                    "opened": opened,
                    "failed": failed,
                    "connects_per_s": round(len(specs) / result["seconds"], 1),
                    "rss_kb": status["VmRSS"],
                    "growth_kb_per_stream": round((status["VmRSS"] - base["VmRSS"]) / step, 2),
                    "open_fds": broker.open_fds(),
                    "total_connections": broker.stats()["totalConnections"],
                }
            )
        backends = ctx.database.backends()
        records, client_cpu = client.close()
        closed = wait_streams_closed(broker, 60)
        time.sleep(1)
        after = broker.status()
    finally:
        client.terminate()
        broker.stop()
    last = points[-1]
    per_stream = last["growth_kb_per_stream"]
    slope = None
    if len(points) >= 2:
        a, b = points[-2], points[-1]
        slope = round((b["rss_kb"] - a["rss_kb"]) / (b["streams"] - a["streams"]), 2)
    return {
        "streams": total,
        "base_rss_kb": base["VmRSS"],
        "base_fds": base_fds,
        "steps": points,
        "growth_kb_per_stream": per_stream,
        "marginal_kb_per_stream": slope,
        "backends_at_zero_streams": base_backends,
        "backends": backends,
        "closed_all": closed,
        "rss_after_close_kb": after["VmRSS"],
        "streams_summary": summarize_records(records),
        "client_cpu_seconds": round(client_cpu, 2),
        "targets": [
            target(f"{total} streams open", last["opened"], last["opened"] == total),
            target("RSS growth <= 12 KB/stream", per_stream, per_stream <= 12),
            target(
                "one listening backend",
                backends["listening_backends"],
                backends["listening_backends"] == 1,
            ),
            target(
                "backends independent of streams",
                f"{base_backends['client_backends']} -> {backends['client_backends']}",
                backends["client_backends"] <= base_backends["client_backends"],
            ),
        ],
    }


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def fanout(ctx: Context) -> dict[str, Any]:
    subscribers = 1_000
    session = "fanout"
    rates = ctx.pick([(10, 5), (50, 20), (100, 5), (200, 5)], [(50, 5), (200, 3)])
    burst_rows = ctx.pick(5_000, 1_000)
    burst_seconds = ctx.pick(10, 4)
    queue_size = burst_rows + 2_000
    broker = ctx.broker("fanout", queue_size=queue_size).start()
    client = ctx.client(broker)
    phases: list[tuple[str, float | None, Writes, dict[str, Any]]] = []
    try:
        opened = open_all(client, [StreamSpec(session) for _ in range(subscribers)])
        time.sleep(1)
        base = broker.status()
        with Sampler(broker) as sampler:
            for rate, seconds in rates:
                started = time.monotonic()
                with ctx.profile(broker, "fanout-50", seconds + 2) if rate == 50 else _nothing():
                    writes = Writer(ctx.database.url, [session], rate=rate, duration=seconds).run()
                done, waited = client.wait_delivered({session: writes.ids[-1]}, timeout=30)
                extra = {
                    "drained": done,
                    "drain_wait_s": round(waited, 2),
                    **sampler.window(started, time.monotonic()),
                }
                phases.append((f"{rate}/s", rate, writes, extra))
            started = time.monotonic()
            with ctx.profile(broker, "fanout-max", ctx.pick(30, 15)):
                writer = Writer(
                    ctx.database.url,
                    [session],
                    rate=None,
                    duration=burst_seconds,
                    max_rows=burst_rows,
                    connections=ctx.options.writer_connections,
                )
                writes = writer.run()
                done, waited = client.wait_delivered(
                    {session: writes.ids[-1]}, timeout=ctx.pick(120, 45)
                )
            extra = {
                "drained": done,
                "drain_wait_s": round(waited, 2),
                **sampler.window(started, time.monotonic()),
            }
            phases.append(("max", None, writes, extra))
            time.sleep(0.5)
        peak = sampler.peak_rss_kb()
        stats = broker.stats()
        records, client_cpu = client.close()
    finally:
        client.terminate()
        broker.stop()
    results: dict[str, Any] = {}
    for name, rate, writes, extra in phases:
        figures = deliveries(records, writes, [session])
        figures.update(extra)
        figures["offered_rows_per_s"] = rate
        figures["offered_deliveries_per_s"] = None if rate is None else rate * subscribers
        figures["deliveries_per_broker_cpu_s"] = per_cpu_second(figures, extra)
        figures["bottleneck"] = bottleneck(extra)
        results[name] = figures
    bound_kb = (subscribers * queue_size * 8 + burst_rows * EVENT_BYTES_ESTIMATE) // 1024
    headline = results.get("50/s", {})
    burst = results["max"]
    p99 = (headline.get("latency_ms") or {}).get("p99")
    per_cpu_10 = results.get("10/s", {}).get("deliveries_per_broker_cpu_s")
    rate_sustained = burst.get("sustained_per_s") or burst.get("deliveries_per_s") or 0
    return {
        "subscribers": subscribers,
        "opened": opened,
        "queue_size": queue_size,
        "phases": results,
        "base_rss_kb": base["VmRSS"],
        "peak_rss_kb": peak,
        "memory_bound_kb": base["VmRSS"] + bound_kb,
        "broker_counters": stats.get("counters"),
        "streams_summary": summarize_records(records),
        "client_cpu_seconds": round(client_cpu, 2),
        "targets": [
            target(
                "50 rows/s: 100% delivered",
                headline.get("completeness_percent"),
                headline.get("completeness_percent") == 100,
            ),
            target("50 rows/s: p99 <= 20 ms", p99, p99 is not None and p99 <= 20),
            target(
                "10 rows/s: >= 100k deliveries per broker CPU-s",
                per_cpu_10,
                per_cpu_10 is not None and per_cpu_10 >= 100_000,
            ),
            target(
                "max rate: >= 100k deliveries/s sustained",
                rate_sustained,
                rate_sustained >= 100_000,
            ),
            target(
                "max rate: 100% delivered after writer stops",
                burst.get("completeness_percent"),
                burst.get("completeness_percent") == 100,
            ),
            target(
                "max rate: peak RSS within queue bound",
                peak,
                peak <= base["VmRSS"] + bound_kb,
            ),
        ],
    }


def spread(ctx: Context) -> dict[str, Any]:
    count = 1_000
    rate = 500
    seconds = ctx.pick(20, 5)
    sessions = [f"spread-{index}" for index in range(count)]
    broker = ctx.broker("spread").start()
    client = ctx.client(broker)
    try:
        opened = open_all(client, [StreamSpec(name) for name in sessions])
        time.sleep(1)
        with Sampler(broker) as sampler:
            started = time.monotonic()
            with ctx.profile(broker, "spread", seconds + 2):
                writes = Writer(ctx.database.url, sessions, rate=rate, duration=seconds).run()
            done, waited = client.wait_delivered(writes.last_id_by_session(sessions), timeout=30)
            cpu = sampler.window(started, time.monotonic())
        records, client_cpu = client.close()
    finally:
        client.terminate()
        broker.stop()
    figures = deliveries(records, writes, sessions)
    p99 = (figures.get("latency_ms") or {}).get("p99")
    return {
        "sessions": count,
        "opened": opened,
        "offered_rows_per_s": rate,
        "offered_deliveries_per_s": rate,
        **figures,
        "drained": done,
        "drain_wait_s": round(waited, 2),
        **cpu,
        "deliveries_per_broker_cpu_s": per_cpu_second(figures, cpu),
        "bottleneck": bottleneck(cpu),
        "streams_summary": summarize_records(records),
        "client_cpu_seconds": round(client_cpu, 2),
        "targets": [
            target(
                "100% delivered",
                figures.get("completeness_percent"),
                figures.get("completeness_percent") == 100,
            ),
            target("p99 <= 1 ms", p99, p99 is not None and p99 <= 1),
        ],
    }


def churn(ctx: Context) -> dict[str, Any]:
    rate = 50.0
    warmup = ctx.pick(10, 4)
    seconds = ctx.pick(60, 10)
    lifetime = (0.2, 4.0)
    sessions = [f"churn-{index}" for index in range(50)]
    broker = ctx.broker("churn").start()
    client = ctx.client(broker)
    writer = Writer(ctx.database.url, sessions, rate=20, duration=warmup + seconds + 10)
    churn_args = {
        "sessions": sessions,
        "rate": rate,
        "lifetime": lifetime,
        "resume_share": 0.25,
        "abort_share": 0.1,
    }
    try:
        writer.start()
        time.sleep(writer.delay + 0.5)
        warm = client.churn(duration=warmup, seed=1, **churn_args)
        wait_streams_closed(broker, 30)
        time.sleep(2)

        def snapshot() -> dict[str, Any]:
            status = broker.status()
            stats = broker.stats()
            return {
                "rss_kb": status["VmRSS"],
                "threads": status["Threads"],
                "open_fds": broker.open_fds(),
                "tcp_sockets": broker.tcp_sockets(),
                "total_connections": stats["totalConnections"],
                "channels": len(stats["channels"]),
                "tasks": stats.get("tasks"),
            }

        before = snapshot()
        with ctx.profile(broker, "churn", min(seconds, 30)):
            main = client.churn(duration=seconds, seed=2, **churn_args)
        closed = wait_streams_closed(broker, 30)
        time.sleep(2)
        after = snapshot()
        writes = writer.join()
        _, client_cpu = client.close()
    finally:
        client.terminate()
        broker.stop()
    growth = round(100 * (after["rss_kb"] - before["rss_kb"]) / before["rss_kb"], 2)
    back_to_zero = after["total_connections"] == 0 and after["channels"] == 0
    return {
        "rate_per_s": rate,
        "churn_seconds": seconds,
        "lifetime_s": list(lifetime),
        "rows_written": len(writes),
        "warmup": warm,
        "run": main,
        "before": before,
        "after": after,
        "closed_all": closed,
        "rss_growth_percent": growth,
        "client_cpu_seconds": round(client_cpu, 2),
        "targets": [
            target("RSS after within 5% of before", growth, growth <= 5),
            target("stats back to zero", back_to_zero, back_to_zero),
            target(
                "TCP sockets back to before",
                f"{before['tcp_sockets']} -> {after['tcp_sockets']}",
                after["tcp_sockets"] <= before["tcp_sockets"],
            ),
            target(
                "tasks back to before (stats 'tasks', if the broker reports it)",
                after["tasks"],
                None if after["tasks"] is None else after["tasks"] <= (before["tasks"] or 0),
            ),
        ],
    }


def relay(ctx: Context) -> dict[str, Any]:
    seconds = ctx.pick(10, 4)
    connections = ctx.options.writer_connections
    session = "relay"
    alone = Writer(
        ctx.database.url, [session], rate=None, duration=seconds, connections=connections
    ).run()
    # The same with a bare LISTEN connection draining the notifications (no broker): the part
    # of any slowdown that is PostgreSQL's own cost of delivering NOTIFY to a listener.
    with BareListener(ctx.database.url, CHANNEL, seconds + 15) as bare:
        listened = Writer(
            ctx.database.url, [session], rate=None, duration=seconds, connections=connections
        ).run()
    bare_received = bare.received()
    floor = {
        f"{batch}_per_statement": relay_floor(ctx, seconds, batch) for batch in (1, RELAY_BATCH)
    }
    broker = ctx.broker("relay", queue_size=200_000).start()
    client = ctx.client(broker, processes=1)

    def phase(name: str, batch: int) -> tuple[Writes, dict[str, Any]]:
        """The writer as fast as it can, `batch` rows per statement; the broker's window."""
        started = time.monotonic()
        with ctx.profile(broker, name, seconds + 2):
            writes = Writer(
                ctx.database.url,
                [session],
                rate=None,
                duration=seconds,
                connections=connections,
                batch=batch,
            ).run()
        done, waited = client.wait_delivered({session: writes.ids[-1]}, timeout=60)
        window = sampler.window(started, time.monotonic())
        return writes, {**window, "drained": done, "drain_wait_s": round(waited, 2)}

    try:
        open_all(client, [StreamSpec(session)])
        time.sleep(1)
        with Sampler(broker) as sampler:
            writes, cpu = phase("relay", 1)
            batched, batch_cpu = phase("relay-batch", RELAY_BATCH)
        with syscalls.counted(broker.pid) as calls:
            traced = Writer(
                ctx.database.url, [session], rate=TRACED_RATE, duration=ctx.pick(4, 2)
            ).run()
            client.wait_delivered({session: traced.ids[-1]}, timeout=60)
        records, client_cpu = client.close()
    finally:
        client.terminate()
        broker.stop()
    figures = deliveries(records, writes, [session])
    delivered_rate = figures.get("deliveries_per_s") or 0
    ratio = round(delivered_rate / alone.rate, 3) if alone.rate else None
    commit_ratio = round(writes.rate / alone.rate, 3) if alone.rate else None
    lag = figures.get("last_delivery_after_last_commit_s")
    per_row = cpu_us_per_row(figures, cpu)
    batch = {
        "rows_per_statement": RELAY_BATCH,
        "committed_rows_per_s": round(batched.rate, 1),
        **deliveries(records, batched, [session]),
        "latency_trend": trend(batched, records),
        **batch_cpu,
    }
    batch["broker_cpu_us_per_row"] = batch_per_row = cpu_us_per_row(batch, batch_cpu)
    batch_lag = batch.get("last_delivery_after_last_commit_s")
    return {
        "writer_connections": connections,
        "db_alone_rows_per_s": round(alone.rate, 1),
        "db_with_bare_listener_rows_per_s": round(listened.rate, 1),
        "bare_listener_received": bare_received,
        "bare_listener_rows": len(listened),
        "with_broker_over_bare_listener": round(writes.rate / listened.rate, 3)
        if listened.rate
        else None,
        "with_broker_rows_per_s": round(writes.rate, 1),
        "delivered_rows_per_s": delivered_rate,
        "delivered_over_db_alone": ratio,
        "committed_with_broker_over_alone": commit_ratio,
        **figures,
        "latency_trend": trend(writes, records),
        **cpu,
        "broker_cpu_us_per_row": per_row,
        "deliveries_per_broker_cpu_s": per_cpu_second(figures, cpu),
        "bottleneck": bottleneck(cpu),
        "batch": batch,
        "floor": floor,
        "syscalls_per_row": {"rows_per_s": TRACED_RATE, **syscalls.per_row(calls, len(traced))},
        "client_cpu_seconds": round(client_cpu, 2),
        "streams_summary": summarize_records(records),
        "targets": [
            target(
                ">= 95% of the database's own rows/s", ratio, ratio is not None and ratio >= 0.95
            ),
            target(
                "no backlog: last delivery <= 1 s after last commit",
                lag,
                lag is not None and lag <= 1,
            ),
            target(
                "broker CPU per relayed row <= 30 us",
                per_row,
                per_row is not None and per_row <= 30,
            ),
            target(
                f"{RELAY_BATCH} rows per statement: 100% delivered",
                batch.get("completeness_percent"),
                batch.get("completeness_percent") == 100,
            ),
            target(
                f"{RELAY_BATCH} rows per statement: last delivery <= 1 s after last commit",
                batch_lag,
                batch_lag is not None and batch_lag <= 1,
            ),
            target(
                f"{RELAY_BATCH} rows per statement: broker CPU per row <= 30 us",
                batch_per_row,
                batch_per_row is not None and batch_per_row <= 30,
            ),
        ],
    }


def relay_floor(ctx: Context, seconds: float, batch: int) -> dict[str, Any]:
    """The same writer against `FloorRelay`: the machine's own cost of relaying a row."""
    with FloorRelay(ctx.database.url, CHANNEL) as floor:
        before = floor.cpu_seconds()
        writes = Writer(ctx.database.url, ["relay"], rate=None, duration=seconds, batch=batch).run()
        relayed = wait_for(lambda: floor.events >= len(writes), 60, interval=0.05)
        cpu = floor.cpu_seconds() - before
    return {
        "rows": len(writes),
        "rows_per_s": round(writes.rate, 1),
        "all_relayed": relayed,
        "cpu_us_per_row": round(cpu * 1e6 / len(writes), 1) if len(writes) else None,
    }


SCENARIOS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "idle": idle,
    "fanout": fanout,
    "spread": spread,
    "churn": churn,
    "relay": relay,
}

__all__ = ["SCENARIOS", "Context", "Options", "StreamRecord"]
