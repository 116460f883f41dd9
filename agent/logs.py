"""Logging: structlog configured once per process.

The daemon writes one JSON object per line to stdout (journald keeps it); the CLI uses the console renderer.
Context such as ``request_id``, ``model`` and ``device_id`` is bound with contextvars
(``structlog.contextvars.bound_contextvars``) so that every event of a unit of work carries it.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from typing import TextIO

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
        logger_factory=structlog.PrintLoggerFactory(file=_own_stream(sys.stdout if json else sys.stderr)),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(
        level=max(numeric, logging.WARNING), stream=_own_stream(sys.stderr), format="%(name)s: %(message)s"
    )


def _own_stream(stream: TextIO) -> TextIO:
    """A line-buffered stream on a duplicate of ``stream``'s file descriptor, or ``stream`` if it has none.

    While llama.cpp opens a model the engine points descriptors 1 and 2 at ``/dev/null`` to silence what the
    library prints (``agent.inference.llama._quiet_stdio``); lines logged meanwhile by other threads must still
    reach the journal, so the logs do not write through descriptors 1 and 2 themselves.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):  # a test's capture object, say
        return stream
    target = os.fstat(fd)
    kept = _duplicates.get(fd)
    if kept is not None and kept[0] == (target.st_dev, target.st_ino):
        return kept[1]
    duplicate = open(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    _duplicates[fd] = ((target.st_dev, target.st_ino), duplicate)  # kept open: loggers made before hold it
    return duplicate


_duplicates: dict[int, tuple[tuple[int, int], TextIO]] = {}
"""Per descriptor: the file it pointed at and our duplicate of it (made again if the descriptor now points
elsewhere, as a test's output capture does)."""
