"""The link's SQLite database (``state_dir/link/link.db``), used from one writer thread.

Tables (migrations in :data:`MIGRATIONS`):

- ``outbox``: messages that must reach the controller (reports, audit batches), kept until its
  application-level ack (:mod:`agent.link.outbox`).
- ``desired``: the one accepted signed assignment (the desired state) and the generation last applied
  (:mod:`agent.link.dispatch`).
- ``events``: audit-worthy link events (assignment refused, message undeliverable, ...), newest
  :data:`MAX_EVENTS` kept; the audit log takes them over when it exists.

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
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import sqlite_utils

from agent.errors import LinkError
from agent.registry.schema import Migrations

__all__ = ["MAX_EVENTS", "MIGRATIONS", "LinkStore"]

P = ParamSpec("P")
T = TypeVar("T")

MAX_EVENTS = 10_000

MIGRATIONS = Migrations("edgefleet.agent.link")


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

    def add_event(self, kind: str, data: Mapping[str, Any], *, now: float | None = None) -> None:
        """Append a link event (inside the caller's transaction, or its own)."""
        own = not self.db.conn.in_transaction
        if own:
            self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(
                "INSERT INTO events (ts, kind, data) VALUES (?, ?, ?)",
                [now if now is not None else time.time(), kind, json.dumps(dict(data), sort_keys=True)],
            )
            self.db.execute("DELETE FROM events WHERE seq <= (SELECT max(seq) FROM events) - ?", [MAX_EVENTS])
        except BaseException:
            if own:
                self.db.execute("ROLLBACK")
            raise
        if own:
            self.db.execute("COMMIT")

    def events(self, kind: str | None = None, *, limit: int = 100) -> list[dict[str, Any]]:
        """Link events, newest first."""
        sql = "SELECT * FROM events"
        params: list[Any] = []
        if kind is not None:
            sql += " WHERE kind = ?"
            params.append(kind)
        rows = self.db.query(sql + " ORDER BY seq DESC LIMIT ?", [*params, limit])
        return [{**row, "data": json.loads(row["data"])} for row in rows]
