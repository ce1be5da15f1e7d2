"""broker.subscriber, pure: the bounded queue and `Seen`."""

from __future__ import annotations

from broker.subscriber import SLOW_CONSUMER, Event, Seen, Subscriber, channel_of


def test_a_full_queue_closes_the_subscriber_and_empties_it() -> None:
    subscriber = Subscriber("a", None, queue_size=2)
    closes: list[bool] = []
    subscriber.on_close = lambda: closes.append(True)
    assert subscriber.push(Event(1, b"1")) and subscriber.push(Event(2, b"2"))
    assert not subscriber.push(Event(3, b"3"))
    assert subscriber.closed and subscriber.close_reason == SLOW_CONSUMER and closes == [True]
    assert subscriber.queued == 0 and not subscriber.push(Event(4, b"4"))


def test_take_empties_the_queue_in_order() -> None:
    subscriber = Subscriber(None, None, queue_size=10)
    for id_ in (1, 2):
        subscriber.push(Event(id_, b""))
    assert [event.id for event in subscriber.take()] == [1, 2]
    subscriber.push(Event(3, b""))
    assert [event.id for event in subscriber.take()] == [3] and subscriber.queued == 0


def test_seen_skips_up_to_its_floor_and_each_id_to_skip_once() -> None:
    seen = Seen()
    seen.floor, seen.to_skip = 5, {7}
    assert 5 in seen and 7 in seen and 6 not in seen and 0 not in seen
    assert seen.skip(3) and seen.skip(7) and not seen.skip(7) and not seen.skip(6)


def test_drop_seen_keeps_heartbeats_and_unseen_rows() -> None:
    subscriber = Subscriber("a", None, queue_size=10)
    for id_ in (4, 0, 6):
        subscriber.push(Event(id_, b""))
    subscriber.seen = Seen()
    subscriber.seen.floor = 5
    subscriber.drop_seen()
    assert [event.id for event in subscriber.take()] == [0, 6]


def test_channels() -> None:
    assert channel_of(None) == "session_messages:global"
    assert Subscriber("x", None, 1).channel == "session_messages:x"
    assert Subscriber(("42", "7"), None, 1, feed="orders").channels == ["orders:42", "orders:7"]
    assert Subscriber(None, None, 1, feed="orders").channel == "orders:global"
