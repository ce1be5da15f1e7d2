"""Changes of declared feeds on the bus (`bus.py`), beside the rows.

The relay appends a change as the trigger signed its notification (`{"feed", "position", "op",
"data", "old", "at"}`, forwarded as is), or, for one it read from the change log (too large
for NOTIFY, or backfilled after an election), that same JSON signed with the database's key
(`payload`). Readers verify every entry alike; one whose payload starts with `{"feed":` is a
change (`ChangeEntry`), routed by the reader (`busreader.py`) through the service's feed
registry (`feedset.FeedSet`), in the stream's order with the rows. So on a bus, as without
one, every broker delivers changes in one order, and a resume is exact in that order on any
broker.

The relay's backfill after an election covers changes as it does rows: per captured feed, a
floor kept in Redis (`Bus.floor`, named by the feed), and every change above it that the
stream's tail lacks (`TailChanges`) is appended, in position order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from ..changes import Change, ChangeReference, parse_change
from ..events import utc_timestamp

__all__ = ["ChangeEntry", "TailChanges", "parse_entry", "payload"]


@dataclass(frozen=True, slots=True)
class ChangeEntry:
    """One stream entry carrying a change: its stream id and the change."""

    stream_id: str
    change: Change

    @property
    def added_ms(self) -> int:
        """When Redis appended it, milliseconds since the epoch (the id's first part)."""
        return int(self.stream_id.split("-", 1)[0])


def payload(change: Change) -> bytes:
    """A change as the trigger's notification carries it (`changes.parse_change` reads it)."""
    at = change.at if isinstance(change.at, str) else utc_timestamp(change.at)
    body: dict[str, Any] = {
        "feed": change.feed,
        "position": change.position,
        "op": change.op,
        "data": change.data,
        "old": change.old,
        "at": at,
    }
    return orjson.dumps(body)


def parse_entry(stream_id: str, verified: bytes) -> ChangeEntry:
    """The change of a verified entry's payload. Raises `ValueError` when malformed, or for
    a reference (the relay reads a change too large for NOTIFY before appending it)."""
    parsed = parse_change(verified)
    if isinstance(parsed, ChangeReference):
        raise ValueError("malformed change payload: a reference on the bus")
    return ChangeEntry(stream_id, parsed)


@dataclass
class TailChanges:
    """The change positions the stream's tail holds, per feed (`source.ChangesHeld`)."""

    positions: dict[str, set[int]] = field(default_factory=dict)

    def add(self, change: Change) -> None:
        self.positions.setdefault(change.feed, set()).add(change.position)

    def holds(self, feed: str, position: int) -> bool:
        return position in self.positions.get(feed, ())

    def forgotten_up_to(self, feed: str) -> int:
        return 0

    def oldest(self, feed: str) -> int | None:
        held = self.positions.get(feed)
        return min(held) if held else None
