"""retry_forever: the shared shape of the relay's and the bus reader's connection loops."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import structlog
from structlog.testing import capture_logs

from broker.feeds.backoff import Backoff
from broker.feeds.retry import pause, retry_forever

log = structlog.get_logger(logger_name="tests.retry")


async def test_expected_failures_and_bugs_are_both_retried_until_cancelled() -> None:
    failures: list[BaseException] = []
    attempts = 0
    fourth = asyncio.Event()

    async def attempt(backoff: Backoff) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 4:
            fourth.set()
            await asyncio.Event().wait()  # connected: runs until cancelled
        raise (ConnectionError("gone") if attempts != 2 else KeyError("a bug"))

    with capture_logs() as logs:
        task = asyncio.ensure_future(
            retry_forever(
                attempt,
                failures.append,
                expected=(ConnectionError,),
                crashed="thing_crashed",
                log=log,
                backoff=Backoff(initial=0.001, maximum=0.01),
            )
        )
        await asyncio.wait_for(fourth.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert [type(exc) for exc in failures] == [ConnectionError, KeyError, ConnectionError]
    crashed = [entry for entry in logs if entry["event"] == "thing_crashed"]
    assert len(crashed) == 1 and crashed[0]["log_level"] == "error"


async def test_a_swallowed_cancellation_still_ends_a_polling_loop() -> None:
    """As Python 3.11's wait_for can lose a cancellation: the loop's next pause raises it."""

    async def polling() -> None:
        while True:
            with contextlib.suppress(asyncio.CancelledError):  # swallowed, as a library might
                await asyncio.sleep(10)
            await pause(0.01)

    task = asyncio.ensure_future(polling())
    await asyncio.sleep(0.05)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert task in done and task.cancelled()
