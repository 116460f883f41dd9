"""``edge-agent enroll`` and ``edge-agent link``: join the fleet, and inspect the link to the controller.

``enroll`` checks the bundle completely (signature, certificate chain, key match, validity; see
:mod:`protocols.enrollment`) before installing it 0600 in the state directory; the daemon picks it up at its
next start. ``link status`` reads the link database directly (safe while the daemon runs).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from agent.errors import AgentError
from agent.link.enrollment import install_bundle, link_dir, load_enrollment

if TYPE_CHECKING:
    from agent.cli import AgentContext

__all__ = ["enroll", "link"]

pass_context = click.pass_obj


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--expect-keyid",
    "keyids",
    multiple=True,
    help="Controller key id the bundle must be signed by (printed by `edge-fleet device enroll`).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an enrollment as another device (drops its unsent messages), or a bundle issued later.",
)
@pass_context
def enroll(ctx: AgentContext, bundle: Path, keyids: tuple[str, ...], force: bool) -> None:
    """Install the provisioning BUNDLE made by `edge-fleet device enroll` (restart the agent afterwards)."""
    config = ctx.config
    try:
        enrollment = install_bundle(
            config.state_dir,
            bundle.read_bytes(),
            expected_keyids=keyids or None,
            device_id=config.device_id,
            force=force,
        )
    except (AgentError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    broker = enrollment.broker
    click.echo(f"enrolled as {enrollment.device}; broker {broker.host}:{broker.port}")
    click.echo(f"installed in {link_dir(config.state_dir)}; restart edge-agent to connect")
    if not keyids:
        click.echo("note: without --expect-keyid the bundle is checked for integrity, not pinned to a controller key")


@click.group()
def link() -> None:
    """The link to the fleet controller."""


@link.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_context
def link_status(ctx: AgentContext, as_json: bool) -> None:
    """Enrollment, desired state, outbox and recent link events."""
    config = ctx.config
    try:
        enrollment = load_enrollment(config.state_dir, device_id=config.device_id)
    except AgentError as exc:
        raise click.ClickException(str(exc)) from exc
    info: dict[str, Any] = {"enrolled": enrollment is not None}
    if enrollment is not None:
        info["device"] = enrollment.device
        info["broker"] = f"{config.link.host or enrollment.broker.host}:{config.link.port or enrollment.broker.port}"
        info["certificate_expires"] = enrollment.bundle.certificate().not_valid_after_utc.isoformat()
    db_path = link_dir(config.state_dir) / "link.db"
    if db_path.exists():
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            desired = conn.execute("SELECT generation, applied_generation FROM desired WHERE id = 1").fetchone()
            info["accepted_generation"], info["applied_generation"] = desired or (0, 0)
            info["outbox"] = dict(conn.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())
            info["events"] = [
                {"ts": ts, "kind": kind, "data": json.loads(data)}
                for ts, kind, data in conn.execute("SELECT ts, kind, data FROM events ORDER BY seq DESC LIMIT 10")
            ]
        finally:
            conn.close()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key != "events":
            click.echo(f"{key}: {value}")
    for event in info.get("events", []):
        click.echo(f"event {event['kind']}: {event['data']}")
