"""Logging: one structlog configuration, one event per line, keys not prose."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

from .config import LOG_LEVELS

__all__ = ["configure"]


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
