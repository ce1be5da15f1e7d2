"""`python -m tests.soak --seconds 360 --seed 1`: run the soak, print its summary line.

Exit status 0 when every client is exact and the brokers came back where they started, 1
otherwise. The report (JSON) and the brokers' and nginx's logs stay in `--run-dir`; every
process is stopped and PostgreSQL's data removed, whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tests.soak import account
from tests.soak.clients import Client, churn
from tests.soak.cluster import Cluster
from tests.soak.faults import Faults
from tests.soak.writer import Writer

ROOT = Path(__file__).resolve().parents[2]
DRAIN_SECONDS = 90.0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=360, help="length of the run (360)")
    parser.add_argument("--seed", type=int, default=1, help="seed of every random choice (1)")
    parser.add_argument("--sessions", type=int, default=30, help="sessions (30)")
    parser.add_argument("--per-session", type=int, default=10, help="clients a session (10)")
    parser.add_argument("--global-clients", type=int, default=5, help="global clients (5)")
    parser.add_argument("--rate", type=float, default=100, help="rows a second (100)")
    parser.add_argument("--drops", type=float, default=4, help="client drops a second (4)")
    parser.add_argument("--fault-every", type=float, default=60, help="seconds between faults")
    parser.add_argument(
        "--capture",
        choices=("notify", "wal"),
        default=os.environ.get("BROKER_CAPTURE", "notify"),
        help="BROKER_CAPTURE of the brokers (the environment's, else notify); wal adds a bus",
    )
    parser.add_argument("--run-dir", type=Path, default=ROOT / ".run" / "soak")
    options = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    report = asyncio.run(soak(options))
    path = options.run_dir / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {path}")
    print(account.summary(report))
    return 0 if not report["failures"] else 1


async def soak(options: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(options.seed)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # stop early, still cleaning up
        loop.add_signal_handler(sig, stop.set)
    cluster = Cluster(options.run_dir, options.capture)
    clients: list[Client] = []
    writer: Writer | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        await asyncio.to_thread(cluster.start, 2)
        marker = int(
            cluster.sql(
                "INSERT INTO messages (session_id, content) VALUES ('soak', 'start') RETURNING id"
            )[0][0]
        )
        for broker in cluster.brokers:  # the marker is in both journals: exact resumes
            await asyncio.to_thread(
                broker.wait_until,
                lambda b=broker: b.stats()["counters"]["messagesRouted"] >= 1,
                10,
                "marker routed",
            )
        idle = [cluster.usage(b) for b in cluster.brokers]
        listeners_start = cluster.backends()
        sessions = [f"soak{options.seed}-{n:02d}" for n in range(options.sessions)]
        filters: list[tuple[str | None, str | None]] = [
            (session, None) for session in sessions for _ in range(options.per_session)
        ]
        filters += [(None, None)] * (options.global_clients - 1) + [(None, "r1")]
        clients = [
            Client(n, cluster.port, s, r, marker, random.Random(rng.random()))
            for n, (s, r) in enumerate(filters)
        ]
        tasks += [asyncio.ensure_future(client.run(stop)) for client in clients]
        await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in clients)), 60)
        loaded = [cluster.usage(b) for b in cluster.brokers]
        print(f"soak: {len(clients)} clients connected; streams {[u.streams for u in loaded]}")

        writer = Writer(cluster.url, sessions, options.rate, rng.randrange(2**32))
        writer.start()
        started = time.monotonic()
        unfiltered = [c for c in clients if c.session_id is None and c.robot_id is None]
        faults = Faults(cluster, unfiltered, rng)  # a stall hurts most on a global stream
        tasks.append(asyncio.ensure_future(churn(clients, options.drops, rng, stop)))
        fault_run = asyncio.ensure_future(
            faults.run(options.fault_every / 2, options.fault_every, options.seconds, started)
        )
        with_stop = asyncio.ensure_future(stop.wait())
        await asyncio.wait([with_stop], timeout=options.seconds)  # the soak itself
        if stop.is_set():  # SIGINT or SIGTERM: no account, just clean up
            fault_run.cancel()
            raise SystemExit("soak: interrupted")
        await fault_run  # the one under way ends; none starts after --seconds
        with_stop.cancel()
        tasks[-1].cancel()  # churn
        await asyncio.to_thread(writer.stop)
        elapsed = time.monotonic() - started

        rows = cluster.sql(
            "SELECT id, session_id, robot_id FROM messages WHERE id > %s AND session_id <> 'soak'"
            " ORDER BY id",
            (marker,),
        )
        expected = account.Expected.from_rows(rows)
        drained = [c.reached(ids[-1]) for c in clients if (ids := expected.of(c))]
        with contextlib.suppress(TimeoutError):  # the account says who fell short
            await asyncio.wait_for(
                asyncio.gather(*(event.wait() for event in drained)), DRAIN_SECONDS
            )
        with contextlib.suppress(TimeoutError):  # clients dropped last are reconnecting
            await asyncio.wait_for(asyncio.gather(*(c.live.wait() for c in clients)), 15)
        streams_loaded_end = sum(cluster.usage(b).streams for b in cluster.brokers)

        stop.set()
        for client in clients:
            client.close()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        for broker in cluster.brokers:
            await asyncio.to_thread(
                broker.wait_until,
                lambda b=broker: b.stats()["totalConnections"] == 0,
                15,
                "streams closed",
            )
        end = [cluster.usage(b) for b in cluster.brokers]
        report: dict[str, Any] = {
            "seed": options.seed,
            "capture": options.capture,
            "seconds": round(elapsed, 1),
            "writer": {
                "rows": len(rows),
                "statements": writer.statements,
                "large": writer.large,
                "multi": writer.multi,
                "failures": writer.failures,
            },
            "reconnects": {
                "total": sum(c.record.connects - 1 for c in clients),
                "fin": sum(c.record.drops["fin"] for c in clients),
                "rst": sum(c.record.drops["rst"] for c in clients),
                "connect_failures": sum(c.record.connect_failures for c in clients),
                "errors": _merged(c.record.errors for c in clients),
                "statuses": _merged(c.record.statuses for c in clients),
            },
            "faults": faults.log,
            "listener_returns_s": faults.listener_returns,
            "account": account.account(clients, expected),
            "latency": account.latency(
                [c for c in clients if c.index not in faults.stalled], writer.commit_times
            ),
            "streams_before_close": streams_loaded_end,
            "brokers": {
                "idle": [u.as_json() for u in idle],
                "loaded": [u.as_json() for u in loaded],
                "end": [u.as_json() for u in end],
            },
            "brokers_back": account.brokers_back(idle, end, loaded),
            "listeners_start": listeners_start,
            "listeners_end": cluster.backends(),
            "store_backends_end": cluster.store_backends(),
        }
        report["failures"] = account.verdict(report)
        return report
    finally:
        stop.set()
        for client in clients:
            client.close()
        for task in tasks:
            task.cancel()
        if writer is not None:
            await asyncio.to_thread(writer.stop)
        await asyncio.to_thread(cluster.stop)


def _merged(counters: Iterable[Counter[Any]]) -> dict[Any, int]:
    total: Counter[Any] = Counter()
    for counter in counters:
        total.update(counter)
    return dict(total)


if __name__ == "__main__":
    sys.exit(main())
