"""`python -m tests.bench [--scenario NAME ...] [--quick] [--profile]`: run the benchmarks.

Starts an embedded PostgreSQL in a temporary directory, runs each chosen scenario against a
broker process of its own, then prints a table and writes `results/latest.json` (and a
timestamped copy) and `results/latency.png`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import psycopg

from tests.bench import report
from tests.bench.capture import capture
from tests.bench.capture_cost import capture_cost
from tests.bench.harness import Database, machine, pin_self_to_load_cpu, raise_file_limit
from tests.bench.scaleout import scaleout
from tests.bench.scenarios import SCENARIOS, Context, Options

SCENARIOS = {
    **SCENARIOS,
    "scaleout": scaleout,
    "capture": capture,
    "capture-cost": capture_cost,
}  # own modules: scenarios.py is full

RESULTS = Path(__file__).parent / "results"
PACKAGES = ("starlette", "uvicorn", "uvloop", "httptools", "orjson", "psycopg", "anyio")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        help="run this scenario (repeatable; a scenario named twice runs twice, the second "
        "as NAME#2); default: all, in this order: " + ", ".join(SCENARIOS),
    )
    parser.add_argument("--quick", action="store_true", help="shorter, smaller runs")
    parser.add_argument("--profile", action="store_true", help="py-spy the broker's key phases")
    parser.add_argument("--native", action="store_true", help="with --profile: C frames too")
    parser.add_argument("--client-processes", type=int, default=2, help="SSE client processes")
    parser.add_argument(
        "--writer-connections", type=int, default=1, help="parallel writers for max-rate phases"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="output directory")
    args = parser.parse_args(argv)
    names = args.scenario or list(SCENARIOS)
    options = Options(
        quick=args.quick,
        client_processes=args.client_processes,
        writer_connections=args.writer_connections,
        profile=args.profile or args.native,
        native=args.native,
    )

    file_limit = raise_file_limit()
    pinned = pin_self_to_load_cpu()
    started = time.monotonic()
    now = datetime.datetime.now(datetime.UTC)
    results: dict[str, Any] = {
        "meta": {
            "date": now.strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "git": _git_revision(),
            "packages": _versions(),
            "options": {**options.__dict__, "scenarios": names},
            "placement": "broker on CPU 0 (taskset); PostgreSQL, writer, clients on CPU 1"
            if pinned
            else "not pinned (fewer than 2 CPUs or no sched_setaffinity)",
            "file_limit": file_limit,
        },
        "scenarios": {},
    }
    args.results.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="pgsse-bench-"))
    database = Database(workdir / "data")
    try:
        database.start()
        context = Context(options, database, workdir, args.results)
        for index, name in enumerate(names):
            runs = names[:index].count(name)
            key = name if not runs else f"{name}#{runs + 1}"
            print(f"== {key} ...", flush=True)
            _settle(database)
            began = time.monotonic()
            try:
                result = SCENARIOS[name](context)
            except Exception as exc:  # one scenario's failure must not lose the others
                traceback.print_exc()
                result = {"error": f"{type(exc).__name__}: {exc}"}
            result["seconds"] = round(time.monotonic() - began, 1)
            result["load_average"] = [round(x, 2) for x in _loadavg()]
            results["scenarios"][key] = result
            print(f"   {key} done in {result['seconds']} s", flush=True)
        if context.profiles:
            results["profiles"] = context.profiles
    finally:
        database.stop()
        results["meta"]["seconds"] = round(time.monotonic() - started, 1)
        results["meta"]["load_average_at_end"] = [round(x, 2) for x in _loadavg()]
        shutil.rmtree(workdir, ignore_errors=True)

    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    path = report.write_json(results, args.results, stamp)
    picture = report.plot(results, args.results / "latency.png")
    print()
    print(report.table(results))
    print()
    print(f"wrote {path}" + (f" and {picture}" if picture else " (no plot: matplotlib missing)"))
    for name, profile in results.get("profiles", {}).items():
        print(f"\nprofile {name} ({profile['samples']} samples), self %:")
        for frame, share in profile["self_percent"][:15]:
            print(f"  {share:5.1f}  {frame}")
    return 0


def _settle(database: Database) -> None:
    """Start each scenario from a quiet database: what the last one wrote is vacuumed and
    checkpointed now, not flushed by the checkpointer or autovacuum in the middle of the next
    one's measurement (spread's p99 was 1.4-1.7 ms right after fanout, 0.4-0.5 ms alone)."""
    with psycopg.connect(database.url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE messages")
        conn.execute("CHECKPOINT")


def _git_revision() -> str | None:
    try:
        revision = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision or None


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = sys.version.split()[0]
    return versions


def _loadavg() -> tuple[float, float, float]:
    import os

    return os.getloadavg()


if __name__ == "__main__":
    sys.exit(main())
