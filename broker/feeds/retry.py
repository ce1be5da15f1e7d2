"""The shape every connection loop of the broker shares: try, and after a failure back off and
try again, until cancelled.

The listener, the relay's campaign and the bus reader run on it. A failure
the caller expects (a server gone: `expected`) is handed to `on_failure`, which logs it as the
caller sees fit and marks itself down; any other exception is a bug, logged with its traceback
as `crashed` and retried all the same, since a bug must not end delivery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from .backoff import Backoff

__all__ = ["checkpoint", "pause", "retry_forever"]


async def retry_forever(
    attempt: Callable[[Backoff], Awaitable[None]],
    on_failure: Callable[[BaseException], None],
    *,
    expected: tuple[type[BaseException], ...],
    crashed: str,
    log: Any,
    backoff: Backoff | None = None,
) -> NoReturn:
    """Run `attempt(backoff)` again and again, `backoff`'s next delay apart; `attempt` resets
    the backoff once it is connected, so the delay grows only while it keeps failing."""
    backoff = backoff or Backoff()
    while True:
        try:
            await attempt(backoff)
        except asyncio.CancelledError:
            raise
        except expected as exc:
            on_failure(exc)
        except Exception as exc:
            log.exception(crashed)
            on_failure(exc)
        await pause(backoff.next())


async def pause(seconds: float) -> None:
    """`asyncio.sleep`, after `checkpoint()`: what every polling loop waits with."""
    checkpoint()
    await asyncio.sleep(seconds)


def checkpoint() -> None:
    """Raise `CancelledError` if this task was cancelled and something swallowed it.

    Python 3.11's `asyncio.wait_for` loses a cancellation that arrives as its inner await
    completes (gh-86296), and a library may turn one into its own timeout error. A loop that
    then polls on would outlive its own shutdown: seen with `--workers 16` on one busy core,
    where followers' campaigns kept polling after SIGTERM and uvicorn's shutdown never ended.
    The task still counts the request (`Task.cancelling()`), so each loop checks it here."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
