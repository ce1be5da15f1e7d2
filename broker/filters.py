"""Which rows one stream takes: one object, checked the same way in memory and in SQL.

A stream names up to `MAX_SESSIONS` sessions (`sessionId` repeated) or none (the global
stream), and optionally one robot. A row goes to the stream when its session is ANY of the
stream's sessions and its robot is the stream's robot, if one is given. The hub routes by the
same rule through its session index (`hub.py`); the journal (`Filter.matches`) and the store
(`store._where`) apply it to rows read back for a resume or history.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EVERYTHING", "MAX_SESSIONS", "Filter", "Sessions"]

# Sessions one stream may name. A bound, so that a request cannot make the hub index one
# stream under thousands of keys or the store match an unbounded `= ANY(...)` list; 100 covers
# a user with many chats open, all on the one connection their browser shares.
MAX_SESSIONS = 100

# What callers may pass for a stream's sessions: one id, several (a tuple), or None for all.
Sessions = str | tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class Filter:
    """A stream's filter. `sessions` is None for every session, else a non-empty tuple of
    distinct ids in the order the client gave them; `robot_id` None for every robot."""

    sessions: tuple[str, ...] | None = None
    robot_id: str | None = None
    _lookup: frozenset[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.sessions is not None:
            if not self.sessions:
                raise ValueError("a filter's sessions must not be empty (None means every one)")
            if len(set(self.sessions)) != len(self.sessions):
                raise ValueError("a filter's sessions must be distinct")
            object.__setattr__(self, "_lookup", frozenset(self.sessions))

    @classmethod
    def of(cls, sessions: Sessions, robot_id: str | None = None) -> Filter:
        """The filter of `sessions` (one id, several, repeats dropped, or None) and a robot."""
        if sessions is None:
            return cls(None, robot_id)
        if isinstance(sessions, str):
            return cls((sessions,), robot_id)
        return cls(tuple(dict.fromkeys(sessions)), robot_id)

    def matches(self, session_id: str, robot_id: str | None) -> bool:
        """True if a row of `session_id` from `robot_id` belongs on the stream."""
        lookup = self._lookup
        return (lookup is None or session_id in lookup) and (
            self.robot_id is None or self.robot_id == robot_id
        )

    @property
    def session_id(self) -> str | None:
        """The first session named, None for the global stream (what `connected` reports)."""
        return None if self.sessions is None else self.sessions[0]


EVERYTHING = Filter()
