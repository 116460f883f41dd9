"""Offline release bundles (``edge-fleet model bundle``): verified exactly like an online delivery.

An air-gapped device gets the TUF metadata and the blob in one tar file (see ``controller.releases.write_bundle``).
:func:`verify_bundle` reads it defensively — only regular files with the expected names and bounded sizes —
then refreshes the device's own TUF state (``link/tuf/``, the same trusted metadata the MQTT updater uses, so
rollback and freeze protection carry over between online and offline updates) from the bundle's metadata, looks
the target up, checks that it fits the device, and verifies the blob chunk by chunk and as a whole into
``downloads/``. The caller then installs the file through the registry with the verified sha256.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent.errors import LinkError
from agent.link.fetch import DOWNLOADS_DIR, FetchRefusedError, finish_file, verified_chunks
from agent.link.updater import DirectorySource, ReleaseRefusedError, ReleaseUpdater, VerifiedTarget
from protocols.messages import HardwareProfile

__all__ = ["BundleError", "VerifiedBundle", "verify_bundle"]

_METADATA_RE = re.compile(r"metadata/(?:[1-9][0-9]{0,18}\.(?:root|snapshot|targets)|timestamp)\.json")
MAX_METADATA_BYTES = 8 * 1024 * 1024
_TARGET_RE = re.compile(
    r"models/(?P<name>[a-z0-9][a-z0-9._-]{0,127})/(?P<version>[1-9][0-9]{0,18})/"
    r"(?P<variant>[a-z0-9][a-z0-9._-]{0,31})\.(?:gguf|onnx)"
)


class BundleError(LinkError):
    """The bundle is malformed, or its release does not verify."""


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    """A bundle's release after verification: install ``blob`` as ``name``/``variant``/``version``."""

    target: VerifiedTarget
    name: str
    version: int
    variant: str
    blob: Path


def verify_bundle(
    bundle: Path,
    *,
    state_dir: Path,
    tuf_dir: Path,
    bootstrap: bytes | None,
    hardware: HardwareProfile | None = None,
) -> VerifiedBundle:
    """Verify ``bundle`` (see the module docstring); the blob is left in ``state_dir/downloads/``.

    Raises:
        BundleError: malformed bundle, TUF refused the metadata, the target does not fit, or the blob does not
            match the signed length, sha256 or chunk list.
    """
    try:
        tar = tarfile.open(bundle, "r:")  # noqa: SIM115 (closed below)
    except (OSError, tarfile.TarError) as exc:
        raise BundleError(f"{bundle}: not a release bundle: {exc}") from exc
    with tar, tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        metadata = Path(tmp) / "metadata"
        metadata.mkdir()
        path = ""
        blob_member: tarfile.TarInfo | None = None
        for member in tar:
            if not member.isfile():
                raise BundleError(f"{bundle}: member {member.name!r} is not a regular file")
            if _METADATA_RE.fullmatch(member.name):
                if member.size > MAX_METADATA_BYTES:
                    raise BundleError(f"{bundle}: {member.name} is larger than {MAX_METADATA_BYTES} bytes")
                (metadata / member.name.removeprefix("metadata/")).write_bytes(_read(tar, member))
            elif member.name == "target" and member.size <= 256:
                path = _read(tar, member).decode("utf-8", "replace")
            elif member.name == "blob":
                blob_member = member
            else:
                raise BundleError(f"{bundle}: unexpected member {member.name!r}")
        match = _TARGET_RE.fullmatch(path)
        if match is None or blob_member is None:
            raise BundleError(f"{bundle}: no valid target path or no blob")
        try:
            target = ReleaseUpdater(tuf_dir, DirectorySource(metadata), bootstrap=bootstrap).lookup(path)
        except ReleaseRefusedError as exc:
            raise BundleError(f"{bundle}: {exc}") from exc
        except LinkError as exc:
            raise BundleError(f"{bundle}: incomplete metadata: {exc}") from exc
        if hardware is not None:
            misfit = target.fields.fit_problem(
                arch=hardware.arch, ram_bytes=hardware.ram_budget_bytes, accelerators=hardware.accelerators
            )
            if misfit is not None:
                raise BundleError(f"{path} does not fit this device: {misfit}")
        if blob_member.size != target.length:
            raise BundleError(f"{bundle}: the blob has {blob_member.size} bytes, the signed target {target.length}")
        dest = state_dir / DOWNLOADS_DIR / f"bundle-{target.sha256}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        source = tar.extractfile(blob_member)
        assert source is not None
        with source, dest.open("wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
        done = verified_chunks(dest, target)
        if len(done) != len(target.fields.chunks):
            bad = min(set(range(len(target.fields.chunks))) - done)
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()
            raise BundleError(f"{bundle}: chunk {bad} of the blob does not match the signed chunk list")
        try:
            finish_file(dest, target, done)
        except FetchRefusedError as exc:
            dest.unlink()
            raise BundleError(str(exc)) from exc
    return VerifiedBundle(
        target=target,
        name=match["name"],
        version=int(match["version"]),
        variant=match["variant"],
        blob=dest,
    )


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    assert handle is not None
    with handle:
        return handle.read(member.size)
