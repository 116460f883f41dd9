"""What the ``edge-fleet`` command modules share."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import click

from controller.errors import ControllerError

__all__ = ["reports_errors"]

P = ParamSpec("P")
T = TypeVar("T")


def reports_errors(fn: Callable[P, T]) -> Callable[P, T]:
    """Turn a :class:`ControllerError` into click's one-line ``Error: ...`` and exit status 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except ControllerError as exc:
            raise click.ClickException(exc.diagnostics()) from exc

    return wrapper
