"""The link's SQLite database (``state_dir/link/link.db``), used from one writer thread.

Tables (migrations in :data:`MIGRATIONS`):

- ``outbox``: messages that must reach the controller (reports, audit batches), kept until its
  application-level ack (:mod:`agent.link.outbox`).
- ``desired``: the one accepted signed assignment (the desired state) and the generation last applied
  (:mod:`agent.link.dispatch`).
- ``events``: audit-worthy link events (assignment refused, message undeliverable, ...), newest
  :data:`MAX_EVENTS` kept, for diagnosis on the device only: nothing copies them into the audit chain (the
  dispatcher records assignments applied and refused there through its own hook; the others reach the
  controller as signed reports or are in the agent's log).
- ``health_checks``: the post-install health checks of delivered releases (:mod:`agent.link.releases`), one row
  per model content: ``running`` with the number of attempts started and never finished (written and committed
  *before* a check starts, so a check that kills the agent is counted, and a release that keeps doing so is
  quarantined instead of crash-looping the device), or ``passed`` with what the check measured (kept until the
  report that carries the numbers is committed, so a crash between activation and that report loses nothing).

Connection settings as the registry's: WAL, ``synchronous=FULL`` (a committed transaction survives power
loss), explicit ``BEGIN IMMEDIATE`` transactions. Every call goes through :meth:`LinkStore.run`, which runs it
on the store's single thread, so SQLite never blocks the event loop and writes are serialised.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import sqlite_utils

from agent.errors import LinkError
from agent.registry.schema import Migrations

__all__ = ["MAX_EVENTS", "MIGRATIONS", "HealthCheckKey", "HealthCheckRow", "LinkStore"]

P = ParamSpec("P")
T = TypeVar("T")

MAX_EVENTS = 10_000

MIGRATIONS = Migrations("edgefleet.agent.link")

HealthCheckKey = tuple[str, str, int, str]
"""``(name, variant, version, sha256)`` of the model a health check is about."""


@dataclass(frozen=True, slots=True)
class HealthCheckRow:
    """A release's health check as recorded in ``health_checks``."""

    state: str
    """``running`` (started, not finished) or ``passed``."""
    attempts: int
    """Checks started and never finished (the agent died during them)."""
    metrics: Mapping[str, float]
    """What a passed check measured."""


@MIGRATIONS()
def m001_link(db: sqlite_utils.Database) -> None:
    """Outbox, desired state, link events."""
    db.execute("""
        CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            msg_id TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL,
            payload BLOB NOT NULL,
            created_ts REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            strikes INTEGER NOT NULL DEFAULT 0,
            next_ts REAL NOT NULL DEFAULT 0,
            state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'undeliverable')),
            error TEXT
        )""")
    db.execute("CREATE INDEX outbox_due ON outbox (state, next_ts, seq)")
    db.execute("""
        CREATE TABLE desired (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            generation INTEGER NOT NULL CHECK (generation >= 1),
            envelope BLOB NOT NULL,
            accepted_ts REAL NOT NULL,
            applied_generation INTEGER NOT NULL DEFAULT 0,
            applied_ts REAL
        )""")
    db.execute("""
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            ts REAL NOT NULL,
            kind TEXT NOT NULL,
            data TEXT NOT NULL
        )""")


@MIGRATIONS()
def m002_health_checks(db: sqlite_utils.Database) -> None:
    """Health checks of delivered releases: attempts that never finished, numbers of passed ones."""
    db.execute("""
        CREATE TABLE health_checks (
            name TEXT NOT NULL,
            variant TEXT NOT NULL,
            version INTEGER NOT NULL,
            sha256 TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('running', 'passed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            metrics TEXT NOT NULL DEFAULT '{}',
            updated_ts REAL NOT NULL,
            PRIMARY KEY (name, variant, version, sha256)
        )""")


class LinkStore:
    """``link.db`` and its writer thread. Open with :meth:`open` (on any thread), close with :meth:`close`."""

    def __init__(self, db: sqlite_utils.Database, path: Path) -> None:
        self.db = db
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="link-db")

    @classmethod
    def open(cls, path: Path) -> LinkStore:
        """Open (creating and migrating) ``link.db``.

        Raises:
            LinkError: the database cannot be opened.
        """
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
        except sqlite3.Error as exc:
            raise LinkError(f"cannot open {path}: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            db = sqlite_utils.Database(conn)
            MIGRATIONS.apply(db)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise LinkError(f"cannot use {path}: {exc}") from exc
            raise
        return cls(db, path)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on the store's one thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        """Finish queued work, then close the connection."""
        self._executor.shutdown(wait=True)
        self.db.conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite_utils.Database]:
        """One ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on any exception."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    @contextlib.contextmanager
    def joined_transaction(self) -> Iterator[sqlite_utils.Database]:
        """The caller's open transaction, or one of its own (as :meth:`transaction`) when there is none."""
        if self.db.conn.in_transaction:
            yield self.db
        else:
            with self.transaction() as db:
                yield db

    def add_event(self, kind: str, data: Mapping[str, Any], *, now: float | None = None) -> None:
        """Append a link event (inside the caller's transaction, or its own)."""
        with self.joined_transaction() as db:
            db.execute(
                "INSERT INTO events (ts, kind, data) VALUES (?, ?, ?)",
                [now if now is not None else time.time(), kind, json.dumps(dict(data), sort_keys=True)],
            )
            db.execute("DELETE FROM events WHERE seq <= (SELECT max(seq) FROM events) - ?", [MAX_EVENTS])

    def events(self, kind: str | None = None, *, limit: int = 100) -> list[dict[str, Any]]:
        """Link events, newest first."""
        sql = "SELECT * FROM events"
        params: list[Any] = []
        if kind is not None:
            sql += " WHERE kind = ?"
            params.append(kind)
        rows = self.db.query(sql + " ORDER BY seq DESC LIMIT ?", [*params, limit])
        return [{**row, "data": json.loads(row["data"])} for row in rows]

    # --- health checks of delivered releases (agent.link.releases) ----------------------------------------------

    def health_check(self, key: HealthCheckKey) -> HealthCheckRow | None:
        """The recorded health check of ``key``, if any."""
        row = self.db.execute(
            "SELECT state, attempts, metrics FROM health_checks WHERE name = ? AND variant = ? AND version = ? "
            "AND sha256 = ?",
            list(key),
        ).fetchone()
        return None if row is None else HealthCheckRow(str(row[0]), int(row[1]), json.loads(row[2]))

    def begin_health_check(self, key: HealthCheckKey, *, now: float | None = None) -> int:
        """Count one more attempt at checking ``key`` (committed before the check starts); returns the count."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO health_checks (name, variant, version, sha256, state, attempts, updated_ts) "
                "VALUES (?, ?, ?, ?, 'running', 1, ?) ON CONFLICT (name, variant, version, sha256) DO UPDATE SET "
                "attempts = CASE WHEN state = 'running' THEN attempts + 1 ELSE 1 END, state = 'running', "
                "metrics = '{}', updated_ts = excluded.updated_ts",
                [*key, now if now is not None else time.time()],
            )
            row = db.execute(
                "SELECT attempts FROM health_checks WHERE name = ? AND variant = ? AND version = ? AND sha256 = ?",
                list(key),
            ).fetchone()
        return int(row[0])

    def uncount_health_check(self, key: HealthCheckKey) -> None:
        """Take back the attempt :meth:`begin_health_check` counted (the check was cancelled: the agent stops)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE health_checks SET attempts = max(attempts - 1, 0) WHERE name = ? AND variant = ? "
                "AND version = ? AND sha256 = ? AND state = 'running'",
                list(key),
            )

    def pass_health_check(self, key: HealthCheckKey, metrics: Mapping[str, float], *, now: float | None = None) -> None:
        """Record that the check of ``key`` passed, with what it measured (until :meth:`forget_health_check`)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO health_checks (name, variant, version, sha256, state, attempts, metrics, updated_ts) "
                "VALUES (?, ?, ?, ?, 'passed', 0, ?, ?) ON CONFLICT (name, variant, version, sha256) DO UPDATE SET "
                "state = 'passed', attempts = 0, metrics = excluded.metrics, updated_ts = excluded.updated_ts",
                [*key, json.dumps(dict(metrics), sort_keys=True), now if now is not None else time.time()],
            )

    def forget_health_check(self, key: HealthCheckKey, *, passed_only: bool = False) -> None:
        """Drop the record of ``key`` (only a passed one with ``passed_only``), in the caller's transaction or its
        own."""
        with self.joined_transaction() as db:
            db.execute(
                "DELETE FROM health_checks WHERE name = ? AND variant = ? AND version = ? AND sha256 = ? "
                "AND (state = 'passed' OR NOT ?)",
                [*key, passed_only],
            )
