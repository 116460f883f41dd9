"""Release commands: ``model add/publish/list``, ``keys rotate/renew/list`` and ``deploy`` (controller.releases).

``model add`` stages a target, ``model publish`` signs it into the repository (targets, snapshot, timestamp);
``edge-fleet serve`` then publishes the metadata as retained messages and serves the blobs. ``deploy``
(:mod:`controller.cli_rollouts`) writes signed assignments naming *published* targets only, so a device only ever
hears of releases TUF can verify.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.table import Table

from controller.cli_common import reports_errors
from controller.cli_models import model_group
from controller.home import FleetHome
from controller.releases import ROLES, ModelDetails, ReleaseError, ReleaseRepository, TargetEntry, write_bundle
from controller.rollout import parse_size
from protocols.limits import MODEL_NAME_RE, VARIANT_RE

if TYPE_CHECKING:
    from controller.cli import FleetContext

__all__ = ["keys_group"]


RELEASE_SPEC_RE = re.compile(
    rf"(?P<name>{MODEL_NAME_RE.pattern})@(?P<version>[1-9][0-9]{{0,18}})(?::(?P<variant>{VARIANT_RE.pattern}))?"
)


_pass_context = click.pass_obj  # the FleetContext made by controller.cli.main


def _repo(ctx: FleetContext) -> ReleaseRepository:
    home = FleetHome.open(ctx.home)
    if not home.repo_dir.exists():
        raise ReleaseError(f"no release repository in {home.repo_dir} (made by `edge-fleet init`)")
    return ReleaseRepository(home.repo_dir)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _size_option(text: str, hint: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from exc


# --- model add / publish / list ---------------------------------------------------------------------------


@model_group.command("add")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--name", required=True, help="Model family, e.g. smollm2-135m-instruct.")
@click.option("--variant", required=True, help="Variant, e.g. q8_0 or onnx-fp32.")
@click.option("--version", "version", type=click.IntRange(1), default=None, help="Release version (default: next).")
@click.option("--quant", default="", help="Quantization (default: the variant).")
@click.option("--params", type=click.IntRange(0), default=0, help="Parameter count.")
@click.option("--context-length", type=click.IntRange(0), default=0, help="Context length in tokens.")
@click.option(
    "--min-ram", "min_ram", default="0", help="Minimum device RAM budget, in bytes or with a unit (512M, 2G)."
)
@click.option("--arch", multiple=True, help="Allowed CPU architecture, e.g. x86_64 (repeatable; none = any).")
@click.option("--accelerator", multiple=True, help="Required accelerator, one of (repeatable; none = any).")
@click.option("--licence", default="unknown", show_default=True, help="Licence identifier.")
@click.option("--chunk-size", type=click.IntRange(4096, 1024 * 1024), default=256 * 1024, show_default=True)
@click.option("--mirror", multiple=True, help="An HTTP(S) URL serving the same bytes (repeatable).")
@_pass_context
@reports_errors
def model_add(
    ctx: FleetContext,
    file: Path,
    name: str,
    variant: str,
    version: int | None,
    quant: str,
    params: int,
    context_length: int,
    min_ram: str,
    arch: tuple[str, ...],
    accelerator: tuple[str, ...],
    licence: str,
    chunk_size: int,
    mirror: tuple[str, ...],
) -> None:
    """Stage FILE as target models/NAME/VERSION/VARIANT.EXT (signed by `model publish`)."""
    details = ModelDetails(
        quant=quant,
        params=params,
        context_length=context_length,
        min_ram_bytes=_size_option(min_ram, "--min-ram"),
        arch=arch,
        accelerators=accelerator,
        licence=licence,
        chunk_size=chunk_size,
        mirrors=mirror,
    )
    entry = _repo(ctx).add_model(file, name=name, variant=variant, version=version, details=details)
    click.echo(f"staged {entry.path} ({_size(entry.length)}, sha256 {entry.sha256}); run `edge-fleet model publish`")


@model_group.command("publish")
@_pass_context
@reports_errors
def model_publish(ctx: FleetContext) -> None:
    """Sign the staged targets: new targets, snapshot and timestamp metadata."""
    repo = _repo(ctx)
    count = repo.publish()
    if count == 0:
        click.echo("nothing staged: nothing signed")
        return
    click.echo(f"published {count} target(s): targets v{repo.versions('targets')[-1]}")


@model_group.command("list")
@_pass_context
@reports_errors
def model_list(ctx: FleetContext) -> None:
    """The repository's model targets, published and staged."""
    table = Table("target", "size", "sha256", "format", "chunks", "status")
    for e in _repo(ctx).entries():
        table.add_row(
            e.path,
            _size(e.length),
            e.sha256[:16],
            e.fields.format,
            str(len(e.fields.chunks)),
            "published" if e.published else "staged",
        )
    Console().print(table)


# --- keys -------------------------------------------------------------------------------------------------


@click.group("keys")
def keys_group() -> None:
    """The TUF repository's signing keys."""


@keys_group.command("rotate")
@click.argument("role", type=click.Choice([*ROLES, "assignments"]))
@_pass_context
@reports_errors
def keys_rotate(ctx: FleetContext, role: str) -> None:
    """Replace ROLE's keys through a new root signed by the old root keys (and the new ones for root).

    ``assignments``: a new assignment key, published as the TUF target keys/assignments.json (signed by the
    targets role); devices then accept only assignments signed by it. Every device's newest assignment is
    re-signed with it under a new generation. A running `edge-fleet serve` picks up the new key by itself.
    """
    if role == "assignments":
        _rotate_assignment_key(ctx)
        return
    repo = _repo(ctx)
    new = repo.rotate_keys(role)
    click.echo(f"{role}: new key(s) {', '.join(new)}; root v{repo.versions('root')[-1]}")


def _rotate_assignment_key(ctx: FleetContext) -> None:
    """New assignment key → keys/assignments.json (TUF) → re-signed assignments (controller.assignment_keys)."""
    from controller.assignment_keys import rotate_assignment_key

    done = rotate_assignment_key(FleetHome.open(ctx.home), _repo(ctx))
    click.echo(
        f"assignments: new key {done.keyid}; published keys/assignments.json in targets v{done.targets_version}; "
        f"re-signed {done.resigned} assignment(s); a running `edge-fleet serve` signs with the new key from now on"
    )


@keys_group.command("renew")
@click.argument("role", type=click.Choice(["targets", "root"]))
@_pass_context
@reports_errors
def keys_renew(ctx: FleetContext, role: str) -> None:
    """Re-sign ROLE (targets or root) with a fresh expiry, then snapshot and timestamp; needs ROLE's key.

    Targets metadata expires 90 days and root 365 days after it was last signed (by `model publish`, `keys
    rotate` or this command); devices refuse every release after that. `edge-fleet serve` warns 30 days ahead.
    """
    repo = _repo(ctx)
    version = repo.renew(role)
    expires = repo.load(role).signed.expires
    click.echo(f"{role}: v{version}, expires {expires.isoformat()}")


@keys_group.command("list")
@_pass_context
@reports_errors
def keys_list(ctx: FleetContext) -> None:
    """Key ids and thresholds of every role in the current root."""
    root = _repo(ctx).load("root").signed
    table = Table("role", "threshold", "key ids")
    for role in ROLES:
        table.add_row(role, str(root.roles[role].threshold), "\n".join(root.roles[role].keyids))
    Console().print(table)


# --- deploy -----------------------------------------------------------------------------------------------


def _find_release(repo: ReleaseRepository, spec: str) -> TargetEntry:
    match = RELEASE_SPEC_RE.fullmatch(spec)
    if match is None:
        raise click.BadParameter(f"{spec!r}: expected NAME@VERSION or NAME@VERSION:VARIANT")
    prefix = f"models/{match['name']}/{match['version']}/"
    found = [e for e in repo.entries() if e.published and e.path.startswith(prefix)]
    if match["variant"]:
        found = [e for e in found if e.path[len(prefix) :].rsplit(".", 1)[0] == match["variant"]]
    if len(found) != 1:
        names = ", ".join(e.path for e in found) or "none published"
        raise ReleaseError(f"{spec} must name exactly one published target ({names})")
    return found[0]


@model_group.command("bundle")
@click.argument("release")
@click.option("--out", "out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="Bundle file.")
@_pass_context
@reports_errors
def model_bundle(ctx: FleetContext, release: str, out: Path) -> None:
    """Write an offline bundle of RELEASE (NAME@VERSION[:VARIANT]) for `edge-agent models import --bundle`."""
    repo = _repo(ctx)
    entry = _find_release(repo, release)
    size = write_bundle(repo, entry.path, out)
    click.echo(f"wrote {out} ({_size(size)}): {entry.path}")
