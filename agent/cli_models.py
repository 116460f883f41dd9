"""``edge-agent models``: import, list, activate, roll back, remove and garbage-collect models.

Every command goes through :func:`open_models_admin`, the one place that decides where it runs: through the
daemon's admin API when an agent answers on the socket (the daemon holds the registry's process lock), else
directly on the state directory. Both sides implement the same :class:`ModelAdmin` interface.

Errors the agent raises on purpose (bad names, unreadable or invalid files, hash mismatches, no space, wrong
state) are printed as one line and exit with status 1, never as a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from agent.client import ApiClient, ApiClientError
from agent.errors import AgentError, ModelNotFoundError
from agent.registry import GcResult, ModelRecord, Registry

if TYPE_CHECKING:
    from agent.cli import AgentContext

__all__ = ["ModelAdmin", "models", "open_models_admin"]

# The root group puts an ``agent.cli.AgentContext`` in ``ctx.obj``. ``pass_obj`` (rather than
# ``agent.cli.pass_context``, which matches by class) keeps these commands working when the root runs as
# ``python -m agent.cli``: there the root's AgentContext is ``__main__.AgentContext``, a different class
# object from ``agent.cli.AgentContext``, and a by-class lookup would find nothing.
pass_context = click.pass_obj

P = ParamSpec("P")
R = TypeVar("R")

_PROGRESS_MIN_BYTES = 32 * 1024 * 1024
"""Files at least this big get a progress bar while they are copied (about a second on slow storage)."""


class ModelAdmin(Protocol):
    """What the ``models`` commands need; :class:`~agent.registry.Registry` provides it locally."""

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
    ) -> ModelRecord: ...

    def list_models(self, name: str | None = None, *, include_removed: bool = False) -> list[ModelRecord]: ...

    def get(self, name: str, variant: str | None = None, version: int | None = None) -> ModelRecord: ...

    def activate(self, name: str, variant: str | None = None, version: int | None = None) -> ModelRecord: ...

    def rollback(self, name: str) -> ModelRecord: ...

    def remove(
        self, name: str, variant: str | None = None, version: int | None = None, *, force: bool = False
    ) -> list[ModelRecord]: ...

    def gc(self) -> GcResult: ...

    def blob_path(self, record: ModelRecord) -> Path: ...


class SocketModelAdmin:
    """:class:`ModelAdmin` over the running daemon's admin API (``/v1/admin/...``)."""

    def __init__(self, client: ApiClient, blobs_dir: Path) -> None:
        self._client = client
        self._blobs_dir = blobs_dir

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        try:
            return self._client.request(method, path, body)
        except ApiClientError as exc:
            raise AgentError(exc.message) from exc

    @staticmethod
    def _record(data: Mapping[str, Any]) -> ModelRecord:
        return ModelRecord(
            id=data["id"],
            name=data["name"],
            variant=data["variant"],
            version=data["version"],
            format=data["format"],
            size=data["size"],
            sha256=data["sha256"],
            params=data.get("params"),
            context_length=data.get("context_length"),
            licence=data.get("licence"),
            origin=data["origin"],
            state=data["state"],
            created_ts=data["created"],
            updated_ts=data["updated"],
            metadata=dict(data.get("metadata") or {}),
        )

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
    ) -> ModelRecord:
        body: dict[str, Any] = {"path": str(src.resolve()), "name": name, "variant": variant, "activate": activate}
        if version is not None:
            body["version"] = version
        if expected_sha256 is not None:
            body["sha256"] = expected_sha256
        return self._record(self._call("POST", "/v1/admin/models", body))

    def list_models(self, name: str | None = None, *, include_removed: bool = False) -> list[ModelRecord]:
        records = [self._record(r) for r in self._call("GET", "/v1/admin/models")["data"]]
        return [r for r in records if (name is None or r.name == name) and (include_removed or r.state != "removed")]

    def get(self, name: str, variant: str | None = None, version: int | None = None) -> ModelRecord:
        candidates = [
            r
            for r in self.list_models(name)
            if (variant is None or r.variant == variant) and (version is None or r.version == version)
        ]
        if variant is None and version is None:
            active = [r for r in candidates if r.state == "active"]
            candidates = active or candidates
        if not candidates:
            raise ModelNotFoundError(f"no model {name!r} matches variant={variant} version={version}")
        return max(candidates, key=lambda r: r.version)

    def activate(self, name: str, variant: str | None = None, version: int | None = None) -> ModelRecord:
        body = {k: v for k, v in (("variant", variant), ("version", version)) if v is not None}
        return self._record(self._call("POST", f"/v1/admin/models/{name}/activate", body))

    def rollback(self, name: str) -> ModelRecord:
        return self._record(self._call("POST", f"/v1/admin/models/{name}/rollback", {}))

    def remove(
        self, name: str, variant: str | None = None, version: int | None = None, *, force: bool = False
    ) -> list[ModelRecord]:
        query = {"force": "true" if force else "false"}
        if variant is not None:
            query["variant"] = variant
        if version is not None:
            query["version"] = str(version)
        data = self._call("DELETE", f"/v1/admin/models/{name}?{urllib.parse.urlencode(query)}")
        return [self._record(r) for r in data["data"]]

    def gc(self) -> GcResult:
        data = self._call("POST", "/v1/admin/gc", {})
        return GcResult(**{**data, "removed_models": tuple(data["removed_models"])})

    def blob_path(self, record: ModelRecord) -> Path:
        return self._blobs_dir / record.sha256


@contextlib.contextmanager
def open_models_admin(ctx: AgentContext) -> Iterator[ModelAdmin]:
    """Open what the models commands talk to: the daemon's admin API if it runs, else the local registry.

    Locally the registry is recovered first, so an install interrupted by a crash is resumed or abandoned
    before the command acts.
    """
    config = ctx.config
    client = ApiClient(config.api.socket_path, token=os.environ.get("EDGE_AGENT_TOKEN"))
    if client.is_running():
        yield SocketModelAdmin(client, config.state_dir / "blobs" / "sha256")
        return
    registry = Registry.open(config.state_dir, config.registry)
    try:
        report = registry.recover()
        if report.changed:
            click.echo(
                "recovered interrupted installs: "
                f"resumed {report.resumed or '-'}, abandoned {report.abandoned or '-'}, "
                f"quarantined {report.quarantined or '-'}, failed {report.failed or '-'}, "
                f"stale partial files {report.stale_partials}",
                err=True,
            )
        yield registry
    finally:
        registry.close()


def _clean_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the agent's own errors into one-line click errors (exit status 1)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except AgentError as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def human_size(n: int) -> str:
    """Bytes in binary units, e.g. ``93.8 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _summary(record: ModelRecord) -> str:
    return f"{record.ref} ({record.format}, {human_size(record.size)}, sha256 {record.sha256[:12]}) {record.state}"


@click.group("models")
def models() -> None:
    """Manage the models installed on this device."""


@models.command("import")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.option("--name", help="Model family name, e.g. smollm2-135m-instruct (required with FILE).")
@click.option("--variant", help="Variant, e.g. q4_0, q8_0, onnx-fp32 (required with FILE).")
@click.option("--version", type=click.IntRange(min=0), help="Version number [default: next for NAME].")
@click.option("--sha256", "expected_sha256", help="Refuse the file unless its sha256 is this.")
@click.option("--origin", default="import", show_default=True, help="Where the file came from.")
@click.option("--no-activate", is_flag=True, help="Install without making it the active model.")
@click.option(
    "--bundle",
    "bundle",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="A signed offline release bundle (`edge-fleet model bundle`) instead of FILE: verified like a delivery.",
)
@pass_context
@_clean_errors
def import_command(
    ctx: AgentContext,
    file: Path | None,
    name: str | None,
    variant: str | None,
    version: int | None,
    expected_sha256: str | None,
    origin: str,
    no_activate: bool,
    bundle: Path | None,
) -> None:
    """Import a local GGUF or ONNX FILE, or a signed --bundle (air-gapped install): copy, verify, then activate."""
    if bundle is not None:
        if file is not None or name or variant or version is not None or expected_sha256:
            raise click.UsageError("--bundle brings its own file, name, variant, version and sha256")
        file, name, variant, version, expected_sha256, origin = _verified_bundle(ctx, bundle)
    if file is None or not name or not variant:
        raise click.UsageError("FILE, --name and --variant are required (or --bundle)")
    try:
        with open_models_admin(ctx) as admin, _progress(file) as progress:
            record = admin.import_file(
                file,
                name=name,
                variant=variant,
                version=version,
                origin=origin,
                expected_sha256=expected_sha256,
                activate=not no_activate,
                progress=progress,
            )
    finally:
        if bundle is not None:
            file.unlink(missing_ok=True)  # the verified copy in downloads/; the registry has its own
    click.echo(f"imported {_summary(record)}")


def _verified_bundle(ctx: AgentContext, bundle: Path) -> tuple[Path, str, str, int, str, str]:
    """Verify ``bundle`` against this device's TUF state (agent/link/bundle.py); what to import."""
    from agent.hardware import hardware_profile
    from agent.link.bundle import verify_bundle
    from agent.link.enrollment import link_dir, load_enrollment

    config = ctx.config
    enrollment = load_enrollment(config.state_dir, device_id=config.device_id)
    root = enrollment.bundle.tuf_root.encode() if enrollment is not None and enrollment.bundle.tuf_root else None
    verified = verify_bundle(
        bundle,
        state_dir=config.state_dir,
        tuf_dir=link_dir(config.state_dir) / "tuf",
        bootstrap=root,
        hardware=hardware_profile(config.state_dir, config.inference.memory_budget_bytes),
    )
    click.echo(f"verified {verified.target.path} (sha256 {verified.target.sha256[:12]})")
    origin = f"bundle:{verified.target.path}"
    return verified.blob, verified.name, verified.variant, verified.version, verified.target.sha256, origin


@contextlib.contextmanager
def _progress(file: Path) -> Iterator[Callable[[int, int], None] | None]:
    try:
        size = file.stat().st_size
    except OSError:
        size = 0
    if size < _PROGRESS_MIN_BYTES:
        yield None
        return
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(f"copying {file.name}", total=size)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@models.command("list")
@click.argument("name", required=False)
@click.option("--all", "include_removed", is_flag=True, help="Include removed models.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@pass_context
@_clean_errors
def list_command(ctx: AgentContext, name: str | None, include_removed: bool, as_json: bool) -> None:
    """List installed models (optionally of one NAME)."""
    with open_models_admin(ctx) as admin:
        records = admin.list_models(name, include_removed=include_removed)
    if as_json:
        for record in records:
            click.echo(json.dumps(record.to_dict(), sort_keys=True))
        return
    table = Table("name", "variant", "version", "format", "size", "state", "sha256", box=None)
    for r in records:
        style = {"active": "bold green", "quarantined": "red", "removed": "dim"}.get(r.state)
        table.add_row(
            r.name, r.variant, str(r.version), r.format, human_size(r.size), r.state, r.sha256[:12], style=style
        )
    console = Console()
    if records:
        console.print(table)
    else:
        console.print("no models installed")


@models.command("show")
@click.argument("name")
@click.option("--variant", help="Variant [default: the active one].")
@click.option("--version", type=click.IntRange(min=0), help="Version [default: the active one, else latest].")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of text.")
@pass_context
@_clean_errors
def show_command(ctx: AgentContext, name: str, variant: str | None, version: int | None, as_json: bool) -> None:
    """Show one model: its record, metadata and blob path."""
    with open_models_admin(ctx) as admin:
        record = admin.get(name, variant, version)
        blob = admin.blob_path(record)
    if as_json:
        click.echo(json.dumps({**record.to_dict(), "blob": str(blob)}, indent=2, sort_keys=True))
        return
    lines = [
        ("model", record.ref),
        ("state", record.state),
        ("format", record.format),
        ("size", f"{human_size(record.size)} ({record.size} bytes)"),
        ("sha256", record.sha256),
        ("params", f"{record.params:,}" if record.params is not None else "-"),
        ("context length", str(record.context_length or "-")),
        ("licence", record.licence or "-"),
        ("origin", record.origin),
        ("created", _when(record.created_ts)),
        ("updated", _when(record.updated_ts)),
        ("blob", str(blob)),
    ]
    lines += [(f"  {key}", json.dumps(value)) for key, value in sorted(record.metadata.items())]
    width = max(len(key) for key, _ in lines)
    for key, value in lines:
        click.echo(f"{key:<{width}}  {value}")


@models.command("activate")
@click.argument("name")
@click.option("--variant", help="Variant to activate.")
@click.option("--version", type=click.IntRange(min=0), help="Version to activate [default: latest].")
@pass_context
@_clean_errors
def activate_command(ctx: AgentContext, name: str, variant: str | None, version: int | None) -> None:
    """Make a version of NAME the active one (the current one becomes previous)."""
    with open_models_admin(ctx) as admin:
        record = admin.activate(name, variant, version)
    click.echo(f"active: {_summary(record)}")


@models.command("rollback")
@click.argument("name")
@pass_context
@_clean_errors
def rollback_command(ctx: AgentContext, name: str) -> None:
    """Re-activate the previous version of NAME (instant: its file is kept)."""
    with open_models_admin(ctx) as admin:
        record = admin.rollback(name)
    click.echo(f"rolled back: {_summary(record)}")


@models.command("rm")
@click.argument("name")
@click.option("--variant", help="Only this variant.")
@click.option("--version", type=click.IntRange(min=0), help="Only this version.")
@click.option("--force", is_flag=True, help="Also remove the active model.")
@pass_context
@_clean_errors
def rm_command(ctx: AgentContext, name: str, variant: str | None, version: int | None, force: bool) -> None:
    """Remove models of NAME (all versions unless --variant/--version narrow it)."""
    with open_models_admin(ctx) as admin:
        removed = admin.remove(name, variant, version, force=force)
    for record in removed:
        click.echo(f"removed {record.ref}")


@models.command("gc")
@pass_context
@_clean_errors
def gc_command(ctx: AgentContext) -> None:
    """Garbage-collect: keep active + previous per name, honour the disk quota, drop orphan files."""
    with open_models_admin(ctx) as admin:
        result = admin.gc()
    for ref in result.removed_models:
        click.echo(f"removed {ref}")
    click.echo(
        f"deleted {result.deleted_blobs} blob(s) and {result.deleted_partials} partial file(s), "
        f"freed {human_size(result.freed_bytes)}; blobs now use {human_size(result.blob_bytes)}"
    )
    if result.over_quota:
        click.echo("warning: active models alone exceed the disk quota", err=True)
