"""Helpers of the in-process tests: a row as the hub sees it, bounded waits on a condition or
on a subscriber's queue, and stopping the tasks a test ran."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from broker.events import Message
from broker.subscriber import Subscriber


def message(id_: int, session: str = "a") -> Message:
    return Message(id_, session, None, f"m{id_}", False, True, None, "2026-01-01T00:00:00.000Z")


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until true; for state of another process (Redis, PostgreSQL locks) or
    a counter with no event to await."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def received(subscriber: Subscriber, count: int, timeout: float = 10) -> list[int]:
    """The ids of the next `count` events queued for `subscriber` (more if they came together)."""
    ids: list[int] = []
    async with asyncio.timeout(timeout):
        while len(ids) < count:
            assert not subscriber.closed, f"closed ({subscriber.close_reason}) after {ids}"
            if not subscriber.queued:
                await subscriber.wait()
            ids += [event.id for event in subscriber.take()]
    return ids


async def stop(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    _, pending = await asyncio.wait(tasks, timeout=10)
    for task in pending:
        task.print_stack()
    assert not pending, "a task did not end within 10 s of its cancellation"
