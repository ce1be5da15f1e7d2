"""Checks of client input, pure: ids, `Last-Event-ID`, and the body of a new message.

Each failure raises `RequestError(400, ...)` with a message naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import RequestError
from ..filters import MAX_SESSIONS

__all__ = [
    "MAX_HISTORY",
    "MAX_ID_LENGTH",
    "RESERVED_PARAMETERS",
    "RESERVED_SESSION_ID",
    "NewMessage",
    "check_feed_query",
    "check_id",
    "check_session_id",
    "check_session_ids",
    "parse_history",
    "parse_last_event_id",
    "parse_new_message",
]

MAX_ID_LENGTH = 255
# `session_messages:global` names the all-sessions stream in stats and logs.
RESERVED_SESSION_ID = "global"
MAX_INTENT_LENGTH = 255
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc: C0, DEL and C1
_LAST_EVENT_ID = re.compile(r"[0-9]{1,19}")
_MAX_BIGINT = 2**63 - 1
MAX_HISTORY = 1000
# Query parameters of every stream that are not a column's equality (`check_feed_query`).
RESERVED_PARAMETERS = frozenset({"history", "lastEventId", "token"})
_HISTORY = re.compile(r"[0-9]{1,4}")


def check_id(name: str, value: str | None) -> str | None:
    """`value` if it is a valid session or robot id, None if absent; else 400."""
    if value is None:
        return None
    if not value:
        raise RequestError(400, f"{name} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise RequestError(400, f"{name} must be at most {MAX_ID_LENGTH} characters")
    if _CONTROL.search(value):
        raise RequestError(400, f"{name} must not contain control characters")
    return value


def check_session_id(value: str | None) -> str | None:
    """`check_id` for a `sessionId`, which may not be the reserved `global` either."""
    if value == RESERVED_SESSION_ID:
        raise RequestError(
            400, f"sessionId {RESERVED_SESSION_ID!r} is reserved: it names the all-sessions stream"
        )
    return check_id("sessionId", value)


def check_session_ids(values: list[str]) -> tuple[str, ...] | None:
    """The `sessionId`s of a stream (the parameter repeated), each checked as by
    `check_session_id`, repeats dropped, in the order given; None for none (the global
    stream). More than `MAX_SESSIONS` distinct ones: 400."""
    if not values:
        return None
    sessions = tuple(dict.fromkeys(values))
    if len(sessions) > MAX_SESSIONS:
        raise RequestError(400, f"sessionId may be given at most {MAX_SESSIONS} times")
    for value in sessions:
        check_session_id(value)
    return sessions


def check_feed_query(
    key: str, filters: Sequence[str], params: Iterable[tuple[str, str]]
) -> tuple[tuple[str, ...] | None, dict[str, str]]:
    """The key values (None: the feed's global stream) and filter equalities of a generic
    feed's stream, from its query parameters: the key column may be repeated (several
    values, as `sessionId`, at most `MAX_SESSIONS`), each filter column given once; every
    value checked as a session id is (`check_id`). `RESERVED_PARAMETERS` are left to their
    own checks; any other parameter is 400, naming it."""
    keys: list[str] = []
    found: dict[str, str] = {}
    for name, value in params:
        if name in RESERVED_PARAMETERS:
            continue
        if name == key:
            keys.append(value)
        elif name in filters:
            if name in found:
                raise RequestError(400, f"{name} may be given once")
            found[name] = value
        else:
            raise RequestError(400, f"unknown parameter {name[:MAX_ID_LENGTH]!r}")
        check_id(name, value)
    distinct = tuple(dict.fromkeys(keys))
    if len(distinct) > MAX_SESSIONS:
        raise RequestError(400, f"{key} may be given at most {MAX_SESSIONS} times")
    return distinct or None, found


def parse_last_event_id(value: str | None) -> int | None:
    """The id to resume after, or None (no replay) for anything but 1 to 19 decimal digits.

    A bad value never fails the request: the client keeps a working live stream.
    """
    if value is None or not _LAST_EVENT_ID.fullmatch(value):
        return None
    return min(int(value), _MAX_BIGINT)


def parse_history(value: str | None) -> int | None:
    """The `history=N` of a stream (1 to `MAX_HISTORY` rows), None if absent; else 400."""
    if value is None:
        return None
    if not _HISTORY.fullmatch(value) or not 1 <= int(value) <= MAX_HISTORY:
        raise RequestError(400, f"history must be a whole number from 1 to {MAX_HISTORY}")
    return int(value)


@dataclass(frozen=True, slots=True)
class NewMessage:
    session_id: str
    content: str
    robot_id: str | None = None
    is_from_bot: bool = False
    is_human: bool = True
    intent: str | None = None


_FIELDS = {"sessionId", "content", "robotId", "isFromBot", "isHuman", "intent"}


def parse_new_message(body: bytes) -> NewMessage:
    """The `POST /api/messages` body. Unknown fields are refused, so a typo is not ignored."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "body must be a JSON object")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise RequestError(400, f"unknown field(s): {', '.join(unknown)}")

    session_id = _string(data, "sessionId", required=True)
    content = _string(data, "content", required=True)
    assert session_id is not None and content is not None
    check_session_id(session_id)
    if not content:
        raise RequestError(400, "content must not be empty")
    if "\x00" in content:
        raise RequestError(400, "content must not contain NUL characters")
    intent = _string(data, "intent")
    if intent is not None and (len(intent) > MAX_INTENT_LENGTH or _CONTROL.search(intent)):
        raise RequestError(
            400, f"intent must be at most {MAX_INTENT_LENGTH} characters, no control characters"
        )
    is_from_bot = _boolean(data, "isFromBot", default=False)
    return NewMessage(
        session_id=session_id,
        content=content,
        robot_id=check_id("robotId", _string(data, "robotId")),
        is_from_bot=is_from_bot,
        is_human=_boolean(data, "isHuman", default=not is_from_bot),  # a bot's is not a human's
        intent=intent,
    )


def _string(data: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = data.get(name)
    if value is None:
        if required:
            raise RequestError(400, f"{name} is required")
        return None
    if not isinstance(value, str):
        raise RequestError(400, f"{name} must be a string")
    return value


def _boolean(data: dict[str, Any], name: str, default: bool) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(400, f"{name} must be true or false")
    return value
