"""The install pipeline: a persisted state machine that survives ``kill -9`` at any point.

Steps (``installs.step``), each committed with its event before the next one starts::

    planned ─▶ copying ─▶ copied ─▶ verified ─▶ fsynced ─▶ renamed ─▶ activated ─▶ done
       │  (into partial/)  (sha256,  (length, sha256,  (partial    (blob in blobs/,   (active pointer
       │                    length)   format check)    fsynced)    dir fsynced,       flipped, events,
       │                                                           model staged)      one transaction)
       └──────────── failed (rejected: hash, format, space) · abandoned (source gone) · quarantined

Invariants:

- Nothing is copied before the free-space and quota check passes (:class:`~agent.errors.InsufficientSpaceError`).
- Only a file whose length and sha256 were verified, and which was fsynced, is renamed into ``blobs/``; only a
  blob becomes a model row; only a model row can be activated. The active model of a name is therefore always
  a complete, hash-verified blob: the old one until the activation transaction commits, the new one after.
- Every step is idempotent. :func:`recover_installs` (``Registry.recover``) resumes an install interrupted at or
  after ``copied`` (re-hashing the content first, since an un-fsynced file may have lost data), restarts one
  interrupted earlier from its source, or abandons it (deleting its partial file) if the source is gone.
- ``move`` (release downloads): the source is hard-linked into ``partial/`` instead of copied and its name is
  removed once ``copied`` is committed; the sha256 the caller verified is recorded without re-reading the file.
  With ``move`` the caller may also hand over the format facts it validated on exactly these bytes
  (``validated``: the release installer validates a GGUF header while the download arrives); ``verified`` then
  records them instead of parsing the header again. A resumption after a crash has neither: it re-hashes and
  re-validates.
- Crash-loop breaker: every start or resumption of an install increments ``installs.attempts`` in its own
  committed transaction. An install still unfinished at recovery crashed the agent once per attempt; when
  ``attempts`` reaches ``RegistryConfig.crash_quarantine_after`` it is quarantined instead of retried (and so
  is its content for that name, once its sha256 was verified: importing it again raises
  :class:`~agent.errors.QuarantinedError` until the quarantined version is removed).

Fault points (for tests): with ``EDGE_AGENT_FAULT=<point>`` (or ``<point>:<n>`` for the n-th hit in this
process) the process calls ``os._exit(86)`` at that point, as a ``kill -9`` would stop it. The points, in
pipeline order (:data:`FAULT_POINTS`):

==============  =====================================================================================
``planned``     install row committed; nothing copied yet
``copying``     after each chunk written to the partial file (``copying:3`` = after the third chunk); with
                ``move``, once, after the hard link
``copied``      partial complete, sha256 and length recorded, not yet verified or fsynced
``verified``    length, sha256 and format verified (step committed); not fsynced
``fsynced``     partial file and ``partial/`` fsynced (step committed)
``renaming``    blob renamed into ``blobs/`` and directory fsynced, but the database does not know yet
``renamed``     model row (staged) committed
``activating``  inside the activation transaction, before COMMIT (the flip must roll back entirely)
``activated``   activation committed; install not yet marked done
``done``        install marked done
==============  =====================================================================================
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from hashlib import sha256 as new_sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from agent.errors import (
    AgentError,
    InsufficientSpaceError,
    IntegrityError,
    InvalidModelError,
    ModelStateError,
    QuarantinedError,
    RegistryError,
)
from agent.registry.formats import ModelFacts, inspect_model
from protocols.limits import MODEL_NAME_RE, VARIANT_RE

if TYPE_CHECKING:
    from agent.registry.store import ModelRecord, Registry

log = structlog.get_logger(__name__)

__all__ = [
    "FAULT_ENV",
    "FAULT_EXIT_CODE",
    "FAULT_POINTS",
    "InstallRequest",
    "RecoveryReport",
    "fault_point",
    "plan_install",
    "recover_installs",
    "run_install",
]

FAULT_ENV = "EDGE_AGENT_FAULT"
FAULT_EXIT_CODE = 86
FAULT_POINTS = (
    "planned",
    "copying",
    "copied",
    "verified",
    "fsynced",
    "renaming",
    "renamed",
    "activating",
    "activated",
    "done",
)
TERMINAL_STEPS = ("done", "failed", "abandoned", "quarantined")
_CHUNK = 1 << 20
_MAX_ORIGIN = 256
_MAX_METADATA_BYTES = 64 * 1024
_MAX_VERSION = 2**53

_fault_hits: Counter[str] = Counter()
"""Hits per fault point in this process (a test seam: read only when ``EDGE_AGENT_FAULT`` is set)."""


def fault_point(name: str) -> None:
    """Exit the process with status 86 here if ``EDGE_AGENT_FAULT`` names this point (and hit count)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _fault_hits[name] += 1
    if _fault_hits[name] == (int(nth) if nth.isdigit() else 1):
        os._exit(FAULT_EXIT_CODE)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True, slots=True)
class InstallRequest:
    """A validated request to install a local file."""

    src: Path
    name: str
    variant: str
    version: int | None
    origin: str
    expected_sha256: str | None
    activate: bool
    metadata: dict[str, Any]

    @classmethod
    def build(
        cls,
        src: Path,
        *,
        name: str,
        variant: str,
        version: int | None,
        origin: str,
        expected_sha256: str | None,
        activate: bool,
        metadata: Mapping[str, Any] | None,
    ) -> InstallRequest:
        """Validate every caller-supplied field; names never reach a path, but must still be well-formed.

        Raises:
            InvalidModelError: a field is malformed.
        """
        if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name):
            raise InvalidModelError(
                f"invalid model name {_show(name)}: use 1-128 of a-z 0-9 . _ - starting with a letter or digit"
            )
        if not isinstance(variant, str) or not VARIANT_RE.fullmatch(variant):
            raise InvalidModelError(
                f"invalid variant {_show(variant)}: use 1-32 of a-z 0-9 . _ - starting with a letter or digit"
            )
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or not 0 <= version < _MAX_VERSION
        ):
            raise InvalidModelError(f"invalid version {_show(version)}: a non-negative integer is required")
        if not isinstance(origin, str) or not 0 < len(origin) <= _MAX_ORIGIN or not origin.isprintable():
            raise InvalidModelError(f"invalid origin {_show(origin)}")
        if expected_sha256 is not None:
            if not isinstance(expected_sha256, str) or len(expected_sha256) != 64:
                raise InvalidModelError(f"invalid expected sha256 {_show(expected_sha256)}")
            expected_sha256 = expected_sha256.lower()
            if any(c not in "0123456789abcdef" for c in expected_sha256):
                raise InvalidModelError(f"invalid expected sha256 {_show(expected_sha256)}")
        try:
            user = dict(metadata or {})
            encoded = json.dumps(user, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidModelError(f"metadata must be a JSON object: {exc}") from exc
        if len(encoded) > _MAX_METADATA_BYTES:
            raise InvalidModelError(f"metadata is larger than {_MAX_METADATA_BYTES} bytes")
        if not isinstance(src, str | os.PathLike) or "\x00" in os.fspath(src):
            raise InvalidModelError(f"invalid source path {_show(src)}")
        return cls(Path(src), name, variant, version, origin, expected_sha256, bool(activate), user)


@dataclass(slots=True)
class RecoveryReport:
    """What :func:`recover_installs` did (install ids or model refs)."""

    resumed: list[str] = field(default_factory=list)
    """Installs finished after an interruption (``name/variant/vN``)."""
    abandoned: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    """Installs whose resumption was rejected (hash, format or space), with the reason."""
    stale_partials: int = 0
    broken_models: list[str] = field(default_factory=list)
    """Active or previous models whose blob was missing or the wrong size, quarantined."""
    unreadable_models: list[str] = field(default_factory=list)
    """Live models whose blob could not be examined (``EACCES``, ``EIO``), with the reason; left as they are."""

    @property
    def changed(self) -> bool:
        """Recovery did anything at all."""
        return bool(
            self.resumed
            or self.abandoned
            or self.quarantined
            or self.failed
            or self.stale_partials
            or self.broken_models
        )


def _install_row(reg: Registry, install_id: str) -> dict[str, Any]:
    rows = reg._query("SELECT * FROM installs WHERE id = ?", [install_id])
    if not rows:
        raise RegistryError(f"no install {install_id}")
    return rows[0]


def _ref(row: Mapping[str, Any]) -> str:
    return f"{row['name']}/{row['variant']}/v{row['version']}"


def _quarantined_content(reg: Registry, name: str, sha256: str) -> Mapping[str, Any] | None:
    rows = reg._query(
        "SELECT * FROM models WHERE name = ? AND sha256 = ? AND state = 'quarantined' LIMIT 1", [name, sha256]
    )
    return rows[0] if rows else None


def _source_size(src: Path) -> int:
    """Length of a readable regular file (directories, FIFOs and devices are refused)."""
    try:
        st = os.stat(src)
    except OSError as exc:
        raise InvalidModelError(f"cannot read {src}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise InvalidModelError(f"{src} is not a regular file")
    if st.st_size == 0:
        raise InvalidModelError(f"{src} is empty")
    if not os.access(src, os.R_OK):
        raise InvalidModelError(f"cannot read {src}: permission denied")
    return st.st_size


def plan_install(reg: Registry, request: InstallRequest) -> str:
    """Check the request against the registry and the disk, then persist it as a ``planned`` install.

    Returns:
        The install id.

    Raises:
        InvalidModelError: unreadable source.
        QuarantinedError: the expected content is quarantined for this name.
        InsufficientSpaceError: not enough disk or quota.
        ModelStateError: the (name, variant, version) exists or is being installed.
    """
    size = _source_size(request.src)
    if request.expected_sha256 is not None:
        bad = _quarantined_content(reg, request.name, request.expected_sha256)
        if bad is not None:
            raise QuarantinedError(
                f"{_ref(bad)} with sha256 {request.expected_sha256[:12]} is quarantined: {bad['reason']}"
            )
    try:  # the partial copy needs the full size even if an identical blob exists already
        reg._check_space(size, f"{request.name}/{request.variant}")
    except InsufficientSpaceError as exc:
        with reg._transaction() as tx:
            tx.event(
                "install_refused",
                install={"id": None, "name": request.name, "variant": request.variant, "version": request.version},
                reason=str(exc),
                size=size,
            )
        raise
    install_id = uuid.uuid4().hex
    with reg._transaction() as tx:
        version = request.version
        if version is None:
            version = (
                tx.query(
                    "SELECT MAX(v) + 1 AS v FROM (SELECT MAX(version) AS v FROM models WHERE name = ? UNION ALL "
                    "SELECT MAX(version) FROM installs WHERE name = ? "
                    "AND step NOT IN ('done', 'failed', 'abandoned', 'quarantined'))",
                    [request.name, request.name],
                )[0]["v"]
                or 1
            )
        else:
            taken = tx.query(
                "SELECT 1 FROM models WHERE name = ? AND variant = ? AND version = ? AND state != 'removed'",
                [request.name, request.variant, version],
            )
            if taken:
                raise ModelStateError(f"{request.name}/{request.variant}/v{version} already exists")
        busy = tx.query(
            "SELECT id FROM installs WHERE name = ? AND variant = ? AND version = ? "
            "AND step NOT IN ('done', 'failed', 'abandoned', 'quarantined')",
            [request.name, request.variant, version],
        )
        if busy:
            raise ModelStateError(
                f"{request.name}/{request.variant}/v{version} is already being installed ({busy[0]['id']})"
            )
        row = {
            "id": install_id,
            "name": request.name,
            "variant": request.variant,
            "version": version,
            "origin": request.origin,
            "source": str(request.src.absolute()),
            "source_size": size,
            "expected_sha256": request.expected_sha256,
            "activate": int(request.activate),
            "user_metadata": json.dumps(request.metadata),
            "step": "planned",
            "attempts": 0,
            "created_ts": tx.ts,
            "updated_ts": tx.ts,
        }
        tx.execute(
            f"INSERT INTO installs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",  # noqa: S608 (own column names)
            list(row.values()),
        )
        tx.event("install_planned", install=row, source=row["source"], size=size, origin=request.origin)
    fault_point("planned")
    return install_id


def _set_step(reg: Registry, row: dict[str, Any], step: str, **changes: Any) -> dict[str, Any]:
    """Commit the install's next step (and any learnt values) with its event; return the updated row."""
    with reg._transaction() as tx:
        assignments = ", ".join(f"{column} = ?" for column in ("step", "updated_ts", *changes))
        tx.execute(
            f"UPDATE installs SET {assignments} WHERE id = ?",  # noqa: S608 (own column names)
            [step, tx.ts, *changes.values(), row["id"]],
        )
        event_data = {k: v for k, v in changes.items() if k in ("sha256", "size", "format", "error")}
        tx.event(f"install_{step}", install=row, **event_data)
    return {**row, "step": step, **changes}


def _move(reg: Registry, row: dict[str, Any], partial: Path) -> dict[str, Any] | None:
    """Hard-link a caller-verified source into ``partial/``, then drop the source's name; None if not possible.

    The caller vouches that the file's sha256 is ``expected_sha256`` (the release fetcher checked it, after
    fsync, a moment ago), so it is recorded without reading 100 MB again; the length is checked here. Crash
    safety is the copy's: the source keeps its name until ``copied`` is committed (a crash before that redoes
    the link, or copies), and a crash after it resumes from the partial file, re-hashed (:func:`_drive`).
    """
    src, total, expected = Path(row["source"]), row["source_size"], row["expected_sha256"]
    if expected is None:
        return None
    try:
        os.link(src, partial, follow_symlinks=False)
    except OSError:
        return None  # another filesystem, or no hard links: copy instead
    st = os.stat(partial, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode) or st.st_size != total:
        partial.unlink(missing_ok=True)
        raise IntegrityError(f"{src} changed since the install was planned (size {st.st_size}, was {total})")
    os.chmod(partial, 0o640)
    fault_point("copying")
    row = _set_step(reg, row, "copied", sha256=expected, size=total)
    src.unlink(missing_ok=True)  # the registry owns the content now; the partial is the only name
    fault_point("copied")
    return row


def _copy(
    reg: Registry, row: dict[str, Any], progress: Callable[[int, int], None] | None, *, move: bool = False
) -> dict[str, Any]:
    """(Re)copy the source into ``partial/``, hashing on the way (or move it: :func:`_move`)."""
    partial = reg._blobs.partial_path(row["id"])
    partial.unlink(missing_ok=True)
    src, total = Path(row["source"]), row["source_size"]
    if row["attempts"] > 1:  # a restart: the disk may have filled up since the plan
        reg._check_space(total, _ref(row))
    row = _set_step(reg, row, "copying")
    if move:
        moved = _move(reg, row, partial)
        if moved is not None:
            if progress is not None:
                progress(total, total)
            return moved
    digest, copied = new_sha256(), 0
    try:
        src_fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise InvalidModelError(f"cannot read {src}: {exc.strerror or exc}") from exc
    with os.fdopen(src_fd, "rb") as source:
        st = os.fstat(source.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size != total:
            raise IntegrityError(f"{src} changed since the install was planned (size {st.st_size}, was {total})")
        out_fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with os.fdopen(out_fd, "wb") as out:
            while block := source.read(_CHUNK):
                copied += len(block)
                if copied > total:
                    raise IntegrityError(f"{src} grew while it was being copied")
                out.write(block)
                digest.update(block)
                if progress is not None:
                    progress(copied, total)
                fault_point("copying")
    if copied != total:
        raise IntegrityError(f"{src} shrank while it was being copied ({copied} of {total} bytes)")
    row = _set_step(reg, row, "copied", sha256=digest.hexdigest(), size=copied)
    fault_point("copied")
    return row


def _verify(reg: Registry, row: dict[str, Any], validated: ModelFacts | None = None) -> dict[str, Any]:
    """Length, sha256 and format checks on the partial file (``validated``: the caller's, see ``move``)."""
    partial = reg._blobs.partial_path(row["id"])
    if row["size"] != row["source_size"]:
        raise IntegrityError(f"{_ref(row)}: copied {row['size']} bytes, expected {row['source_size']}")
    expected = row["expected_sha256"]
    if expected is not None and row["sha256"] != expected:
        raise IntegrityError(f"{_ref(row)}: the sha256 of the file is not the expected one")
    bad = _quarantined_content(reg, row["name"], row["sha256"])
    if bad is not None:
        raise QuarantinedError(f"{_ref(bad)} with sha256 {row['sha256'][:12]} is quarantined: {bad['reason']}")
    source = Path(row["source"])
    try:
        facts = validated if validated is not None else inspect_model(partial, suffix=source.suffix)
    except InvalidModelError as exc:
        raise InvalidModelError(f"{source.name}: {exc}") from exc
    payload = {
        "format": facts.format,
        "params": facts.params,
        "context_length": facts.context_length,
        "licence": facts.licence,
        "metadata": facts.metadata,
    }
    row = _set_step(reg, row, "verified", facts=json.dumps(payload), format=facts.format)
    fault_point("verified")
    return row


def _fsync(reg: Registry, row: dict[str, Any]) -> dict[str, Any]:
    from agent.registry.store import fsync_dir

    partial = reg._blobs.partial_path(row["id"])
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(reg._blobs.partial_dir)
    row = _set_step(reg, row, "fsynced")
    fault_point("fsynced")
    return row


def _rename(reg: Registry, row: dict[str, Any]) -> dict[str, Any]:
    """Move the verified partial into the blob store and record the model as ``staged``."""
    facts = json.loads(row["facts"])
    with reg._lock:
        partial = reg._blobs.partial_path(row["id"])
        if partial.exists():
            reg._blobs.commit_partial(partial, row["sha256"], row["size"])
        elif not reg._blobs.has_blob(row["sha256"], row["size"]):
            raise IntegrityError(f"{_ref(row)}: neither the partial file nor the blob exists")
        fault_point("renaming")
        with reg._transaction() as tx:
            metadata = {**json.loads(row["user_metadata"]), **facts["metadata"]}
            licence = facts["licence"] or metadata.get("licence") or metadata.get("license")
            model = {
                "name": row["name"],
                "variant": row["variant"],
                "version": row["version"],
                "format": facts["format"],
                "size": row["size"],
                "sha256": row["sha256"],
                "params": facts["params"],
                "context_length": facts["context_length"],
                "licence": licence if isinstance(licence, str) else None,
                "origin": row["origin"],
                "state": "staged",
                "created_ts": tx.ts,
                "updated_ts": tx.ts,
                "metadata": json.dumps(metadata),
                "blob": str(reg._blobs.blob_path(row["sha256"]).relative_to(reg.state_dir)),
                "install_id": row["id"],
            }
            cursor = tx.execute(
                f"INSERT INTO models ({', '.join(model)}) VALUES ({', '.join('?' * len(model))})",  # noqa: S608
                list(model.values()),
            )
            model_id = cursor.lastrowid
            tx.execute(
                "UPDATE installs SET step = 'renamed', model_id = ?, updated_ts = ? WHERE id = ?",
                [model_id, tx.ts, row["id"]],
            )
            tx.event("model_staged", model={**model, "id": model_id}, sha256=row["sha256"], size=row["size"])
            tx.event("install_renamed", install={**row, "model_id": model_id})
    fault_point("renamed")
    return {**row, "step": "renamed", "model_id": model_id}


def _activate(reg: Registry, row: dict[str, Any]) -> dict[str, Any]:
    with reg._transaction() as tx:
        target = tx.query("SELECT * FROM models WHERE id = ?", [row["model_id"]])[0]
        if target["state"] in ("staged", "previous"):
            reg._activate_in_tx(tx, target)
        tx.execute("UPDATE installs SET step = 'activated', updated_ts = ? WHERE id = ?", [tx.ts, row["id"]])
        tx.event("install_activated", install=row)
        fault_point("activating")
    fault_point("activated")
    return {**row, "step": "activated"}


def _content_intact(reg: Registry, row: Mapping[str, Any]) -> bool:
    """After a crash: the verified content is still in the partial file or already in its blob."""
    from agent.registry.store import sha256_file

    partial = reg._blobs.partial_path(row["id"])
    if partial.exists():
        return sha256_file(partial) == (row["sha256"], row["size"])
    return reg._blobs.blob_intact(row["sha256"], row["size"])


def _drive(
    reg: Registry,
    row: dict[str, Any],
    progress: Callable[[int, int], None] | None,
    *,
    move: bool = False,
    validated: ModelFacts | None = None,
) -> dict[str, Any]:
    resumed_at = row["step"]
    # ``copied`` too: a moved source has no other name, and an unsynced copy may have lost data
    if resumed_at in ("copied", "verified", "fsynced") and not _content_intact(reg, row):
        row["step"] = "planned"
    if resumed_at == "renamed" and not reg._blobs.blob_intact(row["sha256"], row["size"]):
        raise IntegrityError(f"{_ref(row)}: its blob is missing or damaged after a crash")
    fresh = row["step"] == "planned" and move  # the caller's file, moved in this call: its facts may be used
    if row["step"] in ("planned", "copying"):
        row = _copy(reg, row, progress, move=move)
    if row["step"] == "copied":
        row = _verify(reg, row, validated if fresh else None)
    if row["step"] == "verified":
        row = _fsync(reg, row)
    if row["step"] == "fsynced":
        row = _rename(reg, row)
    if row["step"] == "renamed" and row["activate"]:
        row = _activate(reg, row)
    if row["step"] in ("renamed", "activated"):
        row = _set_step(reg, row, "done")
        fault_point("done")
    return row


def _finish(reg: Registry, row: Mapping[str, Any], step: str, error: str) -> None:
    """End an install as ``failed`` or ``abandoned``: delete its partial file, record why."""
    reg._blobs.partial_path(row["id"]).unlink(missing_ok=True)
    with reg._transaction() as tx:
        tx.execute(
            "UPDATE installs SET step = ?, error = ?, updated_ts = ? WHERE id = ?",
            [step, error[:2000], tx.ts, row["id"]],
        )
        kind = {"failed": "install_rejected", "abandoned": "install_abandoned"}[step]
        tx.event(kind, install=row, reason=error[:2000], at_step=row["step"])


def run_install(
    reg: Registry,
    install_id: str,
    *,
    progress: Callable[[int, int], None] | None = None,
    move: bool = False,
    validated: ModelFacts | None = None,
) -> ModelRecord:
    """Drive an install from its persisted step to ``done``.

    ``move``: take the source file instead of copying it (:func:`_move`; only for a file whose sha256 the
    caller verified against the install's ``expected_sha256``). A resumption after a crash always copies.
    ``validated``: with ``move``, the format facts the caller validated on exactly these bytes (used instead
    of parsing the file again; see the module docstring).

    Returns:
        The installed model.

    Raises:
        IntegrityError, InvalidModelError, QuarantinedError, InsufficientSpaceError: the install was rejected
            (its step is then ``failed`` and its partial file deleted).
        RegistryError: an I/O error ended the install.
    """
    from agent.registry.store import _row_to_record, is_enospc

    reg._running.add(install_id)
    try:
        row = _install_row(reg, install_id)
        if row["step"] in TERMINAL_STEPS:
            raise ModelStateError(f"install {install_id} is already {row['step']}")
        with reg._transaction() as tx:
            tx.execute("UPDATE installs SET attempts = attempts + 1, updated_ts = ? WHERE id = ?", [tx.ts, install_id])
            tx.event("install_started", install=row, attempt=row["attempts"] + 1, step=row["step"])
        row["attempts"] += 1
        try:
            row = _drive(reg, row, progress, move=move, validated=validated)
        except (IntegrityError, InvalidModelError, QuarantinedError, InsufficientSpaceError) as exc:
            _finish(reg, _install_row(reg, install_id), "failed", str(exc))
            raise
        except OSError as exc:
            message = f"install of {_ref(row)} failed: {exc.strerror or exc}"
            _finish(reg, _install_row(reg, install_id), "failed", message)
            if is_enospc(exc):
                raise InsufficientSpaceError(message) from exc
            raise RegistryError(message) from exc
        return _row_to_record(reg._model_row(row["model_id"]))
    finally:
        reg._running.discard(install_id)


def _quarantine_install(reg: Registry, row: Mapping[str, Any], reason: str) -> None:
    """Stop a crash loop: the install ends ``quarantined``; its content, once known, is quarantined too."""
    reg._blobs.partial_path(row["id"]).unlink(missing_ok=True)
    with reg._transaction() as tx:
        tx.execute(
            "UPDATE installs SET step = 'quarantined', error = ?, updated_ts = ? WHERE id = ?",
            [reason, tx.ts, row["id"]],
        )
        tx.event("install_quarantined", install=row, reason=reason, at_step=row["step"], attempts=row["attempts"])
        if row["model_id"] is not None:
            model = tx.query("SELECT * FROM models WHERE id = ?", [row["model_id"]])[0]
            if model["state"] not in ("quarantined", "removed"):
                reg._quarantine_in_tx(tx, model, reason)
        elif row["facts"] is not None:
            facts = json.loads(row["facts"])
            taken = tx.query(
                "SELECT 1 FROM models WHERE name = ? AND variant = ? AND version = ? AND state != 'removed'",
                [row["name"], row["variant"], row["version"]],
            )
            if not taken:
                model = {
                    "name": row["name"],
                    "variant": row["variant"],
                    "version": row["version"],
                    "format": facts["format"],
                    "size": row["size"],
                    "sha256": row["sha256"],
                    "params": facts["params"],
                    "context_length": facts["context_length"],
                    "licence": facts["licence"],
                    "origin": row["origin"],
                    "state": "quarantined",
                    "reason": reason,
                    "created_ts": tx.ts,
                    "updated_ts": tx.ts,
                    "metadata": json.dumps(facts["metadata"]),
                    "blob": str(reg._blobs.blob_path(row["sha256"]).relative_to(reg.state_dir)),
                    "install_id": row["id"],
                }
                cursor = tx.execute(
                    f"INSERT INTO models ({', '.join(model)}) VALUES ({', '.join('?' * len(model))})",  # noqa: S608
                    list(model.values()),
                )
                tx.event("model_quarantined", model={**model, "id": cursor.lastrowid}, reason=reason)


def recover_installs(reg: Registry) -> RecoveryReport:
    """Bring the registry back to a clean state after a crash (see the module docstring)."""
    report = RecoveryReport()
    limit = max(1, reg.config.crash_quarantine_after)
    unfinished = reg._query(
        "SELECT * FROM installs WHERE step NOT IN ('done', 'failed', 'abandoned', 'quarantined') ORDER BY created_ts"
    )
    for row in unfinished:
        if row["id"] in reg._running:
            continue
        ref = _ref(row)
        if row["attempts"] >= limit:
            reason = f"install crashed the agent {row['attempts']} times (at step {row['step']})"
            _quarantine_install(reg, row, reason)
            report.quarantined.append(ref)
            continue
        needs_source = row["step"] in ("planned", "copying") or (
            row["step"] in ("copied", "verified", "fsynced") and not _content_intact(reg, row)
        )
        if needs_source:
            try:
                _source_size(Path(row["source"]))
                available = os.stat(row["source"]).st_size == row["source_size"]
            except InvalidModelError:
                available = False
            if not available:
                _finish(reg, row, "abandoned", "interrupted before verification and the source is gone")
                report.abandoned.append(ref)
                continue
        try:
            run_install(reg, row["id"])
            report.resumed.append(ref)
        except AgentError as exc:
            report.failed.append(f"{ref}: {exc}")

    # partial files that no unfinished install owns
    live = {
        r["id"]
        for r in reg._query("SELECT id FROM installs WHERE step NOT IN ('done', 'failed', 'abandoned', 'quarantined')")
    } | reg._running
    for entry in reg._blobs.partial_names():
        if entry.removesuffix(".part") not in live:
            reg._blobs.delete(reg._blobs.partial_dir / entry)
            report.stale_partials += 1

    # live models whose blob vanished or was truncated cannot be served: quarantine them
    for model in reg._query("SELECT * FROM models WHERE state IN ('staged', 'active', 'previous')"):
        try:
            present = reg._blobs.has_blob(model["sha256"], model["size"])
        except RegistryError as exc:
            # EACCES/EIO: unknown is not missing. Quarantine is persistent, so a permission slip fixed by the
            # operator must not cost the model its release; loading it will fail (and say why) until then.
            log.warning("registry.blob_unreadable", model=_ref(model), reason=str(exc))
            report.unreadable_models.append(f"{_ref(model)}: {exc}")
            continue
        if not present:
            reason = "blob missing or wrong size at recovery"
            log.warning("registry.model_quarantined", model=_ref(model), sha256=model["sha256"], reason=reason)
            with reg._transaction() as tx:
                reg._quarantine_in_tx(tx, model, reason)
            report.broken_models.append(_ref(model))
    return report
