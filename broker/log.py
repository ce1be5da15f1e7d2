"""Logging: one structlog configuration, one event per line, keys not prose."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import time
from typing import Any

import orjson
import structlog

from .config import LOG_LEVELS

__all__ = ["REFUSAL_INTERVAL_SECONDS", "Refusals", "configure", "digest_of"]

REFUSAL_INTERVAL_SECONDS = 1.0


def configure(log_format: str, level_name: str = "info") -> None:
    """Write structlog events and the standard library's records (uvicorn, psycopg) to
    stderr as `log_format`, from `level_name` (`BROKER_LOG_LEVEL`) up.

    The broker's own events go through structlog's plain writer rather than the `logging`
    module, which looks up the caller's frame for every record: that was a fifth of the CPU
    of opening a stream (measured with py-spy under `make bench`'s churn scenario).
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
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
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


def digest_of(text: str) -> dict[str, Any]:
    """What a log may say of untrusted text (a row's content, a payload): its length and a
    hash to match it by, never the text itself."""
    data = text.encode(errors="replace")
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()[:16]}


class Refusals:
    """Refusals logged at a bounded rate: the first of a (event, reason) at once, with
    `count=1`; those that follow within `interval` seconds as one line at its end, with their
    count. One client refused 66,000 times in 8 s wrote as many lines; now at most two per
    reason per second, and the counts still add up to every refusal."""

    def __init__(self, logger: Any, interval: float = REFUSAL_INTERVAL_SECONDS) -> None:
        self._log = logger
        self.interval = interval
        self._pending: dict[tuple[str, str], int] = {}  # refusals not yet written, by key

    def info(self, event: str, reason: str, **fields: Any) -> None:
        key = (event, reason)
        if key in self._pending:
            self._pending[key] += 1
            return
        self._log.info(event, reason=reason, count=1, **fields)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside the server: nothing to aggregate with
            return
        self._pending[key] = 0
        loop.call_later(self.interval, self._flush, key, time.monotonic())

    def _flush(self, key: tuple[str, str], since: float) -> None:
        count = self._pending.pop(key, 0)
        if count:
            event, reason = key
            seconds = round(time.monotonic() - since, 3)
            self._log.info(event, reason=reason, count=count, seconds=seconds)
