"""``edge-fleet audit ...``: read the devices' verified audit logs from the fleet DB (docs/audit.md).

``tail`` shows the newest records (``--follow`` keeps printing batches in the order ``serve`` committed them),
``verify`` re-verifies every stored chain, ``export`` streams records as JSON lines or CSV, ``alerts`` lists what
verification flagged. They read the fleet DB only (``serve`` fills it), so they work whether or not ``serve``
runs, and they never create it: a missing ``fleet.db`` is an error, not an empty log that verifies.

What a device wrote is shown to the operator's terminal escaped (control, format and line/paragraph separator
characters as ``\\uXXXX``): a device must not be able to move the cursor, clear the screen or reorder text with
bidi overrides. ``export`` writes the stored text unchanged (it is data for programs).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
import unicodedata
from typing import TYPE_CHECKING, Any

import click

from controller.audit_ingest import (
    alert_count,
    alerts,
    batch_cursor,
    export_rows,
    format_export,
    records_after,
    tail,
    verify_stored,
)
from controller.cli_common import reports_errors
from controller.errors import StoreError
from controller.home import FleetHome
from controller.store import FleetStore

if TYPE_CHECKING:
    from controller.cli import FleetContext

__all__ = ["audit_group"]

pass_context = click.pass_obj

_DURATION_RE = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_INT64 = 1 << 63
FOLLOW_INTERVAL_S = 1.0
"""How often ``tail --follow`` polls the fleet DB when it has caught up."""
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def parse_since(text: str, *, now: float | None = None) -> int:
    """``--since``: a duration back from now (``30m``, ``2h``, ``7d``) or an ISO-8601 time (UTC without a zone); ms.

    Raises:
        click.BadParameter: neither, or too far back to compare (SQLite integers are 64-bit).
    """
    now = time.time() if now is None else now
    match = _DURATION_RE.fullmatch(text.strip())
    if match:
        since_ms = int(now * 1000) - int(match[1]) * _UNITS[match[2]] * 1000
        if since_ms < -_INT64:
            raise click.BadParameter(f"{text!r} is too far back")
        return since_ms
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a duration like 2h nor an ISO-8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def _since_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value is None else parse_since(value)


def _printable(text: str) -> str:
    """``text`` safe for a terminal: control/format/separator characters as ``\\uXXXX``; é and the like kept."""
    if text.isprintable():
        return text
    return "".join(
        (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
        if unicodedata.category(c) in _UNSAFE_CATEGORIES
        else c
        for c in text
    )


def _open_store(ctx: FleetContext) -> FleetStore:
    """The existing fleet DB of the home; never creates one (an empty new DB would "verify" fine).

    Raises:
        HomeError: no home there.
        StoreError: no ``fleet.db`` in it, or it cannot be opened.
    """
    home = FleetHome.open(ctx.home)
    if not home.db_path.exists():
        missing = StoreError(f"no fleet database at {home.db_path}: nothing to read")
        missing.hint = "Point --home / EDGE_FLEET_HOME at the home `serve` uses, or restore fleet.db from a backup."
        raise missing
    return home.open_store()


def _line(row: dict[str, Any]) -> str:
    when = dt.datetime.fromtimestamp(row["ts_ms"] / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    fields = (row["device"], f"{row['epoch']}:{row['seq']}", row["kind"], row["actor"], row["data"])
    return "  ".join([when, *(_printable(str(f)) for f in fields)])


def _key(row: dict[str, Any]) -> tuple[str, int, int]:
    return row["device"], row["epoch"], row["seq"]


@click.group("audit")
def audit_group() -> None:
    """The devices' tamper-evident audit logs, as verified and stored by `serve`."""


@audit_group.command("tail")
@click.option("--device", "-d", default=None, help="Only this device.")
@click.option("--lines", "-n", type=click.IntRange(1, 100_000), default=20, show_default=True)
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Keep printing new records, batch by batch in the order `serve` stored them.",
)
@pass_context
@reports_errors
def audit_tail(ctx: FleetContext, device: str | None, lines: int, follow: bool) -> None:
    """Show the newest stored audit records."""
    store = _open_store(ctx)
    try:
        # The cursor is read before the newest records: a batch committed in between is then printed by the
        # first poll, not lost. Records of batches up to ``overlap`` may have been printed by tail() already.
        cursor = batch_cursor(store)
        rows = tail(store, device=device, limit=lines)
        for row in rows:
            click.echo(_line(row))
        if not follow:
            return
        overlap = batch_cursor(store)
        shown = {_key(r) for r in rows} if overlap > cursor else set()  # at most --lines keys, dropped below
        while True:
            cursor, fresh = records_after(store, cursor, device=device)
            for row in fresh:
                if _key(row) not in shown:
                    click.echo(_line(row))
            if cursor >= overlap:
                shown = set()  # later batches were committed after tail() read: nothing to skip
            if not fresh:
                time.sleep(FOLLOW_INTERVAL_S)
    finally:
        store.close()


@audit_group.command("verify")
@click.option("--device", "-d", default=None, help="Only this device.")
@pass_context
@reports_errors
def audit_verify(ctx: FleetContext, device: str | None) -> None:
    """Re-verify the stored chains and that no accepted record is missing; exit 1 if one fails."""
    store = _open_store(ctx)
    try:
        chains = verify_stored(store, device=device)
    finally:
        store.close()
    failed = False
    for chain in chains:
        head = "-" if chain.head is None else f"seq {chain.head.seq}"
        status = "ok" if not chain.errors else "FAILED"
        click.echo(f"{chain.device}  epoch {chain.epoch}  {chain.records} records  head {head}  {status}")
        for error in chain.errors:
            click.echo(f"  {error}")
        failed = failed or bool(chain.errors)
    if not chains:
        click.echo("no audit records stored")
    if failed:
        raise SystemExit(1)


@audit_group.command("export")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option(
    "--since",
    "since_ms",
    default=None,
    callback=_since_option,
    help="Only records that happened (device clock) or were received (controller clock) since then: "
    "a duration (30m, 2h, 7d) or an ISO-8601 time, UTC unless it names a zone.",
)
@click.option("--device", "-d", default=None, help="Only this device.")
@pass_context
@reports_errors
def audit_export(ctx: FleetContext, fmt: str, since_ms: int | None, device: str | None) -> None:
    """Write stored records to stdout as JSON lines or CSV, by device, epoch and seq."""
    store = _open_store(ctx)
    try:
        for line in format_export(export_rows(store, since_ms=since_ms or 0, device=device), fmt):
            click.echo(line)
    finally:
        store.close()


@audit_group.command("alerts")
@click.option("--device", "-d", default=None, help="Only this device.")
@click.option("--kind", "-k", default=None, help="Only this kind of alert (fork, gap, dropped, ...).")
@click.option("--limit", type=click.IntRange(1), default=1000, show_default=True, help="Show at most N alerts.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
@reports_errors
def audit_alerts(ctx: FleetContext, device: str | None, kind: str | None, limit: int, as_json: bool) -> None:
    """List what verification flagged, newest first: dropped records, forks, regressions, bad signatures, ..."""
    store = _open_store(ctx)
    try:
        rows = alerts(store, device=device, kind=kind, limit=limit)
        more = alert_count(store, device=device, kind=kind) - len(rows) if len(rows) == limit else 0
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        if not rows:
            click.echo("no audit alerts")
        for row in rows:
            when = dt.datetime.fromtimestamp(row["last_ts"], dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            fields = (row["device"], row["kind"], f"x{row['count']}", row["detail"])
            click.echo("  ".join([when, *(_printable(str(f)) for f in fields)]))
    if more > 0:
        click.echo(f"{more} more alerts not shown (--limit)", err=as_json)
