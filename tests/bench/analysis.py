"""From what the writer committed and what the streams received, to the figures.

A phase's rows are a contiguous id range; each stream's ids are (almost always) increasing, so
a phase's deliveries are found by bisecting each stream's record. Latency is the first receipt
of an id on a stream minus that row's commit time; a second receipt counts as a duplicate.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from tests.bench.client import StreamRecord
from tests.bench.writer import Writes

PERCENTILES = (50, 90, 99, 99.9)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/p99.9, max and mean of `values` (nearest rank), in the values' unit."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "p99.9": None, "max": None, "mean": None}
    ordered = sorted(values)
    count = len(ordered)
    result: dict[str, float | None] = {}
    for p in PERCENTILES:
        rank = max(1, math.ceil(p / 100 * count))
        result[f"p{p:g}"] = ordered[rank - 1]
    result["max"] = ordered[-1]
    result["mean"] = sum(ordered) / count
    return result


def rounded(stats: dict[str, float | None], digits: int = 2) -> dict[str, float | None]:
    return {key: None if value is None else round(value, digits) for key, value in stats.items()}


def deliveries(
    records: Iterable[StreamRecord], writes: Writes, sessions: list[str], bin_seconds: float = 1.0
) -> dict[str, Any]:
    """Completeness, latency and delivery rate of one phase's rows over these streams."""
    records = list(records)
    if not len(writes):
        return {"rows": 0}
    commits = writes.commit_times()
    low, high = writes.ids[0], writes.ids[-1]
    rows_per_session = Counter(sessions[index] for index in writes.sessions)
    expected = delivered = duplicates = unexpected = 0
    latencies: list[float] = []
    receive_times: list[float] = []
    incomplete_streams = 0
    for record in records:
        want = len(writes) if record.session_id is None else rows_per_session[record.session_id]
        expected += want
        if record.out_of_order:  # ids not sorted: scan them all
            pairs = [p for p in zip(record.ids, record.times, strict=True) if low <= p[0] <= high]
        else:
            start = bisect.bisect_left(record.ids, low)
            end = bisect.bisect_right(record.ids, high)
            pairs = list(zip(record.ids[start:end], record.times[start:end], strict=True))
        seen: set[int] = set()
        for row_id, received in pairs:
            committed = commits.get(row_id)
            if committed is None:
                unexpected += 1
                continue
            if row_id in seen:
                duplicates += 1
                continue
            seen.add(row_id)
            latencies.append((received - committed) * 1000)
            receive_times.append(received)
        delivered += len(seen)
        if len(seen) < want:
            incomplete_streams += 1
    result: dict[str, Any] = {
        "rows": len(writes),
        "writer_rows_per_s": round(writes.rate, 1),
        "streams": len(records),
        "expected": expected,
        "delivered": delivered,
        "completeness_percent": round(100 * delivered / expected, 4) if expected else None,
        "missing": expected - delivered,
        "incomplete_streams": incomplete_streams,
        "duplicates": duplicates,
        "unexpected": unexpected,
        "latency_ms": rounded(percentiles(latencies)),
    }
    if receive_times:
        first_commit = writes.commits[0]
        last_receive = max(receive_times)
        span = last_receive - first_commit
        result["deliveries_per_s"] = round(delivered / span, 1) if span > 0 else None
        result["last_delivery_after_last_commit_s"] = round(last_receive - writes.ended, 3)
        timeline = rate_timeline(receive_times, first_commit, bin_seconds)
        result["timeline_per_s"] = timeline
        result["sustained_per_s"] = sustained(timeline)
    return result


def rate_timeline(times: list[float], start: float, bin_seconds: float) -> list[float]:
    """Deliveries per second in consecutive bins from `start`."""
    if not times:
        return []
    bins = [0] * (int((max(times) - start) / bin_seconds) + 1)
    for moment in times:
        index = int((moment - start) / bin_seconds)
        if 0 <= index < len(bins):
            bins[index] += 1
    return [round(count / bin_seconds, 1) for count in bins]


def sustained(timeline: list[float]) -> float | None:
    """The median rate over the full bins between the first and the last busy one.

    The first and last bins are partial (the burst starts and ends inside them), so they are
    left out; with fewer than three bins there is no sustained rate to speak of.
    """
    busy = [index for index, rate in enumerate(timeline) if rate > 0]
    if len(busy) < 3:
        return None
    inner = sorted(timeline[busy[0] + 1 : busy[-1]])
    if not inner:
        return None
    return inner[len(inner) // 2]


def trend(writes: Writes, records: list[StreamRecord]) -> dict[str, float | None]:
    """Median latency of the first and the last tenth of the rows: a growing backlog shows."""
    commits = writes.commit_times()
    first_receipt: dict[int, float] = {}
    for record in records:
        for row_id, received in zip(record.ids, record.times, strict=True):
            if row_id in commits and row_id not in first_receipt:
                first_receipt[row_id] = received
    tenth = max(1, len(writes) // 10)

    def median_ms(ids: Sequence[int]) -> float | None:
        values = sorted((first_receipt[i] - commits[i]) * 1000 for i in ids if i in first_receipt)
        return round(values[len(values) // 2], 2) if values else None

    return {
        "first_tenth_p50_ms": median_ms(writes.ids[:tenth]),
        "last_tenth_p50_ms": median_ms(writes.ids[-tenth:]),
    }


def summarize_records(records: list[StreamRecord]) -> dict[str, Any]:
    """Stream-level counters: reconnects, errors sent by the broker, malformed frames."""
    errors: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    for record in records:
        errors.update(record.errors)
        statuses.update(record.statuses)
    return {
        "streams": len(records),
        "reconnects": sum(r.reconnects for r in records),
        "errors": dict(errors),
        "statuses": {str(k): v for k, v in statuses.items()},
        "malformed": sum(r.malformed for r in records),
        "out_of_order": sum(r.out_of_order for r in records),
        "heartbeats": sum(r.heartbeats for r in records),
    }
