"""`pgsse serve --workers N`: N broker processes serving the same listening sockets.

The parent binds the sockets, reaches (or starts) the database and migrates, once; then it
forks N workers. Each runs its own event loop, broker and uvicorn server on the inherited
sockets, and the kernel hands each new connection to one of them. The parent only supervises:

- SIGTERM or SIGINT is passed on to every worker, which drains as a single process does; the
  parent exits when all have, 0 if all exited 0. Each worker is in a process group of its own,
  so a terminal's Ctrl-C reaches the parent alone and every worker gets exactly one signal.
- A worker that dies (a crash, kill -9, the OOM killer) is forked again: its clients reconnect
  to the same port and reach a sibling meanwhile, and the pool keeps its size, as a service
  manager would restart a single process. A worker that dies within `STARTUP_SECONDS` of its
  start is failing to start (a database gone, a bug at start-up): forking it again would only
  loop, so then every worker is stopped and the parent exits 1.

Forked, not spawned: a worker inherits the bound sockets and the configured logging, and the
parent holds no thread or event loop when it forks. A worker dies with the parent (Linux's
parent-death signal), so kill -9 of the parent leaves no orphan serving the port. Without a
bus each worker LISTENs itself (N listening backends); with `BROKER_BUS_URL` one of all of
them does.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable
from types import FrameType

import structlog

__all__ = ["STARTUP_SECONDS", "run_workers"]

STARTUP_SECONDS = 5.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

log = structlog.get_logger(logger_name=__name__)


def run_workers(
    count: int, serve: Callable[[], int], begin: Callable[[int], None] | None = None
) -> int:
    """Run `serve` in `count` forked workers until a signal stops them; the exit status.
    `begin(index)` runs first in each worker, with its index (0 to count - 1); a worker
    forked again in a dead one's place has the dead one's index."""
    workers: dict[int, float] = {}  # pid -> when it was forked (monotonic)
    indexes: dict[int, int] = {}  # pid -> its index
    parent = os.getpid()
    stopping = False
    status = 0

    def stop(sig: int, frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def fork(index: int) -> None:
        # Signals wait while forking, so none reaches the parent before the worker is known.
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                _worker(serve, parent, index, begin)  # never returns
            workers[pid] = time.monotonic()
            indexes[pid] = index
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    for sig in SIGNALS:
        signal.signal(sig, stop)
    for index in range(count):
        fork(index)
    log.info("workers_started", workers=count, pids=sorted(workers))
    while workers:
        pid, wait_status = os.wait()
        started = workers.pop(pid, None)
        if started is None:
            continue  # not a worker (a child of the embedded database's tooling, say)
        index = indexes.pop(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if stopping:
            status = status or (1 if code else 0)
            continue
        alive = time.monotonic() - started
        log.error("worker_died", pid=pid, exit_code=code, seconds_alive=round(alive, 3))
        if alive < STARTUP_SECONDS:
            log.error("workers_stopping", reason="a worker died starting", workers=len(workers))
            status = 1
            stop(signal.SIGTERM)
            continue
        fork(index)
        log.info("worker_restarted", pids=sorted(workers))
    log.info("workers_stopped", exit_code=status)
    return status


def _worker(
    serve: Callable[[], int], parent: int, index: int, begin: Callable[[int], None] | None
) -> None:
    """In the forked child: a process group of its own, default signal handling, then `serve`;
    exits with its status, never returning into the parent's stack."""
    code = 1
    try:
        _die_with(parent)
        os.setpgid(0, 0)
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        if begin is not None:
            begin(index)
        code = serve()
    except BaseException:
        log.exception("worker_crashed")
    finally:
        os._exit(code)


def _die_with(parent: int) -> None:
    """Linux: the kernel kills this worker when the parent dies (kill -9 of it, say), so no
    worker outlives its supervisor holding the port and a listening backend."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl
        os._exit(1)
