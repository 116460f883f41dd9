"""Importing a library without the optional dependencies it would load for features the daemon does not use.

Some libraries import a package at their own import time *if it is installed*, for a feature the agent's daemon
never uses, and that package then stays resident for the life of the process:

* ``sqlite_utils.db`` imports numpy (~20 MiB resident) to map numpy scalar types to column types; the agent
  stores only Python values.
* ``structlog.dev`` imports rich (with pygments, ~5 MiB) for the console renderer's tracebacks; the daemon logs
  JSON lines (``log.json``, the default).

:func:`import_without` imports such a library as if those packages were not installed. The effect is limited
to the library's own optional import: the packages stay importable afterwards, and nothing changes when either
the library or the package was imported before.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["import_without"]


def import_without(module: str, *optional: str) -> None:
    """Import ``module`` while the packages ``optional`` look uninstalled (``import`` of one raises ImportError).

    Args:
        module: the library to import; nothing happens if it is imported already.
        optional: packages ``module`` imports only if they are installed. One that is imported already is left
            alone (hiding it would save nothing).
    """
    if module in sys.modules:
        return
    hidden = [name for name in optional if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # the import system's "not importable" marker
    try:
        importlib.import_module(module)
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
