"""Logging: structlog configured once per process.

The daemon writes one JSON object per line to stdout (journald keeps it); the CLI uses the console renderer.
Context such as ``request_id``, ``model`` and ``device_id`` is bound with contextvars
(``structlog.contextvars.bound_contextvars``) so that every event of a unit of work carries it.
"""

from __future__ import annotations

import logging
import sys

import structlog

__all__ = ["configure_logging"]


def configure_logging(level: str = "info", *, json: bool = True) -> None:
    """Configure structlog and the standard library's logging to one output.

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error``.
        json: JSON lines (daemon) instead of the human console renderer (CLI).
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout if json else sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, format="%(name)s: %(message)s")
