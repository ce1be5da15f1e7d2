"""broker.workers: `run_workers` with a tiny `serve` in a throwaway Python process (it forks
and takes signals, which pytest's own process must not). No broker, no uvicorn: the
supervision rules alone. `--workers` with real brokers is test_cli's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from broker import workers
    from broker.log import configure

    configure("json")
    workers.STARTUP_SECONDS = float(sys.argv[2])
    mode, marks = sys.argv[1], sys.argv[3]

    def serve():
        if mode == "fail":
            return 3
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        try:  # exactly one worker wins: both may start before either has written a mark
            os.close(os.open(marks + ".first", os.O_CREAT | os.O_EXCL))
            first = True
        except FileExistsError:
            first = False
        with open(marks, "a") as out:
            out.write(f"{os.getpid()} {os.getpgid(0)}\\n")
        if mode == "die-later" and first:
            time.sleep(0.5)
            return 1
        while not stop:
            signal.pause()
        return 0

    sys.exit(workers.run_workers(2, serve))
    """
)


@pytest.fixture
def run() -> Iterator[Callable[[str, float, Path], subprocess.Popen[str]]]:
    """Starts the supervisor; whatever a failing test leaves running is killed, with its
    process group's workers, so no process outlives its test."""
    started: list[subprocess.Popen[str]] = []

    def start(mode: str, startup: float, marks: Path) -> subprocess.Popen[str]:
        parent = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, mode, str(startup), str(marks)],
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(parent)
        return parent

    yield start
    for parent in started:
        if parent.poll() is None:
            parent.kill()
        parent.communicate(timeout=10)


def wait_for_marks(marks: Path, count: int, timeout: float = 10) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    while True:
        lines = marks.read_text().splitlines() if marks.exists() else []
        if len(lines) >= count:
            return [(int(a), int(b)) for a, b in (line.split() for line in lines)]
        assert time.monotonic() < deadline, f"{len(lines)} of {count} workers started"
        time.sleep(0.02)


Runner = Callable[[str, float, Path], subprocess.Popen[str]]


def events(stderr: str) -> list[str]:
    return [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]


def test_sigterm_reaches_each_worker_in_its_own_group_and_the_parent_exits_0(
    tmp_path: Path, run: Runner
) -> None:
    marks = tmp_path / "marks"
    parent = run("serve", 5.0, marks)
    workers = wait_for_marks(marks, 2)
    assert all(pid == group != parent.pid for pid, group in workers)  # a group of its own
    parent.send_signal(signal.SIGTERM)
    _, stderr = parent.communicate(timeout=10)
    assert parent.returncode == 0, stderr
    assert events(stderr)[-1] == "workers_stopped"


def test_a_worker_that_dies_starting_stops_them_all_with_status_1(
    tmp_path: Path, run: Runner
) -> None:
    parent = run("fail", 5.0, tmp_path / "marks")
    _, stderr = parent.communicate(timeout=10)
    assert parent.returncode == 1
    seen = events(stderr)
    assert "worker_died" in seen and "workers_stopping" in seen
    assert "worker_restarted" not in seen


def test_a_worker_that_dies_after_starting_is_forked_again(tmp_path: Path, run: Runner) -> None:
    marks = tmp_path / "marks"
    parent = run("die-later", 0.2, marks)
    workers = wait_for_marks(marks, 3)  # two, then the one forked again
    assert len({pid for pid, _ in workers}) == 3
    parent.send_signal(signal.SIGTERM)
    _, stderr = parent.communicate(timeout=10)
    assert parent.returncode == 0, stderr
    assert events(stderr).count("worker_restarted") == 1


def test_workers_die_with_a_killed_parent(tmp_path: Path, run: Runner) -> None:
    marks = tmp_path / "marks"
    parent = run("serve", 5.0, marks)
    workers = [pid for pid, _ in wait_for_marks(marks, 2)]
    parent.kill()
    parent.communicate(timeout=10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived its parent"
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for init to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z" and os.path.exists(f"/proc/{pid}")
