"""The device's tamper-evident audit log (DESIGN.md §6, docs/audit.md).

Storage: three tables in ``registry.db`` (created by the registry's migration ``m002_audit_log``):

- ``audit_state``: one row: the device, the current ``epoch``, the head (``head_seq``, ``head_hash``), the
  highest seq the controller acknowledged (``acked_seq``) and how many records are stored (``stored``).
- ``audit_log``: the records kept (unacknowledged ones, and acknowledged ones until a cap needs the room), one row
  per record (the hashed fields as columns, ``data`` as canonical JSON).
- ``audit_checkpoints``: the latest signed checkpoints made while offline (a few are kept).

Invariants:

- A record is appended by :func:`append_record` *inside the caller's open transaction*: the registry's one
  event writer (:func:`agent.registry.schema.append_event`) calls it, so a model state change and its audit
  record commit together or not at all; other events (API, tokens, link, start/stop) use
  :meth:`AuditLog.record`, one transaction per record.
- Records only go forward: seq + 1, ``prev_hash`` = the previous hash (:func:`protocols.audit.make_record`).
  ``data`` never holds prompt or completion text (callers pass metadata only); floats become strings.
- Retention (``[audit] max_records`` and ``max_bytes``, the size cap): records stay on the device after the
  controller acknowledged them (``edge-agent audit tail`` shows them) and are deleted only when the log is over
  a cap, oldest acknowledged first. :meth:`AuditLog.acked` moves ``acked_seq`` and refuses an ack whose hash
  differs from the local record at that seq. Only when the unacknowledged records alone are over a cap does
  the log, before it appends the next record, drop a consecutive range of them *ending at the head* (the oldest
  records, which anchor the chain to what the controller has, are kept) and append a chained ``gap`` record
  naming it, then the new record: the GAP record directly follows the hole, so every upload that starts after
  the hole starts with it (:meth:`AuditLog.batch` also keeps a GAP record written after the first record past
  the hole, by earlier versions, in the batch), and a drop is never silent. A later drop that touches an earlier
  GAP record merges the two ranges.
- A new ``registry.db`` (first start, reinstall) starts a new epoch whose number is the wall-clock second, or one
  more than the highest epoch the device used (kept outside ``registry.db`` in ``STATE_DIR/audit-epoch``) if that
  is higher: epochs go up across lost logs even with a clock that is behind, unless both files are lost; the
  controller flags an unlinked epoch.
- An ack is applied only if it names a local record with its hash; any other ack of the current epoch (past the
  local head, or another hash) is refused, logged as an error and recorded (``audit.ack_refused``).

:class:`AuditUploader` ships the log over the link: one batch at a time through the outbox (so a batch
survives restarts and is re-sent until acked), each batch a run of consecutive records split by encoded bytes
to fit ``limits.max_message_bytes`` and the broker's maximum packet size, with a checkpoint signed by the device
key. A batch the link cannot deliver is rebuilt smaller; nothing it queues can block later uploads or be re-sent
in a loop (see the class). It also signs a checkpoint every ``checkpoint_interval`` while the head moves, online
or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import sqlite_utils
import structlog

from agent.link.outbox import audit_ack_key
from protocols.audit import (
    ACTOR_RE,
    KIND_GAP,
    KIND_RE,
    AuditHead,
    AuditRecord,
    Checkpoint,
    SignedCheckpoint,
    explains_hole,
    gap_data,
    make_record,
    sign_checkpoint,
    start_epoch,
    verify_chain,
    verify_checkpoint,
)
from protocols.canonical import canonical_json
from protocols.errors import ChainError, ProtocolError
from protocols.limits import DEFAULT_LIMITS, Limits
from protocols.messages import Ack, AuditBatch, Report
from protocols.topics import TopicKind

if TYPE_CHECKING:
    from agent.link.mqtt import AgentLink
    from protocols.keys import Ed25519PrivateKey

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_RECORDS",
    "AuditLog",
    "AuditUploader",
    "AuditStore",
    "LocalVerification",
    "ReadOnlyAuditStore",
    "append_record",
    "create_tables",
    "watch_clock",
]

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

DEFAULT_MAX_RECORDS = 100_000
"""Records kept; past it acknowledged ones are deleted, then (if still over) a range and a GAP record."""

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""The retention size cap: bytes of records kept (:func:`record_bytes`), same policy as the count."""

RECORD_OVERHEAD = 192
"""Bytes counted per record besides its data, kind and actor (seq, epoch, time, two hashes, the row)."""

KEPT_CHECKPOINTS = 16
"""Offline checkpoints kept on the device."""

MAX_TEXT = 1024
"""Longest string kept in a record's data (longer ones are cut)."""

BATCH_OVERHEAD = 2048
"""Bytes kept free in an upload for the message framing and the checkpoint."""

EPOCH_FILE = "audit-epoch"
"""In the state directory, beside ``registry.db``: the highest epoch this device has used (decimal text, written
atomically before a new epoch commits). A new epoch is at least one more, whatever the clock says."""

HOLD_S = 60.0
"""How long the uploader queues nothing after a single record the link could not deliver, or an ack it refused;
doubled on each repeat up to :data:`HOLD_MAX_S`, until an ack moves the log forward."""

HOLD_MAX_S = 3600.0


def read_highest_epoch(path: Path) -> int:
    """The highest epoch recorded in ``path`` (0 if there is none, or it is unreadable: the clock decides)."""
    try:
        return max(0, int(path.read_text(encoding="ascii").strip()))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        log.error("audit.epoch_file_unreadable", path=str(path), error=str(exc))
        return 0


def write_highest_epoch(path: Path, epoch: int) -> None:
    """Record ``epoch`` in ``path`` atomically (temp file, fsync, rename, fsync of the directory)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, f"{epoch}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def add_size_columns(db: sqlite_utils.Database) -> None:
    """Add the size cap's columns (the registry migration ``m003_audit_size_cap``, inside its transaction)."""
    db.execute("ALTER TABLE audit_state ADD COLUMN stored_bytes INTEGER NOT NULL DEFAULT 0")
    db.execute(f"ALTER TABLE audit_state ADD COLUMN max_bytes INTEGER NOT NULL DEFAULT {DEFAULT_MAX_BYTES}")
    db.execute(
        "UPDATE audit_state SET stored_bytes = (SELECT COALESCE(SUM(length(data) + length(kind) + length(actor) + ?),"
        " 0) FROM audit_log)",
        [RECORD_OVERHEAD],
    )


def record_bytes(record: AuditRecord) -> int:
    """What one record counts against the size cap (about its size in the database)."""
    # characters, as SQLite's length() counts the stored text (the two must agree: see _delete)
    return len(canonical_json(record.data).decode()) + len(record.kind) + len(record.actor) + RECORD_OVERHEAD


def create_tables(db: sqlite_utils.Database) -> None:
    """Create the audit tables (called by the registry migration inside its transaction)."""
    db.execute("""
        CREATE TABLE audit_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            device TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            head_seq INTEGER NOT NULL,
            head_hash TEXT NOT NULL,
            acked_seq INTEGER NOT NULL DEFAULT -1,
            stored INTEGER NOT NULL DEFAULT 0,
            max_records INTEGER NOT NULL
        )""")
    db.execute("""
        CREATE TABLE audit_log (
            seq INTEGER PRIMARY KEY,
            epoch INTEGER NOT NULL,
            ts_ms INTEGER NOT NULL,
            kind TEXT NOT NULL,
            actor TEXT NOT NULL,
            data TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )""")
    db.execute("""
        CREATE TABLE audit_checkpoints (
            epoch INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            ts_ms INTEGER NOT NULL,
            signed TEXT NOT NULL,
            PRIMARY KEY (epoch, seq)
        )""")


def _clean(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON the chain accepts: no floats (as text), strings cut to :data:`MAX_TEXT`."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -(2**63) < value < 2**63 else str(value)
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() and abs(value) < 2**53 else repr(value)
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else value[: MAX_TEXT - 1] + "…"
    if depth > 8:
        return str(value)[:MAX_TEXT]
    if isinstance(value, Mapping):
        return {str(k)[:128]: _clean(v, depth + 1) for k, v in list(value.items())[:64]}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v, depth + 1) for v in list(value)[:64]]
    return str(value)[:MAX_TEXT]


def _kind(kind: str) -> str:
    kind = kind.lower().replace("-", "_")
    return kind if KIND_RE.fullmatch(kind) else "event"


def _actor(actor: str) -> str:
    return actor if ACTOR_RE.fullmatch(actor) else "agent"


def _row(record: AuditRecord) -> list[Any]:
    return [
        record.seq,
        record.epoch,
        record.ts_ms,
        record.kind,
        record.actor,
        canonical_json(record.data).decode(),
        record.prev_hash,
        record.hash,
    ]


def _record(row: Mapping[str, Any]) -> AuditRecord:
    return AuditRecord(
        epoch=row["epoch"],
        seq=row["seq"],
        ts_ms=row["ts_ms"],
        kind=row["kind"],
        actor=row["actor"],
        data=json.loads(row["data"]),
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


_INSERT = (
    "INSERT INTO audit_log (seq, epoch, ts_ms, kind, actor, data, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def initialise(
    db: sqlite_utils.Database,
    device: str,
    *,
    max_records: int,
    ts_ms: int,
    reason: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    min_epoch: int = 1,
) -> bool:
    """Start the log unless it exists; inside the caller's transaction.

    The epoch is the wall-clock second, or ``min_epoch`` if that is higher: the caller passes one more than the
    highest epoch this device used (:data:`EPOCH_FILE`), so that a clock that is behind (a board without RTC
    before NTP) or a second start within one second still gives a newer epoch than the controller accepted.

    The caps (from the agent's ``[audit]`` configuration) are stored with the log: :func:`append_record` runs in
    the registry's transactions, which know nothing of the configuration.

    Returns:
        True if a new epoch was started.
    """
    if db.execute("SELECT 1 FROM audit_state").fetchone() is not None:
        db.execute("UPDATE audit_state SET max_records = ?, max_bytes = ?", [max_records, max_bytes])
        return False
    first = start_epoch(
        device, max(1, min_epoch, ts_ms // 1000), previous=None, reason=reason, actor="agent", ts_ms=ts_ms
    )
    db.execute(_INSERT, _row(first))
    db.execute(
        "INSERT INTO audit_state (id, device, epoch, head_seq, head_hash, stored, max_records, stored_bytes, "
        "max_bytes) VALUES (1, ?, ?, 0, ?, 1, ?, ?, ?)",
        [device, first.epoch, first.hash, max_records, record_bytes(first), max_bytes],
    )
    return True


def append_record(
    db: sqlite_utils.Database, kind: str, actor: str, data: Mapping[str, Any], *, ts_ms: int | None = None
) -> AuditRecord | None:
    """Append one record inside the caller's open transaction; None if the log is not initialised yet.

    ``kind`` and ``actor`` are normalised to the protocol's syntax, ``data`` cleaned (no floats, bounded).
    """
    if not db.conn.in_transaction:
        raise RuntimeError("append_record must run inside the transaction of the change it records")
    state = db.execute("SELECT epoch, head_seq, head_hash FROM audit_state").fetchone()
    if state is None:
        return None
    epoch, head_seq, head_hash = state
    ts = ts_ms if ts_ms is not None else int(time.time() * 1000)
    cleaned = _clean(dict(data))
    if len(canonical_json(cleaned)) > DEFAULT_LIMITS.max_audit_data_bytes // 2:
        cleaned = {"truncated": True, "keys": sorted(cleaned)[:32]}
    head = AuditHead(epoch, head_seq, head_hash)
    record = make_record(head, _kind(kind), _actor(actor), cleaned, ts)
    # Room is made *before* the record is appended: a GAP record then directly follows the hole it names, and the
    # new record follows the GAP record (an upload that starts after the hole starts with its explanation).
    room = _make_room(db, head, record_bytes(record), ts)
    if room != head:
        record = make_record(room, record.kind, record.actor, record.data, ts)
    db.execute(_INSERT, _row(record))
    db.execute(
        "UPDATE audit_state SET head_seq = ?, head_hash = ?, stored = stored + 1, stored_bytes = stored_bytes + ?",
        [record.seq, record.hash, record_bytes(record)],
    )
    return record


def _over(db: sqlite_utils.Database, records: int, size: int) -> tuple[bool, int, int]:
    """``(over a cap once ``records`` more records of ``size`` bytes are stored, acked_seq, max_records)``."""
    stored, stored_bytes, max_records, max_bytes, acked_seq = db.execute(
        "SELECT stored, stored_bytes, max_records, max_bytes, acked_seq FROM audit_state"
    ).fetchone()
    return stored + records > max_records or stored_bytes + size > max_bytes, acked_seq, max_records


def _delete(db: sqlite_utils.Database, first: int, last: int) -> int:
    """Delete stored records ``first..last`` and update the counters; returns how many."""
    removed, size = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(length(data) + length(kind) + length(actor) + ?), 0) FROM audit_log "
        "WHERE seq >= ? AND seq <= ?",
        [RECORD_OVERHEAD, first, last],
    ).fetchone()
    db.execute("DELETE FROM audit_log WHERE seq >= ? AND seq <= ?", [first, last])
    db.execute("UPDATE audit_state SET stored = stored - ?, stored_bytes = stored_bytes - ?", [removed, size])
    return int(removed)


def _make_room(db: sqlite_utils.Database, head: AuditHead, size: int, ts_ms: int) -> AuditHead:
    """Make room under the caps for one more record of ``size`` bytes: oldest acknowledged records first, then a
    range ending at ``head`` and a GAP record. Returns the head the new record follows (the GAP record's, if any)."""
    over, acked_seq, max_records = _over(db, 1, size)
    if not over:
        return head
    # 1. acknowledged records (the controller has them): drop the oldest, down to 90 % of the caps (so that
    #    a log at its cap does not delete on every append)
    stored, stored_bytes, max_bytes = db.execute("SELECT stored, stored_bytes, max_bytes FROM audit_state").fetchone()
    excess_records = stored + 1 - (max_records - max_records // 10)
    excess_bytes = stored_bytes + size - (max_bytes - max_bytes // 10)
    row = db.execute(
        "SELECT seq FROM (SELECT seq, COUNT(*) OVER w AS n, "
        "SUM(length(data) + length(kind) + length(actor) + ?) OVER w AS b FROM audit_log WHERE seq <= ? "
        "WINDOW w AS (ORDER BY seq)) WHERE n >= ? AND b >= ? ORDER BY seq LIMIT 1",
        [RECORD_OVERHEAD, acked_seq, excess_records, excess_bytes],
    ).fetchone()
    last_acked = row[0] if row is not None else acked_seq
    if db.execute("SELECT 1 FROM audit_log WHERE seq <= ? LIMIT 1", [last_acked]).fetchone() is not None:
        removed = _delete(db, -1, last_acked)
        log.info("audit.retention", dropped_acked=removed, up_to_seq=last_acked)
        over, acked_seq, max_records = _over(db, 1, size)
        if not over:
            return head
    # 2. still over: unacknowledged records must go, never silently
    return _drop(db, head, max_records, ts_ms)


def _drop(db: sqlite_utils.Database, head: AuditHead, max_records: int, ts_ms: int) -> AuditHead:
    """Drop the unacknowledged range from past the oldest half of the caps up to ``head``, then chain a GAP record
    right after it; returns the GAP record's head (``head`` if there was nothing to drop)."""
    max_bytes = db.execute("SELECT max_bytes FROM audit_state").fetchone()[0]
    keep_oldest = max(1, max_records // 2)
    # the first record past half of either cap (counting from the oldest stored one) starts the range
    rows = db.execute(
        "SELECT seq FROM (SELECT seq, COUNT(*) OVER w AS n, "
        "SUM(length(data) + length(kind) + length(actor) + ?) OVER w AS b FROM audit_log WHERE seq <= ? "
        "WINDOW w AS (ORDER BY seq)) WHERE n > ? OR b > ? ORDER BY seq LIMIT 1",
        [RECORD_OVERHEAD, head.seq, keep_oldest, max(1, max_bytes // 2)],
    ).fetchone()
    if rows is None:
        return head
    first = rows[0]
    if first == db.execute("SELECT MIN(seq) FROM audit_log").fetchone()[0]:
        first += 1  # keep at least the oldest record: it anchors the chain to what the controller has
    # The range ends at the head: the GAP record is the first record after the hole, so any upload that starts
    # after the hole starts with the record that explains it (protocols.audit: same upload), whatever its size.
    last, last_hash = head.seq, head.hash
    if first > last:
        return head
    for (earlier,) in db.execute(
        "SELECT data FROM audit_log WHERE kind = ? AND seq >= ? AND seq <= ?", [KIND_GAP, first, last]
    ).fetchall():
        first = min(first, json.loads(earlier)["first_seq"])
    _delete(db, first, last)
    gap = make_record(head, KIND_GAP, "agent", gap_data(first, last, last_hash), ts_ms)
    db.execute(_INSERT, _row(gap))
    db.execute(
        "UPDATE audit_state SET head_seq = ?, head_hash = ?, stored = stored + 1, stored_bytes = stored_bytes + ?",
        [gap.seq, gap.hash, record_bytes(gap)],
    )
    log.warning("audit.gap", first_seq=first, last_seq=last, count=last - first + 1)
    return gap.head


def _explains(record: AuditRecord, start: AuditRecord, expected_seq: int) -> bool:
    """:func:`protocols.audit.explains_hole`, the controller's rule; a malformed GAP record explains nothing."""
    try:
        return explains_hole(record, start, expected_seq)
    except ChainError:
        return False


@dataclass(frozen=True, slots=True)
class LocalVerification:
    """What :meth:`AuditLog.verify` found on the device."""

    records: int
    head: AuditHead | None
    checkpoints: int
    errors: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when the stored chain and checkpoints verify."""
        return not self.errors


class AuditStore(Protocol):
    """Where the log lives: the open :class:`~agent.registry.Registry`, or :class:`ReadOnlyAuditStore`."""

    def run_in_transaction(self, fn: Callable[[sqlite_utils.Database], _T]) -> _T:
        """Run ``fn(db)`` in one ``BEGIN IMMEDIATE`` transaction."""
        ...

    def query_readonly(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        """Rows of a read-only query."""
        ...


class ReadOnlyAuditStore:
    """``registry.db`` opened read-only (the CLI, while the daemon holds the registry): reads only."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite_utils.Database(sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False))

    def run_in_transaction(self, fn: Callable[[sqlite_utils.Database], _T]) -> _T:
        """Refused: this store is read-only."""
        raise RuntimeError("the audit log is open read-only")

    def query_readonly(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        """Rows of a read-only query."""
        return list(self.db.query(sql, params))

    def close(self) -> None:
        """Close the connection."""
        self.db.conn.close()


class AuditLog:
    """The device's audit log in ``registry.db`` (through the open registry, or read-only)."""

    def __init__(self, registry: AuditStore, *, clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.clock = clock
        self.changed = asyncio.Event()
        """Set when a record is appended from the event loop, or an ack arrives (the uploader waits on it)."""

    @classmethod
    def open(
        cls,
        registry: AuditStore,
        device: str,
        *,
        max_records: int = DEFAULT_MAX_RECORDS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        reason: str = "first start",
        epoch_file: Path | None = None,
    ) -> AuditLog:
        """Initialise the log in ``registry`` if needed, with the caps (blocking: call it in a worker thread).

        ``epoch_file`` (default: :data:`EPOCH_FILE` in the registry's state directory) keeps the highest epoch
        used outside ``registry.db``: a new epoch is at least one more, and the file is brought up to the log's
        epoch before the transaction that starts it commits (a crash in between only skips an epoch number).
        """
        if epoch_file is None:
            state_dir = getattr(registry, "state_dir", None)
            epoch_file = Path(state_dir) / EPOCH_FILE if state_dir is not None else None
        highest = read_highest_epoch(epoch_file) if epoch_file is not None else 0
        ts_ms = int(time.time() * 1000)

        def start(db: sqlite_utils.Database) -> None:
            started = initialise(
                db,
                device,
                max_records=max_records,
                max_bytes=max_bytes,
                ts_ms=ts_ms,
                reason=reason,
                min_epoch=highest + 1,
            )
            (epoch,) = db.execute("SELECT epoch FROM audit_state").fetchone()
            if started and epoch > ts_ms // 1000:
                log.warning("audit.epoch_after_clock", epoch=epoch, clock_s=ts_ms // 1000, highest_used=highest)
            if epoch_file is not None and epoch > highest:
                try:
                    write_highest_epoch(epoch_file, epoch)
                except OSError as exc:  # a safety net only: the log itself is in registry.db
                    log.error("audit.epoch_file_unwritable", path=str(epoch_file), error=str(exc))

        registry.run_in_transaction(start)
        return cls(registry)

    # --- writing ------------------------------------------------------------------------------------------

    def append(self, kind: str, actor: str, data: Mapping[str, Any]) -> AuditRecord | None:
        """Append one record in its own transaction (blocking)."""
        ts_ms = int(self.clock() * 1000)
        return self.registry.run_in_transaction(lambda db: append_record(db, kind, actor, data, ts_ms=ts_ms))

    async def record(self, kind: str, actor: str, data: Mapping[str, Any]) -> None:
        """Append one record from the event loop (the API's audit hook); committed when this returns."""
        await asyncio.to_thread(self.append, kind, actor, data)
        self.changed.set()

    # --- reading ------------------------------------------------------------------------------------------

    def head(self) -> AuditHead | None:
        """The current head (None if the log is not initialised)."""
        rows = self.registry.query_readonly("SELECT epoch, head_seq, head_hash FROM audit_state")
        if not rows:
            return None
        return AuditHead(rows[0]["epoch"], rows[0]["head_seq"], rows[0]["head_hash"])

    def status(self) -> dict[str, Any]:
        """``{device, epoch, head_seq, head_hash, acked_seq, stored, max_records, stored_bytes, max_bytes,
        pending}`` or ``{}``; ``pending``: stored records the controller has not acknowledged."""
        rows = self.registry.query_readonly(
            "SELECT *, (SELECT COUNT(*) FROM audit_log WHERE seq > audit_state.acked_seq) AS pending FROM audit_state"
        )
        return {k: v for k, v in rows[0].items() if k != "id"} if rows else {}

    def tail(self, limit: int = 20, *, after_seq: int = -1) -> list[AuditRecord]:
        """The newest ``limit`` stored records after ``after_seq``, oldest first."""
        rows = self.registry.query_readonly(
            "SELECT * FROM (SELECT * FROM audit_log WHERE seq > ? ORDER BY seq DESC LIMIT ?) ORDER BY seq",
            [after_seq, limit],
        )
        return [_record(r) for r in rows]

    def batch(self, *, max_bytes: int, max_records: int) -> list[AuditRecord]:
        """The oldest stored records, consecutive, whose encodings fit ``max_bytes`` (at least one).

        A batch that starts after a hole always reaches the GAP record that explains it, whatever the budget: the
        controller accepts a hole only with its GAP record in the same upload. (The log writes the GAP record
        first after the hole; a log written by an earlier version has it after the first record past the hole.)
        """
        out: list[AuditRecord] = []
        used = 0
        rows = self.registry.query_readonly(
            "SELECT * FROM audit_log WHERE seq > (SELECT acked_seq FROM audit_state) ORDER BY seq LIMIT ?",
            [max_records],
        )
        for row in rows:
            record = _record(row)
            size = len(canonical_json(record.to_dict())) + 1
            if out and (used + size > max_bytes or record.seq != out[-1].seq + 1 or record.epoch != out[-1].epoch):
                break
            out.append(record)
            used += size
        if out:
            acked_seq = self.registry.query_readonly("SELECT acked_seq FROM audit_state")[0]["acked_seq"]
            start = out[0]
            if start.seq > acked_seq + 1 and not any(_explains(r, start, acked_seq + 1) for r in out):
                out.extend(self._through_gap(out, acked_seq))
        return out

    def _through_gap(self, records: list[AuditRecord], acked_seq: int, look_ahead: int = 16) -> list[AuditRecord]:
        """The consecutive records after ``records`` up to the GAP record that explains the hole before them
        (none if no such record follows within ``look_ahead``: the controller then refuses the batch, and says so)."""
        start, more = records[0], list[AuditRecord]()
        rows = self.registry.query_readonly(
            "SELECT * FROM audit_log WHERE seq > ? ORDER BY seq LIMIT ?", [records[-1].seq, look_ahead]
        )
        for row in rows:
            record = _record(row)
            if record.seq != (more or records)[-1].seq + 1 or record.epoch != start.epoch:
                return []
            more.append(record)
            if _explains(record, start, acked_seq + 1):
                return more
        return []

    def verify(self, public_key: Any | None = None) -> LocalVerification:
        """Re-verify what is stored: the chain, its holes, the head, and the offline checkpoints.

        The controller's rules applied to the stored records (:func:`protocols.audit.verify_chain`): every hash
        and link; a hole (between stored records, or between the acknowledged seq and the first stored record)
        only where a GAP record after it names it (its first and last seq and the last hash); the stored head is
        the last record. Each offline checkpoint must name the stored record at its seq with that record's hash,
        and no seq past the head; its signature is checked when ``public_key`` is given (the device's enrollment).
        """
        errors: list[str] = []
        records = [_record(r) for r in self.registry.query_readonly("SELECT * FROM audit_log ORDER BY seq")]
        state = self.status()
        acked_seq = int(state.get("acked_seq", -1))
        runs: list[list[AuditRecord]] = []
        for record in records:
            if runs and record.seq == runs[-1][-1].seq + 1 and record.epoch == runs[-1][-1].epoch:
                runs[-1].append(record)
            else:
                runs.append([record])
        head: AuditHead | None = None
        for run in runs:
            first = run[0]
            try:
                if head is not None:
                    # after a hole: a GAP record in this run must account for it, as the controller requires
                    head = verify_chain(run, after=head)
                elif first.seq == 0 or first.seq <= acked_seq + 1:
                    # the records before it (if any) were acknowledged and deleted by retention
                    head = verify_chain(run, after=None) if first.seq == 0 else _verify_suffix(run)
                else:
                    # unacknowledged records are missing at the front: only a GAP record explains that
                    _verify_suffix(run)
                    if not any(_explains(r, first, acked_seq + 1) for r in run):
                        raise ChainError(
                            f"epoch {first.epoch} seqs {acked_seq + 1}..{first.seq - 1} are missing (not "
                            "acknowledged) and no GAP record accounts for them"
                        )
                    head = run[-1].head
            except ProtocolError as exc:
                errors.append(str(exc))
                head = run[-1].head  # go on: report every problem, not only the first
        if records and state and head is not None and (head.seq, head.hash) != (state["head_seq"], state["head_hash"]):
            errors.append(f"the stored head seq {state['head_seq']} is not the last record (seq {head.seq})")
        checkpoints = self.registry.query_readonly("SELECT epoch, seq, signed FROM audit_checkpoints ORDER BY seq")
        stored = {(r.epoch, r.seq): r.hash for r in records}
        for row in checkpoints:
            errors.extend(_check_offline_checkpoint(row["signed"], state, stored, public_key))
        return LocalVerification(len(records), head, len(checkpoints), tuple(errors))

    # --- acks and checkpoints -----------------------------------------------------------------------------

    def acked(self, head: AuditHead) -> int:
        """Mark the records up to ``head`` acknowledged if the local record there has its hash; returns how many
        were newly acknowledged (they stay stored until a cap needs the room)."""
        return self.apply_ack(head)[0]

    def apply_ack(self, head: AuditHead) -> tuple[int, str | None]:
        """:meth:`acked`, and why the ack was refused (None if it was not).

        An ack past the local head, or naming a hash that differs from the local record at its seq, is refused:
        the device's log and the controller's disagree (an old ``registry.db`` restored, or a rewritten log). The
        refusal is logged as an error and an ``audit.ack_refused`` record is appended in the same transaction, so
        it is evidence in the chain itself.
        """
        ts_ms = int(self.clock() * 1000)
        return self.registry.run_in_transaction(lambda db: _apply_ack(db, head, ts_ms=ts_ms))

    def unacked_through(self, epoch: int, seq: int) -> int:
        """How many stored records of ``epoch`` are unacknowledged up to ``seq`` (the size of a batch ending there)."""
        rows = self.registry.query_readonly(
            "SELECT COUNT(*) AS n FROM audit_log, audit_state WHERE audit_log.epoch = ? AND audit_log.epoch = "
            "audit_state.epoch AND seq > acked_seq AND seq <= ?",
            [epoch, seq],
        )
        return int(rows[0]["n"]) if rows else 0

    def store_checkpoint(self, signed: SignedCheckpoint, checkpoint: Checkpoint) -> None:
        """Keep an offline checkpoint (the newest :data:`KEPT_CHECKPOINTS`)."""

        def write(db: sqlite_utils.Database) -> None:
            db.execute(
                "INSERT OR IGNORE INTO audit_checkpoints (epoch, seq, ts_ms, signed) VALUES (?, ?, ?, ?)",
                [checkpoint.epoch, checkpoint.seq, checkpoint.ts_ms, signed.encode().decode()],
            )
            db.execute(
                "DELETE FROM audit_checkpoints WHERE rowid NOT IN "
                "(SELECT rowid FROM audit_checkpoints ORDER BY epoch DESC, seq DESC LIMIT ?)",
                [KEPT_CHECKPOINTS],
            )

        self.registry.run_in_transaction(write)


def _check_offline_checkpoint(
    text: str, state: Mapping[str, Any], stored: Mapping[tuple[int, int], str], public_key: Any | None
) -> list[str]:
    """What is wrong with one stored offline checkpoint, compared with the stored records (and its signature, given
    the device's public key). Without the key the body is read unverified: then it only catches an edit that left
    the checkpoints alone."""
    try:
        signed = SignedCheckpoint.decode(text.encode())
        if public_key is not None:
            checkpoint = verify_checkpoint(signed, public_key)
        else:
            checkpoint = Checkpoint.from_dict(json.loads(signed.body))
    except (ProtocolError, ValueError) as exc:
        return [f"checkpoint: {exc}"]
    where = f"checkpoint of epoch {checkpoint.epoch} seq {checkpoint.seq}"
    if not state:
        return [f"{where}: the log has no state"]
    if checkpoint.device != state["device"]:
        return [f"{where}: signed for device {checkpoint.device!r}, the log is {state['device']!r}"]
    if checkpoint.epoch > state["epoch"]:
        return [f"{where}: newer than the log's epoch {state['epoch']} (the log was replaced by an older one)"]
    if checkpoint.epoch < state["epoch"]:
        return []  # an earlier epoch's records are not in this log
    if checkpoint.seq > state["head_seq"]:
        return [f"{where}: past the stored head seq {state['head_seq']} (records were removed from the end)"]
    found = stored.get((checkpoint.epoch, checkpoint.seq))
    if found is not None and found != checkpoint.head_hash:
        return [f"{where}: names hash {checkpoint.head_hash[:16]}…, the stored record has {found[:16]}… (rewritten)"]
    if found is None and checkpoint.seq == state["head_seq"] and checkpoint.head_hash != state["head_hash"]:
        return [f"{where}: names another hash than the stored head"]
    return []


def _verify_suffix(run: list[AuditRecord]) -> AuditHead:
    """Verify a stored run that starts after acknowledged (deleted) records: links and hashes only."""
    first = run[0]
    return verify_chain(run, after=AuditHead(first.epoch, first.seq - 1, first.prev_hash))


def _apply_ack(db: sqlite_utils.Database, head: AuditHead, *, ts_ms: int) -> tuple[int, str | None]:
    state = db.execute("SELECT epoch, acked_seq, head_seq FROM audit_state").fetchone()
    if state is None or state[0] != head.epoch:
        return 0, None  # a late ack for an epoch this log no longer has (registry.db lost since): nothing to mark
    refused: str | None = None
    if head.seq > state[2]:
        refused = "the ack names a seq past the local head"
    else:
        row = db.execute("SELECT hash FROM audit_log WHERE seq = ?", [head.seq]).fetchone()
        if row is not None and row[0] != head.hash:
            refused = "the ack names another hash than the local record at its seq"
    if refused is not None:
        # The controller holds records this log does not have, or other ones: never silently ignored.
        log.error(
            "audit.ack_refused", epoch=head.epoch, seq=head.seq, hash=head.hash, head_seq=state[2], reason=refused
        )
        data = {"epoch": head.epoch, "seq": head.seq, "hash": head.hash, "reason": refused}
        # once per refused ack while it is unacknowledged: a re-sent batch acked the same way adds nothing
        if (
            db.execute(
                "SELECT 1 FROM audit_log WHERE kind = 'audit.ack_refused' AND seq > ? AND data = ? LIMIT 1",
                [state[1], canonical_json(data).decode()],
            ).fetchone()
            is None
        ):
            append_record(db, "audit.ack_refused", "agent", data, ts_ms=ts_ms)
        return 0, refused
    # No row at the acked seq: it was acked before, or dropped behind a GAP record after the batch went out.
    # The controller signs an ack only for a batch it verified against its head, so everything up to it is
    # stored there. The records stay (retention): the caps delete acknowledged ones first.
    if head.seq <= state[1]:
        return 0, None
    newly = db.execute("SELECT COUNT(*) FROM audit_log WHERE seq > ? AND seq <= ?", [state[1], head.seq]).fetchone()
    db.execute("UPDATE audit_state SET acked_seq = max(acked_seq, ?)", [head.seq])
    return int(newly[0]), None


class AuditUploader:
    """Ships the audit log over the link, one batch at a time through the outbox (see the module docstring).

    A batch never wedges the upload:

    - Batches fit ``limits.max_message_bytes`` *and* the broker's maximum packet size (as the link learnt it).
    - A batch the link set aside as undeliverable (too large for the broker, or in flight on every connection
      that died) is dropped from the outbox (``registry.db`` is the source of truth) and rebuilt with half as
      many records, under a new id, down to one record (or, after a hole, down to the records up to the GAP
      record that explains it: never less); the budget doubles back after each ack. A smallest batch the link
      cannot deliver is retried after a pause of :data:`HOLD_S`, doubling up to :data:`HOLD_MAX_S` until an ack
      moves the log: the link reports each failure to the controller (an ``error`` report) and the records
      behind it wait (the chain is uploaded in order).
    - An ack the log refuses (:meth:`AuditLog.apply_ack`) is reported to the controller and starts the same
      pause: no loop of re-sends, identical or not.
    """

    def __init__(
        self,
        audit: AuditLog,
        link: AgentLink,
        *,
        interval: float = 1.0,
        checkpoint_interval: float = 300.0,
        limits: Limits = DEFAULT_LIMITS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.audit = audit
        self.link = link
        self.interval = interval
        self.checkpoint_interval = checkpoint_interval
        self.limits = limits
        self.monotonic = monotonic
        self.device = link.device
        self.key: Ed25519PrivateKey = link.enrollment.signing_key
        self.batches = 0
        self.max_records = limits.max_audit_batch
        """The record budget of the next batch (halved after an undeliverable batch, doubled back on acks)."""
        self._last_checkpoint: AuditHead | None = None
        self._paused_until = 0.0
        self._pause = 0.0
        """The last pause (:meth:`_pause_uploads`); 0 after an ack that moved the log forward."""
        self._refusals_reported: set[str] = set()
        self._resealed = False
        self._acking = asyncio.Lock()
        """Held while an ack is applied (outbox, then log) and while a batch is queued: no batch is built from
        records whose ack is half applied."""
        link.ack_listeners.append(self.on_ack)

    async def on_ack(self, ack: Ack) -> None:
        """An ack naming an audit head: drop the outbox copies, mark the acked records, then send the next batch.

        An ack the log refuses (past the local head, or another hash) marks nothing; it is reported, the outbox
        copies it names are dropped all the same (a copy queued before an old ``registry.db`` was restored must
        not block the upload), and no batch is queued before a pause (:meth:`_pause_uploads`).
        """
        if ack.audit is None:
            return
        async with self._acking:
            # The outbox copies first, then the log: an agent stopped between the two re-sends a batch the
            # controller has (acked again, as duplicates), and never keeps a copy of records its log counts as
            # acked, which a restored old registry.db would then see acked past its head.
            await self.link.outbox.acked([audit_ack_key(ack.audit), *await self._covered(ack.audit)])
            newly, refused = await asyncio.to_thread(self.audit.apply_ack, ack.audit)
        if refused is not None:
            self._pause_uploads()
            await self._report_refused_ack(ack.audit, refused)
        if newly:
            self.max_records = min(self.limits.max_audit_batch, self.max_records * 2)
            self._pause = 0.0
        log.debug("audit.acked", seq=ack.audit.seq, newly=newly, duplicate=ack.duplicate)
        self.audit.changed.set()

    async def _report_refused_ack(self, head: AuditHead, reason: str) -> None:
        """Tell the controller (an ``error`` report, once per refused ack) that the device refused its ack."""
        key = audit_ack_key(head)
        if key in self._refusals_reported:
            return
        self._refusals_reported.add(key)
        report = Report(
            report_id=secrets.token_hex(16),
            device=self.device,
            ts_ms=int(time.time() * 1000),
            kind="error",
            outcome="failed",
            reason=f"audit ack refused (epoch {head.epoch} seq {head.seq}): {reason}"[:4000],
        )
        try:
            await self.link.send_report(report)
        except Exception as exc:  # the refusal is in the chain and the log already
            log.warning("audit.ack_refused_unreported", error=str(exc))

    def _pause_uploads(self) -> None:
        """Queue no batch for :data:`HOLD_S`, doubled each time until an ack moves the log (at most
        :data:`HOLD_MAX_S`): what bounds re-sends when the controller and the device disagree."""
        self._pause = min(HOLD_MAX_S, self._pause * 2) if self._pause else HOLD_S
        self._paused_until = self.monotonic() + self._pause

    def checkpoint(self, head: AuditHead) -> SignedCheckpoint:
        """A checkpoint of ``head`` signed with the device key."""
        cp = Checkpoint(self.device, head.epoch, head.seq, head.hash, int(time.time() * 1000))
        return sign_checkpoint(cp, self.key)

    def max_payload(self) -> int:
        """The largest upload: ``limits.max_message_bytes`` or what the broker takes, whichever is smaller."""
        return min(self.limits.max_message_bytes, self.link.max_payload_bytes(TopicKind.AUDIT))

    def build_batch(self) -> tuple[AuditHead, bytes] | None:
        """The next upload (blocking): the oldest stored records that fit one message, with a checkpoint.

        At most :attr:`max_records` records, within :meth:`max_payload` less :data:`BATCH_OVERHEAD` (the
        envelope and the checkpoint), except that a batch after a hole always reaches its GAP record
        (:meth:`AuditLog.batch`). A smallest batch larger than that is still built: the link then sets it aside
        as undeliverable, which is reported (see the class docstring).
        """
        max_payload = self.max_payload()
        max_bytes = max(1, max_payload - BATCH_OVERHEAD)
        max_records = self.max_records
        while True:
            records = self.audit.batch(max_bytes=max_bytes, max_records=max_records)
            if not records:
                return None
            # the smallest batch: one record, or (after a hole) up to the GAP record it cannot go without
            smallest = len(records) == 1 or max_records == 1
            head = records[-1].head
            batch = AuditBatch(
                device=self.device, epoch=head.epoch, records=tuple(records), checkpoint=self.checkpoint(head)
            )
            try:
                payload = batch.encode(limits=self.limits)
            except ValueError:
                if smallest:
                    raise
            else:
                if len(payload) <= max_payload or smallest:
                    return head, payload
            max_records = max(1, min(max_records, len(records)) // 2)

    async def _covered(self, head: AuditHead) -> list[str]:
        """Outbox ids of pending batches of ``head``'s epoch that end at or before it (acked by it)."""
        store = self.link.store

        def query() -> list[str]:
            rows = store.db.execute(
                "SELECT msg_id FROM outbox WHERE msg_id LIKE ?", [f"audit:{head.epoch}:%"]
            ).fetchall()
            return [r[0] for r in rows if int(r[0].split(":")[2]) <= head.seq]

        return await store.run(query)

    async def _pending(self) -> bool:
        store = self.link.store

        def query() -> bool:
            row = store.db.execute(
                "SELECT 1 FROM outbox WHERE state = 'pending' AND msg_id LIKE 'audit:%' LIMIT 1"
            ).fetchone()
            return row is not None

        return await store.run(query)

    async def _drop_undeliverable(self) -> None:
        """Delete the audit batches the link set aside as undeliverable, and shrink (or hold) the next one."""
        store = self.link.store

        def take() -> list[tuple[str, str]]:
            with store.transaction():
                rows = store.db.execute(
                    "SELECT msg_id, COALESCE(error, '') FROM outbox WHERE state = 'undeliverable' "
                    "AND msg_id LIKE 'audit:%'"
                ).fetchall()
                if rows:
                    store.db.execute("DELETE FROM outbox WHERE state = 'undeliverable' AND msg_id LIKE 'audit:%'")
                    store.add_event("audit_batches_dropped", {"msg_ids": [r[0] for r in rows]})
                return [(str(r[0]), str(r[1])) for r in rows]

        for msg_id, error in await store.run(take):
            _, epoch, seq, _ = msg_id.split(":", 3)
            records = await asyncio.to_thread(self.audit.unacked_through, int(epoch), int(seq))
            if records > 1 and self.max_records > 1:
                self.max_records = max(1, min(self.max_records, records) // 2)
                log.warning(
                    "audit.batch_undeliverable", msg_id=msg_id, records=records, next_max_records=self.max_records
                )
            elif records >= 1:  # the smallest batch; the link sent an error report already; the records behind wait
                self._pause_uploads()
                log.error("audit.record_undeliverable", msg_id=msg_id, error=error, retry_in_s=self._pause)

    async def step(self) -> bool:
        """Queue the next batch if none waits for its ack; True if one was queued."""
        if not self._resealed:  # a batch signed with an earlier key (re-enrolled) would never be acked
            await self.link.outbox.reseal(self.key)
            self._resealed = True
        await self._drop_undeliverable()
        async with self._acking:
            if self.monotonic() < self._paused_until or await self._pending():
                return False
            built = await asyncio.to_thread(self.build_batch)
            if built is None:
                return False
            head, payload = built
            added = await self.link.send(TopicKind.AUDIT, audit_ack_key(head), payload)
        self.batches += int(added)
        return added

    async def offline_checkpoint(self) -> None:
        """Sign and keep a checkpoint of the head if it moved since the last one."""
        head = await asyncio.to_thread(self.audit.head)
        if head is None or head == self._last_checkpoint:
            return
        signed = self.checkpoint(head)
        await asyncio.to_thread(self.audit.store_checkpoint, signed, Checkpoint.from_dict(json.loads(signed.body)))
        self._last_checkpoint = head

    async def run(self) -> None:
        """Upload until cancelled."""
        loop = asyncio.get_running_loop()
        next_checkpoint = loop.time()
        while True:
            self.audit.changed.clear()
            try:
                await self.step()
            except Exception as exc:  # an outbox that is full is retried later; the records stay
                log.warning("audit.upload_deferred", error=str(exc))
            if loop.time() >= next_checkpoint:
                next_checkpoint = loop.time() + self.checkpoint_interval
                try:
                    await self.offline_checkpoint()
                except Exception as exc:  # a disk error now is no reason to stop uploading: tried again later
                    log.error("audit.checkpoint_failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self.audit.changed.wait()


async def watch_clock(
    audit: AuditLog,
    *,
    interval: float = 10.0,
    threshold: float = 30.0,
    wall: Callable[[], float] = time.time,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Record ``agent.clock_jump`` whenever the wall clock moves more than ``threshold`` seconds away from the
    monotonic clock between two looks (NTP step, manual change, suspend); runs until cancelled.

    A record that cannot be written (a full disk) is logged as an error and the watch goes on: it runs in the
    daemon's TaskGroup, which an exception would end."""
    last_wall, last_mono = wall(), monotonic()
    while True:
        await asyncio.sleep(interval)
        now_wall, now_mono = wall(), monotonic()
        skew = (now_wall - last_wall) - (now_mono - last_mono)
        if abs(skew) > threshold:
            log.warning("audit.clock_jump", skew_s=round(skew, 3))
            data = {"skew_ms": int(skew * 1000), "before_ms": int(last_wall * 1000), "after_ms": int(now_wall * 1000)}
            try:
                await audit.record("agent.clock_jump", "agent", data)
            except Exception as exc:  # as the uploader does: the jump is in the log above, the daemon serves on
                log.error("audit.record_failed", kind="agent.clock_jump", error=str(exc))
        last_wall, last_mono = now_wall, now_mono
