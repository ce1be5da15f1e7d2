"""Where an idle stream's memory goes: `python -m tests.bench.memory [--streams N]`.

Runs the real `broker serve` under tracemalloc (in a process of its own, pinned like the
benchmark's), opens N idle streams with the load client, and compares tracemalloc snapshots
taken before and after (on SIGUSR1). Prints the RSS growth per stream, the part of it Python's
allocator traced, and the allocation sites that grew most, per stream. What tracemalloc does
not see (uvloop's and httptools' C structures, malloc overhead) is the difference.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from tests.bench.client import LoadClient, StreamSpec
from tests.bench.harness import BrokerProcess, Database, pin_self_to_load_cpu, raise_file_limit

SNAPSHOT_ENV = "PGSSE_BENCH_SNAPSHOT"


def traced_broker() -> None:
    """`broker serve`, with tracemalloc on and SIGUSR1 writing a snapshot to $SNAPSHOT_ENV."""
    tracemalloc.start(12)
    target = Path(os.environ[SNAPSHOT_ENV])
    taken = 0

    def dump(signum: int, frame: object) -> None:
        nonlocal taken
        path = target.with_name(f"{target.name}.{taken}")
        tracemalloc.take_snapshot().dump(str(path))
        path.with_name(path.name + ".done").touch()
        taken += 1

    signal.signal(signal.SIGUSR1, dump)
    from broker.cli import main

    sys.exit(main(["serve"]))


def _snapshot(broker: BrokerProcess, base: Path, index: int) -> tracemalloc.Snapshot:
    path = base.with_name(f"{base.name}.{index}")
    broker.process.send_signal(signal.SIGUSR1)  # type: ignore[union-attr]
    deadline = time.monotonic() + 120
    while not path.with_name(path.name + ".done").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("no snapshot from the broker")
        time.sleep(0.2)
    return tracemalloc.Snapshot.load(str(path))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.memory", description=__doc__)
    parser.add_argument("--streams", type=int, default=2_000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--group", choices=["lineno", "filename", "traceback"], default="lineno")
    args = parser.parse_args()
    raise_file_limit()
    pin_self_to_load_cpu()
    workdir = Path(tempfile.mkdtemp(prefix="pgsse-memory-"))
    database = Database(workdir / "data").start()
    snapshot = workdir / "snapshot"
    broker = BrokerProcess(
        database.url,
        workdir / "broker.log",
        max_connections=args.streams + 100,
        extra_env={SNAPSHOT_ENV: str(snapshot)},
        command=("-c", "from tests.bench.memory import traced_broker; traced_broker()"),
    )
    client = None
    try:
        broker.start(timeout=60)
        client = LoadClient(broker.port, 1)
        # Warm every code path once (a few streams), then measure from there.
        client.open([StreamSpec(f"warm-{i}") for i in range(20)], reconnect=False)
        time.sleep(1)
        rss_before = broker.rss_kb()
        before = _snapshot(broker, snapshot, 0)
        opened = client.open(
            [StreamSpec(f"mem-{i}") for i in range(args.streams)], reconnect=False, timeout=300
        )
        time.sleep(2)
        rss_after = broker.rss_kb()
        after = _snapshot(broker, snapshot, 1)
    finally:
        if client is not None:
            client.terminate()
        broker.stop()
        database.stop()
    count = opened["opened"] or 1
    stats = after.compare_to(before, args.group)
    traced = sum(stat.size_diff for stat in stats)
    print(f"streams opened: {opened['opened']} (failed {opened['failed']})")
    print(f"RSS growth: {(rss_after - rss_before) * 1024 / count / 1024:.2f} KB/stream")
    print(f"traced by tracemalloc: {traced / count / 1024:.2f} KB/stream")
    print(f"\ntop {args.top} sites by growth, bytes per stream (count per stream):")
    for stat in stats[: args.top]:
        where = stat.traceback.format()[-1].strip() if args.group != "traceback" else ""
        frame = stat.traceback[0]
        print(
            f"{stat.size_diff / count:9.0f} B  {stat.count_diff / count:6.2f}  "
            f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}  {where[:60]}"
        )
        if args.group == "traceback":
            for line in stat.traceback.format()[-12:]:
                print("      " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
