"""One captured change of a feed's table, as the broker handles it: parsed from the trigger's
notification (`feeds/capture.py` writes it) or read from the change log (`feeds/changelog.py`).

Pure, like `events.py`: no I/O. A notification carries the change itself, or, when it would
not fit NOTIFY's 8000 bytes, a `ChangeReference` (feed and position) from which the broker
reads the change from the log.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import orjson

from .events import data_line, utc_timestamp

__all__ = ["OPS", "Change", "ChangeReference", "encode_change", "parse_change"]

OPS = {"i": "insert", "u": "update", "d": "delete"}
_OP_NAMES = frozenset(OPS.values())


@dataclass(frozen=True, slots=True)
class Change:
    """One captured change. `data` and `old` are as the trigger wrote them (`capture.py`):
    `data` the declared columns of the new row (insert, update) or the route columns of the
    old row (delete); `old` an update's previous values of the route columns that changed."""

    feed: str
    position: int
    op: str  # insert, update or delete
    data: dict[str, Any]
    old: dict[str, Any] | None
    at: datetime.datetime | str  # a datetime read from the log; the trigger's text when notified


@dataclass(frozen=True, slots=True)
class ChangeReference:
    """A change too large for NOTIFY: where it is in the log."""

    feed: str
    position: int


def parse_change(payload: str | bytes) -> Change | ChangeReference:
    """Parse a `pgsse_changes` payload (its signature already checked). Raises `ValueError`
    when malformed: not JSON, a field missing or of the wrong type."""
    try:
        doc = orjson.loads(payload)
        feed, position = doc["feed"], doc["position"]
        if type(feed) is not str or type(position) is not int or position < 1:
            raise TypeError("feed must be a string and position a positive integer")
        if doc.get("ref") is True:
            return ChangeReference(feed, position)
        op, data, old, at = doc["op"], doc["data"], doc["old"], doc["at"]
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"malformed change payload: {exc}") from None
    if (
        op not in _OP_NAMES
        or type(data) is not dict
        or not (old is None or type(old) is dict)
        or type(at) is not str
    ):
        raise ValueError("malformed change payload: a field of the wrong type")
    return Change(feed, position, op, data, old, at)


def encode_change(change: Change, timestamp: str | None = None) -> bytes:
    """A generic feed's event: `{"type": op, "feed", "data", ["old"], "timestamp"}` with the
    change's position as the SSE `id:` (design.md, "Feeds"). `old` only on an update that
    changed a key or filter column."""
    body: dict[str, Any] = {"type": change.op, "feed": change.feed, "data": change.data}
    if change.old is not None:
        body["old"] = change.old
    body["timestamp"] = timestamp or utc_timestamp()
    return b"id: %d\n" % change.position + data_line(body)
