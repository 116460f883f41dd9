"""Audit uploads on the controller: verify, store once, ack after commit, flag what does not verify.

:class:`AuditIngest` is the ``serve`` handler of ``edgefleet/v1/devices/{d}/audit`` (DESIGN.md §6). For each
:class:`~protocols.messages.AuditBatch`, on the fleet DB's one writer thread (so neither the hashing nor SQLite
blocks the event loop) or in a worker process of :mod:`controller.audit_shards`, :func:`ingest_batch`:

1. decodes the batch (bounded by ``limits.max_message_bytes``) with
   :func:`~protocols.messages.decode_upload` — canonical uploads, which is what agents send, through the fast
   path that hashes each record's received bytes; anything else through the strict decoder — and checks it
   names the topic's device;
2. verifies it with :class:`protocols.audit.ChainVerifier` against the device's last accepted head, read from
   ``audit_heads`` in the same transaction (so several ``serve`` processes sharing the subscription agree):
   checkpoint signature with the enrolled device key, checkpoint = last record, chain continuity, no seq
   regression, no fork; re-sent records are recognised through a lookup of stored hashes;
3. stores the new records (``(device, epoch, seq)`` is the primary key: stored once), the new head and the
   duplicate count, and alerts for GAP records (records the device dropped) and unlinked epochs, in one
   transaction.

The audit shards' workers split this in two (:func:`prepare_upload`, then :func:`ingest_upload`): step 1 and the
checks of step 2 that need no accepted head (signature, chain within the batch, :meth:`ChainVerifier.check_upload`)
before the transaction, with no lock held; relating the batch to the head and storing it inside. The verdict is
the same either way (a check made with a key that is no longer the device's enrolled one is done again).

Only after that commit does the handler publish the signed :class:`~protocols.messages.Ack` naming the head;
the device deletes its records only then. A batch that does not verify is never acked (the device keeps its
records, the evidence) and raises an alert: ``bad_signature``, ``regression``, ``fork``, ``gap`` (a hole no
GAP record explains), ``chain`` (a record that does not hash or link), ``malformed``, plus ``dropped`` and
``epoch_reset`` for what verified but lost records. Alerts are unique per ``(device, kind, detail)`` with a
count, so a device re-sending the same bad batch does not flood the table; beyond :data:`ALERT_FLOOD_CAP` new
rows an hour per ``(device, kind)`` further ones are only counted, so varying the detail does not either.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlite_utils
import structlog

from controller.store import FleetStore
from protocols.audit import (
    KIND_EPOCH_START,
    AuditHead,
    AuditRecord,
    ChainVerifier,
    CheckedUpload,
    VerifiedBatch,
    verify_chain,
)
from protocols.errors import ChainError, DecodeError, ProtocolError, RollbackError, VerificationError
from protocols.keys import public_key_from_pem
from protocols.limits import DEFAULT_LIMITS, Limits
from protocols.messages import AuditBatch, decode_upload

if TYPE_CHECKING:
    from controller.daemon import FleetServer
    from controller.link.mqtt import InboundMessage

__all__ = [
    "ALERT_FLOOD_CAP",
    "EXPORT_FIELDS",
    "AuditIngest",
    "IngestResult",
    "PreparedUpload",
    "StoredChain",
    "alert_count",
    "alerts",
    "batch_cursor",
    "decode_batch",
    "export_rows",
    "format_export",
    "ingest_batch",
    "ingest_upload",
    "prepare_upload",
    "record_alert",
    "records_after",
    "store_batch",
    "tail",
    "verify_stored",
]

log = structlog.get_logger(__name__)

EXPORT_FIELDS = ("device", "epoch", "seq", "ts_ms", "kind", "actor", "data", "prev_hash", "hash", "received_ts")


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What one upload did.

    Attributes:
        head: The head to ack: the batch's last record, as stored (the accepted head, unless the whole batch
            was stored before and lies behind it); None when the batch was refused (then ``alert`` says why).
        stored: New records stored.
        duplicates: Records the controller already had.
        alert: The alert kind raised for a refused batch, if any.
        detail: Why it was refused (the alert's detail), for serve's log.
    """

    head: AuditHead | None
    stored: int = 0
    duplicates: int = 0
    alert: str | None = None
    detail: str = ""


ALERT_FLOOD_CAP = 100
"""New ``(device, kind)`` alert rows per hour; beyond it :func:`record_alert` only counts (see there)."""


def record_alert(db: sqlite_utils.Database, device: str, kind: str, detail: str, *, now: float) -> None:
    """Add an alert, or count one more of the same (inside the caller's transaction).

    Alerts are unique per ``(device, kind, detail)``, but a hostile device can vary the detail (a bad record at
    a new seq each time) to add a row per upload. So once a ``(device, kind)`` has :data:`ALERT_FLOOD_CAP` rows
    first seen within the last hour, a new detail is folded into one counting row per ``(device, kind)``
    instead: the table grows by at most that many rows an hour per device and kind, and the count is kept.
    """
    detail = detail[:1000]
    known = db.execute(
        "SELECT 1 FROM audit_alerts WHERE device = ? AND kind = ? AND detail = ?", [device, kind, detail]
    ).fetchone()
    if known is None:
        (recent,) = db.execute(
            "SELECT count(*) FROM audit_alerts WHERE device = ? AND kind = ? AND first_ts > ?",
            [device, kind, now - 3600.0],
        ).fetchone()
        if recent >= ALERT_FLOOD_CAP:
            detail = f"more than {ALERT_FLOOD_CAP} different {kind} alerts within an hour: the rest are counted here"
    db.execute(
        "INSERT INTO audit_alerts (device, kind, detail, first_ts, last_ts) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (device, kind, detail) DO UPDATE SET count = count + 1, last_ts = excluded.last_ts",
        [device, kind, detail, now, now],
    )


def _head(db: sqlite_utils.Database, device: str) -> AuditHead | None:
    row = db.execute("SELECT epoch, seq, hash FROM audit_heads WHERE device = ?", [device]).fetchone()
    return None if row is None else AuditHead(row[0], row[1], row[2])


def _classify(exc: ProtocolError, batch: AuditBatch, head: AuditHead | None) -> str:
    """The alert kind for a refused batch: by what failed (docs/audit.md's table).

    A bad signature, a wrong key or a checkpoint that does not name the batch's last record is ``bad_signature``
    and a record that does not hash or link is ``chain``, wherever the batch lies. Where it lies decides only
    between a ``fork`` and a ``regression`` (a differing record at or behind the accepted head), read from the
    batch's records, which the signature covered by then (a fork is found only after it verified), never from its
    unsigned ``epoch`` field.
    """
    if isinstance(exc, DecodeError):
        return "malformed"
    if isinstance(exc, RollbackError):
        return "regression"
    if not isinstance(exc, ChainError):
        return "bad_signature"  # signature, key, or a checkpoint that does not name the last record
    text = str(exc)
    if "fork" in text:
        if not batch.records:  # a bare checkpoint: behind the head if it was compared with a stored record
            return "regression" if "stored record" in text else "fork"
        last = batch.records[-1]
        behind = head is not None and (last.epoch, last.seq) < (head.epoch, head.seq)
        return "regression" if behind else "fork"
    if "no GAP record" in text:
        return "gap"
    return "chain"


def decode_batch(device: str, payload: bytes, *, limits: Limits = DEFAULT_LIMITS) -> AuditBatch | ProtocolError:
    """Step 1 of :func:`ingest_batch`, no DB: decode one upload of ``device``; the error instead of raising.

    This is most of an upload's CPU time (JSON parse, every record re-encoded and hashed on the fast path), so
    :mod:`controller.audit_shards` runs it (in :func:`prepare_upload`) before taking SQLite's write lock. The error
    is returned, not raised, because what it means is decided later, in the transaction: a ``malformed`` alert for
    an enrolled device, a rejection for an unknown one.
    """
    try:
        message = decode_upload(payload, limits=limits)
        if not isinstance(message, AuditBatch):
            raise DecodeError(f"a {type(message).__name__} on an audit topic")
        if message.device != device:
            raise VerificationError(f"batch names device {message.device!r} on {device!r}'s topic")
    except ProtocolError as exc:
        return exc
    return message


@dataclass(frozen=True, slots=True)
class PreparedUpload:
    """One upload decoded and, when :func:`prepare_upload` made it, checked as far as it can be without a lock.

    Attributes:
        decoded: What :func:`decode_batch` returned.
        key_pem: The enrolled key :attr:`checked` was verified with (None: not checked).
        checked: :meth:`ChainVerifier.check_upload`'s result or error (None: not checked).
        rows: The ``audit_records`` rows of every record, received at the upload's ``now`` (with ``checked``).
    """

    decoded: AuditBatch | ProtocolError
    key_pem: str | None = None
    checked: CheckedUpload | ProtocolError | None = None
    rows: list[Row] | None = None


def prepare_upload(
    store: FleetStore, device: str, payload: bytes, *, now: float, limits: Limits = DEFAULT_LIMITS
) -> PreparedUpload:
    """Step 1 and the head-independent half of step 2, outside any transaction (an audit shard's worker, no lock).

    Decodes; for an enrolled device, verifies the checkpoint signature with its key as read now and the chain
    within the batch (:meth:`~protocols.audit.ChainVerifier.check_upload`). :func:`store_batch` uses the check only
    if the device still has that key inside its transaction, and verifies from scratch otherwise.
    """
    decoded = decode_batch(device, payload, limits=limits)
    if isinstance(decoded, ProtocolError):
        return PreparedUpload(decoded)
    row = store.db.execute("SELECT signing_key_pem, revoked_ts FROM devices WHERE id = ?", [device]).fetchone()
    if row is None or row[1] is not None:
        return PreparedUpload(decoded)
    key_pem = str(row[0])
    public_key = public_key_from_pem(key_pem.encode())  # a bad enrolled key raises, as in store_batch
    try:
        checked = ChainVerifier.check_upload(device, decoded.records, decoded.checkpoint, public_key, limits=limits)
    except ProtocolError as exc:
        return PreparedUpload(decoded, key_pem, exc)
    return PreparedUpload(decoded, key_pem, checked, _rows(device, checked.records, now))


def store_batch(
    store: FleetStore,
    device: str,
    prepared: PreparedUpload,
    *,
    now: float,
    limits: Limits = DEFAULT_LIMITS,
) -> IngestResult:
    """Steps 2 and 3 of :func:`ingest_batch`: verify a decoded upload against the device's head and store it."""
    db = store.db
    row = db.execute("SELECT signing_key_pem, revoked_ts FROM devices WHERE id = ?", [device]).fetchone()
    if row is None or row[1] is not None:
        return IngestResult(None, alert=None)
    if isinstance(prepared.decoded, ProtocolError):
        with store.transaction():
            detail = f"{type(prepared.decoded).__name__}: {prepared.decoded}"
            record_alert(db, device, "malformed", detail, now=now)
        return IngestResult(None, alert="malformed", detail=detail)
    message = prepared.decoded
    key_current = prepared.key_pem == row[0]  # checked with the key still enrolled; else verify from scratch
    checked = prepared.checked if key_current else None
    # a bad enrolled key raises here (the device is not to blame: no alert), as in prepare_upload
    public_key = public_key_from_pem(row[0].encode()) if checked is None else None
    with store.transaction():
        head = _head(db, device)
        verifier = ChainVerifier({device: head} if head is not None else {})

        def known(epoch: int, seq: int) -> str | None:
            return _stored_hash(store, device, epoch, seq)

        try:
            if isinstance(checked, ProtocolError):
                raise checked
            if checked is not None:
                verified = verifier.verify_checked(checked, known=known)
            else:
                assert public_key is not None
                verified = verifier.verify_batch(
                    device, message.records, message.checkpoint, public_key, known=known, limits=limits
                )
        except ProtocolError as exc:
            kind = _classify(exc, message, head)
            record_alert(db, device, kind, str(exc), now=now)
            return IngestResult(None, alert=kind, detail=str(exc))
        _store(db, verified, now=now, rows=prepared.rows if key_current else None)
    verifier.commit(verified)
    # Ack the batch's own last record (what its verified checkpoint names), not the accepted head: for a batch
    # wholly behind the head the two differ, and the device must advance batch by batch until its records differ
    # from the stored ones (a restored registry.db is then a fork or regression, alerted) instead of getting an
    # ack past its own head that it cannot apply (docs/audit.md, "Upload").
    return IngestResult(verified.checkpoint.head, stored=len(verified.records), duplicates=verified.duplicates)


def ingest_batch(
    store: FleetStore,
    device: str,
    payload: bytes,
    *,
    now: float,
    limits: Limits = DEFAULT_LIMITS,
) -> IngestResult:
    """Decode, verify and store one upload of ``device`` (blocking; the DB writer thread). See the module docstring."""
    decoded = decode_batch(device, payload, limits=limits)
    return store_batch(store, device, PreparedUpload(decoded), now=now, limits=limits)


def ingest_upload(
    store: FleetStore,
    topic: str,
    device: str,
    prepared: PreparedUpload,
    *,
    now: float,
    limits: Limits = DEFAULT_LIMITS,
) -> IngestResult:
    """:func:`store_batch`; an upload of an unknown or revoked device is recorded as a rejection (same transaction)."""
    result = store_batch(store, device, prepared, now=now, limits=limits)
    if result.head is None and result.alert is None:
        store.record_rejection(topic, device, "unknown or revoked device", now=now)
    return result


Row = tuple[str, int, int, int, str, str, str, str, str, float]
"""One ``audit_records`` row: device, epoch, seq, ts_ms, kind, actor, data, prev_hash, hash, received_ts."""


def _rows(device: str, records: Sequence[AuditRecord], now: float) -> list[Row]:
    return [
        (device, r.epoch, r.seq, r.ts_ms, r.kind, r.actor, r.canonical_data_text(), r.prev_hash, r.hash, now)
        for r in records
    ]


def _store(
    db: sqlite_utils.Database, verified: VerifiedBatch, *, now: float, rows: Sequence[Row] | None = None
) -> None:
    """Store a verified batch; ``rows``: the rows of every record of its upload, built before the transaction."""
    device = verified.device
    new = verified.records
    if rows is not None and new:  # the new records are the upload's last ones (the re-sent ones come first)
        rows = rows[len(rows) - len(new) :]
        first, last = rows[0], rows[-1]
        if len(rows) != len(new) or first[1:3] != (new[0].epoch, new[0].seq) or last[8] != new[-1].hash:
            raise AssertionError(f"{device}: prepared rows do not match the verified records")
    else:
        rows = _rows(device, new, now)
    db.conn.executemany(
        "INSERT OR IGNORE INTO audit_records (device, epoch, seq, ts_ms, kind, actor, data, prev_hash, hash, "
        "received_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    if new:
        # One row per batch, not per record: the commit order ``audit tail --follow`` follows (store.py, m004).
        # A batch's records share one epoch and are the only stored records of that epoch in first..last.
        db.execute(
            "INSERT INTO audit_batches (device, epoch, first_seq, last_seq, stored_ts) VALUES (?, ?, ?, ?, ?)",
            [device, new[0].epoch, new[0].seq, new[-1].seq, now],
        )
    checkpoint = json.dumps(verified.checkpoint.to_dict(), sort_keys=True)
    # A batch of duplicates wholly behind the head leaves the head where it is: keep the checkpoint (and its time)
    # that signs the head, not this batch's older one. The counters count every batch.
    moved = verified.head != verified.previous
    db.execute(
        "INSERT INTO audit_heads (device, epoch, seq, hash, checkpoint, updated_ts, records, duplicates) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device) DO UPDATE SET epoch = excluded.epoch, "
        "seq = excluded.seq, hash = excluded.hash, "
        "checkpoint = CASE WHEN ? THEN excluded.checkpoint ELSE checkpoint END, "
        "updated_ts = CASE WHEN ? THEN excluded.updated_ts ELSE updated_ts END, "
        "records = records + excluded.records, duplicates = duplicates + excluded.duplicates",
        [
            device,
            verified.head.epoch,
            verified.head.seq,
            verified.head.hash,
            checkpoint,
            now,
            len(verified.records),
            verified.duplicates,
            moved,
            moved,
        ],
    )
    for dropped in verified.dropped:
        detail = (
            f"epoch {dropped.epoch}: the device dropped seqs {dropped.first_seq}..{dropped.last_seq} "
            f"(GAP record seq {dropped.declared_at}; {dropped.missing} never received)"
        )
        record_alert(db, device, "dropped", detail, now=now)
    change = verified.epoch_change
    if change is not None and not change.linked:
        detail = (
            f"new epoch {change.epoch} does not continue the accepted head "
            f"(epoch {change.accepted.epoch} seq {change.accepted.seq}): records after it may be lost"
        )
        record_alert(db, device, "epoch_reset", detail, now=now)


class AuditIngest:
    """The ``serve`` handler for audit uploads (register it under :attr:`TopicKind.AUDIT`)."""

    def __init__(self, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.batches = 0
        self.stored = 0
        self.duplicates = 0
        self.refused = 0

    async def __call__(self, server: FleetServer, message: InboundMessage, device: str) -> None:
        """Ingest one upload in its own transaction, then (only after the commit) ack the stored head."""
        job = self.job(message.topic, device, message.payload, now=server.clock())
        await self.finish(server, device, await server.db(lambda: job(server.store)))

    def job(self, topic: str, device: str, payload: bytes, *, now: float) -> Callable[[FleetStore], IngestResult]:
        """The DB work of one upload, for ``serve``'s group commit (:class:`controller.ingest.WriteBatcher`).

        Decoding, the checkpoint signature and the chain are verified inside the job, on the writer thread. An
        upload from an unknown or revoked device is recorded as a rejection in the same transaction.
        """
        limits = self.limits

        def run(store: FleetStore) -> IngestResult:
            prepared = PreparedUpload(decode_batch(device, payload, limits=limits))
            return ingest_upload(store, topic, device, prepared, now=now, limits=limits)

        return run

    async def finish(self, server: FleetServer, device: str, result: IngestResult) -> None:
        """After the commit: count, and ack the stored head (never for a refused upload)."""
        if result.head is None:
            self.refused += 1
            if result.alert is not None:  # logged here, not where it was verified: that may be a shard's worker
                log.warning("audit.refused", device_id=device, alert=result.alert, error=result.detail)
            return
        self.batches += 1
        self.stored += result.stored
        self.duplicates += result.duplicates
        await server.send_ack(device, audit=result.head, duplicate=result.duplicates)
        log.info(
            "audit.stored", device_id=device, seq=result.head.seq, stored=result.stored, duplicates=result.duplicates
        )


# --- queries for the CLI --------------------------------------------------------------------------------


def _record(row: dict[str, Any]) -> AuditRecord:
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


def tail(store: FleetStore, *, device: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The newest ``limit`` records (by the time ``serve`` received them), oldest first."""
    where, params = "", list[Any]()
    if device is not None:
        where = "WHERE device = ?"
        params.append(device)
    rows = list(
        store.db.query(
            f"SELECT * FROM audit_records {where} ORDER BY received_ts DESC, device, epoch DESC, seq DESC LIMIT ?",  # noqa: S608
            [*params, limit],
        )
    )
    return rows[::-1]


def batch_cursor(store: FleetStore) -> int:
    """The id of the last committed ``audit_batches`` row (0: none): where :func:`records_after` starts.

    Read it *before* reading what is already there (e.g. :func:`tail`): every batch committed after that read
    has a larger id, so none is missed (ids grow in commit order, see ``m004_audit_batches`` in store.py).
    """
    row = store.db.execute("SELECT coalesce(max(id), 0) FROM audit_batches").fetchone()
    return int(row[0])


def records_after(
    store: FleetStore, cursor: int, *, device: str | None = None, batches: int = 50
) -> tuple[int, list[dict[str, Any]]]:
    """The records of up to ``batches`` batches committed after ``cursor``, in commit order; and the new cursor.

    Follows ``audit_batches`` (commit order), not ``received_ts``: a batch received earlier but committed later
    (another audit shard) is still found, and a burst of any size is read in bounded chunks (call again until
    no records come back). Memory is bounded by ``batches`` batches; nothing is remembered between calls but the
    cursor. Batches stored before the ``audit_batches`` migration are not found.
    """
    db = store.db
    top = int(db.execute("SELECT coalesce(max(id), 0) FROM audit_batches").fetchone()[0])
    where, params = "id > ? AND id <= ?", list[Any]([cursor, top])
    if device is not None:
        where += " AND device = ?"
        params.append(device)
    found = db.execute(
        f"SELECT id, device, epoch, first_seq, last_seq FROM audit_batches WHERE {where} ORDER BY id LIMIT ?",  # noqa: S608
        [*params, batches],
    ).fetchall()
    # With fewer than ``batches`` matches every id up to ``top`` was looked at: skip past the other devices' ones.
    new_cursor = top if len(found) < batches else int(found[-1][0])
    rows: list[dict[str, Any]] = []
    for _, dev, epoch, first_seq, last_seq in found:
        rows.extend(
            db.query(
                "SELECT * FROM audit_records WHERE device = ? AND epoch = ? AND seq BETWEEN ? AND ? ORDER BY seq",
                [dev, epoch, first_seq, last_seq],
            )
        )
    return new_cursor, rows


def export_rows(store: FleetStore, *, since_ms: int = 0, device: str | None = None) -> Iterator[dict[str, Any]]:
    """Every stored record that happened or was received since ``since_ms``, by device, epoch and seq (streamed).

    "Happened" is the device's clock (``ts_ms``), which can be wrong (a board without a real-time clock says 1970
    until NTP); "received" is the controller's (``received_ts``). Either being recent selects the record, so a
    record received now is never left out because of its device's clock.
    """
    where, params = "(ts_ms >= ? OR received_ts >= ?)", list[Any]([since_ms, since_ms / 1000])
    if device is not None:
        where += " AND device = ?"
        params.append(device)
    yield from store.db.query(
        f"SELECT * FROM audit_records WHERE {where} ORDER BY device, epoch, seq",  # noqa: S608
        params,
    )


def format_export(rows: Iterator[dict[str, Any]], fmt: str) -> Iterator[str]:
    """Lines of ``jsonl`` or ``csv`` output."""
    if fmt == "jsonl":
        for row in rows:
            yield json.dumps({k: row[k] if k != "data" else json.loads(row[k]) for k in EXPORT_FIELDS}, sort_keys=True)
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="")
    writer.writerow(EXPORT_FIELDS)
    yield buffer.getvalue()
    for row in rows:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow([row[k] for k in EXPORT_FIELDS])
        yield buffer.getvalue()


def _alert_filter(device: str | None, kind: str | None) -> tuple[str, list[Any]]:
    clauses, params = [], list[Any]()
    if device is not None:
        clauses.append("device = ?")
        params.append(device)
    if kind is not None:
        clauses.append("kind = ?")
        params.append(kind)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


def alerts(
    store: FleetStore, *, device: str | None = None, kind: str | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    """The newest ``limit`` alerts (by last occurrence), newest first; :func:`alert_count` says how many match."""
    where, params = _alert_filter(device, kind)
    return list(
        store.db.query(f"SELECT * FROM audit_alerts {where} ORDER BY last_ts DESC, id DESC LIMIT ?", [*params, limit])  # noqa: S608
    )


def alert_count(store: FleetStore, *, device: str | None = None, kind: str | None = None) -> int:
    """How many alerts match (to tell the operator what :func:`alerts`' limit left out)."""
    where, params = _alert_filter(device, kind)
    return int(store.db.execute(f"SELECT count(*) FROM audit_alerts {where}", params).fetchone()[0])  # noqa: S608


@dataclass(frozen=True, slots=True)
class StoredChain:
    """One device epoch as re-verified by :func:`verify_stored`."""

    device: str
    epoch: int
    records: int
    head: AuditHead | None
    errors: tuple[str, ...]


def verify_stored(store: FleetStore, *, device: str | None = None, chunk: int = 5000) -> list[StoredChain]:
    """Re-verify every stored chain, and that nothing the controller accepted is missing.

    Per epoch: hashes and links, holes only where a stored GAP record explains them. Per device (every device
    with an accepted head or a stored record, so one whose records were all deleted still shows, as failed):
    the accepted head is stored and is the last record of its epoch; each epoch whose ``epoch_start`` names a
    previous head in a stored older epoch finds that record stored with that hash (deleting the end of an older
    epoch leaves a chain that verifies on its own); and ``audit_heads.records`` equals the records stored.
    """
    where = "" if device is None else "WHERE device = ?"
    params: list[Any] = [] if device is None else [device]
    devices = store.db.execute(
        f"SELECT device FROM audit_heads {where} UNION SELECT device FROM audit_records {where} ORDER BY 1",  # noqa: S608
        params * 2,
    ).fetchall()
    out: list[StoredChain] = []
    for (dev,) in devices:
        out.extend(_verify_device(store, dev, chunk))
    return out


def _verify_device(store: FleetStore, device: str, chunk: int) -> list[StoredChain]:
    db = store.db
    counts = dict(
        db.execute(
            "SELECT epoch, count(*) FROM audit_records WHERE device = ? GROUP BY epoch ORDER BY epoch", [device]
        ).fetchall()
    )
    chains: dict[int, tuple[AuditHead | None, list[str]]] = {}
    for epoch in counts:
        head, errors = _verify_epoch(store, device, epoch, chunk)
        errors += _epoch_link_errors(store, device, epoch, counts)
        chains[epoch] = head, errors
    accepted = db.execute("SELECT epoch, seq, hash, records FROM audit_heads WHERE device = ?", [device]).fetchone()
    if accepted is not None:
        epoch, seq, hash_, accepted_records = accepted
        head, errors = chains.setdefault(epoch, (None, []))
        stored = _stored_hash(store, device, epoch, seq)
        if stored is None:
            errors.append(f"epoch {epoch}: the accepted head seq {seq} is not stored (records deleted)")
        elif stored != hash_:
            errors.append(f"epoch {epoch}: the accepted head seq {seq} is stored with another hash")
        elif head is not None and (seq, hash_) != (head.seq, head.hash):
            errors.append(f"epoch {epoch}: the accepted head seq {seq} is not the last stored record")
        total = sum(counts.values())
        if total != accepted_records:
            errors.append(
                f"{accepted_records} records were accepted from this device but {total} are stored (records deleted)"
            )
    return [
        StoredChain(device, epoch, counts.get(epoch, 0), head, tuple(errors))
        for epoch, (head, errors) in sorted(chains.items())
    ]


def _stored_hash(store: FleetStore, device: str, epoch: int, seq: int) -> str | None:
    """The hash of the stored record ``(device, epoch, seq)``, or None."""
    row = store.db.execute(
        "SELECT hash FROM audit_records WHERE device = ? AND epoch = ? AND seq = ?", [device, epoch, seq]
    ).fetchone()
    return None if row is None else str(row[0])


def _epoch_link_errors(store: FleetStore, device: str, epoch: int, stored_epochs: dict[int, int]) -> list[str]:
    """Epoch ``epoch``'s ``epoch_start`` names a previous head in a stored older epoch: is that record stored?

    An epoch change the controller accepted as not continuing the accepted head (an ``epoch_reset`` alert) may
    name a record it never received; that loss is already alerted, so it is not reported again here.
    """
    row = store.db.execute(
        "SELECT kind, data FROM audit_records WHERE device = ? AND epoch = ? AND seq = 0", [device, epoch]
    ).fetchone()
    if row is None or row[0] != KIND_EPOCH_START:
        return []
    try:
        previous = json.loads(row[1]).get("previous")
        claimed = AuditHead(int(previous["epoch"]), int(previous["seq"]), str(previous["hash"]))
    except (ValueError, TypeError, KeyError, AttributeError):
        return []  # no previous head named (or not readable: the chain check of seq 0 reports that)
    if claimed.epoch not in stored_epochs or claimed.epoch >= epoch:
        return []
    stored = _stored_hash(store, device, claimed.epoch, claimed.seq)
    if stored == claimed.hash:
        return []
    reset = store.db.execute(
        "SELECT 1 FROM audit_alerts WHERE device = ? AND kind = 'epoch_reset' AND detail LIKE ?",
        [device, f"new epoch {epoch} does not continue %"],
    ).fetchone()
    if reset is not None:
        return []
    what = "is not stored (records deleted)" if stored is None else "is stored with another hash"
    return [
        f"epoch {epoch}: its epoch_start continues from epoch {claimed.epoch} seq {claimed.seq}, but that record {what}"
    ]


def _verify_epoch(store: FleetStore, device: str, epoch: int, chunk: int) -> tuple[AuditHead | None, list[str]]:
    """Verify one stored epoch in runs of consecutive records; a hole must be explained by a GAP record."""
    head: AuditHead | None = None
    run: list[AuditRecord] = []
    try:
        for row in store.db.query(
            "SELECT * FROM audit_records WHERE device = ? AND epoch = ? ORDER BY seq", [device, epoch]
        ):
            record = _record(row)
            if run and (record.seq != run[-1].seq + 1 or len(run) >= chunk):
                head = verify_chain(run, after=head)
                run = []
            run.append(record)
        if run:
            head = verify_chain(run, after=head)
    except ProtocolError as exc:
        return head, [str(exc)]
    return head, []
