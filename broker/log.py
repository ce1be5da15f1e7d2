"""Logging: one structlog configuration, one event per line, keys not prose."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import IO, Any, TextIO

import orjson
import structlog

from .config.settings import LOG_LEVELS

__all__ = ["REFUSAL_INTERVAL_SECONDS", "Refusals", "configure", "silence_closed_pipe"]

REFUSAL_INTERVAL_SECONDS = 1.0


def configure(log_format: str, level_name: str = "info") -> None:
    """Write structlog events and the standard library's records (uvicorn, psycopg) to
    stderr as `log_format`, from `level_name` (`BROKER_LOG_LEVEL`) up.

    The broker's own events go through structlog's plain writer rather than the `logging`
    module, which looks up the caller's frame for every record: that was a fifth of the CPU
    of opening a stream (measured with py-spy under `make bench`'s churn scenario).

    A line that cannot be written is dropped, never raised to the code that logged it: behind
    `make run 2>&1 | tee run.log`, Ctrl-C ends `tee` too, and a shutdown that raised
    `BrokenPipeError` from its first log line left every stream open for the whole grace
    period and exited 1. A closed pipe (EPIPE) is then replaced by /dev/null, as nobody can
    read it again; any other failure (a full disk) drops only that line.
    """
    level = LOG_LEVELS[level_name]
    shared: list[structlog.types.Processor] = [
        _logger_key,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if log_format == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer(serializer=_json)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())

    structlog.configure(
        processors=[*shared, renderer],
        logger_factory=_WriterFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    handler = _Handler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("uvicorn.error").addFilter(_drop_cut_stream_report)
    logging.getLogger("uvicorn.error").addFilter(_drop_invalid_request_report)


class _Writer(structlog.WriteLogger):
    """structlog's plain writer, whose failures to write are dropped (see `configure`)."""

    def msg(self, message: str) -> None:
        try:
            super().msg(message)
        except OSError as exc:
            silence_closed_pipe(self._file, exc)
        except ValueError:  # a file closed under it (an embedding app's, a test's capture)
            pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _WriterFactory(structlog.WriteLoggerFactory):
    def __init__(self, file: TextIO) -> None:
        self._out = file

    def __call__(self, *args: Any) -> _Writer:
        return _Writer(self._out)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The standard library's records, whose failures to write are dropped like structlog's
    (its own `handleError` would print a traceback to the same dead stream)."""

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            silence_closed_pipe(self.stream, exc)
        else:
            super().handleError(record)


def silence_closed_pipe(file: IO[str], exc: OSError) -> None:
    """After a failed write to `file`: a closed pipe's descriptor now points at /dev/null, so
    that no later write, nor the flush at exit, fails again."""
    if not isinstance(exc, BrokenPipeError):
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, file.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):  # no descriptor (a test's capture), or closed
        pass


def _logger_key(_: Any, __: str, event_dict: structlog.types.EventDict) -> Any:
    """Modules bind `logger_name` (`logger` is taken by structlog's own arguments); it is
    written as `logger`, the key the standard library's records have."""
    if "logger_name" in event_dict:
        event_dict["logger"] = event_dict.pop("logger_name")
    return event_dict


def _json(event: Any, **_: Any) -> str:
    return orjson.dumps(event, default=str).decode()


def _drop_cut_stream_report(record: logging.LogRecord) -> bool:
    """uvicorn reports a response ended without its last chunk as an error; the broker does
    that on purpose to a client that stopped reading (it cannot be sent anything more) and
    logs `stream_closed` with the reason itself."""
    return record.getMessage() != "ASGI callable returned without completing response."


def _drop_invalid_request_report(record: logging.LogRecord) -> bool:
    """uvicorn warns once per unparsable request, at any rate a client likes; the broker
    logs `request_invalid` instead, at a bounded rate (`Refusals`)."""
    return record.getMessage() != "Invalid HTTP request received."


class Refusals:
    """Refusals logged at a bounded rate: the first of a (event, reason) at once, with
    `count=1`; those that follow within `interval` seconds as one line at its end, with their
    count. One client refused 66,000 times in 8 s wrote as many lines; now at most two per
    reason per second, and the counts still add up to every refusal. `count` is every refusal
    so far (stats). A reason is a fixed text, never a payload's content nor anything a client
    can vary at will, or the bound is per variant."""

    def __init__(self, logger: Any, interval: float = REFUSAL_INTERVAL_SECONDS) -> None:
        self._log = logger
        self.interval = interval
        self.count = 0
        self._pending: dict[tuple[str, str], int] = {}  # refusals not yet written, by key

    def info(self, event: str, reason: str, **fields: Any) -> None:
        self._refuse(self._log.info, event, reason, fields)

    def error(self, event: str, reason: str, **fields: Any) -> None:
        """A refusal that says something is wrong upstream (a forged or foreign payload)."""
        self._refuse(self._log.error, event, reason, fields)

    def _refuse(self, write: Any, event: str, reason: str, fields: dict[str, Any]) -> None:
        self.count += 1
        key = (event, reason)
        if key in self._pending:
            self._pending[key] += 1
            return
        write(event, reason=reason, count=1, **fields)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside the server: nothing to aggregate with
            return
        self._pending[key] = 0
        loop.call_later(self.interval, self._flush, write, key, time.monotonic())

    def _flush(self, write: Any, key: tuple[str, str], since: float) -> None:
        count = self._pending.pop(key, 0)
        if count:
            event, reason = key
            seconds = round(time.monotonic() - since, 3)
            write(event, reason=reason, count=count, seconds=seconds)
