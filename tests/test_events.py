"""The wire format, pure."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from broker.changes import Change
from broker.events import (
    Message,
    Reference,
    encode_connected,
    encode_error,
    encode_message,
    encode_message_deleted,
    encode_message_updated,
    message_of_change,
    parse_notification,
    utc_timestamp,
)

MESSAGE = Message(7, "s", None, "a\nb\r\nc 你好", True, False, None, "2026-01-01T00:00:00.000Z")


def test_timestamps_are_utc_with_milliseconds() -> None:
    moment = datetime(2026, 1, 1, 8, 0, 0, 123_999, tzinfo=timezone(timedelta(hours=8)))
    assert utc_timestamp(moment) == "2026-01-01T00:00:00.123Z"
    assert utc_timestamp(datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)) == "2026-05-06T07:08:09.000Z"


def test_message_event_is_one_data_line_with_id() -> None:
    encoded = encode_message(MESSAGE, "2026-01-01T00:00:00.001Z")
    lines = encoded.split(b"\n")
    assert lines[0] == b"id: 7" and lines[1].startswith(b"data: ") and lines[2:] == [b"", b""]
    body = json.loads(lines[1][len(b"data: ") :])
    assert body == {
        "type": "message",
        "timestamp": "2026-01-01T00:00:00.001Z",
        "data": {
            "id": "7",
            "sessionId": "s",
            "robotId": None,
            "content": "a\nb\r\nc 你好",
            "isFromBot": True,
            "isHuman": False,
            "intent": None,
            "createdAt": "2026-01-01T00:00:00.000Z",
        },
    }
    assert "你好".encode() in encoded  # UTF-8, not \\u escapes


def test_control_events() -> None:
    assert json.loads(encode_error("bye")[6:]) == {"type": "error", "error": "bye"}
    connected = json.loads(encode_connected(None, "r")[6:])
    assert connected["sessionId"] is None and connected["robotId"] == "r"
    assert "sessionIds" not in connected


def test_retry_travels_in_the_connected_block() -> None:
    """One block: a client that hands every block to the app never sees an empty event."""
    encoded = encode_connected(("a",), None, 3000)
    assert encoded.startswith(b"retry: 3000\ndata: {") and encoded.count(b"\n\n") == 1
    assert json.loads(encoded.split(b"data: ", 1)[1])["type"] == "connected"


def test_connected_names_every_session_of_a_stream_of_several() -> None:
    connected = json.loads(encode_connected(("a", "b"), None)[6:])
    assert connected["sessionId"] == "a" and connected["sessionIds"] == ["a", "b"]


def test_parse_notification_round_trips_the_trigger_shape() -> None:
    payload = json.dumps(MESSAGE.as_json())
    assert parse_notification(payload) == MESSAGE
    assert parse_notification('{"id": "9", "ref": true}') == Reference(9)


@pytest.mark.parametrize("payload", ["", "nope", "[]", '{"id": "x"}', '{"id": "1"}'])
def test_malformed_notifications_raise_value_error(payload: str) -> None:
    with pytest.raises(ValueError, match="malformed"):
        parse_notification(payload)


def test_current_timestamp_follows_the_clock_across_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 2026-01-01T00:00:00Z, then the same second's next millisecond, then the next second.
    base = 1_767_225_600_000
    for now_ms, expected in (
        (base + 999, "2026-01-01T00:00:00.999Z"),
        (base + 999, "2026-01-01T00:00:00.999Z"),
        (base + 1_000, "2026-01-01T00:00:01.000Z"),
        (base + 1_007, "2026-01-01T00:00:01.007Z"),
        (base - 60_000, "2025-12-31T23:59:00.000Z"),
    ):
        monkeypatch.setattr(time, "time_ns", lambda ms=now_ms: ms * 1_000_000)
        assert utc_timestamp() == expected


@pytest.mark.parametrize(
    "field, value",
    [
        ("sessionId", ["a"]),
        ("sessionId", 7),
        ("content", {"x": 1}),
        ("robotId", 1),
        ("intent", []),
        ("isFromBot", 1),
        ("createdAt", None),
        ("id", 5),
        ("id", "-5"),
    ],
)
def test_a_field_of_the_wrong_type_is_malformed(field: str, value: object) -> None:
    """What no table row can hold is refused, never routed (a list is unhashable)."""
    row = {
        "id": "5",
        "sessionId": "a",
        "robotId": None,
        "content": "x",
        "isFromBot": False,
        "isHuman": True,
        "intent": None,
        "createdAt": "2026-01-01T00:00:00.000Z",
    }
    parse_notification(orjson.dumps(row))  # well typed as it is
    with pytest.raises(ValueError, match="malformed"):
        parse_notification(orjson.dumps({**row, field: value}))


ROW = {  # a messages row as the capture trigger writes it in a change's `data`
    "id": 7,
    "session_id": "s",
    "robot_id": None,
    "content": "a\nb\r\nc 你好",
    "is_from_bot": True,
    "is_human": False,
    "intent": None,
    "created_at": "2026-01-01T00:00:00.000Z",
}


def test_an_update_of_a_message_is_the_message_shape_under_the_change_position() -> None:
    change = Change("messages", 9, "update", ROW, None, "2026-01-01T00:00:01.000Z")
    encoded = encode_message_updated(change, "2026-01-01T00:00:02.000Z")
    as_row = encode_message(MESSAGE, "2026-01-01T00:00:02.000Z")
    assert encoded == b"id: 9\n" + as_row.split(b"\n", 1)[1].replace(
        b'"type":"message"', b'"type":"message_updated"'
    )
    assert message_of_change(ROW) == MESSAGE


def test_a_delete_of_a_message_is_its_id_session_and_robot() -> None:
    data = {"id": 7, "session_id": "s", "robot_id": "r"}
    change = Change("messages", 10, "delete", data, None, "2026-01-01T00:00:01.000Z")
    encoded = encode_message_deleted(change, "2026-01-01T00:00:02.000Z")
    assert encoded == (
        b'id: 10\ndata: {"type":"message_deleted","data":{"id":"7","sessionId":"s",'
        b'"robotId":"r"},"timestamp":"2026-01-01T00:00:02.000Z"}\n\n'
    )


@pytest.mark.parametrize(
    "data",
    [
        {**ROW, "id": "7"},
        {**ROW, "id": True},
        {**ROW, "is_human": "yes"},
        {k: v for k, v in ROW.items() if k != "content"},
    ],
)
def test_a_change_that_is_not_a_messages_row_raises_value_error(data: dict[str, object]) -> None:
    change = Change("messages", 9, "update", data, None, "2026-01-01T00:00:01.000Z")
    with pytest.raises(ValueError):
        encode_message_updated(change)
