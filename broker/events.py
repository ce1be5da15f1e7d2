"""The wire format, pure: parse notification payloads, encode Server-Sent Events and the API's
error body.

Every function here is free of I/O. Events are encoded to bytes once and those bytes are
shared by every subscriber that receives them. JSON never contains a raw newline, so each
event's JSON fits on one `data:` line whatever the message content holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:  # changes.py imports this module: the type only
    from .changes import Change

__all__ = [
    "HISTORY_EXPIRED",
    "Message",
    "Reference",
    "cut_content",
    "data_line",
    "encode_connected",
    "encode_error",
    "encode_heartbeat",
    "encode_message",
    "encode_message_deleted",
    "encode_message_updated",
    "encode_reset",
    "error_body",
    "message_of_change",
    "parse_notification",
    "utc_timestamp",
]


@dataclass(frozen=True, slots=True)
class Message:
    """One row of `messages`, as the contract's `data` object names its fields."""

    id: int
    session_id: str
    robot_id: str | None
    content: str
    is_from_bot: bool
    is_human: bool
    intent: str | None
    created_at: str
    # Set when `content` was cut to `BROKER_MAX_ROW_BYTES`: the stored content's full size,
    # in bytes. The event then says `"truncated": true` and `"contentBytes"` (`store.py`).
    content_bytes: int | None = None

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "sessionId": self.session_id,
            "robotId": self.robot_id,
            "content": self.content,
            "isFromBot": self.is_from_bot,
            "isHuman": self.is_human,
            "intent": self.intent,
            "createdAt": self.created_at,
        }
        if self.content_bytes is not None:
            data["truncated"] = True
            data["contentBytes"] = self.content_bytes
        return data


@dataclass(frozen=True, slots=True)
class Reference:
    """A row too large for NOTIFY: only its id (the broker reads the row)."""

    id: int


def parse_notification(payload: str | bytes) -> Message | Reference:
    """Parse a payload written by `notify_new_message()` (its signature already checked).
    Raises `ValueError` if malformed: not JSON, a field missing, or of the wrong type (a
    `sessionId` that is a list or a number, `content` that is not a string: what a table row
    can never hold, so never routed or relayed)."""
    try:
        data = orjson.loads(payload)
        raw_id = data["id"]
        if type(raw_id) is not str or not raw_id.isdigit() or len(raw_id) > 19:
            raise TypeError("id must be a string of 1 to 19 decimal digits")
        id_ = int(raw_id)
        if data.get("ref") is True:
            return Reference(id_)
        message = Message(
            id=id_,
            session_id=data["sessionId"],
            robot_id=data["robotId"],
            content=data["content"],
            is_from_bot=data["isFromBot"],
            is_human=data["isHuman"],
            intent=data["intent"],
            created_at=data["createdAt"],
            content_bytes=_content_bytes(data),
        )
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"malformed notification payload: {exc}") from None
    if not _well_typed(message):
        raise ValueError("malformed notification payload: a field of the wrong type")
    return message


def _well_typed(message: Message) -> bool:
    """Every field of the type its column gives it (`type() is`, not isinstance: no bool
    subclass tricks, and it is the cheaper test)."""
    return (
        type(message.session_id) is str
        and type(message.content) is str
        and type(message.created_at) is str
        and type(message.is_from_bot) is bool
        and type(message.is_human) is bool
        and (message.robot_id is None or type(message.robot_id) is str)
        and (message.intent is None or type(message.intent) is str)
    )


def _content_bytes(data: dict[str, Any]) -> int | None:
    """The full size of a cut row's content (the bus carries cut rows as `as_json` writes
    them); None for a whole row. Raises `ValueError` for a flag without a size."""
    if not data.get("truncated"):
        return None
    size = data.get("contentBytes")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError("truncated row without a valid contentBytes")
    return size


def cut_content(content: str, max_bytes: int) -> str:
    """The longest prefix of `content` whose UTF-8 encoding fits in `max_bytes` (a character
    split by the cut is left out whole)."""
    return content.encode()[:max_bytes].decode("utf-8", "ignore")


def utc_timestamp(moment: datetime | None = None) -> str:
    """`2026-01-01T00:00:00.000Z`: UTC with milliseconds, as JavaScript's toISOString().

    Without `moment`, the current time; that string is cached for the millisecond, since
    every encoded event asks for it (7.6 us for datetime formatting, measured; 0.3 cached),
    and its seconds for the second: rows at 2,000/s change the millisecond at nearly each
    one (`strftime` per row was 4% of the relay's profile).
    """
    if moment is not None:
        moment = moment.astimezone(UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    now_ms = time.time_ns() // 1_000_000
    if now_ms == _now_cache[0]:
        return str(_now_cache[1])
    seconds, millis = divmod(now_ms, 1000)
    if seconds != _second_cache[0]:
        _second_cache[:] = [seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))]
    text = f"{_second_cache[1]}.{millis:03d}Z"
    _now_cache[:] = [now_ms, text]
    return text


# Caches of (value, text): the whole timestamp for the millisecond, its formatted second.
_now_cache: list[Any] = [-1, ""]
_second_cache: list[Any] = [-1, ""]


def data_line(obj: dict[str, Any]) -> bytes:
    """One unnamed event's `data:` line and its blank line."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def encode_message(message: Message, timestamp: str | None = None) -> bytes:
    """The `message` event, with the row id as the SSE `id:` so clients can resume."""
    body = {"type": "message", "data": message.as_json(), "timestamp": timestamp or utc_timestamp()}
    return b"id: %d\n" % message.id + data_line(body)


def message_of_change(data: dict[str, Any], max_bytes: int | None = None) -> Message:
    """The `Message` a messages-feed change's `data` holds (the trigger's column names and
    values: `capture.py`), its content cut to `max_bytes` as `store.py` cuts a row read from
    the table, so a row reads the same whether inserted, edited or replayed. Raises
    `ValueError` for data that is not a messages row (a field missing or of the wrong type)."""
    try:
        message = Message(
            id=_row_id(data),
            session_id=data["session_id"],
            robot_id=data["robot_id"],
            content=data["content"],
            is_from_bot=data["is_from_bot"],
            is_human=data["is_human"],
            intent=data["intent"],
            created_at=data["created_at"],
        )
    except KeyError as exc:
        raise ValueError(f"not a messages row: {exc!r} missing") from None
    if not _well_typed(message):
        raise ValueError("not a messages row: a field of the wrong type")
    if max_bytes is not None and len(message.content) > max_bytes // 4:
        size = len(message.content.encode())
        if size > max_bytes:
            return replace(
                message, content=cut_content(message.content, max_bytes), content_bytes=size
            )
    return message


def _row_id(data: dict[str, Any]) -> int:
    """A change's row id (`to_jsonb` writes a bigint as a JSON number). Raises `ValueError`."""
    row_id = data.get("id")
    if type(row_id) is not int or row_id < 1:
        raise ValueError("not a messages row: id must be a positive integer")
    return row_id


def encode_message_updated(
    change: Change, timestamp: str | None = None, max_bytes: int | None = None
) -> bytes:
    """`message_updated`: the edited row in the message shape (`Message.as_json`), with the
    change's position as the SSE `id:` (it shares the row ids' sequence). Raises `ValueError`
    as `message_of_change`."""
    message = message_of_change(change.data, max_bytes)
    body = {
        "type": "message_updated",
        "data": message.as_json(),
        "timestamp": timestamp or utc_timestamp(),
    }
    return b"id: %d\n" % change.position + data_line(body)


def encode_message_deleted(change: Change, timestamp: str | None = None) -> bytes:
    """`message_deleted`: the deleted row's id, session and robot (what the trigger keeps of a
    deleted row), with the change's position as the SSE `id:`. Raises `ValueError` for data
    without them."""
    data = change.data
    session_id, robot_id = data.get("session_id"), data.get("robot_id")
    if type(session_id) is not str or not (robot_id is None or type(robot_id) is str):
        raise ValueError("not a messages row: sessionId or robotId of the wrong type")
    row_id = _row_id(data)
    body = {
        "type": "message_deleted",
        "data": {"id": str(row_id), "sessionId": session_id, "robotId": robot_id},
        "timestamp": timestamp or utc_timestamp(),
    }
    return b"id: %d\n" % change.position + data_line(body)


def encode_connected(
    sessions: tuple[str, ...] | None, robot_id: str | None, retry_ms: int | None = None
) -> bytes:
    """The stream's first event. `sessionId` is the first session (None: the global stream);
    a stream of several also lists them all in `sessionIds`. `retry:` travels in this block:
    a block of its own is handed to the app as an empty event by some clients (httpx-sse,
    fetch-event-source), whose "parse every event as JSON" then breaks on it."""
    body: dict[str, Any] = {
        "type": "connected",
        "message": "SSE connected",
        "timestamp": utc_timestamp(),
        "sessionId": None if sessions is None else sessions[0],
        "robotId": robot_id,
    }
    if sessions is not None and len(sessions) > 1:
        body["sessionIds"] = list(sessions)
    return (b"" if retry_ms is None else b"retry: %d\n" % retry_ms) + data_line(body)


def encode_heartbeat() -> bytes:
    return data_line({"type": "heartbeat", "timestamp": utc_timestamp()})


def encode_error(error: str) -> bytes:
    return data_line({"type": "error", "error": error})


HISTORY_EXPIRED = "history expired"


def encode_reset(reason: str = HISTORY_EXPIRED) -> bytes:
    """Sent instead of a replay when the changes after the client's position were pruned
    (`BROKER_RETENTION`): the client refetches what it shows; live events follow."""
    return data_line({"type": "reset", "reason": reason})


def error_body(message: str) -> bytes:
    """The API's error body: `{"success":false,"error":<message>}`. Here, below both the web
    app (`web/answers.py`) and the server (`server/protocol.py`, which writes refusals on the
    socket before there is a request), so neither imports the other."""
    return orjson.dumps({"success": False, "error": message})
