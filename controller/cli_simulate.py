"""``edge-fleet simulate``: run N simulated devices against the broker (load tests; controller.simulate)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import click

from controller.cli import FleetContext, pass_context
from controller.errors import ControllerError
from controller.home import FleetHome

__all__ = ["simulate"]


@click.command()
@click.option("--devices", type=click.IntRange(1, 100_000), required=True, help="How many simulated devices.")
@click.option("--broker", default=None, metavar="HOST:PORT", help="Broker address (default: the home's broker).")
@click.option("--prefix", default="sim", show_default=True, help="Device ids are PREFIX-00000, PREFIX-00001, ...")
@click.option("--heartbeat", type=click.FloatRange(0.5), default=30.0, show_default=True, help="Seconds per heartbeat.")
@click.option(
    "--events-per-min", type=click.FloatRange(0), default=6.0, show_default=True, help="Audit events per device."
)
@click.option(
    "--connect-rate", type=click.FloatRange(0.1), default=200.0, show_default=True, help="New connections per second."
)
@click.option(
    "--resend-after", type=click.FloatRange(0.1), default=10.0, show_default=True, help="First re-send of unacked data."
)
@click.option("--duration", type=click.FloatRange(0), default=0.0, help="Stop after N seconds (default: SIGINT).")
@click.option(
    "--skip-blobs",
    is_flag=True,
    help="Report assignments installed without downloading the blobs (required: transfers are not simulated).",
)
@click.option("--seed", type=int, default=None, help="Random seed for jitter and event times.")
@click.option("--json", "as_json", is_flag=True, help="Print the final counters as JSON.")
@pass_context
def simulate(
    ctx: FleetContext,
    devices: int,
    broker: str | None,
    prefix: str,
    heartbeat: float,
    events_per_min: float,
    connect_rate: float,
    resend_after: float,
    duration: float,
    skip_blobs: bool,
    seed: int | None,
    as_json: bool,
) -> None:
    """Run DEVICES simulated agents in this process, speaking the real protocol (enrolled here if needed)."""
    import logging
    import sys

    import structlog

    from controller import simulate as sim

    # Warnings and errors only, on stderr: stdout carries the progress lines or the JSON counters.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    if not skip_blobs:
        raise click.UsageError("blob transfer is not simulated: pass --skip-blobs (installs are reported as such)")
    try:
        home = FleetHome.open(ctx.home)
        host, port = (home.config.broker.host, home.config.broker.port) if broker is None else sim.parse_broker(broker)
        identities = sim.enroll_simulated(home, devices, prefix)
        heads = sim.stored_heads(home.db_path, [i.device for i in identities])
        options = sim.SimulationOptions(
            heartbeat_s=heartbeat,
            events_per_min=events_per_min,
            connect_rate=connect_rate,
            resend_after_s=resend_after,
            skip_blobs=True,
            seed=seed,
        )
        simulation = sim.Simulation(
            identities,
            host=host,
            port=port,
            controller_keys=sim.controller_keys(home),
            options=options,
            previous_heads=heads,
        )
    except (ControllerError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc

    async def run() -> None:
        async with simulation:
            started = time.monotonic()
            while not duration or time.monotonic() - started < duration:
                await asyncio.sleep(min(5.0, duration or 5.0))
                if not as_json:
                    s = simulation.summary()
                    click.echo(
                        f"{s['elapsed_s']:8.1f}s connected {s['connected_now']}/{devices} "
                        f"records {s['records_acked']}/{s['records_made']} acked "
                        f"reports {s['reports_acked']}/{s['reports_made']} acked, states {s['states']}"
                    )
            await simulation.drain(within=30.0)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    summary = simulation.summary()
    click.echo(json.dumps(summary, indent=2) if as_json else f"final: {summary}")
