"""Garbage collection of the registry by policy.

Policy, applied in this order by :func:`collect_garbage`:

1. per name, keep the active model and the ``keep_previous`` most recently active ``previous`` ones; older
   ``previous`` models are removed;
2. if ``disk_quota_bytes`` is set and the live blobs exceed it, remove ``staged`` models (oldest first), then
   ``previous`` ones (least recently active first) until under quota. The active model is never removed:
   if active models alone exceed the quota, :attr:`GcResult.over_quota` says so;
3. delete every blob no live model (``staged``, ``active``, ``previous``) and no unfinished install refers to
   (this includes the blobs of removed and quarantined models, and files that are not blobs at all);
4. delete partial files that no unfinished install owns.

Invariants: model rows change state (with their events) in a committed transaction *before* any file is
deleted, and a file is deleted only if nothing live refers to it at that moment (both under the registry's
lock), so a crash during GC leaves orphans for the next run, never a live model without its blob.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.registry.store import Registry

__all__ = ["GcResult", "collect_garbage"]


@dataclass(frozen=True, slots=True)
class GcResult:
    """What one garbage collection did."""

    removed_models: tuple[str, ...]
    """Models removed by policy (``name/variant/vN``)."""
    deleted_blobs: int
    deleted_partials: int
    freed_bytes: int
    blob_bytes: int
    """Bytes still held by blobs and partial files afterwards."""
    over_quota: bool
    """The quota is still exceeded (active models alone need more)."""


def _ref(row: Mapping[str, Any]) -> str:
    return f"{row['name']}/{row['variant']}/v{row['version']}"


def _remove_rows(reg: Registry, rows: list[dict[str, Any]], reason: str) -> None:
    if not rows:
        return
    with reg._transaction() as tx:
        for row in rows:
            tx.execute("UPDATE models SET state = 'removed', updated_ts = ? WHERE id = ?", [tx.ts, row["id"]])
            tx.event("model_removed", model=row, previous_state=row["state"], reason=reason)


def collect_garbage(reg: Registry) -> GcResult:
    """Apply the garbage-collection policy (see the module docstring) to ``reg``."""
    from agent.registry.store import fsync_dir

    config = reg.config
    removed: list[str] = []
    freed = deleted_blobs = deleted_partials = 0
    over_quota = False
    with reg._lock:
        # 1. keep active + keep_previous per name
        doomed: list[dict[str, Any]] = []
        kept: dict[str, int] = {}
        for row in reg._query(
            "SELECT * FROM models WHERE state = 'previous' ORDER BY name, activation_seq DESC, id DESC"
        ):
            kept[row["name"]] = kept.get(row["name"], 0) + 1
            if kept[row["name"]] > config.keep_previous:
                doomed.append(row)
        _remove_rows(reg, doomed, f"policy: keep {config.keep_previous} previous")
        removed += [_ref(row) for row in doomed]

        # 2. disk quota
        if config.disk_quota_bytes is not None:
            live = reg._query("SELECT * FROM models WHERE state IN ('staged', 'active', 'previous')")
            sizes = {row["sha256"]: row["size"] for row in live}
            users: dict[str, int] = {}
            for row in live:
                users[row["sha256"]] = users.get(row["sha256"], 0) + 1
            in_flight = {
                r["sha256"]: r["size"]
                for r in reg._query(
                    "SELECT sha256, size FROM installs WHERE sha256 IS NOT NULL "
                    "AND step NOT IN ('done', 'failed', 'abandoned', 'quarantined')"
                )
            }
            usage = sum(sizes.values()) + sum(s for sha, s in in_flight.items() if sha not in sizes)
            candidates = sorted(
                (row for row in live if row["state"] == "staged"), key=lambda r: (r["created_ts"], r["id"])
            ) + sorted(
                (row for row in live if row["state"] == "previous"),
                key=lambda r: (r["activation_seq"] or 0, r["id"]),
            )
            quota_doomed: list[dict[str, Any]] = []
            for row in candidates:
                if usage <= config.disk_quota_bytes:
                    break
                quota_doomed.append(row)
                users[row["sha256"]] -= 1
                if users[row["sha256"]] == 0 and row["sha256"] not in in_flight:
                    usage -= row["size"]
            _remove_rows(reg, quota_doomed, f"policy: disk quota {config.disk_quota_bytes} bytes")
            removed += [_ref(row) for row in quota_doomed]
            over_quota = usage > config.disk_quota_bytes

        # 3. unreferenced blobs (removed, quarantined, orphaned by a crash, or not blobs at all)
        referenced = reg._referenced_sha256()
        for entry in reg._blobs.blob_names():
            if entry not in referenced:
                freed += reg._blobs.delete(reg._blobs.blobs_dir / entry)
                deleted_blobs += 1
        if deleted_blobs:
            fsync_dir(reg._blobs.blobs_dir)

        # 4. partial files no unfinished install owns
        owners = {
            r["id"]
            for r in reg._query(
                "SELECT id FROM installs WHERE step NOT IN ('done', 'failed', 'abandoned', 'quarantined')"
            )
        } | reg._running
        for entry in reg._blobs.partial_names():
            if entry.removesuffix(".part") not in owners:
                freed += reg._blobs.delete(reg._blobs.partial_dir / entry)
                deleted_partials += 1
        if deleted_partials:
            fsync_dir(reg._blobs.partial_dir)

        return GcResult(
            removed_models=tuple(removed),
            deleted_blobs=deleted_blobs,
            deleted_partials=deleted_partials,
            freed_bytes=freed,
            blob_bytes=reg._blobs.usage_bytes(),
            over_quota=over_quota,
        )
