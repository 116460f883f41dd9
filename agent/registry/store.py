"""The content-addressed blob store and the :class:`Registry`: the agent's models on disk and in SQLite.

Layout of the state directory::

    registry.db             SQLite (see agent.registry.schema)
    registry.lock           flock held by the one process that has the registry open
    blobs/sha256/<hex>      complete, hash-verified model files, read-only, named by their sha256
    partial/<install>.part  files being copied in; never used by anything but the install pipeline

Invariants:

- A file is in ``blobs/`` only if its sha256 was verified and it was fsynced before the ``rename`` that put it
  there; the directory is fsynced after. A model row in state ``staged``, ``active`` or ``previous`` refers to
  such a blob, so the active model for a name is always a complete, verified file (old or new), never a
  partial one.
- At most one row per name is ``active`` (enforced by a unique index as well as by the code).
- Every change of a model's or an install's state is one ``BEGIN IMMEDIATE`` transaction that also appends
  its event rows (:meth:`Registry._transaction`); a transaction that writes without recording an event is a
  bug and is rolled back.
- Files are deleted only after the transaction that stops referencing them has committed: a crash leaves an
  orphan (collected by :meth:`Registry.gc`), never a dangling reference.
- One process at a time has a registry open (``registry.lock``); inside it, the class is thread-safe: one
  SQLite connection behind a lock, and one heavy operation (import, recovery, GC) at a time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import sqlite_utils

from agent.config import RegistryConfig
from agent.errors import (
    InsufficientSpaceError,
    ModelNotFoundError,
    ModelStateError,
    QuarantinedError,
    RegistryError,
)
from agent.registry import gc as _gc
from agent.registry import install as _install
from agent.registry import loads as _loads
from agent.registry.formats import ModelFacts
from agent.registry.schema import append_event, open_database

__all__ = [
    "BlobStore",
    "ModelEvent",
    "ModelRecord",
    "Registry",
    "atomic_write_bytes",
    "fsync_dir",
    "sha256_file",
]

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
LIVE_STATES = ("staged", "active", "previous")
"""States whose blob must exist and is kept by garbage collection."""


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename or unlink in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write a file atomically: temp file in the same directory, fsync, ``os.replace``, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256_file(path: Path) -> tuple[str, int]:
    """The sha256 (hex) and length of a file."""
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256")
        size = f.tell()
    return digest.hexdigest(), size


@dataclass(frozen=True, slots=True)
class ModelRecord:
    """One model (name, variant, version) as the registry knows it."""

    id: int
    name: str
    variant: str
    version: int
    format: str
    size: int
    sha256: str
    params: int | None
    context_length: int | None
    licence: str | None
    origin: str
    state: str
    created_ts: float
    updated_ts: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """``name/variant/vN``: how messages and logs name this model."""
        return f"{self.name}/{self.variant}/v{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ModelEvent:
    """One row of the append-only model event log."""

    seq: int
    ts: float
    kind: str
    actor: str
    model_id: int | None
    install_id: str | None
    name: str | None
    variant: str | None
    version: int | None
    data: dict[str, Any]


class BlobStore:
    """Content-addressed files under ``state_dir``: ``blobs/sha256/<hex>`` and ``partial/``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / "blobs" / "sha256"
        self.partial_dir = root / "partial"

    def ensure_layout(self) -> None:
        """Create the directories (mode 0750) if missing."""
        for directory in (self.root, self.blobs_dir.parent, self.blobs_dir, self.partial_dir):
            directory.mkdir(mode=0o750, parents=True, exist_ok=True)

    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this sha256 lives (whether or not it exists)."""
        if not _SHA256_RE.fullmatch(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.blobs_dir / sha256

    def partial_path(self, install_id: str) -> Path:
        """The partial file of an install."""
        return self.partial_dir / f"{install_id}.part"

    def has_blob(self, sha256: str, size: int) -> bool:
        """A regular file of the right size is at the blob's address.

        Raises:
            RegistryError: the blob's address cannot be examined (``EACCES``, ``EIO``, ...): whether the blob is
                there is unknown, which is not the same as missing.
        """
        path = self.blob_path(sha256)
        try:
            st = os.stat(path, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise RegistryError(f"cannot examine blob {path}: {exc.strerror or exc}") from exc
        return stat.S_ISREG(st.st_mode) and st.st_size == size

    def blob_intact(self, sha256: str, size: int) -> bool:
        """The blob exists and its content hashes to its name (reads the whole file)."""
        if not self.has_blob(sha256, size):
            return False
        return sha256_file(self.blob_path(sha256)) == (sha256, size)

    def blob_names(self) -> list[str]:
        """Names of the files in ``blobs/sha256`` (normally sha256 digests)."""
        return sorted(e.name for e in os.scandir(self.blobs_dir) if not e.is_dir(follow_symlinks=False))

    def partial_names(self) -> list[str]:
        """Names of the files in ``partial/``."""
        return sorted(e.name for e in os.scandir(self.partial_dir) if not e.is_dir(follow_symlinks=False))

    def usage_bytes(self) -> int:
        """Bytes held by blobs and partial files."""
        total = 0
        for directory in (self.blobs_dir, self.partial_dir):
            for entry in os.scandir(directory):
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat(follow_symlinks=False).st_size
        return total

    def commit_partial(self, partial: Path, sha256: str, size: int) -> Path:
        """Move a verified, fsynced partial file to its blob address (read-only), then fsync both dirs.

        If an identical blob is already there (same content address and length) the partial is dropped.
        """
        target = self.blob_path(sha256)
        if self.has_blob(sha256, size):
            partial.unlink(missing_ok=True)
        else:
            os.chmod(partial, 0o444)
            os.replace(partial, target)
        fsync_dir(self.blobs_dir)
        fsync_dir(self.partial_dir)
        return target

    def delete(self, path: Path) -> int:
        """Delete a blob store file; return the bytes freed (0 if it was already gone)."""
        try:
            size = os.stat(path, follow_symlinks=False).st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size


_T = TypeVar("_T")


class _Tx:
    """An open ``BEGIN IMMEDIATE`` transaction: writes and the events that record them."""

    def __init__(self, db: sqlite_utils.Database, ts: float) -> None:
        self.db = db
        self.ts = ts
        self.writes = 0
        self.events = 0

    def execute(self, sql: str, params: Any = ()) -> Any:
        self.writes += 1
        return self.db.execute(sql, params)

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        return list(self.db.query(sql, params))

    def event(
        self,
        kind: str,
        *,
        model: Mapping[str, Any] | None = None,
        install: Mapping[str, Any] | None = None,
        **data: Any,
    ) -> None:
        source = model if model is not None else install
        append_event(
            self.db,
            kind,
            ts=self.ts,
            model_id=model["id"] if model is not None else (install or {}).get("model_id"),
            install_id=install["id"] if install is not None else (model or {}).get("install_id"),
            name=source["name"] if source is not None else None,
            variant=source["variant"] if source is not None else None,
            version=source["version"] if source is not None else None,
            data=data,
        )
        self.events += 1


def _row_to_record(row: Mapping[str, Any]) -> ModelRecord:
    return ModelRecord(
        id=row["id"],
        name=row["name"],
        variant=row["variant"],
        version=row["version"],
        format=row["format"],
        size=row["size"],
        sha256=row["sha256"],
        params=row["params"],
        context_length=row["context_length"],
        licence=row["licence"],
        origin=row["origin"],
        state=row["state"],
        created_ts=row["created_ts"],
        updated_ts=row["updated_ts"],
        metadata=json.loads(row["metadata"]),
    )


def _show(value: object) -> str:
    """``repr`` cut to 60 characters: hostile names never flood a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(name: str, variant: str | None, version: int | None) -> str:
    parts = [
        f"variant {_show(variant)}" if variant is not None else "",
        f"version {version}" if version is not None else "",
    ]
    detail = ", ".join(p for p in parts if p)
    return _show(name) + (f" ({detail})" if detail else "")


class Registry:
    """The agent's model registry: SQLite records plus the content-addressed blob store.

    Plain and synchronous: the async daemon calls it from one writer thread. Open with :meth:`open`, then call
    :meth:`recover` once before installing anything (it finishes or abandons installs a crash interrupted).
    """

    def __init__(self, state_dir: Path, config: RegistryConfig, db: sqlite_utils.Database, lock_fd: int) -> None:
        self.state_dir = state_dir
        self.config = config
        self._db = db
        self._lock_fd = lock_fd
        self._blobs = BlobStore(state_dir)
        self._lock = threading.RLock()
        self._heavy = threading.Lock()
        self._running: set[str] = set()
        self._closed = False

    # --- lifecycle ----------------------------------------------------------------------------------------

    @classmethod
    def open(cls, state_dir: Path, config: RegistryConfig) -> Registry:
        """Open the registry in ``state_dir`` (created if missing), taking its process lock.

        Raises:
            RegistryError: another process has the registry open, or the directory is unusable.
        """
        state_dir = Path(state_dir)
        blobs = BlobStore(state_dir)
        try:
            blobs.ensure_layout()
            lock_fd = os.open(state_dir / "registry.lock", os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as exc:
            raise RegistryError(f"cannot use state directory {state_dir}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(lock_fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(lock_fd)
            raise RegistryError(
                f"the registry in {state_dir} is in use by another process (pid {holder}); "
                "stop it or go through the agent's socket"
            ) from None
        try:
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
            db = open_database(state_dir / "registry.db")
        except sqlite3.DatabaseError as exc:
            os.close(lock_fd)
            raise RegistryError(f"the registry database in {state_dir} is unusable: {exc}") from exc
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(state_dir, config, db, lock_fd)

    def close(self) -> None:
        """Close the database and release the process lock (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._db.conn.close()
            os.close(self._lock_fd)

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- internals shared with install.py and gc.py -------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[_Tx]:
        """One ``BEGIN IMMEDIATE`` transaction; commits on success, rolls back on any exception."""
        with self._lock:
            if self._closed:
                raise RegistryError("the registry is closed")
            self._db.execute("BEGIN IMMEDIATE")
            tx = _Tx(self._db, time.time())
            try:
                yield tx
                if tx.writes and not tx.events:
                    raise RuntimeError("a registry transaction changed state without recording an event")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def run_in_transaction(self, fn: Callable[[sqlite_utils.Database], _T]) -> _T:
        """Run ``fn(db)`` in one ``BEGIN IMMEDIATE`` transaction (the audit log's own writes)."""
        with self._lock:
            if self._closed:
                raise RegistryError("the registry is closed")
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    def query_readonly(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        """Rows of a read-only query (the audit log's reads)."""
        return self._query(sql, params)

    def _query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        with self._lock:
            if self._closed:
                raise RegistryError("the registry is closed")
            return list(self._db.query(sql, params))

    def _model_row(self, model_id: int) -> dict[str, Any]:
        rows = self._query("SELECT * FROM models WHERE id = ?", [model_id])
        if not rows:
            raise ModelNotFoundError(f"no model with id {model_id}")
        return rows[0]

    def _referenced_sha256(self) -> set[str]:
        """Blobs that must be kept: live models and installs in flight."""
        rows = self._query(
            "SELECT sha256 FROM models WHERE state IN ('staged', 'active', 'previous') "
            "UNION SELECT sha256 FROM installs WHERE sha256 IS NOT NULL AND step NOT IN "
            "('done', 'failed', 'abandoned', 'quarantined')"
        )
        return {row["sha256"] for row in rows}

    def _delete_unreferenced_blob(self, sha256: str) -> int:
        """Delete a blob unless something still refers to it; return the bytes freed."""
        with self._lock:
            if sha256 in self._referenced_sha256():
                return 0
            freed = self._blobs.delete(self._blobs.blob_path(sha256))
            if freed:
                fsync_dir(self._blobs.blobs_dir)
            return freed

    def check_space(self, needed: int, what: str) -> None:
        """Raise ``InsufficientSpaceError`` unless ``needed`` more bytes fit the free-space floor and quota.

        For callers that must refuse *before* fetching anything (release delivery).
        """
        self._check_space(needed, what)

    def _check_space(self, needed: int, what: str) -> None:
        """Refuse (before any byte is copied) when ``needed`` bytes would break the free-space floor or quota."""
        free = shutil.disk_usage(self.state_dir).free
        floor = self.config.min_free_bytes
        if free - needed < floor:
            raise InsufficientSpaceError(
                f"not enough disk space for {what}: it needs {needed} bytes and {floor} must stay free, "
                f"but only {free} bytes are free in {self.state_dir}"
            )
        quota = self.config.disk_quota_bytes
        if quota is not None:
            used = self._blobs.usage_bytes()
            if used + needed > quota:
                raise InsufficientSpaceError(
                    f"disk quota exceeded for {what}: blobs use {used} bytes, it needs {needed} more, the quota "
                    f"is {quota} bytes (run `edge-agent models gc` or raise registry.disk_quota_bytes)"
                )

    def _activate_in_tx(self, tx: _Tx, target: Mapping[str, Any], *, kind: str = "model_activated") -> None:
        """Make ``target`` the active model of its name inside ``tx``; the old active one becomes previous."""
        current = tx.query("SELECT * FROM models WHERE name = ? AND state = 'active'", [target["name"]])
        if current and current[0]["id"] == target["id"]:
            return
        if current:
            tx.execute("UPDATE models SET state = 'previous', updated_ts = ? WHERE id = ?", [tx.ts, current[0]["id"]])
            tx.event("model_deactivated", model=current[0], next=target["id"])
        seq = tx.query(
            "SELECT COALESCE(MAX(activation_seq), 0) + 1 AS seq FROM models WHERE name = ?", [target["name"]]
        )[0]["seq"]
        tx.execute(
            "UPDATE models SET state = 'active', activation_seq = ?, updated_ts = ? WHERE id = ?",
            [seq, tx.ts, target["id"]],
        )
        tx.event(kind, model=target, replaced=current[0]["id"] if current else None)

    def _select(
        self, name: str, variant: str | None, version: int | None, *, include_removed: bool = False
    ) -> list[dict[str, Any]]:
        sql = "SELECT * FROM models WHERE name = ?"
        params: list[Any] = [name]
        if variant is not None:
            sql += " AND variant = ?"
            params.append(variant)
        if version is not None:
            sql += " AND version = ?"
            params.append(version)
        if not include_removed:
            sql += " AND state != 'removed'"
        return self._query(sql + " ORDER BY version DESC, variant, id DESC", params)

    def _resolve(self, name: str, variant: str | None, version: int | None) -> dict[str, Any]:
        """The one model row a (name, variant, version) selector means.

        With neither variant nor version: the active model, else the latest version. Otherwise the highest
        version that matches; several variants at that version without ``variant`` is ambiguous.
        """
        if not isinstance(name, str) or not name:
            raise ModelNotFoundError("a model name is required")
        rows = self._select(name, variant, version)
        if not rows:
            raise ModelNotFoundError(f"no model {_describe(name, variant, version)}")
        if variant is None and version is None:
            active = [r for r in rows if r["state"] == "active"]
            if active:
                return active[0]
        top = [r for r in rows if r["version"] == rows[0]["version"]]
        if len(top) > 1 and variant is None:
            active = [r for r in top if r["state"] == "active"]
            if active:
                return active[0]
            variants = ", ".join(sorted(r["variant"] for r in top))
            raise ModelStateError(
                f"model {name!r} version {rows[0]['version']} has several variants ({variants}); pick one"
            )
        return top[0]

    # --- public API ---------------------------------------------------------------------------------------

    def import_file(
        self,
        src: Path,
        *,
        name: str,
        variant: str,
        version: int | None = None,
        origin: str = "import",
        expected_sha256: str | None = None,
        activate: bool = True,
        metadata: Mapping[str, Any] | None = None,
        progress: Callable[[int, int], None] | None = None,
        move: bool = False,
        validated: ModelFacts | None = None,
    ) -> ModelRecord:
        """Install a local model file through the install pipeline (copy, verify, fsync, rename, activate).

        Args:
            src: the model file (GGUF or ONNX; the format is inferred from its content and extension).
            name: model family name (``protocols.limits.MODEL_NAME_RE``).
            variant: variant name (``protocols.limits.VARIANT_RE``).
            version: version number; ``None`` = one more than the highest version of ``name``.
            origin: where the file came from (``import``, a release id, ...).
            expected_sha256: refuse the file unless its sha256 is this.
            activate: make it the active model of ``name`` once installed.
            metadata: extra JSON-able facts to record (validated format facts take precedence).
            progress: called with (bytes copied, total bytes) while copying.
            move: the registry takes ``src`` (hard link, then the source name is removed) instead of copying it,
                when it is on the same filesystem. Only for a file the caller has just verified and fsynced
                against ``expected_sha256`` (a release download): its content is then not hashed again here.
            validated: only with ``move``: the facts :func:`~agent.registry.formats.inspect_gguf_file` (or
                ``inspect_model``) returned for exactly this content, validated by the caller while the file
                arrived; the header is then not parsed again (a crash-resumed install re-validates).

        Returns:
            The installed model.

        Raises:
            InvalidModelError: bad name/variant/version/metadata, unreadable source, or not a valid model.
            IntegrityError: the sha256 differs from ``expected_sha256`` or the source changed while copying.
            InsufficientSpaceError: not enough free disk or quota (checked before any byte is copied).
            QuarantinedError: this content is quarantined for this name.
            ModelStateError: that (name, variant, version) exists already or is being installed.
        """
        request = _install.InstallRequest.build(
            src,
            name=name,
            variant=variant,
            version=version,
            origin=origin,
            expected_sha256=expected_sha256,
            activate=activate,
            metadata=metadata,
        )
        with self._heavy:
            install_id = _install.plan_install(self, request)
            return _install.run_install(self, install_id, progress=progress, move=move, validated=validated)

    def list_models(self, name: str | None = None, *, include_removed: bool = False) -> list[ModelRecord]:
        """Models ordered by name, then version (newest first), then variant."""
        sql = "SELECT * FROM models WHERE 1 = 1"
        params: list[Any] = []
        if name is not None:
            sql += " AND name = ?"
            params.append(name)
        if not include_removed:
            sql += " AND state != 'removed'"
        rows = self._query(sql + " ORDER BY name, version DESC, variant, id DESC", params)
        return [_row_to_record(row) for row in rows]

    def quarantine_reason(self, name: str, variant: str | None = None) -> str | None:
        """Why the newest version of ``name`` (of ``variant``, if given) is quarantined; None if it is not."""
        rows = self._select(name, variant, None)
        if not rows or rows[0]["state"] != "quarantined":
            return None
        row = rows[0]
        return f"{row['name']}/{row['variant']}/v{row['version']} is quarantined: {row['reason'] or 'no reason given'}"

    def get(self, name: str, variant: str | None = None, version: int | None = None) -> ModelRecord:
        """The model a selector means (see :meth:`_resolve`); removed models are not found.

        Raises:
            ModelNotFoundError: nothing matches.
            ModelStateError: the selector is ambiguous (several variants).
        """
        return _row_to_record(self._resolve(name, variant, version))

    def active(self, name: str) -> ModelRecord | None:
        """The active model of ``name``, if any."""
        rows = self._query("SELECT * FROM models WHERE name = ? AND state = 'active'", [name])
        return _row_to_record(rows[0]) if rows else None

    def active_models(self) -> list[ModelRecord]:
        """Every active model, by name."""
        rows = self._query("SELECT * FROM models WHERE state = 'active' ORDER BY name")
        return [_row_to_record(row) for row in rows]

    def blob_path(self, record: ModelRecord) -> Path:
        """Path of the model's blob (exists for staged, active and previous models)."""
        return self._blobs.blob_path(record.sha256)

    def activate(self, name: str, variant: str | None = None, version: int | None = None) -> ModelRecord:
        """Make a staged or previous model the active one of its name (the old one becomes previous).

        Raises:
            ModelNotFoundError: nothing matches.
            QuarantinedError: the model is quarantined.
            ModelStateError: its blob is missing or damaged.
        """
        with self._lock:
            target = self._resolve(name, variant, version)
            if target["state"] == "quarantined":
                raise QuarantinedError(f"{_row_to_record(target).ref} is quarantined: {target['reason']}")
            if target["state"] == "active":
                return _row_to_record(target)
            if not self._blobs.has_blob(target["sha256"], target["size"]):
                raise ModelStateError(f"{_row_to_record(target).ref} cannot be activated: its blob is missing")
            with self._transaction() as tx:
                self._activate_in_tx(tx, target)
            return _row_to_record(self._model_row(target["id"]))

    def rollback(self, name: str) -> ModelRecord:
        """Re-activate the most recently active ``previous`` model of ``name`` (instant: its blob is kept).

        The model rolled back from becomes ``staged`` (so a second rollback goes further back).

        Raises:
            ModelStateError: there is no previous model to roll back to.
        """
        with self._lock:
            rows = self._query(
                "SELECT * FROM models WHERE name = ? AND state = 'previous' "
                "ORDER BY activation_seq DESC, id DESC LIMIT 1",
                [name],
            )
            if not rows:
                raise ModelStateError(f"model {_show(name)} has no previous version to roll back to")
            target = rows[0]
            if not self._blobs.has_blob(target["sha256"], target["size"]):
                raise ModelStateError(f"cannot roll back to {_row_to_record(target).ref}: its blob is missing")
            with self._transaction() as tx:
                current = tx.query("SELECT * FROM models WHERE name = ? AND state = 'active'", [name])
                if current:
                    tx.execute(
                        "UPDATE models SET state = 'staged', updated_ts = ? WHERE id = ?",
                        [tx.ts, current[0]["id"]],
                    )
                    tx.event("model_deactivated", model=current[0], rolled_back=True)
                seq = tx.query("SELECT COALESCE(MAX(activation_seq), 0) + 1 AS seq FROM models WHERE name = ?", [name])[
                    0
                ]["seq"]
                tx.execute(
                    "UPDATE models SET state = 'active', activation_seq = ?, updated_ts = ? WHERE id = ?",
                    [seq, tx.ts, target["id"]],
                )
                tx.event("model_rolled_back", model=target, replaced=current[0]["id"] if current else None)
            return _row_to_record(self._model_row(target["id"]))

    def remove(
        self, name: str, variant: str | None = None, version: int | None = None, *, force: bool = False
    ) -> list[ModelRecord]:
        """Remove every model of ``name`` matching ``variant`` and ``version`` (all of them when omitted).

        Their blobs are deleted once nothing else refers to them.

        Args:
            name: model name.
            variant: only this variant.
            version: only this version.
            force: also remove the active model (the name then has no active model).

        Returns:
            The records removed (as they were before removal).

        Raises:
            ModelNotFoundError: nothing matches.
            ModelStateError: the selection includes the active model and ``force`` is false.
        """
        with self._lock:
            rows = self._select(name, variant, version)
            if not rows:
                raise ModelNotFoundError(f"no model {_describe(name, variant, version)}")
            active = [r for r in rows if r["state"] == "active"]
            if active and not force:
                raise ModelStateError(
                    f"{_row_to_record(active[0]).ref} is active; activate another version first or use force"
                )
            with self._transaction() as tx:
                for row in rows:
                    tx.execute("UPDATE models SET state = 'removed', updated_ts = ? WHERE id = ?", [tx.ts, row["id"]])
                    tx.event("model_removed", model=row, previous_state=row["state"], forced=bool(active))
            for sha in {row["sha256"] for row in rows}:
                self._delete_unreferenced_blob(sha)
            return [_row_to_record(row) for row in rows]

    def quarantine(self, record: ModelRecord, reason: str) -> ModelRecord:
        """Quarantine a model (failed health check, crash loop): it can no longer be activated.

        If it is the active model, the most recent previous model is activated in the same transaction (if
        there is none, the name has no active model).
        """
        with self._lock:
            row = self._model_row(record.id)
            if row["state"] in ("quarantined", "removed"):
                return _row_to_record(row)
            with self._transaction() as tx:
                self._quarantine_in_tx(tx, row, reason[:1000])
            return _row_to_record(self._model_row(record.id))

    def _quarantine_in_tx(self, tx: _Tx, row: Mapping[str, Any], reason: str) -> None:
        tx.execute(
            "UPDATE models SET state = 'quarantined', reason = ?, updated_ts = ? WHERE id = ?",
            [reason, tx.ts, row["id"]],
        )
        tx.event("model_quarantined", model=row, reason=reason, previous_state=row["state"])
        if row["state"] == "active":
            previous = tx.query(
                "SELECT * FROM models WHERE name = ? AND state = 'previous' "
                "ORDER BY activation_seq DESC, id DESC LIMIT 1",
                [row["name"]],
            )
            if previous and self._blobs.has_blob(previous[0]["sha256"], previous[0]["size"]):
                tx.execute(
                    "UPDATE models SET state = 'active', updated_ts = ? WHERE id = ?", [tx.ts, previous[0]["id"]]
                )
                tx.event("model_rolled_back", model=previous[0], replaced=row["id"], reason="quarantine")

    def gc(self) -> _gc.GcResult:
        """Garbage-collect by policy: keep active + ``keep_previous`` per name, honour the disk quota, delete
        orphan blobs and stale partial files (see :mod:`agent.registry.gc`)."""
        with self._heavy:
            return _gc.collect_garbage(self)

    def recover(self) -> _install.RecoveryReport:
        """Finish, resume or abandon installs a crash interrupted; quarantine crash loops (of installs and of
        loads, :mod:`agent.registry.loads`); drop stale partials.

        Call once after :meth:`open`, before anything else changes the registry.
        """
        with self._heavy:
            report = _install.recover_installs(self)
            _loads.recover_loads(self, report)
            return report

    def begin_load(self, name: str, sha256: str) -> None:
        """Record durably that the engine starts loading ``(name, sha256)`` (see :mod:`agent.registry.loads`)."""
        _loads.begin_load(self, name, sha256)

    def end_load(self, name: str, sha256: str) -> None:
        """The load of ``(name, sha256)`` ended without killing the agent (loaded, or cleanly refused)."""
        _loads.end_load(self, name, sha256)

    def events(self, limit: int = 100, *, name: str | None = None) -> list[ModelEvent]:
        """The last ``limit`` events (optionally of one model name), oldest first."""
        limit = max(0, min(int(limit), 10_000))
        sql = "SELECT * FROM model_events"
        params: list[Any] = []
        if name is not None:
            sql += " WHERE name = ?"
            params.append(name)
        rows = self._query(sql + " ORDER BY seq DESC LIMIT ?", [*params, limit])
        return [
            ModelEvent(
                seq=r["seq"],
                ts=r["ts"],
                kind=r["kind"],
                actor=r["actor"],
                model_id=r["model_id"],
                install_id=r["install_id"],
                name=r["name"],
                variant=r["variant"],
                version=r["version"],
                data=json.loads(r["data"]),
            )
            for r in reversed(rows)
        ]

    def installs(self, *, unfinished_only: bool = False) -> list[dict[str, Any]]:
        """Install state machine rows (newest first), for status displays and tests."""
        sql = "SELECT * FROM installs"
        if unfinished_only:
            sql += " WHERE step NOT IN ('done', 'failed', 'abandoned', 'quarantined')"
        return self._query(sql + " ORDER BY created_ts DESC")


def is_enospc(exc: OSError) -> bool:
    """The OS said the disk (or quota) is full."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)
