"""The fleet database (``HOME/fleet.db``): devices, their credentials, inventory, assignments, reports.

Plain synchronous functions over one :class:`sqlite_utils.Database` (the sqlite-utils habit). Processes share
the file: ``edge-fleet serve`` writes inventory and reports, CLI commands enroll devices and issue
assignments. Each process uses its connection from one thread at a time (``serve`` from its one writer
thread, see :mod:`controller.daemon`); every change is one ``BEGIN IMMEDIATE`` transaction.

Tables (migrations in :data:`MIGRATIONS`):

- ``devices``: one row per device id ever enrolled: its certificate serial, Ed25519 signing key (PEM, key
  id), revocation time, and the latest verified inventory (``status`` from its last state message,
  ``state_json``, ``last_seen``).
- ``certificates``: every certificate the CA issued (devices, controllers, the broker), for the CRL.
- ``assignments``: the signed desired state per device; ``generation`` is monotonic per device and the
  primary key makes it unique. ``published_ts`` is set once ``serve`` published it (retained).
- ``reports``: every report, once (``report_id`` is the primary key); ``duplicates`` counts re-deliveries.
- ``rejections``: messages the controller refused (bad signature, unknown or revoked device, device
  mismatch), newest kept (bounded).
- ``meta``: counters such as the CRL number.
- ``audit_records``, ``audit_heads``, ``audit_alerts``: the devices' verified audit logs, unique by
  ``(device, epoch, seq)``, each device's last accepted head, and what verification flagged
  (:mod:`controller.audit_ingest`). ``audit_batches``: one row per stored batch, in commit order (what
  ``audit tail --follow`` follows).
- ``device_labels``, ``device_groups``: what rollout selectors match (``key=value``, ``group:G``).
- ``rollouts``, ``rollout_devices``: each rollout's waves, status and deadlines, and per device its wave,
  chosen variant, previous desired models (for rollback), assignment generation and outcome
  (:mod:`controller.rollout`; everything the driver needs to resume after a restart).

Invariants: a report is acked only after the transaction that stored it committed (the caller's order);
``devices.last_seen`` is the controller's clock, never later than "now"; an offline device is never
reported online (:func:`is_online`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from controller.errors import StoreError

__all__ = [
    "MIGRATIONS",
    "AssignmentRow",
    "DeviceRow",
    "FleetStore",
    "Migrations",
    "is_online",
]

MAX_REJECTIONS = 10_000

Migration = Callable[[sqlite_utils.Database], None]


class Migrations:
    """A named, ordered set of schema migrations, each applied once in its own transaction."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._migrations: list[tuple[str, Migration]] = []

    def __call__(self) -> Callable[[Migration], Migration]:
        def register(fn: Migration) -> Migration:
            self._migrations.append((fn.__name__, fn))
            return fn

        return register

    def apply(self, db: sqlite_utils.Database) -> list[str]:
        """Apply pending migrations; return the names applied."""
        db.execute(
            "CREATE TABLE IF NOT EXISTS _migrations (migration_set TEXT NOT NULL, name TEXT NOT NULL, "
            "applied_at REAL NOT NULL, PRIMARY KEY (migration_set, name))"
        )
        applied = []
        for name, fn in self._migrations:
            db.execute("BEGIN IMMEDIATE")
            try:
                done = db.execute(
                    "SELECT 1 FROM _migrations WHERE migration_set = ? AND name = ?", [self.name, name]
                ).fetchone()
                if done is None:
                    fn(db)
                    db.execute(
                        "INSERT INTO _migrations (migration_set, name, applied_at) VALUES (?, ?, ?)",
                        [self.name, name, time.time()],
                    )
                    applied.append(name)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return applied


MIGRATIONS = Migrations("edgefleet.controller.fleet")


@MIGRATIONS()
def m001_link(db: sqlite_utils.Database) -> None:
    """Devices, certificates, assignments, reports, rejections."""
    db.execute("""
        CREATE TABLE devices (
            id TEXT PRIMARY KEY,
            enrolled_ts REAL NOT NULL,
            cert_serial TEXT NOT NULL,
            cert_not_after REAL NOT NULL,
            signing_keyid TEXT NOT NULL,
            signing_key_pem TEXT NOT NULL,
            revoked_ts REAL,
            status TEXT CHECK (status IN ('online', 'offline', 'draining')),
            state_json TEXT,
            state_ts_ms INTEGER,
            heartbeat INTEGER,
            agent_version TEXT,
            last_seen REAL,
            state_received_ts REAL
        )""")
    db.execute("""
        CREATE TABLE certificates (
            serial TEXT PRIMARY KEY,
            subject TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('device', 'controller', 'server')),
            issued_ts REAL NOT NULL,
            not_after REAL NOT NULL,
            revoked_ts REAL
        )""")
    db.execute("CREATE INDEX certificates_subject ON certificates (subject)")
    db.execute("""
        CREATE TABLE assignments (
            device TEXT NOT NULL REFERENCES devices (id),
            generation INTEGER NOT NULL CHECK (generation >= 1),
            envelope BLOB NOT NULL,
            models_json TEXT NOT NULL,
            issued_ts REAL NOT NULL,
            published_ts REAL,
            PRIMARY KEY (device, generation)
        )""")
    db.execute("""
        CREATE TABLE reports (
            report_id TEXT PRIMARY KEY,
            device TEXT NOT NULL,
            ts_ms INTEGER NOT NULL,
            kind TEXT NOT NULL,
            outcome TEXT NOT NULL,
            reason TEXT NOT NULL,
            generation INTEGER,
            model TEXT,
            metrics_json TEXT NOT NULL,
            received_ts REAL NOT NULL,
            duplicates INTEGER NOT NULL DEFAULT 0
        )""")
    db.execute("CREATE INDEX reports_device ON reports (device, ts_ms)")
    db.execute("""
        CREATE TABLE rejections (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            topic TEXT NOT NULL,
            device TEXT,
            reason TEXT NOT NULL
        )""")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


@MIGRATIONS()
def m002_audit(db: sqlite_utils.Database) -> None:
    """The devices' verified audit records, accepted heads and alerts (see :mod:`controller.audit_ingest`)."""
    db.execute("""
        CREATE TABLE audit_records (
            device TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            ts_ms INTEGER NOT NULL,
            kind TEXT NOT NULL,
            actor TEXT NOT NULL,
            data TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL,
            received_ts REAL NOT NULL,
            PRIMARY KEY (device, epoch, seq)
        ) WITHOUT ROWID""")
    db.execute("CREATE INDEX audit_records_received ON audit_records (received_ts)")
    db.execute("""
        CREATE TABLE audit_heads (
            device TEXT PRIMARY KEY,
            epoch INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            hash TEXT NOT NULL,
            checkpoint TEXT NOT NULL,
            updated_ts REAL NOT NULL,
            records INTEGER NOT NULL DEFAULT 0,
            duplicates INTEGER NOT NULL DEFAULT 0
        )""")
    db.execute("""
        CREATE TABLE audit_alerts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            device TEXT NOT NULL,
            kind TEXT NOT NULL,
            detail TEXT NOT NULL,
            first_ts REAL NOT NULL,
            last_ts REAL NOT NULL,
            count INTEGER NOT NULL DEFAULT 1,
            UNIQUE (device, kind, detail)
        )""")


@MIGRATIONS()
def m003_rollouts(db: sqlite_utils.Database) -> None:
    """Device labels and groups (selectors), rollouts and their per-device progress (controller.rollout)."""
    db.execute("""
        CREATE TABLE device_labels (
            device TEXT NOT NULL REFERENCES devices (id),
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (device, key)
        )""")
    db.execute("""
        CREATE TABLE device_groups (
            name TEXT NOT NULL,
            device TEXT NOT NULL REFERENCES devices (id),
            PRIMARY KEY (name, device)
        )""")
    db.execute("""
        CREATE TABLE rollouts (
            id TEXT PRIMARY KEY,
            created_ts REAL NOT NULL,
            updated_ts REAL NOT NULL,
            model TEXT NOT NULL,
            version INTEGER NOT NULL,
            selector TEXT NOT NULL,
            waves_json TEXT NOT NULL,
            wave_timeout_s REAL NOT NULL,
            policy_json TEXT NOT NULL,
            gates_json TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('running', 'paused', 'halted', 'completed', 'aborted')),
            wave INTEGER NOT NULL DEFAULT 0,
            wave_started_ts REAL,
            wave_deadline_ts REAL,
            paused_remaining_s REAL,
            reason TEXT NOT NULL DEFAULT '',
            gate_log_json TEXT NOT NULL DEFAULT '[]'
        )""")
    db.execute("""
        CREATE TABLE rollout_devices (
            rollout_id TEXT NOT NULL REFERENCES rollouts (id),
            device TEXT NOT NULL,
            wave INTEGER NOT NULL,
            status TEXT NOT NULL,
            variant TEXT,
            target_json TEXT,
            previous_json TEXT NOT NULL DEFAULT '[]',
            generation INTEGER,
            assigned_ts REAL,
            result_ts REAL,
            reason TEXT NOT NULL DEFAULT '',
            metrics_json TEXT NOT NULL DEFAULT '{}',
            baseline_json TEXT NOT NULL DEFAULT '{}',
            caught_up INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (rollout_id, device)
        )""")


@MIGRATIONS()
def m004_audit_batches(db: sqlite_utils.Database) -> None:
    """The commit order of stored audit batches (``audit tail --follow``), and indexes for alert listing and caps.

    ``audit_batches`` gets one row per batch that stored new records, inserted in the same transaction as the
    records. SQLite serialises writers and ``AUTOINCREMENT`` never reuses a committed id, so ids grow in commit
    order: a reader that has seen every id up to ``n`` has seen every batch committed before ``n``, whatever
    ``received_ts`` (when ``serve`` received the message) says. Batches stored before this migration have no row.
    """
    db.execute("""
        CREATE TABLE audit_batches (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            device TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            first_seq INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            stored_ts REAL NOT NULL
        )""")
    db.execute("CREATE INDEX audit_alerts_recent ON audit_alerts (device, kind, first_ts)")
    db.execute("CREATE INDEX audit_alerts_last ON audit_alerts (last_ts)")


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """One device as the fleet DB knows it."""

    id: str
    enrolled_ts: float
    cert_serial: str
    cert_not_after: float
    signing_keyid: str
    signing_key_pem: str
    revoked_ts: float | None
    status: str | None
    state: dict[str, Any] | None
    state_ts_ms: int | None
    heartbeat: int | None
    agent_version: str | None
    last_seen: float | None

    @property
    def revoked(self) -> bool:
        """Whether the device's credentials are revoked."""
        return self.revoked_ts is not None


@dataclass(frozen=True, slots=True)
class AssignmentRow:
    """One stored assignment."""

    device: str
    generation: int
    envelope: bytes
    models: list[dict[str, Any]]
    issued_ts: float
    published_ts: float | None


def is_online(device: DeviceRow, *, now: float, heartbeat_timeout: float) -> bool:
    """Online only if its last state said so *and* it was heard from within ``heartbeat_timeout`` seconds.

    The last-will message turns a vanished device offline; the age check covers everything the will cannot
    (the broker or this controller down, a lost will): an offline device is never shown online.
    """
    if device.revoked or device.status != "online" or device.last_seen is None:
        return False
    return now - device.last_seen <= heartbeat_timeout


class FleetStore:
    """The fleet database. Use from one thread at a time; open with :meth:`open`."""

    def __init__(self, db: sqlite_utils.Database, path: Path) -> None:
        self.db = db
        self.path = path

    @classmethod
    def open(cls, path: Path) -> FleetStore:
        """Open (creating and migrating if needed) the fleet DB at ``path``.

        Raises:
            StoreError: the file cannot be opened or migrated.
        """
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the fleet database {path}: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            db = sqlite_utils.Database(conn)
            MIGRATIONS.apply(db)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot use the fleet database {path}: {exc}") from exc
            raise
        return cls(db, path)

    def close(self) -> None:
        """Close the connection."""
        self.db.conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """One ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on any exception.

        Inside another transaction (``serve`` groups many messages' writes into one commit, see
        :mod:`controller.ingest`) it is a ``SAVEPOINT`` instead: its changes are undone alone on an exception,
        and become durable with the enclosing commit.
        """
        if self.db.conn.in_transaction:
            self.db.execute("SAVEPOINT nested")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK TO nested")
                self.db.execute("RELEASE nested")
                raise
            self.db.execute("RELEASE nested")
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        try:
            self.db.execute("COMMIT")
        except BaseException:
            # SQLite can leave the transaction open after a failed COMMIT (SQLITE_FULL, an I/O error): the next
            # transaction() would then nest in it as a savepoint, "commit" nothing, and its caller would ack work
            # that is rolled back later. End it here; the error goes to the caller (nothing of it is durable).
            if self.db.conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            raise

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return list(self.db.query(sql, list(params)))

    # --- meta -------------------------------------------------------------------------------------------

    def next_counter(self, key: str) -> int:
        """Increment and return a counter in ``meta`` (call inside a transaction)."""
        rows = self._rows("SELECT value FROM meta WHERE key = ?", [key])
        value = int(rows[0]["value"]) + 1 if rows else 1
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [key, str(value)])
        return value

    # --- certificates and devices -------------------------------------------------------------------------

    def record_certificate(self, serial: int, subject: str, kind: str, not_after: dt.datetime) -> None:
        """Remember an issued certificate (call inside a transaction)."""
        self.db.execute(
            "INSERT INTO certificates (serial, subject, kind, issued_ts, not_after) VALUES (?, ?, ?, ?, ?)",
            [format(serial, "x"), subject, kind, time.time(), not_after.timestamp()],
        )

    def revoked_serials(self) -> list[tuple[int, dt.datetime]]:
        """Every revoked certificate serial with its revocation time (for the CRL)."""
        rows = self._rows("SELECT serial, revoked_ts FROM certificates WHERE revoked_ts IS NOT NULL ORDER BY serial")
        return [(int(r["serial"], 16), dt.datetime.fromtimestamp(r["revoked_ts"], dt.UTC)) for r in rows]

    def revoked_devices(self) -> list[str]:
        """Ids of devices whose credentials are revoked."""
        return [r["id"] for r in self._rows("SELECT id FROM devices WHERE revoked_ts IS NOT NULL ORDER BY id")]

    def add_device(
        self, device: str, *, cert_serial: int, cert_not_after: dt.datetime, signing_keyid: str, signing_key_pem: str
    ) -> None:
        """Insert a device, or re-enroll a revoked one (call inside a transaction).

        Raises:
            StoreError: the device exists and is not revoked.
        """
        existing = self.get_device(device)
        if existing is not None and not existing.revoked:
            raise StoreError(f"device {device!r} is already enrolled; revoke it first (or use --force)")
        values = [time.time(), format(cert_serial, "x"), cert_not_after.timestamp(), signing_keyid, signing_key_pem]
        if existing is None:
            self.db.execute(
                "INSERT INTO devices (id, enrolled_ts, cert_serial, cert_not_after, signing_keyid, signing_key_pem) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [device, *values],
            )
        else:
            self.db.execute(
                "UPDATE devices SET enrolled_ts = ?, cert_serial = ?, cert_not_after = ?, signing_keyid = ?, "
                "signing_key_pem = ?, revoked_ts = NULL, status = NULL, state_json = NULL, state_ts_ms = NULL, "
                "heartbeat = NULL, agent_version = NULL, last_seen = NULL, state_received_ts = NULL WHERE id = ?",
                [*values, device],
            )

    def revoke_device(self, device: str) -> None:
        """Mark a device and its certificates revoked (call inside a transaction).

        Raises:
            StoreError: no such device, or already revoked.
        """
        existing = self.get_device(device)
        if existing is None:
            raise StoreError(f"no device {device!r}")
        if existing.revoked:
            raise StoreError(f"device {device!r} is already revoked")
        now = time.time()
        self.db.execute("UPDATE devices SET revoked_ts = ? WHERE id = ?", [now, device])
        self.db.execute(
            "UPDATE certificates SET revoked_ts = ? WHERE kind = 'device' AND subject = ? AND revoked_ts IS NULL",
            [now, device],
        )

    def get_device(self, device: str) -> DeviceRow | None:
        """One device, or None."""
        rows = self._rows("SELECT * FROM devices WHERE id = ?", [device])
        return _device_row(rows[0]) if rows else None

    def list_devices(self) -> list[DeviceRow]:
        """Every device, by id."""
        return [_device_row(r) for r in self._rows("SELECT * FROM devices ORDER BY id")]

    # --- inventory --------------------------------------------------------------------------------------

    def record_state(
        self,
        device: str,
        *,
        status: str,
        state: dict[str, Any],
        state_ts_ms: int,
        heartbeat: int,
        agent_version: str,
        seen: float | None,
        now: float,
    ) -> None:
        """Store a verified state message (its own transaction). ``seen`` None keeps the last-seen time."""
        with self.transaction():
            self.db.execute(
                "UPDATE devices SET status = ?, state_json = ?, state_ts_ms = ?, heartbeat = ?, agent_version = ?, "
                "last_seen = CASE WHEN ? IS NULL THEN last_seen ELSE max(coalesce(last_seen, 0), ?) END, "
                "state_received_ts = ? WHERE id = ?",
                [
                    status,
                    json.dumps(state, sort_keys=True),
                    state_ts_ms,
                    heartbeat,
                    agent_version,
                    seen,
                    seen,
                    now,
                    device,
                ],
            )

    def touch(self, device: str, seen: float) -> None:
        """Record that a verified message from ``device`` arrived at ``seen`` (its own transaction)."""
        with self.transaction():
            self.db.execute(
                "UPDATE devices SET last_seen = max(coalesce(last_seen, 0), ?) WHERE id = ?", [seen, device]
            )

    # --- reports ----------------------------------------------------------------------------------------

    def record_report(self, report: dict[str, Any], *, received_ts: float) -> bool:
        """Store a verified report once; returns False (and counts a duplicate) if it was stored before.

        One transaction; the caller acks only after this returned.
        """
        with self.transaction():
            cursor = self.db.execute(
                "INSERT OR IGNORE INTO reports (report_id, device, ts_ms, kind, outcome, reason, generation, model, "
                "metrics_json, received_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    report["report_id"],
                    report["device"],
                    report["ts_ms"],
                    report["kind"],
                    report["outcome"],
                    report.get("reason", ""),
                    report.get("generation"),
                    json.dumps(report["model"], sort_keys=True) if report.get("model") else None,
                    json.dumps(report.get("metrics", {}), sort_keys=True),
                    received_ts,
                ],
            )
            if cursor.rowcount == 1:
                return True
            self.db.execute("UPDATE reports SET duplicates = duplicates + 1 WHERE report_id = ?", [report["report_id"]])
            return False

    def reports(self, device: str | None = None, *, limit: int = 1000) -> list[dict[str, Any]]:
        """Reports, newest first."""
        sql = "SELECT * FROM reports"
        params: list[Any] = []
        if device is not None:
            sql += " WHERE device = ?"
            params.append(device)
        return self._rows(sql + " ORDER BY ts_ms DESC, report_id LIMIT ?", [*params, limit])

    # --- rejections -------------------------------------------------------------------------------------

    def record_rejection(self, topic: str, device: str | None, reason: str, *, now: float) -> None:
        """Remember a refused message (bounded: the oldest are dropped past :data:`MAX_REJECTIONS`)."""
        with self.transaction():
            self.db.execute(
                "INSERT INTO rejections (ts, topic, device, reason) VALUES (?, ?, ?, ?)",
                [now, topic[:256], device, reason[:1000]],
            )
            self.db.execute("DELETE FROM rejections WHERE id <= (SELECT max(id) FROM rejections) - ?", [MAX_REJECTIONS])

    def rejections(self, device: str | None = None, *, limit: int = 100) -> list[dict[str, Any]]:
        """Refused messages, newest first."""
        sql = "SELECT * FROM rejections"
        params: list[Any] = []
        if device is not None:
            sql += " WHERE device = ?"
            params.append(device)
        return self._rows(sql + " ORDER BY id DESC LIMIT ?", [*params, limit])

    # --- assignments ------------------------------------------------------------------------------------

    def next_generation(self, device: str) -> int:
        """One more than the device's highest generation (call inside the transaction that inserts it)."""
        rows = self._rows("SELECT max(generation) AS g FROM assignments WHERE device = ?", [device])
        return int(rows[0]["g"] or 0) + 1

    def add_assignment(self, device: str, generation: int, envelope: bytes, models: list[dict[str, Any]]) -> None:
        """Insert a signed assignment (call inside a transaction)."""
        self.db.execute(
            "INSERT INTO assignments (device, generation, envelope, models_json, issued_ts) VALUES (?, ?, ?, ?, ?)",
            [device, generation, envelope, json.dumps(models, sort_keys=True), time.time()],
        )

    def latest_assignments(
        self, *, unpublished_only: bool = False, devices: Sequence[str] | None = None
    ) -> list[AssignmentRow]:
        """The newest assignment of every device (of non-revoked devices; of ``devices`` only, if given)."""
        sql = (
            "SELECT a.* FROM assignments a JOIN devices d ON d.id = a.device "
            "WHERE d.revoked_ts IS NULL AND a.generation = "
            "(SELECT max(generation) FROM assignments b WHERE b.device = a.device)"
        )
        params: list[Any] = []
        if unpublished_only:
            sql += " AND a.published_ts IS NULL"
        if devices is not None:
            sql += " AND a.device IN (SELECT value FROM json_each(?))"
            params.append(json.dumps(list(devices)))
        return [_assignment_row(r) for r in self._rows(sql + " ORDER BY a.device", params)]

    def mark_published(self, device: str, generation: int, *, now: float) -> None:
        """Record that an assignment was published (its own transaction)."""
        with self.transaction():
            self.db.execute(
                "UPDATE assignments SET published_ts = ? WHERE device = ? AND generation = ?",
                [now, device, generation],
            )

    def assignments(self, device: str, *, limit: int = 20) -> list[AssignmentRow]:
        """A device's assignments, newest first."""
        rows = self._rows(
            "SELECT * FROM assignments WHERE device = ? ORDER BY generation DESC LIMIT ?", [device, limit]
        )
        return [_assignment_row(r) for r in rows]

    # --- labels and groups ------------------------------------------------------------------------------

    def set_label(self, device: str, key: str, value: str | None) -> None:
        """Set (or with ``value`` None remove) a device label (its own transaction)."""
        with self.transaction():
            if value is None:
                self.db.execute("DELETE FROM device_labels WHERE device = ? AND key = ?", [device, key])
            else:
                self.db.execute(
                    "INSERT INTO device_labels (device, key, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (device, key) DO UPDATE SET value = excluded.value",
                    [device, key, value],
                )

    def labels(self) -> dict[str, dict[str, str]]:
        """Every device's labels: ``{device: {key: value}}``."""
        out: dict[str, dict[str, str]] = {}
        for row in self._rows("SELECT device, key, value FROM device_labels ORDER BY device, key"):
            out.setdefault(row["device"], {})[row["key"]] = row["value"]
        return out

    def set_group_member(self, group: str, device: str, member: bool) -> None:
        """Add ``device`` to (or remove it from) ``group`` (its own transaction)."""
        with self.transaction():
            if member:
                self.db.execute("INSERT OR IGNORE INTO device_groups (name, device) VALUES (?, ?)", [group, device])
            else:
                self.db.execute("DELETE FROM device_groups WHERE name = ? AND device = ?", [group, device])

    def groups(self) -> dict[str, list[str]]:
        """Every group's members: ``{group: [device, ...]}``."""
        out: dict[str, list[str]] = {}
        for row in self._rows("SELECT name, device FROM device_groups ORDER BY name, device"):
            out.setdefault(row["name"], []).append(row["device"])
        return out

    # --- rollouts ---------------------------------------------------------------------------------------

    def add_rollout(self, rollout: dict[str, Any], devices: list[dict[str, Any]]) -> None:
        """Insert a rollout and its devices (call inside a transaction)."""
        for table, rows in (("rollouts", [rollout]), ("rollout_devices", devices)):
            for row in rows:
                columns = ", ".join(row)
                marks = ", ".join("?" for _ in row)
                self.db.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", list(row.values()))  # noqa: S608

    def rollout(self, rollout_id: str) -> dict[str, Any] | None:
        """One rollout row, or None."""
        rows = self._rows("SELECT * FROM rollouts WHERE id = ?", [rollout_id])
        return rows[0] if rows else None

    def rollouts(self, *, status: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Rollouts, newest first (of the given statuses, or all)."""
        sql = "SELECT * FROM rollouts"
        if status:
            sql += f" WHERE status IN ({', '.join('?' for _ in status)})"
        return self._rows(sql + " ORDER BY created_ts DESC, id", list(status))

    def update_rollout(self, rollout_id: str, **values: Any) -> None:
        """Update columns of a rollout (call inside a transaction)."""
        columns = ", ".join(f"{key} = ?" for key in values)
        self.db.execute(f"UPDATE rollouts SET {columns} WHERE id = ?", [*values.values(), rollout_id])  # noqa: S608

    def rollout_devices(self, rollout_id: str, *, status: Sequence[str] = ()) -> list[dict[str, Any]]:
        """The devices of a rollout (of the given statuses, or all), by wave then id."""
        sql = "SELECT * FROM rollout_devices WHERE rollout_id = ?"
        if status:
            sql += f" AND status IN ({', '.join('?' for _ in status)})"
        return self._rows(sql + " ORDER BY wave, device", [rollout_id, *status])

    def update_rollout_device(self, rollout_id: str, device: str, **values: Any) -> None:
        """Update columns of one rollout device (call inside a transaction)."""
        columns = ", ".join(f"{key} = ?" for key in values)
        self.db.execute(
            f"UPDATE rollout_devices SET {columns} WHERE rollout_id = ? AND device = ?",  # noqa: S608
            [*values.values(), rollout_id, device],
        )

    def reports_since(self, device: str, generation: int) -> list[dict[str, Any]]:
        """A device's reports about assignment ``generation`` or a newer one, oldest first."""
        return self._rows(
            "SELECT * FROM reports WHERE device = ? AND generation >= ? ORDER BY generation, ts_ms, report_id",
            [device, generation],
        )

    def model_reports(self, device: str, model: str) -> list[dict[str, Any]]:
        """A device's reports naming exactly ``model`` (its JSON as stored), newest first."""
        return self._rows(
            "SELECT * FROM reports WHERE device = ? AND model = ? ORDER BY ts_ms DESC, report_id LIMIT 100",
            [device, model],
        )


def _device_row(row: dict[str, Any]) -> DeviceRow:
    return DeviceRow(
        id=row["id"],
        enrolled_ts=row["enrolled_ts"],
        cert_serial=row["cert_serial"],
        cert_not_after=row["cert_not_after"],
        signing_keyid=row["signing_keyid"],
        signing_key_pem=row["signing_key_pem"],
        revoked_ts=row["revoked_ts"],
        status=row["status"],
        state=json.loads(row["state_json"]) if row["state_json"] else None,
        state_ts_ms=row["state_ts_ms"],
        heartbeat=row["heartbeat"],
        agent_version=row["agent_version"],
        last_seen=row["last_seen"],
    )


def _assignment_row(row: dict[str, Any]) -> AssignmentRow:
    return AssignmentRow(
        device=row["device"],
        generation=row["generation"],
        envelope=bytes(row["envelope"]),
        models=json.loads(row["models_json"]),
        issued_ts=row["issued_ts"],
        published_ts=row["published_ts"],
    )
