"""The `scaleout` scenario: what the bus buys and what it costs.

- INSERT rows/s (the trigger firing, 4 writer connections as fast as they go) with the database
  alone, then with 1, 4 and 16 broker processes, first each LISTENing (no bus), then on the bus
  (one relay LISTENs). The processes are one `serve --workers K` (on the broker CPU).
- p99 commit -> client at 500 rows/s over 1,000 sessions, one broker without and with the bus:
  what the bus adds (XADD, then XREAD on every broker).
- Redis's own CPU (utime + stime from /proc) per phase on the bus.

Redis runs as tests/support/redis.py starts it, with `appendfsync everysec` (the usual
production setting; the tests fsync every write to prove nothing is lost), on the brokers' CPU:
in production it is on another host, not taking the database's CPU.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from tests.bench.analysis import deliveries
from tests.bench.client import StreamSpec
from tests.bench.harness import BROKER_CPU, BrokerProcess, cpu_seconds, pinning_available
from tests.bench.scenarios import Context, open_all, target, wait_for
from tests.bench.writer import Writer, Writes
from tests.support.redis import RedisServer

PROCESSES = (1, 4, 16)
WRITERS = 4  # as docs/deployment.md's pgbench measurement
LISTENER = "pgsse-listener"


def scaleout(ctx: Context) -> dict[str, Any]:
    seconds = ctx.pick(5, 3)
    redis = RedisServer(fsync="everysec").start()
    assert redis.process is not None
    if pinning_available():  # with the brokers: Redis would be on another host, not the DB's
        os.sched_setaffinity(redis.process.pid, {BROKER_CPU})
    try:
        alone = _insert_rate(ctx, seconds)
        inserts: dict[str, Any] = {"database alone": alone}
        for bus in (False, True):
            for count in PROCESSES:
                name = f"{count} {'on the bus' if bus else 'LISTENing'}"
                inserts[name] = _with_brokers(ctx, count, redis if bus else None, seconds)
        latency = {
            "no bus": _latency(ctx, None, ctx.pick(10, 5)),
            "bus": _latency(ctx, redis, ctx.pick(10, 5)),
        }
    finally:
        redis.destroy()
    for name, figures in inserts.items():
        redis_cost = figures.get("redis_cpu_ms_per_1000_rows")
        extra = "" if redis_cost is None else f", Redis {redis_cost} ms CPU / 1000 rows"
        print(f"   INSERT rows/s, {name}: {figures['rows_per_s']}{extra}", flush=True)
    single = inserts["1 LISTENing"]["rows_per_s"]
    ratio = round(inserts["16 on the bus"]["rows_per_s"] / single, 3) if single else None
    p99 = {name: (figures.get("latency_ms") or {}).get("p99") for name, figures in latency.items()}
    bus_p99, plain_p99 = p99["bus"], p99["no bus"]
    added = None if bus_p99 is None or plain_p99 is None else round(bus_p99 - plain_p99, 2)
    return {
        "writer_connections": WRITERS,
        "inserts": inserts,
        "latency_500_rows_per_s_1000_sessions": latency,
        "bus_added_p99_ms": added,
        "targets": [
            target(
                "16 brokers on the bus: >= 90% of 1 broker's INSERT rows/s",
                ratio,
                ratio is not None and ratio >= 0.9,
            ),
            target(
                "the bus adds <= 2 ms to p99 commit -> client",
                added,
                added is not None and added <= 2,
            ),
            target(
                "100% delivered on the bus",
                latency["bus"].get("completeness_percent"),
                latency["bus"].get("completeness_percent") == 100,
            ),
        ],
    }


def _insert_rate(ctx: Context, seconds: float) -> dict[str, Any]:
    writes = Writer(
        ctx.database.url, ["scaleout"], rate=None, duration=seconds, connections=WRITERS
    ).run()
    return {"rows_per_s": round(writes.rate, 1), "rows": len(writes)}


def _brokers(ctx: Context, name: str, count: int, redis: RedisServer | None) -> BrokerProcess:
    """`serve --workers count`, started and holding the listening backends it should."""
    env = {"BROKER_WORKERS": str(count)}
    if redis is not None:
        env |= {"BROKER_BUS_URL": redis.url, "BROKER_BUS_STREAM": f"bench:{uuid.uuid4().hex}"}
    broker = ctx.broker(name, extra_env=env).start(timeout=60)
    listening = 1 if redis is not None else count
    if not wait_for(lambda: _listening(ctx) == listening, 60):
        broker.stop()
        raise RuntimeError(f"{name}: {_listening(ctx)} listening backends, not {listening}")
    return broker


def _with_brokers(
    ctx: Context, count: int, redis: RedisServer | None, seconds: float
) -> dict[str, Any]:
    name = f"scaleout-{count}-{'bus' if redis else 'listen'}"
    broker = _brokers(ctx, name, count, redis)
    try:
        redis_before = _redis_cpu(redis)
        figures = _insert_rate(ctx, seconds)
        figures["listening_backends"] = _listening(ctx)
        if redis is not None:
            cpu = _redis_cpu(redis) - redis_before
            figures["redis_cpu_s"] = round(cpu, 3)
            figures["redis_cpu_ms_per_1000_rows"] = round(cpu * 1e6 / figures["rows"], 2)
    finally:
        broker.stop()
    return figures


def _latency(ctx: Context, redis: RedisServer | None, seconds: float) -> dict[str, Any]:
    rate, sessions = 500, [f"scaleout-{index}" for index in range(1_000)]
    broker = _brokers(ctx, f"scaleout-latency-{'bus' if redis else 'listen'}", 1, redis)
    client = ctx.client(broker)
    try:
        open_all(client, [StreamSpec(name) for name in sessions])
        time.sleep(1)
        redis_before = _redis_cpu(redis)
        started = time.monotonic()
        writes: Writes = Writer(ctx.database.url, sessions, rate=rate, duration=seconds).run()
        done, _ = client.wait_delivered(writes.last_id_by_session(sessions), timeout=30)
        elapsed = time.monotonic() - started
        redis_cpu = _redis_cpu(redis) - redis_before
        records, _ = client.close()
    finally:
        client.terminate()
        broker.stop()
    figures = deliveries(records, writes, sessions)
    keep = ("rows", "completeness_percent", "duplicates", "latency_ms")
    result = {key: figures.get(key) for key in keep} | {"drained": done}
    if redis is not None:
        result["redis_cpu_percent_of_a_core"] = round(100 * redis_cpu / elapsed, 2)
    return result


def _listening(ctx: Context) -> int:
    rows = ctx.database.query(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (LISTENER,)
    )
    return int(rows[0][0])


def _redis_cpu(redis: RedisServer | None) -> float:
    if redis is None or redis.process is None:
        return 0.0
    return cpu_seconds(redis.process.pid)


__all__ = ["scaleout"]
