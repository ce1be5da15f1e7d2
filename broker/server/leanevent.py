"""`LeanEvent`: an `asyncio.Event` without the deque an `asyncio.Event` allocates.

uvicorn gives every connection one event (flow control: may the response write?) and every
request another (has the request a message or has its client gone?). An empty
`collections.deque` allocates a 64-slot block: each event cost about 760 B, for as long as
a stream lasts. The protocol (`pipelining.py`) swaps both for a `LeanEvent`, which keeps its
waiters in a list (56 B empty) and implements all of `Event` that is used: `set`, `clear`,
`is_set` and `wait`, without relying on `asyncio.Event`'s internals.
"""

from __future__ import annotations

import asyncio
from typing import Literal

__all__ = ["LeanEvent"]


class LeanEvent(asyncio.Event):
    """An `asyncio.Event` whose waiters are a list."""

    def __init__(self, value: bool = False) -> None:
        # Not asyncio.Event.__init__: it allocates the deque this class exists to avoid.
        self._set = value
        self._waiters_list: list[asyncio.Future[bool]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        for waiter in self._waiters_list:
            if not waiter.done():
                waiter.set_result(True)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> Literal[True]:
        if self._set:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters_list.append(waiter)
        try:
            await waiter
            return True
        finally:
            self._waiters_list.remove(waiter)

    def __repr__(self) -> str:
        return f"<LeanEvent {'set' if self._set else 'unset'}, waiters:{len(self._waiters_list)}>"
