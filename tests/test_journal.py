"""The commit-order journal, pure."""

from __future__ import annotations

import pytest

from broker.filters import Filter
from broker.journal import Journal


def test_after_follows_delivery_order_not_id_order() -> None:
    journal = Journal(10)
    for row_id in (10, 12, 11, 13):  # 12 committed before 11
        journal.append(row_id, "a", None)
    assert journal.after(12, Filter.of("a", None)) == [11, 13]
    assert journal.after(11, Filter.of("a", None)) == [13]  # 12 is not sent twice
    assert journal.after(10, Filter.of(None, None)) == [12, 11, 13]
    assert journal.after(13, Filter.of("a", None)) == []


def test_after_filters_by_session_and_robot() -> None:
    journal = Journal(10)
    rows = [(1, "a", "r1"), (2, "b", "r1"), (3, "a", None), (4, "a", "r2"), (5, "b", None)]
    for row in rows:
        journal.append(*row)
    assert journal.after(1, Filter.of("a", None)) == [3, 4]
    assert journal.after(1, Filter.of(None, "r1")) == [2]
    assert journal.after(1, Filter.of("a", "r2")) == [4]
    assert journal.after(2, Filter.of(None, None)) == [3, 4, 5]


def test_unknown_or_evicted_id_gives_none() -> None:
    journal = Journal(3)
    for row_id in range(1, 6):
        journal.append(row_id, "a", None)
    assert len(journal) == 3 and journal.oldest_id == 3
    assert journal.after(2, Filter.of("a", None)) is None
    assert journal.after(99, Filter.of("a", None)) is None
    assert journal.after(3, Filter.of("a", None)) == [4, 5]
    assert 2 not in journal and 3 in journal


def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Journal(0)


def test_a_change_matches_on_its_route_before_or_after_and_leaves_with_its_place() -> None:
    journal = Journal(3)
    journal.append(1, "a", None)
    journal.append_change(2, "b", "r2", "a", "r1")  # moved from a/r1 to b/r2
    journal.append(3, "a", None)
    assert journal.after(1, Filter.of("a", "r1")) == [2]
    assert journal.after(1, Filter.of("b")) == [2]
    assert journal.after(1, Filter.of("a", "r2")) == []
    assert journal.is_change(2) and not journal.is_change(3)
    journal.append(4, "a", None)
    journal.append(5, "a", None)  # the change is dropped to keep the size
    assert not journal.is_change(2) and journal.after(3, Filter.of("a")) == [4, 5]
    journal.append_change(6, "a", None, "a", None)
    journal.clear()
    assert not journal.is_change(6)
