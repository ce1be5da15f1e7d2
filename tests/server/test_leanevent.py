"""broker.server.leanevent in-process: a `LeanEvent` behaves as the `asyncio.Event` it replaces."""

from __future__ import annotations

import asyncio
import sys

import pytest

from broker.server.leanevent import LeanEvent


async def test_set_wakes_every_waiter_and_wait_returns_at_once_while_set() -> None:
    event = LeanEvent()
    assert not event.is_set()
    waiters = [asyncio.ensure_future(event.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(waiter.done() for waiter in waiters)
    event.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 5) == [True, True, True]
    assert event.is_set() and await asyncio.wait_for(event.wait(), 5)
    event.clear()
    assert not event.is_set()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(event.wait(), 0.05)


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    event = LeanEvent()
    waiter = asyncio.ensure_future(event.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert "waiters:0" in repr(event)
    event.set()  # nothing to wake, nothing raised


def test_it_starts_set_when_asked_and_costs_less_than_an_asyncio_event() -> None:
    assert LeanEvent(True).is_set()
    lean, plain = LeanEvent(), asyncio.Event()
    assert sys.getsizeof(lean._waiters_list) < 100 < sys.getsizeof(plain._waiters)
