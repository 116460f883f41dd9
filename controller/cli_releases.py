"""Release commands: ``model add/publish/list``, ``keys rotate/list`` and ``deploy`` (controller.releases).

``model add`` stages a target, ``model publish`` signs it into the repository (targets, snapshot, timestamp);
``edge-fleet serve`` then publishes the metadata as retained messages and serves the blobs. ``deploy`` writes a
signed assignment naming a *published* target, so a device only ever hears of releases TUF can verify.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import click
from rich.console import Console
from rich.table import Table

from controller.cli_models import model_group
from controller.errors import ControllerError, EnrollmentError
from controller.home import FleetHome
from controller.releases import ROLES, ModelDetails, ReleaseError, ReleaseRepository, TargetEntry, write_bundle
from protocols.limits import MODEL_NAME_RE, VARIANT_RE
from protocols.link import seal
from protocols.messages import Assignment, DesiredModel
from protocols.topics import TopicKind

if TYPE_CHECKING:
    from controller.cli import FleetContext

__all__ = ["deploy", "keys_group"]

P = ParamSpec("P")
T = TypeVar("T")

RELEASE_SPEC_RE = re.compile(
    rf"(?P<name>{MODEL_NAME_RE.pattern})@(?P<version>[1-9][0-9]{{0,18}})(?::(?P<variant>{VARIANT_RE.pattern}))?"
)


_pass_context = click.pass_obj  # the FleetContext made by controller.cli.main


def _errors(fn: Callable[P, T]) -> Callable[P, T]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except ControllerError as exc:
            raise click.ClickException(exc.diagnostics()) from exc

    return wrapper


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


# --- model add / publish / list ---------------------------------------------------------------------------


@model_group.command("add")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--name", required=True, help="Model family, e.g. smollm2-135m-instruct.")
@click.option("--variant", required=True, help="Variant, e.g. q8_0 or onnx-fp32.")
@click.option("--version", "version", type=click.IntRange(1), default=None, help="Release version (default: next).")
@click.option("--quant", default="", help="Quantization (default: the variant).")
@click.option("--params", type=click.IntRange(0), default=0, help="Parameter count.")
@click.option("--context-length", type=click.IntRange(0), default=0, help="Context length in tokens.")
@click.option("--min-ram", "min_ram", type=click.IntRange(0), default=0, help="Minimum device RAM in bytes.")
@click.option("--arch", multiple=True, help="Allowed CPU architecture, e.g. x86_64 (repeatable; none = any).")
@click.option("--accelerator", multiple=True, help="Required accelerator, one of (repeatable; none = any).")
@click.option("--licence", default="unknown", show_default=True, help="Licence identifier.")
@click.option("--chunk-size", type=click.IntRange(4096, 1024 * 1024), default=256 * 1024, show_default=True)
@click.option("--mirror", multiple=True, help="An HTTP(S) URL serving the same bytes (repeatable).")
@_pass_context
@_errors
def model_add(
    ctx: FleetContext,
    file: Path,
    name: str,
    variant: str,
    version: int | None,
    quant: str,
    params: int,
    context_length: int,
    min_ram: int,
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
        min_ram_bytes=min_ram,
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
@_errors
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
@_errors
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
@click.argument("role", type=click.Choice(ROLES))
@_pass_context
@_errors
def keys_rotate(ctx: FleetContext, role: str) -> None:
    """Replace ROLE's keys through a new root signed by the old root keys (and the new ones for root)."""
    repo = _repo(ctx)
    new = repo.rotate_keys(role)
    click.echo(f"{role}: new key(s) {', '.join(new)}; root v{repo.versions('root')[-1]}")


@keys_group.command("list")
@_pass_context
@_errors
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


@click.command("deploy")
@click.argument("release")
@click.option("--to", "devices", multiple=True, required=True, help="A device id (repeatable).")
@_pass_context
@_errors
def deploy(ctx: FleetContext, release: str, devices: tuple[str, ...]) -> None:
    """Make RELEASE (NAME@VERSION[:VARIANT], published) the desired model of each --to device."""
    home = FleetHome.open(ctx.home)
    entry = _find_release(_repo(ctx), release)
    name, version, file = entry.path.split("/")[1:]
    desired = DesiredModel(
        name=name,
        version=int(version),
        variant=file.rsplit(".", 1)[0],
        target_path=entry.path,
        sha256=entry.sha256,
        length=entry.length,
    )
    key = home.assignment_key()
    store = home.open_store()
    try:
        for device_id in devices:
            row = store.get_device(device_id)
            if row is None or row.revoked:
                raise EnrollmentError(f"no enrolled device {device_id!r}")
            with store.transaction():
                generation = store.next_generation(device_id)
                assignment = Assignment(
                    device=device_id, generation=generation, issued_ts_ms=int(time.time() * 1000), models=(desired,)
                )
                store.add_assignment(
                    device_id, generation, seal(assignment, TopicKind.ASSIGN, [key]), [desired.to_dict()]
                )
            click.echo(f"{device_id}: assignment generation {generation} -> {entry.path}")
    finally:
        store.close()


@model_group.command("bundle")
@click.argument("release")
@click.option("--out", "out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="Bundle file.")
@_pass_context
@_errors
def model_bundle(ctx: FleetContext, release: str, out: Path) -> None:
    """Write an offline bundle of RELEASE (NAME@VERSION[:VARIANT]) for `edge-agent models import --bundle`."""
    repo = _repo(ctx)
    entry = _find_release(repo, release)
    size = write_bundle(repo, entry.path, out)
    click.echo(f"wrote {out} ({_size(size)}): {entry.path}")
