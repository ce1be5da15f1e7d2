"""The soak's verdict: an exact account per client, the brokers against where they started,
and the one summary line.

A client is exact when the ids it received are every committed row of its filter above the
soak's start marker, once each, in order. The soak's one writer commits in id order, so the
order the README's rule promises (commit order, and by id for a resume from an id a journal
does not hold) is id order here.
"""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from tests.soak.clients import Client
from tests.soak.cluster import Usage

MAX_LISTENER_RETURN_S = 1.0
MAX_RSS_GROWTH_MIB = 64
POOL_SIZE = 4  # the store pool grows from 1 to this: its sockets may differ from the start
NGINX_KEEPALIVE = 2 * 32  # idle upstream connections nginx may keep: workers x `keepalive`
RELAY_CONNECTIONS = 1  # the relay's lease connection to Redis, beyond a follower's (`Bus.lease`)
RELAY_TASKS = 1  # and the task that renews the lease (feeds/relay.py)


@dataclass
class Expected:
    """Committed rows above the start marker, in id order, by filter."""

    everything: list[int] = field(default_factory=list)
    by_session: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    by_robot: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def from_rows(cls, rows: list[tuple[Any, ...]]) -> Expected:
        expected = cls()
        for row_id, session_id, robot_id in rows:
            expected.everything.append(int(row_id))
            expected.by_session[session_id].append(int(row_id))
            if robot_id is not None:
                expected.by_robot[robot_id].append(int(row_id))
        return expected

    def of(self, client: Client) -> list[int]:
        if client.session_id is not None:
            ids = self.by_session.get(client.session_id, [])
            if client.robot_id is not None:
                robots = set(self.by_robot.get(client.robot_id, []))
                ids = [i for i in ids if i in robots]
            return ids
        if client.robot_id is not None:
            return self.by_robot.get(client.robot_id, [])
        return self.everything


def account(clients: list[Client], expected: Expected) -> dict[str, Any]:
    exact = lost = duplicates = out_of_order = foreign = deliveries = 0
    inexact: list[dict[str, Any]] = []
    for client in clients:
        received = client.record.ids.tolist()
        wanted = expected.of(client)
        deliveries += len(received)
        foreign += client.record.foreign
        if received == wanted and not client.record.foreign:
            exact += 1
            continue
        got = set(received)
        missing = sorted(set(wanted) - got)
        twice = len(received) - len(got)
        backwards = sum(1 for a, b in itertools.pairwise(received) if b < a)
        entry = {
            "client": client.index,
            "session": client.session_id,
            "robot": client.robot_id,
            "lost": missing[:20],
            "duplicates": twice,
            "out_of_order": backwards,
            "extra": sorted(got - set(wanted))[:20],
        }
        lost += len(missing)
        duplicates += twice
        out_of_order += backwards
        inexact.append(entry)
    return {
        "clients": len(clients),
        "exact": exact,
        "lost": lost,
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "foreign": foreign,
        "deliveries": deliveries,
        "inexact": inexact[:20],
    }


def latency(clients: list[Client], commit_times: dict[int, float]) -> dict[str, float]:
    """Receive time minus commit time over every delivery to `clients` (replays after a drop
    included)."""
    samples = sorted(
        at - commit_times[row_id]
        for client in clients
        for row_id, at in zip(client.record.ids, client.record.times, strict=True)
        if row_id in commit_times
    )
    if not samples:
        return {}
    return {
        "p50_ms": round(statistics.median(samples) * 1e3, 1),
        "p99_ms": round(samples[int(len(samples) * 0.99)] * 1e3, 1),
        "max_s": round(samples[-1], 2),
    }


def brokers_back(idle: list[Usage], end: list[Usage], loaded: list[Usage]) -> dict[str, Any]:
    """Each broker at the end (every client gone) against its idle start.

    On a bus the relay holds one Redis connection and one task more than a follower, its
    lease's and the lease's renewal, for as long as it holds the role (`Bus.lease`); a fault
    may move the role to the other broker, so each broker's other descriptors and tasks are
    compared against what its role at each end holds: a follower at idle that is the relay
    at the end holds one more of each, and no other."""
    return {
        "streams": [u.streams for u in end],
        "channels": [u.channels for u in end],
        "roles": {"idle": [u.role for u in idle], "end": [u.role for u in end]},
        "other_fds_delta": [
            e.other_fds - i.other_fds - RELAY_CONNECTIONS * (_relay(e) - _relay(i))
            for e, i in zip(end, idle, strict=True)
        ],
        "unix_sockets_delta": [
            e.unix_sockets - i.unix_sockets for e, i in zip(end, idle, strict=True)
        ],
        "nginx_keepalive": [e.http_connections for e in end],
        "tasks_delta": [
            e.tasks - i.tasks - RELAY_TASKS * (_relay(e) - _relay(i))
            for e, i in zip(end, idle, strict=True)
        ],
        "rss_growth_mib": [
            round((e.rss_kib - lo.rss_kib) / 1024, 1) for e, lo in zip(end, loaded, strict=True)
        ],
    }


def _relay(usage: Usage) -> int:
    return 1 if usage.role == "relay" else 0


def verdict(report: dict[str, Any]) -> list[str]:
    """What failed; empty when the soak passed."""
    failures = []
    clients = report["account"]
    if clients["exact"] != clients["clients"]:
        failures.append(f"{clients['clients'] - clients['exact']} clients not exact")
    returns = report["listener_returns_s"]
    if any(back_s > MAX_LISTENER_RETURN_S for back_s in returns):  # inf: never came back
        failures.append(f"listener return {returns} (limit {MAX_LISTENER_RETURN_S} s)")
    back = report["brokers_back"]
    if any(back["streams"]) or any(back["channels"]):
        failures.append(f"streams left {back['streams']}, channels {back['channels']}")
    if any(back["other_fds_delta"]):
        failures.append(f"descriptors {back['other_fds_delta']} off the start")
    if any(delta > POOL_SIZE - 1 for delta in back["unix_sockets_delta"]):
        failures.append(f"database sockets {back['unix_sockets_delta']} above the start")
    if any(count > NGINX_KEEPALIVE for count in back["nginx_keepalive"]):
        failures.append(f"connections {back['nginx_keepalive']} with no stream")
    if any(delta > 0 for delta in back["tasks_delta"]):
        failures.append(f"tasks {back['tasks_delta']} above the start")
    if any(growth > MAX_RSS_GROWTH_MIB for growth in back["rss_growth_mib"]):
        failures.append(f"memory growth {back['rss_growth_mib']} MiB")
    if report["streams_before_close"] != clients["clients"]:
        failures.append(f"{report['streams_before_close']} streams for {clients['clients']}")
    if report["listeners_end"] != report["listeners_start"]:
        failures.append(f"listeners {report['listeners_start']} -> {report['listeners_end']}")
    return failures


def summary(report: dict[str, Any]) -> str:
    a, w, back = report["account"], report["writer"], report["brokers_back"]
    reconnects = report["reconnects"]
    returns = ", ".join(f"{t:.2f}" for t in report["listener_returns_s"])
    lat = report["latency"]  # the stalled client excluded
    failures = report["failures"]
    return (
        f"soak seed={report['seed']} {report['seconds']:.0f}s: {w['rows']:,} rows"
        f" ({w['large']} of 20-100 kB, {w['multi']} 10-row INSERTs), {a['deliveries']:,}"
        f" deliveries, {reconnects['total']:,} reconnects ({reconnects['fin']} FIN,"
        f" {reconnects['rst']} RST drops), {len(report['faults'])} faults;"
        f" exact {a['exact']}/{a['clients']} clients (lost {a['lost']}, duplicate"
        f" {a['duplicates']}, out of order {a['out_of_order']});"
        f" listener back {returns} s after PostgreSQL returned;"
        f" latency p50 {lat.get('p50_ms')} ms, p99 {lat.get('p99_ms')} ms,"
        f" max {lat.get('max_s')} s (stalled client aside);"
        f" at the end streams {back['streams']}, fds {back['other_fds_delta']} vs start"
        f" (+{back['unix_sockets_delta']} pool, {back['nginx_keepalive']} nginx keep-alive),"
        f" RSS {back['rss_growth_mib']} MiB vs loaded, listeners {report['listeners_end']}"
        f" -> {'PASS' if not failures else 'FAIL: ' + '; '.join(failures)}"
    )
