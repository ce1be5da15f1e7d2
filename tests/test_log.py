"""broker.log: one configuration for structlog and the standard library's records, one event
per line with keys, at the configured level; uvicorn's report of a cut stream dropped."""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from broker.log import configure

NAMES = ("uvicorn", "uvicorn.error", "uvicorn.access")


@pytest.fixture
def stderr() -> Iterator[io.StringIO]:
    """Where `configure_into` writes; structlog and logging are restored afterwards."""
    root = logging.getLogger()
    saved: dict[str, Any] = {"root": (root.handlers[:], root.level)}
    for name in NAMES:
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.propagate, logger.disabled, logger.filters[:])
    stream = io.StringIO()
    yield stream
    structlog.reset_defaults()
    root.handlers[:], root.level = saved["root"]
    for name in NAMES:
        logger = logging.getLogger(name)
        logger.handlers[:], logger.propagate, logger.disabled, logger.filters[:] = saved[name]


def configure_into(stream: io.StringIO, log_format: str, level: str = "info") -> None:
    """`configure`, with `stream` as its stderr (pytest swaps sys.stderr between phases)."""
    with contextlib.redirect_stderr(stream):
        configure(log_format, level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_structlog_event_is_one_json_line_of_keys(stderr: io.StringIO) -> None:
    configure_into(stderr, "json")
    log = structlog.get_logger(logger_name="tests.log")
    log.info("stream_opened", session_id="s-1", replay_rows=3, note="two\nlines")
    (event,) = lines(stderr)
    assert event["event"] == "stream_opened" and event["level"] == "info"
    assert event["logger"] == "tests.log" and "logger_name" not in event
    assert event["session_id"] == "s-1" and event["replay_rows"] == 3
    assert event["note"] == "two\nlines"  # escaped inside its line
    assert event["timestamp"].endswith("Z")


def test_standard_library_records_share_the_format(stderr: io.StringIO) -> None:
    configure_into(stderr, "json")
    logging.getLogger("psycopg.pool").warning("pool %s is slow", "pgsse-store")
    (event,) = lines(stderr)
    assert event["event"] == "pool pgsse-store is slow"
    assert (event["level"], event["logger"]) == ("warning", "psycopg.pool")


def test_events_below_the_level_are_dropped(stderr: io.StringIO) -> None:
    configure_into(stderr, "json", "warning")
    log = structlog.get_logger(logger_name="tests.log")
    log.info("quiet")
    logging.getLogger("psycopg").info("quiet too")
    log.warning("loud")
    logging.getLogger("psycopg").error("loud too")
    assert [event["event"] for event in lines(stderr)] == ["loud", "loud too"]


def test_uvicorn_goes_through_the_root_and_its_cut_stream_report_is_dropped(
    stderr: io.StringIO,
) -> None:
    configure_into(stderr, "json")
    error = logging.getLogger("uvicorn.error")
    error.error("ASGI callable returned without completing response.")
    error.error("Exception in ASGI application")
    logging.getLogger("uvicorn.access").info('127.0.0.1 - "GET / HTTP/1.1" 200')
    assert [event["event"] for event in lines(stderr)] == ["Exception in ASGI application"]


def test_an_exception_is_rendered_inside_its_json_line(stderr: io.StringIO) -> None:
    configure_into(stderr, "json")
    log = structlog.get_logger(logger_name="tests.log")
    try:
        raise KeyError("a bug")
    except KeyError:
        log.exception("listener_crashed")
    (event,) = lines(stderr)
    assert event["event"] == "listener_crashed" and "KeyError: 'a bug'" in event["exception"]


def test_the_console_format_is_one_line_per_event(stderr: io.StringIO) -> None:
    configure_into(stderr, "console")
    structlog.get_logger(logger_name="tests.log").info("listener_up", reconnects=0)
    (line,) = stderr.getvalue().splitlines()
    assert "listener_up" in line and "reconnects=0" in line and "\x1b[" not in line
