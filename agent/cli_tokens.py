"""``edge-agent token create|list|revoke``: API tokens, through the daemon or on the state directory, audited.

Where a command runs is decided once, like the ``models`` commands: when an agent answers on the socket the
command goes through its admin API (``/v1/admin/tokens``), which records ``token_created`` / ``token_revoked`` in
the audit log itself; when no agent runs it opens ``STATE_DIR/tokens.db`` directly and records the same audit
record in ``registry.db``, taking the registry's process lock for that (so the two paths never write the log at
the same time). The token store and the audit log are two SQLite files: the audit record is committed right
after the token change, in its own transaction (a crash between the two loses that one record; the change
itself is then visible in the token listing). Before the device's first enrolled start there is no audit log yet
and nothing is recorded.

The plaintext of a new token is printed once, on stdout alone, so that
``TOKEN=$(edge-agent token create app --scope infer)`` captures exactly the token; everything else goes to
stderr.

Registered by name in :data:`agent.cli._LAZY` (imported when the command is used).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

import click
from rich.console import Console
from rich.table import Table

from agent.api.tokens import TokenRecord, TokenStore
from agent.audit import AuditLog
from agent.cli import AgentContext, pass_context
from agent.client import ApiClient, ApiClientError
from agent.errors import AgentError
from agent.registry import Registry

__all__ = ["token"]


class TokenAdmin(Protocol):
    """What the token commands need: the daemon's API, or the local store (:class:`LocalTokenAdmin`)."""

    def create(self, name: str, scopes: tuple[str, ...]) -> tuple[TokenRecord, str]: ...
    def list(self, *, include_revoked: bool) -> list[TokenRecord]: ...
    def revoke(self, token_id: str) -> TokenRecord: ...


def _record(data: Mapping[str, Any]) -> TokenRecord:
    revoked = data.get("revoked")
    return TokenRecord(
        id=str(data["id"]),
        name=str(data["name"]),
        scopes=tuple(data["scopes"]),
        created_ts=float(data["created"]),
        revoked_ts=None if revoked is None else float(revoked),
    )


class SocketTokenAdmin:
    """Tokens through the running daemon's admin API (the daemon audits the change)."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        try:
            return self.client.request(method, path, body)
        except ApiClientError as exc:
            raise AgentError(exc.message) from exc

    def create(self, name: str, scopes: tuple[str, ...]) -> tuple[TokenRecord, str]:
        """Create over the API; returns the record and the plaintext."""
        data = self._call("POST", "/v1/admin/tokens", {"name": name, "scopes": list(scopes)})
        return _record(data), str(data["token"])

    def list(self, *, include_revoked: bool) -> list[TokenRecord]:
        """List over the API."""
        records = [_record(r) for r in self._call("GET", "/v1/admin/tokens")["data"]]
        return [r for r in records if include_revoked or not r.revoked]

    def revoke(self, token_id: str) -> TokenRecord:
        """Revoke over the API."""
        return _record(self._call("DELETE", f"/v1/admin/tokens/{token_id}"))


class LocalTokenAdmin:
    """Tokens in ``tokens.db``, each change audited in ``registry.db`` (no daemon runs)."""

    def __init__(self, store: TokenStore, audit: AuditLog | None) -> None:
        self.store = store
        self.audit = audit
        self.actor = f"uid:{os.getuid()}"

    def _audit(self, kind: str, data: Mapping[str, Any]) -> None:
        if self.audit is not None:
            self.audit.append(kind, self.actor, {**data, "via": "cli"})

    def create(self, name: str, scopes: tuple[str, ...]) -> tuple[TokenRecord, str]:
        """Create the token, then record ``token_created``."""
        record, plaintext = self.store.create(name, scopes)
        self._audit("token_created", {"token_id": record.id, "scopes": list(record.scopes)})
        return record, plaintext

    def list(self, *, include_revoked: bool) -> list[TokenRecord]:
        """List (not audited: nothing changes)."""
        return self.store.list(include_revoked=include_revoked)

    def revoke(self, token_id: str) -> TokenRecord:
        """Revoke the token, then record ``token_revoked``."""
        record = self.store.revoke(token_id)
        self._audit("token_revoked", {"token_id": record.id})
        return record


@contextmanager
def open_token_admin(ctx: AgentContext) -> Iterator[TokenAdmin]:
    """The daemon's API if an agent answers on the socket, else the local token store and audit log."""
    config = ctx.config
    client = ApiClient(config.api.socket_path, token=os.environ.get("EDGE_AGENT_TOKEN"))
    if client.is_running():
        yield SocketTokenAdmin(client)
        return
    try:
        store = TokenStore.open(config.state_dir)
    except OSError as exc:
        raise click.ClickException(f"cannot open the token store in {config.state_dir}: {exc}") from exc
    try:
        registry = (
            Registry.open(config.state_dir, config.registry) if (config.state_dir / "registry.db").exists() else None
        )
    except AgentError as exc:
        store.close()
        raise click.ClickException(f"cannot record the change in the audit log: {exc}") from exc
    try:
        audit = AuditLog(registry) if registry is not None else None
        yield LocalTokenAdmin(store, audit)
    finally:
        store.close()
        if registry is not None:
            registry.close()


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
    with open_token_admin(ctx) as admin:
        try:
            record, plaintext = admin.create(name, scopes)
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
    with open_token_admin(ctx) as admin:
        try:
            records = admin.list(include_revoked=include_revoked)
        except AgentError as exc:
            raise click.ClickException(str(exc)) from exc
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
    with open_token_admin(ctx) as admin:
        try:
            record = admin.revoke(token_id)
        except AgentError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"revoked token {record.id} ({record.name})")
