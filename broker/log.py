"""Logging: one structlog configuration, one event per line, keys not prose."""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure"]


def configure(log_format: str, level: int = logging.INFO) -> None:
    """Route structlog and the standard library (uvicorn, psycopg) to stderr as `log_format`."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
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


def _drop_cut_stream_report(record: logging.LogRecord) -> bool:
    """uvicorn reports a response ended without its last chunk as an error; the broker does
    that on purpose to a client that stopped reading (it cannot be sent anything more) and
    logs `stream_closed` with the reason itself."""
    return record.getMessage() != "ASGI callable returned without completing response."
