"""``edge-fleet audit ...``: read the devices' verified audit logs from the fleet DB (docs/audit.md).

``tail`` shows the newest records (``--follow`` keeps polling), ``verify`` re-verifies every stored chain,
``export`` streams records as JSON lines or CSV, ``alerts`` lists what verification flagged. They read the
fleet DB only (``serve`` fills it), so they work whether or not ``serve`` runs.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from typing import TYPE_CHECKING, Any

import click

from controller.audit_ingest import alerts, export_rows, format_export, tail, verify_stored
from controller.home import FleetHome

if TYPE_CHECKING:
    from controller.cli import FleetContext

__all__ = ["audit_group"]

pass_context = click.pass_obj

_DURATION_RE = re.compile(r"(\d+)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
FOLLOW_INTERVAL_S = 1.0
"""How often ``tail --follow`` polls the fleet DB."""


def parse_since(text: str, *, now: float | None = None) -> int:
    """``--since``: a duration back from now (``30m``, ``2h``, ``7d``) or an ISO-8601 time; milliseconds."""
    now = time.time() if now is None else now
    match = _DURATION_RE.fullmatch(text.strip())
    if match:
        return int((now - int(match[1]) * _UNITS[match[2]]) * 1000)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a duration like 2h nor an ISO-8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def _line(row: dict[str, Any]) -> str:
    when = dt.datetime.fromtimestamp(row["ts_ms"] / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    return f"{when}  {row['device']}  {row['epoch']}:{row['seq']}  {row['kind']}  {row['actor']}  {row['data']}"


@click.group("audit")
def audit_group() -> None:
    """The devices' tamper-evident audit logs, as verified and stored by `serve`."""


@audit_group.command("tail")
@click.option("--device", "-d", default=None, help="Only this device.")
@click.option("--lines", "-n", type=click.IntRange(1, 100_000), default=20, show_default=True)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new records as `serve` stores them.")
@pass_context
def audit_tail(ctx: FleetContext, device: str | None, lines: int, follow: bool) -> None:
    """Show the newest stored audit records."""
    store = FleetHome.open(ctx.home).open_store()
    try:
        rows = tail(store, device=device, limit=lines)
        for row in rows:
            click.echo(_line(row))
        if not follow:
            return
        seen = {(r["device"], r["epoch"], r["seq"]) for r in rows}
        after = max((r["received_ts"] for r in rows), default=0.0)
        while True:
            time.sleep(FOLLOW_INTERVAL_S)
            fresh = [
                r
                for r in tail(store, device=device, limit=10_000, after=after - 1e-6)
                if (r["device"], r["epoch"], r["seq"]) not in seen
            ]
            for row in fresh:
                click.echo(_line(row))
                seen.add((row["device"], row["epoch"], row["seq"]))
                after = max(after, row["received_ts"])
    finally:
        store.close()


@audit_group.command("verify")
@click.option("--device", "-d", default=None, help="Only this device.")
@pass_context
def audit_verify(ctx: FleetContext, device: str | None) -> None:
    """Re-verify the stored chains (hashes, links, GAP records); exit 1 if one does not verify."""
    store = FleetHome.open(ctx.home).open_store()
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
@click.option("--since", default=None, help="Only records from then on: a duration (30m, 2h, 7d) or ISO-8601.")
@click.option("--device", "-d", default=None, help="Only this device.")
@pass_context
def audit_export(ctx: FleetContext, fmt: str, since: str | None, device: str | None) -> None:
    """Write stored records to stdout as JSON lines or CSV, by device, epoch and seq."""
    since_ms = 0 if since is None else parse_since(since)
    store = FleetHome.open(ctx.home).open_store()
    try:
        for line in format_export(export_rows(store, since_ms=since_ms, device=device), fmt):
            click.echo(line)
    finally:
        store.close()


@audit_group.command("alerts")
@click.option("--device", "-d", default=None, help="Only this device.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_context
def audit_alerts(ctx: FleetContext, device: str | None, as_json: bool) -> None:
    """List what verification flagged: dropped records, forks, regressions, bad signatures, epoch resets."""
    store = FleetHome.open(ctx.home).open_store()
    try:
        rows = alerts(store, device=device)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no audit alerts")
    for row in rows:
        when = dt.datetime.fromtimestamp(row["last_ts"], dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        click.echo(f"{when}  {row['device']}  {row['kind']}  x{row['count']}  {row['detail']}")
