"""The controller's TUF release repository (python-tuf Metadata API): keys, targets, signing, publishing.

Layout under ``<home>/repo`` (DESIGN.md §4)::

    metadata/<N>.root.json  <N>.targets.json  <N>.snapshot.json  timestamp.json   (consistent snapshots)
    keys/<role>/<keyid>.pem  (0600)   Ed25519 signing keys; root and targets keys may be moved off this machine
    blobs/sha256/<hex>                the published model files, content-addressed
    pending.json                      targets added with ``model add`` and not yet published

Invariants:

- Every metadata file is written atomically and never rewritten: a new version is a new file (``timestamp.json``
  is the only unversioned one). The latest version of a role is the highest ``<N>.<role>.json``.
- ``publish`` signs, in order, targets → snapshot → timestamp; each is written only after the one it names, so a
  reader of the directory never sees metadata naming a version that does not exist.
- A new root is signed by the threshold of the *old* root's keys and of its own keys (TUF §5.3.4), so devices
  accept it; a key rotation of any role goes through a new root.
- A target's blob is copied into ``blobs/`` before the target is recorded as pending, and a published target's
  blob is never deleted here.

Errors: :class:`ReleaseError` (a ``ControllerError``) for everything an operator can cause.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.metadata import (
    TOP_LEVEL_ROLE_NAMES,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from controller.errors import ControllerError
from controller.home import atomic_write
from protocols.canonical import canonical_json
from protocols.limits import MODEL_NAME_RE, VARIANT_RE
from protocols.messages import MODEL_FORMATS, target_path
from protocols.releases import (
    ASSIGNMENT_KEYS_CUSTOM,
    ASSIGNMENT_KEYS_TARGET,
    DEFAULT_CHUNK_SIZE,
    AssignmentKeyList,
    ModelTargetFields,
    chunk_count,
    decode_assignment_keys,
)

__all__ = [
    "DEFAULT_EXPIRY",
    "ROLES",
    "ModelDetails",
    "ReleaseError",
    "ReleaseRepository",
    "TargetEntry",
    "write_bundle",
]

ROLES: Final = ("root", "targets", "snapshot", "timestamp")

DEFAULT_EXPIRY: Final[Mapping[str, dt.timedelta]] = {
    "root": dt.timedelta(days=365),
    "targets": dt.timedelta(days=90),
    "snapshot": dt.timedelta(days=7),
    "timestamp": dt.timedelta(days=1),
}
"""How long newly signed metadata of each role stays valid."""

_HASH_BLOCK = 1 << 20


class ReleaseError(ControllerError):
    """The release repository cannot do what was asked (missing keys, bad model file, unknown target)."""


@dataclass(frozen=True, slots=True)
class ModelDetails:
    """Operator-supplied facts about a model file (what ``model add`` cannot read from the file itself)."""

    quant: str = ""
    params: int = 0
    context_length: int = 0
    min_ram_bytes: int = 0
    arch: tuple[str, ...] = ()
    accelerators: tuple[str, ...] = ()
    licence: str = "unknown"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    mirrors: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class TargetEntry:
    """One model target, published or pending."""

    path: str
    length: int
    sha256: str
    fields: ModelTargetFields
    published: bool


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _file_digests(path: Path, chunk_size: int) -> tuple[int, str, list[str]]:
    total = hashlib.sha256()
    chunks: list[str] = []
    length = 0
    with path.open("rb") as f:
        while block := f.read(chunk_size):
            total.update(block)
            chunks.append(hashlib.sha256(block).hexdigest())
            length += len(block)
    return length, total.hexdigest(), chunks


class ReleaseRepository:
    """A TUF repository in a directory (see the module docstring). Not thread-safe: one writer at a time."""

    def __init__(self, base: Path, *, clock: Callable[[], dt.datetime] = _utcnow) -> None:
        self.base = base
        self.clock = clock

    # --- layout -----------------------------------------------------------------------------------------

    @property
    def metadata_dir(self) -> Path:
        """Signed metadata files."""
        return self.base / "metadata"

    @property
    def keys_dir(self) -> Path:
        """Private keys by role."""
        return self.base / "keys"

    @property
    def blobs_dir(self) -> Path:
        """Published blobs by sha256."""
        return self.base / "blobs" / "sha256"

    @property
    def pending_file(self) -> Path:
        """Targets added and not yet published."""
        return self.base / "pending.json"

    def blob_path(self, sha256: str) -> Path:
        """Where the blob with digest ``sha256`` is kept."""
        return self.blobs_dir / sha256

    # --- creation ---------------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        base: Path,
        *,
        thresholds: Mapping[str, int] | None = None,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> ReleaseRepository:
        """Generate keys (``threshold`` keys per role) and sign version 1 of every role.

        Raises:
            ReleaseError: ``base`` already holds a repository, or a threshold is below 1.
        """
        repo = cls(base, clock=clock)
        if repo.metadata_dir.exists() and any(repo.metadata_dir.iterdir()):
            raise ReleaseError(f"{base} already holds a release repository")
        wanted = {role: 1 for role in ROLES} | dict(thresholds or {})
        if any(t < 1 for t in wanted.values()) or set(wanted) - set(ROLES):
            raise ReleaseError(f"thresholds must be >= 1 for the roles {', '.join(ROLES)}: {wanted}")
        now = clock()
        root = Metadata(Root(expires=now + DEFAULT_EXPIRY["root"], consistent_snapshot=True))
        signers: dict[str, list[Signer]] = {}
        for role in ROLES:
            signers[role] = [repo._new_key(role) for _ in range(wanted[role])]
            for signer in signers[role]:
                root.signed.add_key(signer.public_key, role)
            root.signed.roles[role].threshold = wanted[role]
        for signer in signers["root"]:
            root.sign(signer, append=True)
        repo._write(root)
        repo.blobs_dir.mkdir(parents=True, exist_ok=True)
        targets = Metadata(Targets(expires=now + DEFAULT_EXPIRY["targets"]))
        repo._sign_and_write(targets, signers["targets"])
        repo._sign_chain(signers["snapshot"], signers["timestamp"])
        return repo

    def _new_key(self, role: str) -> CryptoSigner:
        private = Ed25519PrivateKey.generate()
        signer = CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))
        pem = private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        (self.keys_dir / role).mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.keys_dir / role / f"{signer.public_key.keyid}.pem", pem, mode=0o600)
        return signer

    # --- reading ----------------------------------------------------------------------------------------

    def versions(self, role: str) -> list[int]:
        """Versions of ``role`` on disk, ascending (empty for ``timestamp``, which is unversioned)."""
        found = []
        for path in self.metadata_dir.glob(f"*.{role}.json"):
            head = path.name.split(".", 1)[0]
            if head.isdigit():
                found.append(int(head))
        return sorted(found)

    def metadata_bytes(self, role: str, version: int | None = None) -> bytes:
        """The signed bytes of ``role`` (the latest version if ``version`` is None).

        Raises:
            ReleaseError: no such version.
        """
        if role == "timestamp":
            path = self.metadata_dir / "timestamp.json"
        else:
            if version is None:
                known = self.versions(role)
                if not known:
                    raise ReleaseError(f"no {role} metadata in {self.metadata_dir}")
                version = known[-1]
            path = self.metadata_dir / f"{version}.{role}.json"
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise ReleaseError(f"no {path.name} in {self.metadata_dir}") from exc

    def load(self, role: str, version: int | None = None) -> Metadata[Any]:
        """The parsed metadata of ``role``."""
        return Metadata.from_bytes(self.metadata_bytes(role, version))

    def signers(self, role: str) -> list[Signer]:
        """The private keys of ``role`` present on this machine, restricted to the keys the root lists.

        Raises:
            ReleaseError: fewer than the role's threshold are present (an offline key must be brought back).
        """
        root = self.load("root").signed
        allowed = set(root.roles[role].keyids)
        found: list[Signer] = []
        for path in sorted((self.keys_dir / role).glob("*.pem")):
            if path.stem not in allowed:
                continue
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
            assert isinstance(private, Ed25519PrivateKey)
            found.append(CryptoSigner(private, SSlibKey.from_crypto(private.public_key(), path.stem)))
        if len(found) < root.roles[role].threshold:
            raise ReleaseError(
                f"{len(found)} {role} key(s) in {self.keys_dir / role}, the threshold is {root.roles[role].threshold}"
            )
        return found

    def entries(self) -> list[TargetEntry]:
        """Every model target: published ones, then pending ones, each sorted by path."""
        published = self.load("targets").signed.targets
        # only models: ``keys/assignments.json`` is a target too (publish_assignment_keys)
        out = [self._entry(t, published=True) for p, t in sorted(published.items()) if p.startswith("models/")]
        out += [
            self._entry(TargetFile.from_dict(dict(d), p), published=False) for p, d in sorted(self._pending().items())
        ]
        return out

    @staticmethod
    def _entry(target: TargetFile, *, published: bool) -> TargetEntry:
        return TargetEntry(
            path=target.path,
            length=target.length,
            sha256=target.hashes["sha256"],
            fields=ModelTargetFields.from_custom(target.custom, target.length),
            published=published,
        )

    def _pending(self) -> dict[str, dict[str, Any]]:
        if not self.pending_file.exists():
            return {}
        data: dict[str, dict[str, Any]] = json.loads(self.pending_file.read_text(encoding="utf-8"))
        return data

    def next_version(self, name: str) -> int:
        """One more than the highest version of ``name`` published or pending (1 for a new name)."""
        highest = 0
        for entry in self.entries():
            parts = entry.path.split("/")
            if parts[1] == name:
                highest = max(highest, int(parts[2]))
        return highest + 1

    # --- targets ----------------------------------------------------------------------------------------

    def add_model(
        self,
        source: Path,
        *,
        name: str,
        variant: str,
        version: int | None = None,
        details: ModelDetails | None = None,
    ) -> TargetEntry:
        """Copy ``source`` into the blob store and record it as a pending target.

        Raises:
            ReleaseError: bad name/variant/extension, unreadable file, or the target path exists already.
        """
        details = details or ModelDetails()
        fmt = source.suffix.lstrip(".").lower()
        if fmt not in MODEL_FORMATS:
            raise ReleaseError(f"{source}: the extension must be one of {', '.join(MODEL_FORMATS)}")
        if not MODEL_NAME_RE.fullmatch(name) or not VARIANT_RE.fullmatch(variant):
            raise ReleaseError(f"invalid model name {name!r} or variant {variant!r}")
        if not 1 <= details.chunk_size <= 1024 * 1024:
            raise ReleaseError(f"chunk size {details.chunk_size} outside 1..1048576")
        version = version or self.next_version(name)
        path = target_path(name, version, variant, fmt)
        if any(e.path == path for e in self.entries()):
            raise ReleaseError(f"target {path} exists already: releases are immutable, add a new version")
        try:
            length, sha256, chunks = _file_digests(source, details.chunk_size)
        except OSError as exc:
            raise ReleaseError(f"cannot read {source}: {exc}") from exc
        if length == 0:
            raise ReleaseError(f"{source} is empty")
        assert len(chunks) == chunk_count(length, details.chunk_size)
        fields = ModelTargetFields(
            format=fmt,
            quant=details.quant or variant,
            params=details.params,
            context_length=details.context_length,
            min_ram_bytes=details.min_ram_bytes,
            arch=details.arch,
            accelerators=details.accelerators,
            licence=details.licence,
            chunk_size=details.chunk_size,
            chunks=tuple(chunks),
        )
        custom = fields.to_custom()
        if details.mirrors:
            custom["mirrors"] = list(details.mirrors)
        blob = self.blob_path(sha256)
        if not blob.exists():
            self.blobs_dir.mkdir(parents=True, exist_ok=True)
            tmp = blob.with_name(f".{sha256}.{os.getpid()}.tmp")
            shutil.copyfile(source, tmp)
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, blob)
        target = TargetFile(length, {"sha256": sha256}, path, unrecognized_fields={"custom": custom})
        pending = self._pending()
        pending[path] = target.to_dict()
        atomic_write(self.pending_file, json.dumps(pending, indent=1, sort_keys=True).encode())
        return self._entry(target, published=False)

    def publish(self) -> int:
        """Sign the pending targets into a new targets version, then snapshot and timestamp.

        Returns:
            The number of targets published (0: nothing pending, nothing signed).
        """
        pending = self._pending()
        if not pending:
            return 0
        targets_signers = self.signers("targets")
        snapshot_signers, timestamp_signers = self.signers("snapshot"), self.signers("timestamp")
        targets = self.load("targets")
        for path, data in pending.items():
            targets.signed.targets[path] = TargetFile.from_dict(dict(data), path)
        targets.signed.version += 1
        targets.signed.expires = self.clock() + DEFAULT_EXPIRY["targets"]
        self._sign_and_write(targets, targets_signers)
        self._sign_chain(snapshot_signers, timestamp_signers)
        self.pending_file.unlink()
        return len(pending)

    def target(self, path: str) -> TargetFile:
        """A published target.

        Raises:
            ReleaseError: not published.
        """
        targets: Targets = self.load("targets").signed
        found = targets.targets.get(path)
        if found is None:
            raise ReleaseError(f"no published target {path}")
        return found

    # --- assignment keys ----------------------------------------------------------------------------------

    def publish_assignment_keys(self, keys: AssignmentKeyList) -> int:
        """Sign ``keys`` as the target ``keys/assignments.json`` into a new targets version (then the chain).

        DESIGN.md §4: the keys that sign assignments rotate under TUF's rules — a device takes a new list only
        from verified targets metadata, so an old list cannot be replayed (rollback) or held back past the
        timestamp's expiry (freeze). The document is the target's content and is carried in its ``custom``
        field, so devices read it from the metadata they already verify (nothing to download).

        Returns:
            The new targets version.

        Raises:
            ReleaseError: the targets, snapshot or timestamp keys are not on this machine.
        """
        data = keys.encode()
        targets_signers = self.signers("targets")
        snapshot_signers, timestamp_signers = self.signers("snapshot"), self.signers("timestamp")
        targets = self.load("targets")
        targets.signed.targets[ASSIGNMENT_KEYS_TARGET] = TargetFile(
            length=len(data),
            hashes={"sha256": hashlib.sha256(data).hexdigest()},
            path=ASSIGNMENT_KEYS_TARGET,
            unrecognized_fields={"custom": {ASSIGNMENT_KEYS_CUSTOM: keys.to_dict()}},
        )
        targets.signed.version += 1
        targets.signed.expires = self.clock() + DEFAULT_EXPIRY["targets"]
        self._sign_and_write(targets, targets_signers)
        self._sign_chain(snapshot_signers, timestamp_signers)
        return int(targets.signed.version)

    def assignment_keys(self) -> AssignmentKeyList | None:
        """The published assignment key list (None: never published; devices use their enrollment keys)."""
        target = self.load("targets").signed.targets.get(ASSIGNMENT_KEYS_TARGET)
        if target is None:
            return None
        return decode_assignment_keys(canonical_json(target.custom[ASSIGNMENT_KEYS_CUSTOM]))

    # --- online roles -------------------------------------------------------------------------------------

    def _sign_and_write(self, md: Metadata[Any], signers: Sequence[Signer]) -> None:
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        self._write(md)

    def _write(self, md: Metadata[Any]) -> None:
        role = md.signed.type
        name = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
        atomic_write(self.metadata_dir / name, md.to_bytes())

    def _sign_chain(self, snapshot_signers: Sequence[Signer], timestamp_signers: Sequence[Signer]) -> None:
        """A new snapshot naming the latest targets, then a new timestamp naming it."""
        now = self.clock()
        targets_version = self.versions("targets")[-1]
        snapshot_versions = self.versions("snapshot")
        snapshot = Metadata(
            Snapshot(
                version=(snapshot_versions[-1] + 1) if snapshot_versions else 1,
                expires=now + DEFAULT_EXPIRY["snapshot"],
                meta={"targets.json": MetaFile(targets_version)},
            )
        )
        self._sign_and_write(snapshot, snapshot_signers)
        self._sign_timestamp(timestamp_signers, snapshot.signed.version)

    def _sign_timestamp(self, signers: Sequence[Signer], snapshot_version: int) -> None:
        previous = 0
        if (self.metadata_dir / "timestamp.json").exists():
            previous = self.load("timestamp").signed.version
        timestamp = Metadata(
            Timestamp(
                version=previous + 1,
                expires=self.clock() + DEFAULT_EXPIRY["timestamp"],
                snapshot_meta=MetaFile(snapshot_version),
            )
        )
        self._sign_and_write(timestamp, signers)

    def refresh_timestamp(
        self,
        *,
        if_expiring_within: dt.timedelta,
        snapshot_if_expiring_within: dt.timedelta = DEFAULT_EXPIRY["snapshot"] / 2,
    ) -> bool:
        """Re-sign the online roles before they expire (``edge-fleet serve``'s loop).

        The snapshot is re-signed (a new version naming the same targets) when it expires within
        ``snapshot_if_expiring_within``, and then a new timestamp names it; otherwise the timestamp alone is
        re-signed when it expires within ``if_expiring_within``. Both keys are online, so a fleet with no new
        publish keeps verifiable metadata for as long as the targets and root last (see :meth:`renew`).

        Returns:
            Whether new metadata was written.
        """
        now = self.clock()
        if self.load("snapshot").signed.expires - now <= snapshot_if_expiring_within:
            snapshot_signers, timestamp_signers = self.signers("snapshot"), self.signers("timestamp")
            self._sign_chain(snapshot_signers, timestamp_signers)
            return True
        current = self.load("timestamp").signed
        if current.expires - now > if_expiring_within:
            return False
        self._sign_timestamp(self.signers("timestamp"), current.snapshot_meta.version)
        return True

    def expiring(self, within: dt.timedelta, roles: Sequence[str] = ("root", "targets")) -> dict[str, dt.datetime]:
        """``{role: expires}`` of the latest metadata of ``roles`` that expires within ``within`` from now."""
        now = self.clock()
        found = {role: self.load(role).signed.expires for role in roles}
        return {role: expires for role, expires in found.items() if expires - now <= within}

    def renew(self, role: str) -> int:
        """Re-sign ``role`` (``targets`` or ``root``) unchanged but for a new version and a fresh expiry, then a new
        snapshot and timestamp (``edge-fleet keys renew``).

        Root and targets are signed offline and only ``model publish`` / ``keys rotate`` re-sign them otherwise,
        so a fleet that publishes nothing for 90 days (targets) or a year (root) needs this before they expire.
        A new root is signed by the keys the current root lists, so devices accept it (TUF §5.3.4).

        Returns:
            The new version of ``role``.

        Raises:
            ReleaseError: another role, or the role's (or the snapshot's/timestamp's) keys are not on this machine.
        """
        if role not in ("root", "targets"):
            raise ReleaseError(f"only root and targets are renewed by hand (not {role!r}): serve renews the others")
        signers = self.signers(role)
        snapshot_signers, timestamp_signers = self.signers("snapshot"), self.signers("timestamp")
        md = self.load(role)
        md.signed.version += 1
        md.signed.expires = self.clock() + DEFAULT_EXPIRY[role]
        self._sign_and_write(md, signers)
        self._sign_chain(snapshot_signers, timestamp_signers)
        return int(md.signed.version)

    # --- keys -------------------------------------------------------------------------------------------

    def rotate_keys(self, role: str) -> list[str]:
        """Replace every key of ``role`` by new ones (as many as its threshold), through a new root.

        The new root is signed by the old root keys and, for a root rotation, by the new ones too; then the
        role's metadata is re-signed with the new keys and a fresh expiry (and the chain above it), so devices
        move over on their next refresh. Only the keys of the roles signed are loaded: rotating an online key
        does not need the offline targets key. The old private keys are moved to ``keys/retired/``.

        Returns:
            The new key ids.

        Raises:
            ReleaseError: unknown role, or keys needed for signing are not on this machine.
        """
        if role not in TOP_LEVEL_ROLE_NAMES:
            raise ReleaseError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
        old_root_signers = self.signers("root")
        # Only the keys this rotation signs with: an emergency rotation of a compromised online key must not
        # need the offline targets key (which is not re-signed unless targets is the role rotated).
        needed = {
            "root": (),
            "targets": ("snapshot", "timestamp"),
            "snapshot": ("timestamp",),
            "timestamp": ("snapshot",),
        }
        chain = {r: self.signers(r) for r in needed[role]}
        root = self.load("root")
        old_ids = list(root.signed.roles[role].keyids)
        new = [self._new_key(role) for _ in range(root.signed.roles[role].threshold)]
        for keyid in old_ids:
            root.signed.revoke_key(keyid, role)
        for new_signer in new:
            root.signed.add_key(new_signer.public_key, role)
        root.signed.version += 1
        root.signed.expires = self.clock() + DEFAULT_EXPIRY["root"]
        root.signatures.clear()
        for signer in [*old_root_signers, *(new if role == "root" else [])]:
            root.sign(signer, append=True)
        self._write(root)
        new_signers: list[Signer] = list(new)
        if role in ("targets",):
            targets = self.load("targets")
            targets.signed.version += 1
            targets.signed.expires = self.clock() + DEFAULT_EXPIRY["targets"]
            self._sign_and_write(targets, new_signers)
        if role in ("targets", "snapshot", "timestamp"):
            snapshot = new_signers if role == "snapshot" else chain["snapshot"]
            timestamp = new_signers if role == "timestamp" else chain["timestamp"]
            self._sign_chain(snapshot, timestamp)
        retired = self.keys_dir / "retired"
        retired.mkdir(parents=True, exist_ok=True, mode=0o700)
        for keyid in old_ids:
            old = self.keys_dir / role / f"{keyid}.pem"
            if old.exists():
                os.replace(old, retired / f"{role}-{keyid}.pem")
        return [s.public_key.keyid for s in new]

    # --- publishing ---------------------------------------------------------------------------------------

    def documents(self) -> Iterator[tuple[str, int | None, bytes]]:
        """``(role, version, bytes)`` of every document devices may ask for (``version`` None: timestamp)."""
        for role in ("root", "targets", "snapshot"):
            for version in self.versions(role):
                yield role, version, self.metadata_bytes(role, version)
        yield "timestamp", None, self.metadata_bytes("timestamp")


# --- offline bundles --------------------------------------------------------------------------------------

BUNDLE_TARGET_MEMBER: Final = "target"
BUNDLE_BLOB_MEMBER: Final = "blob"


def write_bundle(repo: ReleaseRepository, path: str, out: Path) -> int:
    """Write an offline bundle of published target ``path``: the metadata a device needs, and the blob.

    The bundle is an uncompressed tar: ``metadata/<N>.root.json`` (every root version, so a device on an old
    root can walk forward), ``metadata/timestamp.json``, ``metadata/<N>.snapshot.json``,
    ``metadata/<N>.targets.json`` (the latest), ``target`` (the path, UTF-8) and ``blob``. Nothing in it is
    trusted by the device beyond what TUF verifies.

    Returns:
        The bundle's size in bytes.

    Raises:
        ReleaseError: ``path`` is not published.
    """
    target = repo.target(path)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:

        def add_bytes(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))

        for version in repo.versions("root"):
            add_bytes(f"metadata/{version}.root.json", repo.metadata_bytes("root", version))
        add_bytes("metadata/timestamp.json", repo.metadata_bytes("timestamp"))
        for role in ("snapshot", "targets"):
            version = repo.versions(role)[-1]
            add_bytes(f"metadata/{version}.{role}.json", repo.metadata_bytes(role, version))
        add_bytes(BUNDLE_TARGET_MEMBER, path.encode())
        blob = repo.blob_path(target.hashes["sha256"])
        info = tarfile.TarInfo(BUNDLE_BLOB_MEMBER)
        info.size = blob.stat().st_size
        info.mode = 0o644
        with blob.open("rb") as f:
            tar.addfile(info, f)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out.stat().st_size
