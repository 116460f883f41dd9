"""Rollout commands: ``deploy`` (one-shot or in waves), ``rollout list/show/pause/resume/abort``, labels, groups.

``deploy`` plans in this process (selector → devices → variant per device, :mod:`controller.rollout`) and either
writes the signed assignments at once (no ``--waves``) or records a rollout that ``edge-fleet serve`` drives wave
by wave. ``--dry-run`` prints the plan (each device's variant and why, and the devices nothing fits) and sends
nothing. The other commands only read or flip rows of the fleet DB; ``serve`` acts on them at its next tick.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from controller.cli_common import reports_errors
from controller.cli_fleet import device as device_group
from controller.cli_releases import _repo
from controller.errors import EnrollmentError
from controller.home import FleetHome
from controller.rollout import (
    LABEL_RE,
    LABEL_VALUE_RE,
    TERMINAL,
    Candidate,
    Choice,
    DeviceFacts,
    FitPolicy,
    Gates,
    RolloutDriver,
    RolloutError,
    choose_variant,
    current_models,
    device_facts,
    human,
    issue_assignment,
    load_candidates,
    parse_selector,
    parse_waves,
    refuse_while_rolling_out,
    start_rollout,
    wave_plan,
    with_model,
)
from controller.store import FleetStore
from protocols.limits import DEVICE_ID_RE, MODEL_NAME_RE, VARIANT_RE

if TYPE_CHECKING:
    from controller.cli import FleetContext

__all__ = ["deploy", "group_cmd", "rollout_document", "rollout_group", "render_rollout"]


RELEASE_RE = re.compile(
    rf"(?P<name>{MODEL_NAME_RE.pattern})(?:@(?P<version>[1-9][0-9]{{0,18}}))?(?::(?P<variant>{VARIANT_RE.pattern}))?"
)
_DURATION_RE = re.compile(r"(?P<n>[0-9]+(?:\.[0-9]+)?)(?P<unit>ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}

pass_context = click.pass_obj


def parse_duration(text: str) -> float:
    """``15m``, ``90s``, ``1.5h``, ``30`` (seconds) → seconds.

    Raises:
        click.BadParameter: not a positive duration.
    """
    match = _DURATION_RE.fullmatch(text.strip())
    if match is None or float(match["n"]) <= 0:
        raise click.BadParameter(f"{text!r} is not a duration (e.g. 90s, 15m, 1h)")
    return float(match["n"]) * _DURATION_UNITS[match["unit"]]


@contextlib.contextmanager
def _store(ctx: FleetContext) -> Iterator[tuple[FleetHome, FleetStore]]:
    home = FleetHome.open(ctx.home)
    store = home.open_store()
    try:
        yield home, store
    finally:
        store.close()


# --- deploy -----------------------------------------------------------------------------------------------


def _plan(
    store: FleetStore, home: FleetHome, selectors: tuple[str, ...], candidates: list[Candidate], policy: FitPolicy
) -> tuple[list[DeviceFacts], list[Choice]]:
    parsed = [parse_selector(s) for s in selectors]
    facts = device_facts(store, heartbeat_timeout=home.config.controller.heartbeat_timeout_s, now=time.time())
    known = {f.id for f in facts}
    for selector in parsed:
        for term in selector.terms:
            if term.kind == "device" and term.value not in known:
                raise EnrollmentError(f"no enrolled device {term.value!r}")
    chosen = [f for f in facts if any(s.matches(f) for s in parsed)]
    if not chosen:
        raise RolloutError(f"no device matches {' / '.join(selectors)}")
    return chosen, [choose_variant(f, candidates, policy) for f in chosen]


def _plan_table(devices: list[DeviceFacts], choices: list[Choice], waves: dict[str, int]) -> Table:
    table = Table("device", "online", "RAM budget", "arch", "variant", "wave", "why", title="plan")
    for facts, choice in zip(devices, choices, strict=True):
        hw = facts.hardware
        table.add_row(
            facts.id,
            "yes" if facts.online else "no",
            human(hw.ram_budget_bytes) if hw else "?",
            hw.arch if hw else "?",
            choice.candidate.variant if choice.candidate else "[red]refused[/red]",
            str(waves[facts.id] + 1) if facts.id in waves else "-",
            choice.summary,
        )
    return table


@click.command("deploy")
@click.argument("release")
@click.option(
    "--to",
    "selectors",
    multiple=True,
    required=True,
    help="Devices: ids, group:G, labels key=value, hardware predicates ram>=2G,arch=aarch64, or all (repeatable).",
)
@click.option("--waves", default=None, help="Cumulative wave sizes, e.g. 5%,25%,100% (none: all at once).")
@click.option("--wave-timeout", default="15m", show_default=True, help="Deadline of each wave (e.g. 90s, 15m, 1h).")
@click.option(
    "--dry-run", is_flag=True, help="Print each device's variant and why, and the refused ones; send nothing."
)
@click.option(
    "--prefer",
    type=click.Choice(["quality", "speed"]),
    default="quality",
    show_default=True,
    help="quality: the highest precision that fits; speed: the smallest that fits.",
)
@click.option("--context", "n_ctx", type=click.IntRange(1), default=2048, show_default=True, help="Context per slot.")
@click.option("--slots", "n_slots", type=click.IntRange(1), default=1, show_default=True, help="Parallel sequences.")
@click.option("--min-install-rate", type=click.FloatRange(0, 1), default=1.0, show_default=True, help="Gate.")
@click.option("--min-health-rate", type=click.FloatRange(0, 1), default=1.0, show_default=True, help="Gate.")
@click.option(
    "--min-tps-ratio", type=click.FloatRange(0), default=0.5, show_default=True, help="Gate: tokens/s ÷ previous model."
)
@click.option(
    "--max-ttft-ratio", type=click.FloatRange(0), default=2.0, show_default=True, help="Gate: TTFT ÷ previous model."
)
@pass_context
@reports_errors
def deploy(
    ctx: FleetContext,
    release: str,
    selectors: tuple[str, ...],
    waves: str | None,
    wave_timeout: str,
    dry_run: bool,
    prefer: str,
    n_ctx: int,
    n_slots: int,
    min_install_rate: float,
    min_health_rate: float,
    min_tps_ratio: float,
    max_ttft_ratio: float,
) -> None:
    """Deploy RELEASE (NAME[@VERSION][:VARIANT], published; default the newest version) to the --to devices.

    Each device gets the best variant that fits it (see docs/rollouts.md); with --waves, `edge-fleet serve`
    rolls out wave by wave behind the health gates and rolls back on a failing gate.
    """
    match = RELEASE_RE.fullmatch(release)
    if match is None:
        raise click.BadParameter(f"{release!r}: expected NAME[@VERSION][:VARIANT]", param_hint="RELEASE")
    timeout_s = parse_duration(wave_timeout)
    wave_shares = parse_waves(waves) if waves else None
    candidates = load_candidates(_repo(ctx), match["name"], int(match["version"]) if match["version"] else None)
    if match["variant"]:
        candidates = [c for c in candidates if c.variant == match["variant"]]
        if not candidates:
            raise RolloutError(f"{release}: no such published variant")
    policy = FitPolicy(n_ctx=n_ctx, n_slots=n_slots, prefer=prefer)
    gates = Gates(min_install_rate, min_health_rate, min_tps_ratio, max_ttft_ratio)
    console = Console(width=160)
    with _store(ctx) as (home, store):
        devices, choices = _plan(store, home, selectors, candidates, policy)
        wave_of = wave_plan(choices, wave_shares) if wave_shares is not None else {}
        if dry_run or wave_shares is not None:
            console.print(_plan_table(devices, choices, wave_of))
        refused = [c for c in choices if c.candidate is None]
        for choice in refused:
            console.print(f"refused {choice.device}: {choice.summary}", highlight=False, soft_wrap=True)
        if dry_run:
            click.echo("dry run: nothing sent")
            return
        key = home.assignment_key()
        if wave_shares is None:
            _deploy_now(store, key, devices, choices, candidates)
            return
        rollout_id = start_rollout(
            store,
            choices,
            wave_of,
            selector=" / ".join(selectors),
            waves=wave_shares,
            wave_timeout_s=timeout_s,
            policy=policy,
            gates=gates,
            now=time.time(),
        )
        click.echo(f"rollout {rollout_id} started: {len(wave_of)} device(s) in {len(wave_shares)} wave(s)")


def _deploy_now(
    store: FleetStore, key: Any, devices: list[DeviceFacts], choices: list[Choice], candidates: list[Candidate]
) -> None:
    """Assign at once. One published variant (or VARIANT named): assigned even where fit is unknown or bad —
    the device checks the signed constraints itself and reports a refusal.

    One transaction: the check that no rollout of the model runs and every assignment, so a `deploy --waves`
    started concurrently either sees these assignments or makes this deploy refuse.
    """
    lines = []
    with store.transaction():
        for name in sorted({c.name for c in candidates}):
            refuse_while_rolling_out(store, name)
        for facts, choice in zip(devices, choices, strict=True):
            candidate = choice.candidate or (candidates[0] if len(candidates) == 1 else None)
            if candidate is None:
                continue
            models = with_model(current_models(store, facts.id), candidate.desired)
            generation = issue_assignment(store, key, facts.id, models)
            lines.append(f"{facts.id}: assignment generation {generation} -> {candidate.entry.path}")
        if not lines:
            raise RolloutError("nothing fits any selected device: nothing assigned")
    for line in lines:
        click.echo(line)


# --- rollout list / show / pause / resume / abort ---------------------------------------------------------


@click.group("rollout")
def rollout_group() -> None:
    """Rollouts started by `deploy --waves`: list, watch, pause, resume, abort."""


def _get(store: FleetStore, rollout_id: str) -> dict[str, Any]:
    row = store.rollout(rollout_id)
    if row is None:
        raise RolloutError(f"no rollout {rollout_id!r} (see `edge-fleet rollout list`)")
    return row


@rollout_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_context
@reports_errors
def rollout_list(ctx: FleetContext, as_json: bool) -> None:
    """Every rollout, newest first."""
    with _store(ctx) as (_, store):
        rows = []
        for r in store.rollouts():
            devices = store.rollout_devices(r["id"])
            counts: dict[str, int] = {}
            for d in devices:
                counts[d["status"]] = counts.get(d["status"], 0) + 1
            rows.append({**r, "counts": counts})
    if as_json:
        click.echo(json.dumps([_public(r) for r in rows], indent=2, sort_keys=True))
        return
    table = Table("rollout", "release", "status", "wave", "devices", "reason")
    for r in rows:
        waves = len(json.loads(r["waves_json"]))
        table.add_row(
            r["id"],
            f"{r['model']}@{r['version']}",
            r["status"],
            f"{min(r['wave'] + 1, waves)}/{waves}",
            ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items())),
            r["reason"],
        )
    Console(width=160).print(table)


def _public(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if not k.endswith("_json")}
    for k, v in row.items():
        if k.endswith("_json") and v is not None:
            out[k.removesuffix("_json")] = json.loads(v)
    return out


_STYLE = {
    "ok": "green",
    "failed": "red",
    "timeout": "red",
    "rolled_back": "yellow",
    "offline": "magenta",
    "skipped": "dim",
    "unfit": "dim",
    "assigned": "cyan",
}


def render_rollout(rollout: dict[str, Any], devices: list[dict[str, Any]], *, now: float) -> Group:
    """The live view: header, per-wave progress with gate values, per-device outcome."""
    waves = json.loads(rollout["waves_json"])
    gate_log = {g["wave"]: g for g in json.loads(rollout["gate_log_json"])}
    header = Text(
        f"rollout {rollout['id']}  {rollout['model']}@{rollout['version']}  → {rollout['selector']}\n"
        f"status {rollout['status']}  wave {min(rollout['wave'] + 1, len(waves))}/{len(waves)}"
    )
    if rollout["status"] == "running" and rollout["wave_deadline_ts"]:
        header.append(f"  deadline in {max(0.0, rollout['wave_deadline_ts'] - now):.0f}s")
    if rollout["reason"]:
        header.append(f"\n{rollout['reason']}")
    progress = Table("wave", "size", "devices", "ok", "failed", "offline", "waiting", "gates", title="waves")
    for index, percent in enumerate(waves):
        in_wave = [d for d in devices if d["wave"] == index]
        count = {s: sum(1 for d in in_wave if d["status"] == s) for s in _STYLE}
        gate = gate_log.get(index)
        if gate is None:
            gates = "running" if index == rollout["wave"] and rollout["status"] == "running" else "-"
        else:
            values = ", ".join(f"{k} {v:.2f}" for k, v in gate["values"].items() if v is not None) or "nothing measured"
            gates = ("[green]passed[/green] " if gate["passed"] else "[red]FAILED[/red] ") + values
        progress.add_row(
            str(index + 1),
            f"{percent:g}%",
            str(len(in_wave)),
            str(count["ok"]),
            str(count["failed"] + count["timeout"]),
            str(count["offline"] + count["skipped"]),
            str(count["assigned"] + sum(1 for d in in_wave if d["status"] == "pending")),
            gates,
        )
    table = Table(
        "device", "wave", "variant", "status", "tokens/s", "TTFT ms", "vs previous", "detail", title="devices"
    )
    for d in devices:
        metrics, baseline = json.loads(d["metrics_json"]), json.loads(d["baseline_json"])
        tps, ttft = metrics.get("tokens_per_s"), metrics.get("ttft_ms")
        versus = ""
        if tps and baseline.get("tokens_per_s"):
            versus = f"{tps / baseline['tokens_per_s']:.2f}× tok/s"
        style = _STYLE.get(d["status"], "")
        status = d["status"] + (" (caught up)" if d["caught_up"] else "")
        table.add_row(
            d["device"],
            str(d["wave"] + 1) if d["wave"] >= 0 else "-",
            d["variant"] or "-",
            f"[{style}]{status}[/{style}]" if style else status,
            f"{tps:.1f}" if tps else "",
            f"{ttft:.0f}" if ttft else "",
            versus,
            (d["reason"] or "")[:70],
        )
    return Group(header, progress, table)


def rollout_document(store: FleetStore, rollout_id: str) -> dict[str, Any]:
    """A rollout and its devices as JSON-able data (``rollout show --json``)."""
    devices = [_public(d) for d in store.rollout_devices(rollout_id)]
    return {**_public(_get(store, rollout_id)), "devices": devices}


@rollout_group.command("show")
@click.argument("rollout_id")
@click.option("--follow", is_flag=True, help="Keep the view live until the rollout ends (Ctrl-C stops watching).")
@click.option("--interval", type=click.FloatRange(0.1), default=1.0, show_default=True, help="Refresh (seconds).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_context
@reports_errors
def rollout_show(ctx: FleetContext, rollout_id: str, follow: bool, interval: float, as_json: bool) -> None:
    """One rollout: waves with their gate values, and every device's outcome."""
    console = Console(width=160)
    with _store(ctx) as (_, store):
        rollout = _get(store, rollout_id)
        if as_json:
            click.echo(json.dumps(rollout_document(store, rollout_id), indent=2, sort_keys=True))
            return
        if not follow:
            console.print(render_rollout(rollout, store.rollout_devices(rollout_id), now=time.time()))
            return
        with Live(console=console, auto_refresh=False) as live:
            while True:
                rollout = _get(store, rollout_id)
                devices = store.rollout_devices(rollout_id)
                live.update(render_rollout(rollout, devices, now=time.time()), refresh=True)
                settled = not any(d["status"] == "assigned" for d in devices)
                if rollout["status"] in TERMINAL and settled:
                    break
                time.sleep(interval)
        if not console.is_terminal:
            console.line()  # the last frame of a non-interactive Live view ends without a newline


@rollout_group.command("pause")
@click.argument("rollout_id")
@pass_context
@reports_errors
def rollout_pause(ctx: FleetContext, rollout_id: str) -> None:
    """Stop starting waves and evaluating gates (the wave's deadline stops too)."""
    with _store(ctx) as (_, store), store.transaction():
        rollout = _get(store, rollout_id)
        if rollout["status"] != "running":
            raise RolloutError(f"rollout {rollout_id} is {rollout['status']}, not running")
        now = time.time()
        remaining = None if rollout["wave_deadline_ts"] is None else max(0.0, rollout["wave_deadline_ts"] - now)
        store.update_rollout(rollout_id, status="paused", paused_remaining_s=remaining, updated_ts=now)
    click.echo(f"rollout {rollout_id} paused")


@rollout_group.command("resume")
@click.argument("rollout_id")
@pass_context
@reports_errors
def rollout_resume(ctx: FleetContext, rollout_id: str) -> None:
    """Continue a paused rollout (the wave gets back the time it had left)."""
    with _store(ctx) as (_, store), store.transaction():
        rollout = _get(store, rollout_id)
        if rollout["status"] != "paused":
            raise RolloutError(f"rollout {rollout_id} is {rollout['status']}, not paused")
        now = time.time()
        remaining = rollout["paused_remaining_s"]
        if rollout["wave_started_ts"] is None:
            deadline = None  # paused between waves: the next wave starts with its own deadline
        elif remaining is None:  # a wave that started without a deadline (paused just as it started): a whole one
            deadline = now + float(rollout["wave_timeout_s"])
        else:
            deadline = now + float(remaining)
        store.update_rollout(rollout_id, status="running", wave_deadline_ts=deadline, updated_ts=now)
    click.echo(f"rollout {rollout_id} resumed")


@rollout_group.command("abort")
@click.argument("rollout_id")
@pass_context
@reports_errors
def rollout_abort(ctx: FleetContext, rollout_id: str) -> None:
    """Stop a rollout and roll back every device it reached to its previous desired models."""
    with _store(ctx) as (home, store), store.transaction():
        rollout = _get(store, rollout_id)
        if rollout["status"] in TERMINAL:
            raise RolloutError(f"rollout {rollout_id} is already {rollout['status']}")
        now = time.time()
        store.update_rollout(rollout_id, status="aborted", reason="aborted by the operator", updated_ts=now)
        driver = RolloutDriver(home.assignment_key(), heartbeat_timeout=home.config.controller.heartbeat_timeout_s)
        rolled = driver.roll_back(store, rollout_id, now=now)
    click.echo(f"rollout {rollout_id} aborted; rolled back: {', '.join(rolled) or 'none'}")


# --- labels and groups ------------------------------------------------------------------------------------


def _check_device(store: FleetStore, device_id: str) -> None:
    row = store.get_device(device_id)
    if row is None or row.revoked:
        raise EnrollmentError(f"no enrolled device {device_id!r}")


@device_group.command("label")
@click.argument("device_id")
@click.argument("labels", nargs=-1)
@click.option("--remove", multiple=True, help="A label key to remove (repeatable).")
@pass_context
@reports_errors
def device_label(ctx: FleetContext, device_id: str, labels: tuple[str, ...], remove: tuple[str, ...]) -> None:
    """Set labels (key=value ...) on a device, for selectors such as `--to site=berlin`."""
    with _store(ctx) as (_, store):
        _check_device(store, device_id)
        for label in labels:
            key, sep, value = label.partition("=")
            if not sep or not LABEL_RE.fullmatch(key) or not LABEL_VALUE_RE.fullmatch(value):
                raise click.BadParameter(f"{label!r} is not key=value (key [a-z][a-z0-9_.-]*)", param_hint="LABELS")
            store.set_label(device_id, key, value)
        for key in remove:
            store.set_label(device_id, key, None)
        current = store.labels().get(device_id, {})
    click.echo(f"{device_id}: " + (", ".join(f"{k}={v}" for k, v in current.items()) or "no labels"))


@click.group("group")
def group_cmd() -> None:
    """Named device groups (selector `group:NAME`)."""


def _group_name(name: str) -> str:
    if not DEVICE_ID_RE.fullmatch(name):
        raise click.BadParameter(f"{name!r} is not a group name ([a-z0-9][a-z0-9._-]*)", param_hint="GROUP")
    return name


@group_cmd.command("add")
@click.argument("group")
@click.argument("devices", nargs=-1, required=True)
@pass_context
@reports_errors
def group_add(ctx: FleetContext, group: str, devices: tuple[str, ...]) -> None:
    """Add devices to GROUP (created on first use); nothing changes unless every device is enrolled."""
    group = _group_name(group)
    with _store(ctx) as (_, store):
        with store.transaction():  # every id first: a typo must not leave the group half-made
            for device_id in devices:
                _check_device(store, device_id)
            for device_id in devices:
                store.set_group_member(group, device_id, True)
        members = store.groups().get(group, [])
    click.echo(f"{group}: {', '.join(members)}")


@group_cmd.command("remove")
@click.argument("group")
@click.argument("devices", nargs=-1, required=True)
@pass_context
@reports_errors
def group_remove(ctx: FleetContext, group: str, devices: tuple[str, ...]) -> None:
    """Remove devices from GROUP; nothing changes unless every device is a member of it."""
    group = _group_name(group)
    with _store(ctx) as (_, store):
        with store.transaction():
            current = set(store.groups().get(group, []))
            missing = [device_id for device_id in devices if device_id not in current]
            if missing:  # a typo would otherwise leave the device in the group and report success
                raise EnrollmentError(f"not in group {group!r}: {', '.join(missing)}")
            for device_id in devices:
                store.set_group_member(group, device_id, False)
        members = store.groups().get(group, [])
    click.echo(f"{group}: {', '.join(members) or '(empty)'}")


@group_cmd.command("list")
@pass_context
@reports_errors
def group_list(ctx: FleetContext) -> None:
    """Every group and its devices."""
    with _store(ctx) as (_, store):
        for name, members in store.groups().items():
            click.echo(f"{name}: {', '.join(members)}")
