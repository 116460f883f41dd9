"""``edge-agent audit tail|verify``: the device's own audit log, read from ``STATE_DIR/registry.db``.

Both open the database read-only (SQLite WAL lets them read while the daemon writes), so they work whether or
not the daemon runs. The device keeps acknowledged records too (they also live in the fleet DB, ``edge-fleet
audit ...``) until a retention cap needs the room (docs/adr/0011). A database that cannot be read (not SQLite,
no audit tables, not readable) is a one-line error, not a traceback.

Registered by name in :data:`agent.cli._LAZY` (imported when the command is used).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import click

from agent.audit import AuditLog, ReadOnlyAuditStore
from agent.cli import AgentContext, pass_context
from agent.errors import AgentError
from agent.link.enrollment import load_enrollment

__all__ = ["audit"]


def _unreadable(path: Path, exc: Exception) -> click.ClickException:
    return click.ClickException(f"cannot read the audit log in {path}: {exc}")


def _open(ctx: AgentContext) -> tuple[ReadOnlyAuditStore, AuditLog]:
    path = ctx.config.state_dir / "registry.db"
    if not path.exists():
        raise click.ClickException(f"no registry in {ctx.config.state_dir}")
    try:
        store = ReadOnlyAuditStore(path)
    except (sqlite3.Error, OSError) as exc:
        raise _unreadable(path, exc) from exc
    try:
        # sqlite3.connect is lazy: the first query finds a file that is not SQLite, or has no audit tables
        store.query_readonly("SELECT 1 FROM audit_state, audit_log, audit_checkpoints LIMIT 1")
    except sqlite3.Error as exc:
        store.close()
        raise _unreadable(path, exc) from exc
    return store, AuditLog(store)


@contextlib.contextmanager
def _reading(ctx: AgentContext) -> Iterator[AuditLog]:
    """The log, read-only; a database error while reading it becomes a one-line error."""
    store, log = _open(ctx)
    try:
        yield log
    except sqlite3.Error as exc:
        raise _unreadable(ctx.config.state_dir / "registry.db", exc) from exc
    finally:
        store.close()


@click.group()
def audit() -> None:
    """The device's tamper-evident audit log (the records kept on the device, acknowledged or not)."""


@audit.command("tail")
@click.option("--lines", "-n", type=click.IntRange(1, 100_000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON record per line.")
@pass_context
def audit_tail(ctx: AgentContext, lines: int, as_json: bool) -> None:
    """Show the newest records kept on this device, and the log's head."""
    with _reading(ctx) as log:
        status = log.status()
        records = log.tail(lines)
    if not status:
        click.echo("the audit log is not started (it starts with the daemon once the device id is known)")
        return
    for record in records:
        if as_json:
            click.echo(json.dumps(record.to_dict(), sort_keys=True))
            continue
        when = dt.datetime.fromtimestamp(record.ts_ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        data = json.dumps(record.data, sort_keys=True)
        click.echo(f"{when}  {record.epoch}:{record.seq}  {record.kind}  {record.actor}  {data}")
    if not as_json:
        click.echo(
            f"head epoch {status['epoch']} seq {status['head_seq']}; acked up to seq {status['acked_seq']}; "
            f"{status['stored']} records kept (cap {status['max_records']}), {status.get('stored_bytes', 0)} bytes "
            f"(cap {status.get('max_bytes', 0)}), {status.get('pending', 0)} not yet acknowledged",
            err=True,
        )


@audit.command("verify")
@pass_context
def audit_verify(ctx: AgentContext) -> None:
    """Re-verify the kept records: hash chain, holes (each needs its GAP record), head, and the offline
    checkpoints (each must match the stored record at its seq; signatures checked with the enrollment); exit 1
    on any problem."""
    key = None
    try:
        enrollment = load_enrollment(ctx.config.state_dir, device_id=ctx.config.device_id)
        key = enrollment.signing_key.public_key() if enrollment is not None else None
    except (AgentError, OSError):
        key = None
    with _reading(ctx) as log:
        result = log.verify(key)
    head = "-" if result.head is None else f"epoch {result.head.epoch} seq {result.head.seq}"
    checked = "verified" if key is not None else "not checked (no enrollment)"
    click.echo(f"{result.records} records, head {head}, {result.checkpoints} checkpoints {checked}")
    for error in result.errors:
        click.echo(f"  {error}")
    if not result.ok:
        raise SystemExit(1)
    click.echo("ok")
