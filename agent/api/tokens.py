"""Bearer tokens for the local API, stored hashed in ``state_dir/tokens.db``.

A token is shown in plaintext exactly once, when it is created: ``efa_<id>_<secret>`` where ``<id>`` is 8 hex
digits (public: it names the token in listings and audit records) and ``<secret>`` 64 hex digits (256 bits
from :mod:`secrets`). The database keeps only ``sha256(token)``; verification compares digests with
:func:`hmac.compare_digest`, so neither the lookup nor the comparison reveals the secret through timing.

Scopes (a token has one or more):

- ``admin``: every route, admin routes included (admin implies ``infer`` on every model);
- ``infer``: inference on every model;
- ``infer:NAME``: inference on the model named ``NAME`` (any of its variants); repeat for several models.

Invariants:

- the plaintext secret is never written anywhere (database, logs, exceptions);
- a revoked token never authenticates again; revocation is read from the database on every request, so
  ``edge-agent token revoke`` takes effect immediately even while the daemon runs;
- the database file is created with mode 0600;
- the schema is upgraded by :data:`TOKEN_MIGRATIONS` (the registry's in-tree ``Migrations``: each migration
  applied once, in its own transaction together with its record).

The store is synchronous and thread-safe (one connection behind a lock); the API calls it through
:func:`asyncio.to_thread`.

A ``tokens.db`` that cannot be opened (garbage, locked by another process, unreadable) raises
:class:`TokenStoreUnavailableError`; the daemon then serves with an :class:`UnavailableTokenStore`: callers
identified by their uid on the unix socket are served as usual, a caller presenting a token gets 503 naming the
cause (never a silent 401 that would look like a wrong token).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import sqlite_utils

from agent.errors import ApiError, AuthenticationError, BadRequestError
from agent.registry.schema import Migrations
from protocols.limits import MODEL_NAME_RE

__all__ = [
    "TOKEN_NAME_RE",
    "TokenNotFoundError",
    "TokenRecord",
    "TokenStore",
    "TokenStoreUnavailableError",
    "UnavailableTokenStore",
    "parse_scopes",
]

TOKENS_DB = "tokens.db"
TOKEN_PREFIX = "efa"  # noqa: S105 - a public prefix, not a secret
TOKEN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TOKEN_RE = re.compile(r"efa_([0-9a-f]{8})_([0-9a-f]{64})")
_ID_RE = re.compile(r"[0-9a-f]{8}")
MAX_SCOPES = 64


class TokenNotFoundError(ApiError):
    """No token with that id."""

    http_status = 404
    error_code = "token_not_found"


class TokenStoreUnavailableError(ApiError):
    """The token database cannot be used; tokens can be neither checked nor managed until it is repaired."""

    http_status = 503
    error_type = "server_error"
    error_code = "token_store_unavailable"


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A stored token (never its secret)."""

    id: str
    name: str
    scopes: tuple[str, ...]
    created_ts: float
    revoked_ts: float | None

    @property
    def revoked(self) -> bool:
        """Whether the token has been revoked."""
        return self.revoked_ts is not None

    @property
    def is_admin(self) -> bool:
        """Whether the token carries the ``admin`` scope."""
        return "admin" in self.scopes

    def allows_infer(self, model_name: str) -> bool:
        """Whether the token may run inference on the model named ``model_name``."""
        return self.is_admin or "infer" in self.scopes or f"infer:{model_name}" in self.scopes

    def as_json(self) -> dict[str, object]:
        """The record as JSON for listings (no hash, no secret)."""
        return {
            "id": self.id,
            "name": self.name,
            "scopes": list(self.scopes),
            "created": int(self.created_ts),
            "revoked": None if self.revoked_ts is None else int(self.revoked_ts),
        }


def parse_scopes(values: Iterable[str]) -> tuple[str, ...]:
    """Normalise and validate scope strings.

    Accepts ``admin``, ``infer``, ``infer:NAME`` and the comma form ``infer:NAME1,NAME2``.

    Returns:
        The scopes, deduplicated, in a stable order.

    Raises:
        BadRequestError: an unknown scope, a bad model name, too many scopes, or none at all.
    """
    out: list[str] = []
    for value in values:
        if not isinstance(value, str) or len(value) > 4096:
            raise BadRequestError("a scope must be a string")
        if value in {"admin", "infer"}:
            out.append(value)
            continue
        if value.startswith("infer:"):
            names = value[len("infer:") :].split(",")
            for name in names:
                if not MODEL_NAME_RE.fullmatch(name):
                    raise BadRequestError(f"invalid model name in scope: {name[:64]!r}")
                out.append(f"infer:{name}")
            continue
        raise BadRequestError(f"unknown scope {value[:64]!r}: expected admin, infer or infer:MODEL[,MODEL...]")
    scopes = tuple(dict.fromkeys(out))
    if not scopes:
        raise BadRequestError("a token needs at least one scope")
    if len(scopes) > MAX_SCOPES:
        raise BadRequestError(f"a token has at most {MAX_SCOPES} scopes")
    return scopes


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


TOKEN_MIGRATIONS = Migrations("edgefleet.agent.tokens")


@TOKEN_MIGRATIONS()
def m001_tokens(db: sqlite_utils.Database) -> None:
    """The tokens table."""
    db.execute(
        "CREATE TABLE tokens ("
        " id TEXT PRIMARY KEY,"
        " name TEXT NOT NULL,"
        " token_hash TEXT NOT NULL CHECK (length(token_hash) = 64),"
        " scopes TEXT NOT NULL,"
        " created_ts REAL NOT NULL,"
        " revoked_ts REAL)"
    )


class TokenStore:
    """The token database. Open with :meth:`open`; close with :meth:`close` or ``with``."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.path = path

    @classmethod
    def open(cls, state_dir: Path, *, timeout: float = 10.0) -> TokenStore:
        """Open (creating and migrating if needed) ``state_dir/tokens.db``.

        Args:
            state_dir: the agent's state directory.
            timeout: how long to wait for a lock another process holds on the database (seconds).

        Raises:
            TokenStoreUnavailableError: the file cannot be created or opened, is not a token database (garbage),
                or stays locked by another process for ``timeout`` seconds.
        """
        path = state_dir / TOKENS_DB
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                # Create it 0600 before SQLite does (SQLite would use the umask); its -wal/-shm copy this mode.
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout)
        except (OSError, sqlite3.Error) as exc:
            raise TokenStoreUnavailableError(f"cannot open the token store {path}: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            store = cls(conn, path)
            store._migrate()
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise TokenStoreUnavailableError(f"cannot use the token store {path}: {exc}") from exc
            raise
        return store

    def _migrate(self) -> None:
        with self._lock:
            TOKEN_MIGRATIONS.apply(sqlite_utils.Database(self._conn))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def create(self, name: str, scopes: Iterable[str]) -> tuple[TokenRecord, str]:
        """Create a token.

        Args:
            name: a label for humans (``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``).
            scopes: scope strings, see :func:`parse_scopes`.

        Returns:
            The stored record and the plaintext token, which is not kept anywhere and cannot be shown again.

        Raises:
            BadRequestError: bad name or scopes.
        """
        if not isinstance(name, str) or not TOKEN_NAME_RE.fullmatch(name):
            raise BadRequestError("token name must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}")
        parsed = parse_scopes(scopes)
        now = time.time()
        with self._transaction():
            while True:
                token_id = secrets.token_hex(4)
                if self._conn.execute("SELECT 1 FROM tokens WHERE id = ?", (token_id,)).fetchone() is None:
                    break
            plaintext = f"{TOKEN_PREFIX}_{token_id}_{secrets.token_hex(32)}"
            self._conn.execute(
                "INSERT INTO tokens (id, name, token_hash, scopes, created_ts, revoked_ts) "
                "VALUES (?, ?, ?, ?, ?, NULL)",
                (token_id, name, _digest(plaintext), json.dumps(list(parsed)), now),
            )
        return TokenRecord(token_id, name, parsed, now, None), plaintext

    def list(self, *, include_revoked: bool = True) -> list[TokenRecord]:
        """All tokens, oldest first."""
        sql = "SELECT id, name, scopes, created_ts, revoked_ts FROM tokens"
        if not include_revoked:
            sql += " WHERE revoked_ts IS NULL"
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY created_ts, id").fetchall()
        return [self._record(row) for row in rows]

    def get(self, token_id: str) -> TokenRecord:
        """The token with id ``token_id``.

        Raises:
            TokenNotFoundError: no such token (or a malformed id).
        """
        if not isinstance(token_id, str) or not _ID_RE.fullmatch(token_id):
            raise TokenNotFoundError("no such token")
        with self._lock:
            row = self._conn.execute(
                "SELECT id, name, scopes, created_ts, revoked_ts FROM tokens WHERE id = ?", (token_id,)
            ).fetchone()
        if row is None:
            raise TokenNotFoundError(f"no token with id {token_id}")
        return self._record(row)

    def revoke(self, token_id: str) -> TokenRecord:
        """Revoke a token (idempotent: revoking a revoked token keeps its first revocation time).

        Raises:
            TokenNotFoundError: no such token.
        """
        self.get(token_id)
        with self._transaction():
            self._conn.execute(
                "UPDATE tokens SET revoked_ts = ? WHERE id = ? AND revoked_ts IS NULL", (time.time(), token_id)
            )
        return self.get(token_id)

    def verify(self, token: str) -> TokenRecord:
        """Authenticate a presented bearer token.

        Raises:
            AuthenticationError: malformed, unknown, wrong or revoked token.
        """
        match = _TOKEN_RE.fullmatch(token) if isinstance(token, str) and len(token) < 256 else None
        if match is None:
            raise AuthenticationError("invalid API token")
        with self._lock:
            row = self._conn.execute(
                "SELECT id, name, scopes, created_ts, revoked_ts, token_hash FROM tokens WHERE id = ?",
                (match.group(1),),
            ).fetchone()
        stored = row[5] if row is not None else "0" * 64
        if not hmac.compare_digest(stored.encode("ascii"), _digest(token).encode("ascii")) or row is None:
            raise AuthenticationError("invalid API token")
        record = self._record(row[:5])
        if record.revoked:
            raise AuthenticationError("API token has been revoked")
        return record

    @staticmethod
    def _record(row: Sequence[object]) -> TokenRecord:
        token_id, name, scopes, created_ts, revoked_ts = row
        return TokenRecord(
            id=str(token_id),
            name=str(name),
            scopes=tuple(json.loads(str(scopes))),
            created_ts=float(created_ts),  # type: ignore[arg-type]
            revoked_ts=None if revoked_ts is None else float(revoked_ts),  # type: ignore[arg-type]
        )


class UnavailableTokenStore(TokenStore):
    """Stands in for a token store that could not be opened: every operation raises
    :class:`TokenStoreUnavailableError` naming the cause, so token callers get 503 (not 401) and callers
    identified by their uid, which never touch the store, are served as usual."""

    def __init__(self, path: Path, reason: str) -> None:  # no connection: nothing to lock or close
        self.path = path
        self.reason = reason

    def _unavailable(self) -> TokenStoreUnavailableError:
        return TokenStoreUnavailableError(
            f"API tokens are unavailable: {self.reason} (uid-authenticated socket callers are still served)"
        )

    def close(self) -> None:
        """Nothing to close."""

    def create(self, name: str, scopes: Iterable[str]) -> tuple[TokenRecord, str]:
        """Refused: :class:`TokenStoreUnavailableError`."""
        raise self._unavailable()

    def list(self, *, include_revoked: bool = True) -> list[TokenRecord]:
        """Refused: :class:`TokenStoreUnavailableError`."""
        raise self._unavailable()

    def get(self, token_id: str) -> TokenRecord:
        """Refused: :class:`TokenStoreUnavailableError`."""
        raise self._unavailable()

    def revoke(self, token_id: str) -> TokenRecord:
        """Refused: :class:`TokenStoreUnavailableError`."""
        raise self._unavailable()

    def verify(self, token: str) -> TokenRecord:
        """Refused: :class:`TokenStoreUnavailableError` (a token cannot be checked, so it is not accepted)."""
        raise self._unavailable()
