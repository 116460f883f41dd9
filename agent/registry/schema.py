"""The registry's SQLite schema (``state_dir/registry.db``) and the one function that writes its event log.

Tables:

- ``models``: one row per (name, variant, version) ever staged. ``state`` is one of ``staged``, ``active``,
  ``previous``, ``removed``, ``quarantined``. The database itself enforces *at most one active row per name*
  (a partial unique index) and *one live row per (name, variant, version)* (removed rows are history).
- ``installs``: the persisted install state machine (see :mod:`agent.registry.install`): one row per install,
  its current ``step``, the attempt counter the crash-loop breaker reads, and what was learnt on the way
  (sha256, size, format facts).
- ``model_events``: append-only log of every state change (triggers refuse UPDATE and DELETE). Rows are
  written only by :func:`append_event`, always inside the transaction that makes the change, so the log and
  the state can never disagree. It also appends the hash-chained audit record (:func:`agent.audit.append_record`)
  in that same transaction.

Connection settings: WAL journal, ``synchronous=FULL`` (a committed transaction survives power loss),
foreign keys on, autocommit mode with explicit ``BEGIN IMMEDIATE`` transactions (never Python's implicit ones).

Migrations are plain functions registered on a :class:`Migrations` set, applied in order, each in its own
transaction together with its row in ``_migrations``; applying is idempotent. (This is the small
``sqlite-migrate`` pattern kept in-tree: the package itself is an alpha and not a dependency.)
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import sqlite_utils

__all__ = [
    "EVENT_KINDS",
    "INSTALL_STEPS",
    "MODEL_STATES",
    "MIGRATIONS",
    "Migrations",
    "append_event",
    "open_database",
]

MODEL_STATES = ("staged", "active", "previous", "removed", "quarantined")
INSTALL_STEPS = (
    "planned",
    "copying",
    "copied",
    "verified",
    "fsynced",
    "renamed",
    "activated",
    "done",
    "failed",
    "abandoned",
    "quarantined",
)
EVENT_KINDS = (
    # install pipeline
    "install_planned",
    "install_started",
    "install_copying",
    "install_copied",
    "install_verified",
    "install_fsynced",
    "install_renamed",
    "install_activated",
    "install_done",
    "install_rejected",
    "install_failed",
    "install_abandoned",
    "install_quarantined",
    "install_refused",
    # model state changes
    "model_staged",
    "model_activated",
    "model_deactivated",
    "model_rolled_back",
    "model_removed",
    "model_quarantined",
    "model_load_crashed",
)

Migration = Callable[[sqlite_utils.Database], None]


class Migrations:
    """A named, ordered set of schema migrations.

    Register functions with ``@migrations()``; :meth:`apply` runs those not yet recorded in ``_migrations``,
    in registration order, each in one ``BEGIN IMMEDIATE`` transaction with its record.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._migrations: list[tuple[str, Migration]] = []

    def __call__(self) -> Callable[[Migration], Migration]:
        def register(fn: Migration) -> Migration:
            self._migrations.append((fn.__name__, fn))
            return fn

        return register

    def apply(self, db: sqlite_utils.Database) -> list[str]:
        """Apply pending migrations; return the names applied (empty when the schema is current)."""
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


MIGRATIONS = Migrations("edgefleet.agent.registry")


def _check(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


@MIGRATIONS()
def m001_initial(db: sqlite_utils.Database) -> None:
    """Models, installs and the append-only event log."""
    db.execute(f"""
        CREATE TABLE models (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            variant TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 0),
            format TEXT NOT NULL CHECK (format IN ('gguf', 'onnx')),
            size INTEGER NOT NULL CHECK (size >= 0),
            sha256 TEXT NOT NULL CHECK (length(sha256) = 64),
            params INTEGER,
            context_length INTEGER,
            licence TEXT,
            origin TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ({_check(MODEL_STATES)})),
            created_ts REAL NOT NULL,
            updated_ts REAL NOT NULL,
            activation_seq INTEGER,
            metadata TEXT NOT NULL DEFAULT '{{}}',
            blob TEXT NOT NULL,
            install_id TEXT,
            reason TEXT
        )""")
    db.execute("CREATE UNIQUE INDEX models_one_active ON models (name) WHERE state = 'active'")
    db.execute("CREATE UNIQUE INDEX models_live_identity ON models (name, variant, version) WHERE state != 'removed'")
    db.execute("CREATE INDEX models_sha256 ON models (sha256)")
    db.execute(f"""
        CREATE TABLE installs (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            variant TEXT NOT NULL,
            version INTEGER NOT NULL,
            origin TEXT NOT NULL,
            source TEXT NOT NULL,
            source_size INTEGER NOT NULL,
            expected_sha256 TEXT,
            activate INTEGER NOT NULL,
            user_metadata TEXT NOT NULL DEFAULT '{{}}',
            step TEXT NOT NULL CHECK (step IN ({_check(INSTALL_STEPS)})),
            attempts INTEGER NOT NULL DEFAULT 0,
            sha256 TEXT,
            size INTEGER,
            format TEXT,
            facts TEXT,
            model_id INTEGER REFERENCES models (id),
            error TEXT,
            created_ts REAL NOT NULL,
            updated_ts REAL NOT NULL
        )""")
    db.execute("CREATE INDEX installs_step ON installs (step)")
    db.execute("""
        CREATE TABLE model_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            actor TEXT NOT NULL,
            model_id INTEGER,
            install_id TEXT,
            name TEXT,
            variant TEXT,
            version INTEGER,
            data TEXT NOT NULL DEFAULT '{}'
        )""")
    db.execute("""
        CREATE TRIGGER model_events_append_only_update BEFORE UPDATE ON model_events
        BEGIN SELECT RAISE(ABORT, 'model_events is append-only'); END""")
    db.execute("""
        CREATE TRIGGER model_events_append_only_delete BEFORE DELETE ON model_events
        BEGIN SELECT RAISE(ABORT, 'model_events is append-only'); END""")


@MIGRATIONS()
def m002_audit_log(db: sqlite_utils.Database) -> None:
    """The tamper-evident audit log's tables (see :mod:`agent.audit`)."""
    from agent.audit import create_tables  # agent.audit must not import the registry

    create_tables(db)


@MIGRATIONS()
def m003_audit_size_cap(db: sqlite_utils.Database) -> None:
    """The audit log's retention size cap (``[audit] max_bytes``): stored and maximum bytes."""
    from agent.audit import add_size_columns

    add_size_columns(db)


@MIGRATIONS()
def m004_model_loads(db: sqlite_utils.Database) -> None:
    """Loads in progress and the crashes in a row they caused (see :mod:`agent.registry.loads`)."""
    db.execute("""
        CREATE TABLE model_loads (
            name TEXT NOT NULL,
            sha256 TEXT NOT NULL CHECK (length(sha256) = 64),
            in_progress INTEGER NOT NULL CHECK (in_progress IN (0, 1)),
            crashes INTEGER NOT NULL CHECK (crashes >= 0),
            started_ts REAL NOT NULL,
            PRIMARY KEY (name, sha256)
        )""")


def open_database(path: Path) -> sqlite_utils.Database:
    """Open (creating if needed) the registry database with the registry's settings, migrated.

    The connection may be used from any one thread at a time (``check_same_thread=False``); the
    :class:`~agent.registry.store.Registry` serialises access with its lock.
    """
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        db = sqlite_utils.Database(conn)
        MIGRATIONS.apply(db)
    except BaseException:
        conn.close()
        raise
    return db


def append_event(
    db: sqlite_utils.Database,
    kind: str,
    *,
    ts: float,
    actor: str = "agent",
    model_id: int | None = None,
    install_id: str | None = None,
    name: str | None = None,
    variant: str | None = None,
    version: int | None = None,
    data: Mapping[str, Any] | None = None,
) -> int:
    """Append one event; the caller's open transaction makes it atomic with the change it records.

    Returns:
        The event's sequence number.
    """
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown model event kind {kind!r}")
    if not db.conn.in_transaction:
        raise RuntimeError("append_event must run inside the transaction of the change it records")
    cursor = db.execute(
        "INSERT INTO model_events (ts, kind, actor, model_id, install_id, name, variant, version, data) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [ts, kind, actor, model_id, install_id, name, variant, version, json.dumps(dict(data or {}))],
    )
    seq: int | None = cursor.lastrowid
    assert seq is not None
    # The same transaction appends the hash-chained audit record (a no-op until the daemon started the log).
    from agent.audit import append_record

    details = {"name": name, "variant": variant, "version": version, "model_id": model_id, "install_id": install_id}
    append_record(
        db,
        f"registry.{kind}",
        actor,
        {**{k: v for k, v in details.items() if v is not None}, **dict(data or {})},
        ts_ms=int(ts * 1000),
    )
    return seq
