"""``edge-fleet`` commands of the MQTT link: init, device enroll/revoke/show/assign, devices, serve, broker.

Errors the controller raises on purpose are printed with their diagnostics and exit with status 1, never as a
traceback. ``devices`` and ``device show`` read the fleet DB only (``serve`` keeps it current), so they work
whether or not ``serve`` runs — and then show every device offline once its last message is older than
``controller.heartbeat_timeout_s``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from controller.cli_common import reports_errors
from controller.config import BrokerConfig, ControllerConfig, FleetConfig
from controller.errors import EnrollmentError
from controller.home import FleetHome
from controller.rollout import current_models, refuse_while_rolling_out_on
from controller.store import DeviceRow, is_online
from protocols.limits import MODEL_NAME_RE, VARIANT_RE
from protocols.link import seal
from protocols.messages import Assignment, DesiredModel, target_path
from protocols.topics import TopicKind

if TYPE_CHECKING:
    from controller.cli import FleetContext

__all__ = ["broker", "controller_group", "device", "devices", "init", "serve"]

# ``pass_obj`` rather than the by-class decorator: works when the root runs as ``python -m controller.cli``.
pass_context = click.pass_obj


MODEL_SPEC_RE = re.compile(
    rf"(?P<name>{MODEL_NAME_RE.pattern})@(?P<version>[1-9][0-9]{{0,18}}):(?P<variant>{VARIANT_RE.pattern})"
)
SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}")


def _open_home(ctx: FleetContext) -> FleetHome:
    return FleetHome.open(ctx.home)


# --- init -------------------------------------------------------------------------------------------------


@click.command()
@click.option("--broker-host", default="127.0.0.1", show_default=True, help="Address devices connect to.")
@click.option("--broker-port", type=click.IntRange(1, 65535), default=8883, show_default=True)
@click.option("--bind", default="0.0.0.0", show_default=True, help="Address the broker's TLS listener binds to.")  # noqa: S104
@click.option("--extra-name", multiple=True, help="More DNS names / IPs for the broker certificate (repeatable).")
@click.option("--max-packet-size", type=click.IntRange(4096), default=BrokerConfig().max_packet_size, show_default=True)
@click.option("--max-queued-messages", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--broker-user", default="", help="mosquitto's `user` (the account it runs as when started as root).")
@click.option("--controller-name", default="main", show_default=True, help="This controller's MQTT identity.")
@click.option("--keepalive", type=click.IntRange(2, 600), default=30, show_default=True)
@click.option(
    "--heartbeat-timeout",
    type=click.IntRange(1),
    default=180,
    show_default=True,
    help="Seconds of silence after which a device is shown offline.",
)
@click.option(
    "--release-threshold",
    "release_threshold",
    multiple=True,
    metavar="ROLE=N",
    help="Signatures needed (and keys made) for a TUF role: root, targets, snapshot, timestamp (repeatable).",
)
@pass_context
@reports_errors
def init(
    ctx: FleetContext,
    broker_host: str,
    broker_port: int,
    bind: str,
    extra_name: tuple[str, ...],
    max_packet_size: int,
    max_queued_messages: int,
    broker_user: str,
    controller_name: str,
    keepalive: int,
    heartbeat_timeout: int,
    release_threshold: tuple[str, ...],
) -> None:
    """Create the controller home: assignment key, device CA, broker certificate and Mosquitto config."""
    thresholds: dict[str, int] = {}
    for item in release_threshold:
        role, _, count = item.partition("=")
        if role not in ("root", "targets", "snapshot", "timestamp") or not count.isdigit() or int(count) < 1:
            raise click.BadParameter(f"{item!r}: expected ROLE=N with N >= 1", param_hint="--release-threshold")
        thresholds[role] = int(count)
    config = FleetConfig(
        broker=BrokerConfig(
            host=broker_host,
            port=broker_port,
            bind=bind,
            extra_names=extra_name,
            max_packet_size=max_packet_size,
            max_queued_messages=max_queued_messages,
            user=broker_user,
        ),
        controller=ControllerConfig(name=controller_name, keepalive_s=keepalive, heartbeat_timeout_s=heartbeat_timeout),
    )
    home = FleetHome.init(ctx.home, config, release_thresholds=thresholds)
    click.echo(f"created the controller home in {home.root}")
    click.echo(f"run the broker:  mosquitto -c {home.mosquitto_conf_path}")
    click.echo("then:            edge-fleet serve")


# --- broker / controller identities -----------------------------------------------------------------------


@click.group()
def broker() -> None:
    """The Mosquitto configuration."""


@broker.command("config")
@pass_context
@reports_errors
def broker_config(ctx: FleetContext) -> None:
    """Rewrite mosquitto.conf, the ACL and the CRL from fleet.toml and the fleet DB.

    Re-issues the broker's server certificate if it no longer names the configured host(s) or expires within
    30 days.
    """
    home = _open_home(ctx)
    reissued = home.write_broker_files()
    click.echo(f"wrote {home.mosquitto_conf_path}, {home.acl_path} and {home.crl_path}")
    if reissued:
        click.echo(
            f"re-issued the broker's server certificate {home.broker_dir / 'server.crt'} ({reissued}); "
            "restart the broker to use it"
        )
    click.echo("reload the ACL with SIGHUP; restart the broker for a new CRL or listener settings")


@click.group("controller")
def controller_group() -> None:
    """Controller identities (several `serve` processes share the work)."""


@controller_group.command("add")
@click.argument("name")
@pass_context
@reports_errors
def controller_add(ctx: FleetContext, name: str) -> None:
    """Issue a certificate for another controller NAME and allow it in the ACL."""
    files = _open_home(ctx).add_controller(name)
    click.echo(f"issued {files.cert}; send the broker SIGHUP to reload its ACL")


# --- devices ----------------------------------------------------------------------------------------------


@click.group()
def device() -> None:
    """Enroll, revoke, inspect and assign one device."""


@device.command("enroll")
@click.argument("name")
@click.option(
    "--out", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Bundle file [default: ./NAME.bundle]."
)
@click.option("--days", type=click.IntRange(1), default=730, show_default=True, help="Certificate validity.")
@click.option("--force", is_flag=True, help="Re-enroll a device that is enrolled (revokes its old credentials).")
@pass_context
@reports_errors
def device_enroll(ctx: FleetContext, name: str, out: Path | None, days: int, force: bool) -> None:
    """Issue credentials for device NAME and write its provisioning bundle (0600)."""
    home = _open_home(ctx)
    out = out or Path(f"{name}.bundle")
    store = home.open_store()
    try:
        reenrolled = store.get_device(name) is not None
    finally:
        store.close()
    bundle = home.enroll_device(name, out, days=days, force=force)
    keyids = ", ".join(sorted(bundle.controller_keys))
    click.echo(f"wrote {out} for device {name} (keep it secret: it holds the device's private keys)")
    click.echo(f"install it on the device:  edge-agent enroll {out.name} --expect-keyid {keyids}")
    if reenrolled:
        # The ACL no longer denies the id and the CRL lists its previous certificate, but the broker uses
        # neither until it re-reads them: until then the new certificate is denied and an old one still works.
        click.echo(
            f"re-enrolled {name}: send the broker SIGHUP now (the ACL no longer denies {name}), "
            "and restart it to load the new CRL (until then its previous certificate still connects)"
        )


@device.command("revoke")
@click.argument("name")
@pass_context
@reports_errors
def device_revoke(ctx: FleetContext, name: str) -> None:
    """Revoke device NAME: fleet DB, CRL and ACL."""
    home = _open_home(ctx)
    home.revoke_device(name)
    click.echo(f"revoked {name}; its messages are refused by `serve` from now on")
    click.echo("send the broker SIGHUP now (ACL: denies every topic), and restart it to load the new CRL")


def _model_spec(spec: str) -> tuple[str, int, str]:
    match = MODEL_SPEC_RE.fullmatch(spec)
    if match is None:
        raise click.BadParameter(f"{spec!r} is not NAME@VERSION:VARIANT", param_hint="--model")
    return match["name"], int(match["version"]), match["variant"]


def _desired(row: DeviceRow, spec: str, sha256: str | None, length: int | None, fmt: str | None) -> DesiredModel:
    name, version, variant = _model_spec(spec)
    known = {
        (m["name"], m["version"], m["variant"]): m for m in (row.state or {}).get("models", []) if isinstance(m, dict)
    }
    model = known.get((name, version, variant))
    if sha256 is None or length is None:
        if model is None:
            raise EnrollmentError(
                f"device {row.id} has not reported {spec}; give --sha256 and --length "
                "(delivery of new models comes with releases)"
            )
        sha256, length = str(model["sha256"]), int(model["size"])
    if not SHA256_HEX_RE.fullmatch(sha256):
        raise click.BadParameter("must be 64 lower-case hex characters", param_hint="--sha256")
    return DesiredModel(
        name=name,
        version=version,
        variant=variant,
        target_path=target_path(name, version, variant, fmt or "gguf"),
        sha256=sha256,
        length=length,
    )


@device.command("assign")
@click.argument("device_id")
@click.option("--model", "models", multiple=True, required=True, help="NAME@VERSION:VARIANT (repeatable).")
@click.option("--sha256", default=None, help="The blob's sha256 (if the device has not reported the model).")
@click.option("--length", type=click.IntRange(1), default=None, help="The blob's length in bytes (likewise).")
@click.option("--format", "fmt", type=click.Choice(["gguf", "onnx"]), default=None, help="Target file format.")
@click.option("--force", is_flag=True, help="Assign even while a rollout of one of these models includes the device.")
@pass_context
@reports_errors
def device_assign(
    ctx: FleetContext,
    device_id: str,
    models: tuple[str, ...],
    sha256: str | None,
    length: int | None,
    fmt: str | None,
    force: bool,
) -> None:
    """Set DEVICE_ID's desired models: a new signed assignment, published (retained) by `serve`.

    Refused while a running or paused rollout of a model it names (or drops) includes the device, unless --force.
    """
    if (sha256 is not None or length is not None) and len(models) != 1:
        raise click.UsageError("--sha256/--length describe one --model")
    home = _open_home(ctx)
    key = home.assignment_key()
    store = home.open_store()
    try:
        row = store.get_device(device_id)
        if row is None or row.revoked:
            raise EnrollmentError(f"no enrolled device {device_id!r}")
        desired = tuple(_desired(row, spec, sha256, length, fmt) for spec in models)
        with store.transaction():
            if not force:  # in the transaction: a rollout started concurrently sees this assignment or refuses it
                current = [m["name"] for m in current_models(store, device_id)]
                refuse_while_rolling_out_on(store, device_id, [*current, *(m.name for m in desired)])
            generation = store.next_generation(device_id)
            assignment = Assignment(
                device=device_id, generation=generation, issued_ts_ms=int(time.time() * 1000), models=desired
            )
            envelope = seal(assignment, TopicKind.ASSIGN, [key])
            store.add_assignment(device_id, generation, envelope, [m.to_dict() for m in desired])
    finally:
        store.close()
    click.echo(f"assignment generation {generation} for {device_id}: {', '.join(models)}")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _summary(row: DeviceRow, now: float, timeout: float) -> dict[str, Any]:
    state = row.state or {}
    hardware = state.get("hardware") or {}
    online = is_online(row, now=now, heartbeat_timeout=timeout)
    if row.revoked:
        why = "revoked"
    elif online:
        why = "online"
    elif row.status == "online":
        why = "offline (silent)"
    elif row.status is None:
        why = "never seen"
    else:
        why = row.status
    head = state.get("audit_head")
    return {
        "id": row.id,
        "online": online,
        "status": why,
        "last_seen_age_s": None if row.last_seen is None else round(now - row.last_seen, 3),
        "agent_version": row.agent_version,
        "heartbeat": row.heartbeat,
        "hardware": hardware,
        "models": [
            f"{m['name']}@{m['version']}:{m['variant']}"
            for m in state.get("models", [])
            if isinstance(m, dict) and m.get("state") == "active"
        ],
        "audit_head_seq": head.get("seq") if isinstance(head, dict) else None,
        "revoked": row.revoked,
    }


def _hardware_text(hardware: dict[str, Any]) -> str:
    if not hardware:
        return "-"
    gib = 1024**3
    parts = [str(hardware.get("arch", "?")), f"{hardware.get('cores', '?')} cores"]
    if isinstance(hardware.get("ram_bytes"), int):
        parts.append(f"{hardware['ram_bytes'] / gib:.1f} GiB RAM")
    if isinstance(hardware.get("disk_free_bytes"), int):
        parts.append(f"{hardware['disk_free_bytes'] / gib:.1f} GiB free")
    accelerators = hardware.get("accelerators") or []
    if accelerators:
        parts.append("+".join(str(a) for a in accelerators))
    return ", ".join(parts)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_context
@reports_errors
def devices(ctx: FleetContext, as_json: bool) -> None:
    """List devices: online/offline (with last-seen age), agent version, hardware, models, audit head."""
    home = _open_home(ctx)
    store = home.open_store()
    try:
        rows = store.list_devices()
    finally:
        store.close()
    now = time.time()
    summaries = [_summary(r, now, home.config.controller.heartbeat_timeout_s) for r in rows]
    if as_json:
        click.echo(json.dumps(summaries, indent=2))
        return
    table = Table("device", "status", "last seen", "agent", "hardware", "active models", "audit head")
    for s in summaries:
        colour = "green" if s["online"] else "red"
        table.add_row(
            s["id"],
            f"[{colour}]{s['status']}[/]",
            _age(s["last_seen_age_s"]),
            s["agent_version"] or "-",
            _hardware_text(s["hardware"]),
            ", ".join(s["models"]) or "-",
            "-" if s["audit_head_seq"] is None else f"seq {s['audit_head_seq']}",
        )
    Console().print(table)


@device.command("show")
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_context
@reports_errors
def device_show(ctx: FleetContext, device_id: str, as_json: bool) -> None:
    """Everything known about DEVICE_ID: status, state, assignments, recent reports and rejections."""
    home = _open_home(ctx)
    store = home.open_store()
    try:
        row = store.get_device(device_id)
        if row is None:
            raise EnrollmentError(f"no device {device_id!r}")
        assignments = store.assignments(device_id)
        reports = store.reports(device_id, limit=20)
        rejections = store.rejections(device_id, limit=20)
        labels = store.labels().get(device_id, {})
        groups = sorted(name for name, members in store.groups().items() if device_id in members)
    finally:
        store.close()
    summary = _summary(row, time.time(), home.config.controller.heartbeat_timeout_s)
    info = {
        **summary,
        "labels": labels,
        "groups": groups,
        "signing_keyid": row.signing_keyid,
        "cert_serial": row.cert_serial,
        "state": row.state,
        "assignments": [
            {"generation": a.generation, "models": a.models, "issued_ts": a.issued_ts, "published_ts": a.published_ts}
            for a in assignments
        ],
        "reports": [
            {k: r[k] for k in ("report_id", "ts_ms", "kind", "outcome", "reason", "generation", "model", "duplicates")}
            for r in reports
        ],
        "rejections": [{k: r[k] for k in ("ts", "topic", "reason")} for r in rejections],
    }
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    console = Console()
    console.print(f"[bold]{row.id}[/]  {summary['status']}  last seen {_age(summary['last_seen_age_s'])} ago")
    console.print(f"agent {row.agent_version or '-'}  hardware: {_hardware_text(summary['hardware'])}")
    console.print(f"signing key {row.signing_keyid}  certificate serial {row.cert_serial}")
    if labels or groups:  # what rollout selectors match (docs/rollouts.md)
        console.print(
            "labels "
            + (", ".join(f"{k}={v}" for k, v in labels.items()) or "-")
            + "  groups "
            + (", ".join(groups) or "-")
        )
    models = Table("model", "version", "variant", "state", "loaded", title="models")
    for m in (row.state or {}).get("models", []):
        models.add_row(m["name"], str(m["version"]), m["variant"], m["state"], "yes" if m.get("loaded") else "")
    console.print(models)
    transfers = (row.state or {}).get("transfers", [])
    if transfers:  # release downloads in progress (agent/link/releases.py)
        table = Table("model", "received", "total", "progress", title="transfers")
        for t in transfers:
            m, done, total = t["model"], t["received_bytes"], t["total_bytes"]
            table.add_row(
                f"{m['name']}@{m['version']}:{m['variant']}", str(done), str(total), f"{done / max(1, total):.0%}"
            )
        console.print(table)
    table = Table("generation", "models", "published", title="assignments")
    for a in assignments:
        table.add_row(
            str(a.generation),
            ", ".join(f"{m['name']}@{m['version']}:{m['variant']}" for m in a.models) or "(none)",
            "yes" if a.published_ts else "pending",
        )
    console.print(table)
    table = Table("kind", "outcome", "generation", "reason", title="recent reports")
    for r in reports:
        table.add_row(r["kind"], r["outcome"], str(r["generation"] or "-"), r["reason"])
    console.print(table)
    if rejections:
        table = Table("topic", "reason", title="refused messages")
        for r in rejections:
            table.add_row(r["topic"], r["reason"])
        console.print(table)


# --- serve ------------------------------------------------------------------------------------------------


@click.command()
@pass_context
@reports_errors
def serve(ctx: FleetContext) -> None:
    """Run the controller daemon: inventory, reports and acks, assignment publishing (SIGTERM stops it)."""
    import sys

    import structlog

    from controller import daemon

    home = _open_home(ctx)
    # One JSON object per line on stdout (journald keeps it), as the agent's daemon does.
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(20),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
    )
    raise SystemExit(asyncio.run(daemon.serve(home)))
