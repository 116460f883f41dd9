"""``edge-agent token create|list|revoke``: API tokens, managed on the state directory directly.

The commands open ``STATE_DIR/tokens.db`` themselves, so they work whether or not the daemon runs (SQLite in
WAL mode serialises the writers; the daemon reads revocations from the database on every request, so a revoke
takes effect at once). The plaintext of a new token is printed once, on stdout alone, so that
``TOKEN=$(edge-agent token create app --scope infer)`` captures exactly the token; everything else goes to
stderr.

Register with ``main.add_command(token)`` in :mod:`agent.cli`.
"""

from __future__ import annotations

import datetime as dt

import click
from rich.console import Console
from rich.table import Table

from agent.api.tokens import TokenStore
from agent.cli import AgentContext, pass_context
from agent.errors import AgentError

__all__ = ["token"]


def _open(ctx: AgentContext) -> TokenStore:
    try:
        return TokenStore.open(ctx.config.state_dir)
    except OSError as exc:
        raise click.ClickException(f"cannot open the token store in {ctx.config.state_dir}: {exc}") from exc


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@click.group()
def token() -> None:
    """Create, list and revoke bearer tokens for the local API."""


@token.command("create")
@click.argument("name")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    metavar="SCOPE",
    help="admin, infer (every model) or infer:MODEL[,MODEL...]; repeat for several.",
)
@pass_context
def create(ctx: AgentContext, name: str, scopes: tuple[str, ...]) -> None:
    """Create a token NAME and print it once (it is stored only as a hash)."""
    with _open(ctx) as store:
        try:
            record, plaintext = store.create(name, scopes)
        except AgentError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"created token {record.id} ({record.name}) with scopes {', '.join(record.scopes)}", err=True)
    click.echo("store it now: it cannot be shown again", err=True)
    click.echo(plaintext)


@token.command("list")
@click.option("--all", "include_revoked", is_flag=True, help="Include revoked tokens.")
@pass_context
def list_tokens(ctx: AgentContext, include_revoked: bool) -> None:
    """List tokens (ids, names, scopes; never secrets)."""
    with _open(ctx) as store:
        records = store.list(include_revoked=include_revoked)
    table = Table("ID", "NAME", "SCOPES", "CREATED", "REVOKED")
    for record in records:
        table.add_row(
            record.id, record.name, " ".join(record.scopes), _when(record.created_ts), _when(record.revoked_ts)
        )
    Console(soft_wrap=True).print(table)


@token.command("revoke")
@click.argument("token_id", metavar="ID")
@pass_context
def revoke(ctx: AgentContext, token_id: str) -> None:
    """Revoke the token ID (effective immediately, also for a running daemon)."""
    with _open(ctx) as store:
        try:
            record = store.revoke(token_id)
        except AgentError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"revoked token {record.id} ({record.name})")
