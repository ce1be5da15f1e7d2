"""The commit-order journal: the last rows this process delivered, in delivery order.

Row ids are drawn before commit, so concurrent writers can commit id 11 before id 10. NOTIFY
is delivered in commit order, so live streams see 11 then 10; but a client that resumes with
`Last-Event-ID: 11` by "id > 11" would never get 10, and one that resumes with 10 would get 11
twice. The journal remembers, for the last `size` rows, the order they were delivered in and
their routing keys, so a resume from a row it holds is exact: the rows delivered after it that
match the filter, in the same order, nothing twice. Every broker process receives NOTIFYs in
the same commit order, so the answer is the same on any instance that was up at the time.

It also tells the listener which rows it already delivered, for exactly-once backfill, and
keeps each row's `created_at`, so a row that reuses a delivered id (the table was truncated
with `RESTART IDENTITY`, or restored to an earlier point) is told from a copy of that row.
Memory: about 200 bytes a row (the strings are shared with the messages).

Changes of the messages feed (its updates and deletes, when the feeds file declares them) take
the same place in the order, under their position (drawn from the same sequence as row ids):
an update that moved a row is held with its new route and, in `_old`, its old one, so a resume
from the journal sends it to a stream that matched either, as live routing did (`Hub.
publish_change`). `_old` holds an entry only for a change, so a row costs what it did, and
`is_change` tells the replay to read a position from the change log, not the table.
"""

from __future__ import annotations

from collections import deque
from itertools import islice

from .filters import Filter

__all__ = ["Journal"]


class Journal:
    """A bounded, ordered record of delivered rows: (id, session_id, robot_id, created_at)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"journal size must be at least 1, got {size}")
        self._size = size
        self._rows: deque[tuple[int, str, str | None, str]] = deque()
        self._position: dict[int, int] = {}
        # A change's position -> the route (session, robot) of the row before it.
        self._old: dict[int, tuple[str, str | None]] = {}
        self._first = 0  # position of self._rows[0]; positions only grow
        self.forgotten_up_to = 0  # the highest id that was dropped to keep the size

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._position

    @property
    def end(self) -> int:
        """The position the next row will take; compare with `position` of a row."""
        return self._first + len(self._rows)

    def position(self, message_id: int) -> int | None:
        """Where `message_id` stands in delivery order, None if not (or no longer) held."""
        return self._position.get(message_id)

    @property
    def oldest_id(self) -> int | None:
        return self._rows[0][0] if self._rows else None

    def created_at(self, message_id: int) -> str | None:
        """The `created_at` the journal holds for `message_id`, None if not held. Slower
        than `in` (a walk of the deque): for the rare row delivered twice."""
        position = self._position.get(message_id)
        return None if position is None else self._rows[position - self._first][3]

    def clear(self) -> None:
        """Forget every row: the ids it holds now name other rows (`Hub.publish`)."""
        self._first = self.end
        self._rows.clear()
        self._position.clear()
        self._old.clear()
        self.forgotten_up_to = 0

    def append(
        self, message_id: int, session_id: str, robot_id: str | None, created_at: str = ""
    ) -> None:
        self._position[message_id] = self.end
        self._rows.append((message_id, session_id, robot_id, created_at))
        if len(self._rows) > self._size:
            old_id, _, _, _ = self._rows.popleft()
            del self._position[old_id]
            if self._old:
                self._old.pop(old_id, None)
            self._first += 1
            self.forgotten_up_to = max(self.forgotten_up_to, old_id)

    def append_change(
        self,
        position: int,
        session_id: str,
        robot_id: str | None,
        old_session_id: str,
        old_robot_id: str | None,
    ) -> None:
        """Hold a change of the messages feed: its route after (an update's new row; a
        delete's old one) and before. No `created_at`: a row that reuses the position is
        told from it by `Hub.publish`'s check (an empty one matches no row)."""
        self.append(position, session_id, robot_id)
        self._old[position] = (old_session_id, old_robot_id)

    def is_change(self, position: int) -> bool:
        """Whether the journal holds `position` as a change (read from the change log)."""
        return position in self._old

    def after(self, message_id: int, wanted: Filter) -> list[int] | None:
        """Ids delivered after `message_id` that match `wanted`, in delivery order; a change
        matches on its route before or after.

        None when the journal does not hold `message_id` (too old, or never delivered here):
        the caller then falls back to replay by id.
        """
        position = self._position.get(message_id)
        if position is None:
            return None
        later = islice(self._rows, position - self._first + 1, None)
        matches, old = wanted.matches, self._old
        if not old:  # no changes held: the rows' loop alone
            return [row_id for row_id, session, robot, _ in later if matches(session, robot)]
        return [
            row_id
            for row_id, session, robot, _ in later
            if matches(session, robot) or (row_id in old and matches(*old[row_id]))
        ]
