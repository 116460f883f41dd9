"""Coalescing of failed authentications before they reach the tamper-evident audit log.

Any local process can send requests that fail authentication (a wrong token over TCP, any token on the socket).
Were each one an audit record, a flood would fill the audit log (and, under its retention caps while the
controller is away, push out older unacknowledged records behind a GAP) and keep the audit writer busy.

:class:`AuthFailureAudit` decides which records a failure produces, per caller key (transport and peer uid, or
TCP peer address) and per window of ``window_s`` seconds:

- the first failure of a key in a window is audited as ``api.auth_failed`` (as before), at once;
- later failures of that key in the window are only counted; when the window has closed, the count is audited
  as one ``api.auth_failed_repeated`` record (``count``, ``window_s``, the routes and the last reason), with the
  next failure of any caller, or by :meth:`AuthFailureAudit.flush` when the server stops;
- at most ``max_peers`` keys are tracked: failures of further keys share one overflow key (actor
  ``peers:other``), so memory stays bounded whatever the number of addresses or uids a flood uses.

Pure bookkeeping (no I/O, no clock of its own unless given): the caller writes the records it returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AuditRecord", "AuthFailureAudit"]

AuditRecord = tuple[str, str, dict[str, Any]]
"""``(kind, actor, data)``, as :meth:`agent.api.app.ApiState.record` takes them."""

MAX_ROUTES = 8
OVERFLOW_KEY = ("*", "*")
OVERFLOW_ACTOR = "peers:other"


@dataclass
class _Window:
    actor: str
    opened: float
    suppressed: int = 0
    routes: set[str] = field(default_factory=set)
    reason: str = ""


class AuthFailureAudit:
    """Which audit records failed authentications produce (see the module docstring)."""

    def __init__(self, window_s: float, *, max_peers: int = 256, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._max_peers = max_peers
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}

    def failed(self, key: tuple[str, str], actor: str, route: str, reason: str) -> list[AuditRecord]:
        """Account one failed authentication of caller ``key``; return the records to write now, in order."""
        now = self._clock()
        records = self._close_windows(lambda w: now - w.opened >= self._window_s)
        if key not in self._windows and len(self._windows) >= self._max_peers:
            key, actor = OVERFLOW_KEY, OVERFLOW_ACTOR
        window = self._windows.get(key)
        if window is None:
            self._windows[key] = _Window(actor, now)
            records.append(("api.auth_failed", actor, {"route": route, "reason": reason}))
        else:
            window.suppressed += 1
            if len(window.routes) < MAX_ROUTES:
                window.routes.add(route)
            window.reason = reason
        return records

    def flush(self) -> list[AuditRecord]:
        """Close every window: the summaries of all failures counted but not yet audited."""
        return self._close_windows(lambda w: True)

    def __len__(self) -> int:
        return len(self._windows)

    def _close_windows(self, closing: Callable[[_Window], bool]) -> list[AuditRecord]:
        records: list[AuditRecord] = []
        for key, window in list(self._windows.items()):
            if not closing(window):
                continue
            del self._windows[key]
            if window.suppressed:
                data = {
                    "count": window.suppressed,
                    "window_s": self._window_s,
                    "routes": sorted(window.routes),
                    "reason": window.reason,
                }
                records.append(("api.auth_failed_repeated", window.actor, data))
        return records
