"""Crash-loop breaker for model loads: a model whose load keeps killing the agent is quarantined.

A load triggered by a request (or a health check) runs the engine's native open in the agent's process: a model
that segfaults or is OOM-killed while loading would restart the agent on every request for it, until systemd's
``StartLimitBurst`` leaves the unit failed for every model. So:

* :func:`begin_load` records durably, before the engine opens the file, that a load of ``(name, sha256)`` is in
  progress (table ``model_loads``); :func:`end_load` clears the record when the load ends, loaded or cleanly
  refused. A success or a clean failure also forgets earlier crashes: only loads that crash *in a row* count.
* At start-up, :func:`recover_loads` (from :meth:`Registry.recover`) finds loads that were in progress when the
  process died and counts one crash for each (event ``model_load_crashed``). At
  ``RegistryConfig.load_crash_quarantine_after`` crashes in a row the model is quarantined
  (:meth:`Registry.quarantine`: its previous version becomes active, if there is one) with a reason that says
  why; the event and its audit record name it, and requests for it get :class:`~agent.errors.QuarantinedError`.

The marks are bookkeeping, not state changes: they are written with :meth:`Registry.run_in_transaction` and
record no event; the crash count and the quarantine do.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.registry.install import RecoveryReport
    from agent.registry.store import Registry

__all__ = ["begin_load", "end_load", "recover_loads"]


def begin_load(reg: Registry, name: str, sha256: str) -> None:
    """Record that a load of ``(name, sha256)`` starts now (committed before this returns)."""
    reg.run_in_transaction(
        lambda db: db.execute(
            "INSERT INTO model_loads (name, sha256, in_progress, crashes, started_ts) VALUES (?, ?, 1, 0, ?) "
            "ON CONFLICT (name, sha256) DO UPDATE SET in_progress = 1, started_ts = excluded.started_ts",
            [name, sha256, time.time()],
        )
    )


def end_load(reg: Registry, name: str, sha256: str) -> None:
    """The load of ``(name, sha256)`` ended without killing the agent: forget its mark and its crashes."""
    reg.run_in_transaction(
        lambda db: db.execute("DELETE FROM model_loads WHERE name = ? AND sha256 = ?", [name, sha256])
    )


def recover_loads(reg: Registry, report: RecoveryReport) -> None:
    """Count a crash for each load the last process did not finish; quarantine models at the limit."""
    from agent.registry.store import _row_to_record

    limit = max(1, reg.config.load_crash_quarantine_after)
    for mark in reg._query("SELECT * FROM model_loads WHERE in_progress = 1 ORDER BY started_ts"):
        name, sha256, crashes = mark["name"], mark["sha256"], mark["crashes"] + 1
        models = reg._query(
            "SELECT * FROM models WHERE name = ? AND sha256 = ? AND state NOT IN ('removed', 'quarantined') "
            "ORDER BY version DESC",
            [name, sha256],
        )
        if not models:  # removed or quarantined since: nothing left to protect
            end_load(reg, name, sha256)
            continue
        with reg._transaction() as tx:
            if crashes >= limit:
                tx.execute("DELETE FROM model_loads WHERE name = ? AND sha256 = ?", [name, sha256])
            else:
                tx.execute(
                    "UPDATE model_loads SET in_progress = 0, crashes = ? WHERE name = ? AND sha256 = ?",
                    [crashes, name, sha256],
                )
            for model in models:
                tx.event("model_load_crashed", model=model, crashes=crashes, limit=limit)
        if crashes >= limit:
            reason = f"loading it crashed the agent {crashes} times in a row"
            for model in models:
                report.quarantined.append(reg.quarantine(_row_to_record(model), reason).ref)
