"""``edge-fleet``: the fleet controller's command line.

Every subcommand takes ``--home DIR`` (or ``EDGE_FLEET_HOME``; default ``~/.local/share/edge-fleet``), the
controller's state directory: keys, CA, fleet database, release repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from controller import __version__

__all__ = ["FleetContext", "main", "pass_context"]

DEFAULT_HOME = Path("~/.local/share/edge-fleet")


@dataclass(frozen=True)
class FleetContext:
    """What every subcommand gets."""

    home: Path


pass_context = click.make_pass_decorator(FleetContext)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="edge-fleet")
@click.option(
    "--home",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="EDGE_FLEET_HOME",
    default=DEFAULT_HOME,
    show_default=True,
    help="The controller's state directory (keys, CA, fleet database, release repository).",
)
@click.pass_context
def main(ctx: click.Context, home: Path) -> None:
    """edge-fleet: sign, push and roll out small language models to a fleet of edge devices."""
    ctx.obj = FleetContext(home=home.expanduser())


def _register_commands() -> None:
    from controller.cli_fleet import broker, controller_group, device, devices, init, serve
    from controller.cli_models import model_group
    from controller.cli_releases import keys_group  # also adds `model add/publish/list`
    from controller.cli_rollouts import deploy, group_cmd, rollout_group  # also adds `device label`

    # Other modules extend the `model` group (releases: add/publish/list) by importing `model_group`.
    for command in (init, device, devices, serve, broker, controller_group, model_group, keys_group, deploy):
        main.add_command(command)

    from controller.cli_audit import audit_group

    main.add_command(audit_group)

    from controller.cli_simulate import simulate

    main.add_command(simulate)
    for command in (rollout_group, group_cmd):
        main.add_command(command)


_register_commands()
