"""Client input checks, pure."""

from __future__ import annotations

import pytest

from broker.errors import RequestError
from broker.filters import MAX_SESSIONS
from broker.web.validation import (
    check_feed_query,
    check_id,
    check_session_ids,
    parse_history,
    parse_last_event_id,
    parse_new_message,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", 1),
        ("42", 42),
        ("0", 0),
        ("9" * 19, 2**63 - 1),
        ("0000000000000000042", 42),
        (None, None),
        ("", None),
        ("-1", None),
        ("abc", None),
        ("1.5", None),
        (" 1", None),
        ("9" * 20, None),
        ("99999999999999999999", None),
        ("١٢", None),
        ("1\n", None),
    ],
)
def test_last_event_id(value: str | None, expected: int | None) -> None:
    assert parse_last_event_id(value) == expected


@pytest.mark.parametrize("value", ["", "x" * 256, "a\x00", "\x1fb", "a\x7f", "\x9f", "a\u0085"])
def test_bad_ids(value: str) -> None:
    with pytest.raises(RequestError) as caught:
        check_id("sessionId", value)
    assert caught.value.status == 400 and "sessionId" in str(caught.value)


@pytest.mark.parametrize("value", ["x" * 255, "中" * 255, "a b", "😀", "a\u200bb", "\u2028"])
def test_good_ids(value: str) -> None:
    assert check_id("robotId", value) == value


def test_new_message_defaults() -> None:
    message = parse_new_message(b'{"sessionId": "s", "content": "c"}')
    assert (message.robot_id, message.is_from_bot, message.is_human, message.intent) == (
        None,
        False,
        True,
        None,
    )


@pytest.mark.parametrize(
    ("fields", "is_human"),
    [
        ('"isFromBot": true', False),
        ('"isFromBot": false', True),
        ('"isFromBot": true, "isHuman": true', True),
        ('"isFromBot": false, "isHuman": false', False),
        ('"isFromBot": true, "isHuman": null', False),
    ],
)
def test_is_human_defaults_to_not_from_bot(fields: str, is_human: bool) -> None:
    message = parse_new_message(f'{{"sessionId": "s", "content": "c", {fields}}}'.encode())
    assert message.is_human is is_human


def test_new_message_null_optionals_are_defaults() -> None:
    message = parse_new_message(
        b'{"sessionId": "s", "content": "c", "robotId": null, "isFromBot": null}'
    )
    assert message.robot_id is None and message.is_from_bot is False


@pytest.mark.parametrize(
    ("value", "expected"), [(None, None), ("1", 1), ("1000", 1000), ("0042", 42)]
)
def test_history_takes_1_to_1000(value: str | None, expected: int | None) -> None:
    assert parse_history(value) == expected


@pytest.mark.parametrize(
    "value", ["0", "1001", "abc", "", "-1", "1.5", " 5", "١٢", "5\n", "9" * 30]
)
def test_bad_history_is_a_400_naming_it(value: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_history(value)
    assert caught.value.status == 400 and str(caught.value).startswith("history must be")


def test_session_ids_repeated_are_bounded_checked_and_deduplicated() -> None:
    assert check_session_ids([]) is None
    assert check_session_ids(["a"]) == ("a",)
    assert check_session_ids(["b", "a", "b"]) == ("b", "a")
    many = [f"s{n}" for n in range(MAX_SESSIONS)]
    assert check_session_ids(many + many[:5]) == tuple(many)  # repeats are not counted
    with pytest.raises(RequestError, match=f"at most {MAX_SESSIONS} times"):
        check_session_ids([*many, "one more"])
    for bad in ("", "global", "x\x00"):
        with pytest.raises(RequestError):
            check_session_ids(["fine", bad])


def test_a_feed_query_is_its_key_values_and_filter_equalities() -> None:
    assert check_feed_query("customer_id", ("status",), []) == (None, {})
    params = [
        ("customer_id", "42"),
        ("history", "5"),  # reserved: checked elsewhere
        ("customer_id", "43"),
        ("customer_id", "42"),
        ("status", "open"),
        ("token", "t"),
        ("lastEventId", "9"),
    ]
    assert check_feed_query("customer_id", ("status",), params) == (
        ("42", "43"),
        {"status": "open"},
    )


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ([("customerId", "42")], "unknown parameter 'customerId'"),
        ([("sessionId", "a")], "unknown parameter 'sessionId'"),
        ([("status", "a"), ("status", "b")], "status may be given once"),
        ([("status", "")], "status must not be empty"),
        ([("customer_id", "a\x00")], "customer_id must not contain control characters"),
        ([("customer_id", "x" * 256)], "customer_id must be at most 255 characters"),
        (
            [("customer_id", str(n)) for n in range(MAX_SESSIONS + 1)],
            f"customer_id may be given at most {MAX_SESSIONS} times",
        ),
    ],
)
def test_a_feed_query_refuses_with_the_parameter_named(
    params: list[tuple[str, str]], error: str
) -> None:
    with pytest.raises(RequestError) as refused:
        check_feed_query("customer_id", ("status",), params)
    assert refused.value.status == 400 and str(refused.value) == error
