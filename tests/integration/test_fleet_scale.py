"""Fleet scale end to end: simulated devices → private Mosquitto (generated config) → ``serve`` processes → fleet DB.

Real parts only (``tests/sim_harness.py``): the broker runs the TLS + per-device-ACL configuration ``edge-fleet
init`` wrote, every simulated device has its own certificate, the controllers are real ``edge-fleet serve``
processes, and every count is read from the fleet DB they wrote. Sized for the test suite on 2 cores (200 and
120 devices); ``bench/fleet.py`` measures 1,000 and 5,000 against the same limits (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from sim_harness import ROOT, ScaleFleet, scale_fleet, wait_until

from controller.simulate import Simulation, SimulationOptions

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def assert_nothing_lost(fleet: ScaleFleet, sim: Simulation) -> None:
    """Every record and report the devices made is stored exactly once, and they all have their acks."""
    counts = fleet.counts()
    stats = sim.stats
    assert stats.records_made == stats.records_acked == counts["audit_records"]
    assert stats.reports_made == stats.reports_acked == counts["reports"]
    (distinct,) = fleet.query("SELECT count(*) FROM (SELECT DISTINCT device, epoch, seq FROM audit_records)")[0]
    assert distinct == counts["audit_records"]
    assert counts["alerts"] == 0
    assert counts["rejections"] == 0


async def test_simulated_fleet_online_deployed_bounded(tmp_path: Path) -> None:
    """200 simulated devices: all online within 30 s, a deploy acked by all within 60 s, RSS < 500 MB, none lost."""
    n = 200
    async with scale_fleet(tmp_path) as fleet:
        controller = fleet.start_controller()
        sim = fleet.simulation(n, SimulationOptions(heartbeat_s=10, events_per_min=60, resend_after_s=10, seed=7))
        async with sim:
            online = await wait_until(
                lambda: fleet.counts()["online"] == n, 30, what="all devices online", sample=controller.sample
            )
            await asyncio.sleep(3)  # some audit traffic before the deploy
            generation = fleet.deploy([d.device for d in sim.devices])
            deployed = await wait_until(
                lambda: len(sim.installed.get(generation, ())) == n,
                60,
                what="install reports acked",
                sample=controller.sample,
            )
            assert await sim.drain(60), sim.summary()
        assert online < 30
        assert deployed < 60
        assert sim.stats.assignments_applied == n
        assert_nothing_lost(fleet, sim)
        controller.sample()
        assert 0 < controller.peak_rss < 500 * 2**20


async def test_two_controllers_share_ingestion_and_survive_a_kill(tmp_path: Path) -> None:
    """Two controllers on one broker and DB: both ingest, one killed mid-run (SIGKILL), nothing lost or doubled."""
    n = 120
    async with scale_fleet(tmp_path) as fleet:
        fleet.add_controller_identity("second")
        main = fleet.start_controller("main")
        second = fleet.start_controller("second")
        options = SimulationOptions(heartbeat_s=10, events_per_min=120, batch_delay_s=0.3, resend_after_s=3, seed=11)
        sim = fleet.simulation(n, options)
        async with sim:
            await wait_until(lambda: fleet.counts()["online"] == n, 60, what="all devices online")
            await wait_until(lambda: sim.stats.records_acked > 3 * n, 60, what="audit traffic through both")
            # Both controllers took a share of the shared subscription.
            logs = [c.log_path.read_text() for c in (main, second)]
            assert all('"audit.stored"' in text for text in logs)
            second.kill()
            killed_at = sim.stats.records_made
            await wait_until(lambda: sim.stats.records_made > killed_at + 2 * n, 60, what="traffic after the kill")
            generation = fleet.deploy([d.device for d in sim.devices])
            await wait_until(lambda: len(sim.installed.get(generation, ())) == n, 90, what="install reports acked")
            assert await sim.drain(90), sim.summary()
        assert_nothing_lost(fleet, sim)


def test_simulate_command_runs_and_resumes(tmp_path: Path) -> None:
    """`edge-fleet simulate` twice on one home: every record acked and stored, the second run's epochs linked."""
    with contextlib.ExitStack() as stack:
        fleet = ScaleFleet(tmp_path)
        stack.callback(fleet.close)
        fleet.start_broker()
        fleet.start_controller()
        command = [
            sys.executable, "-m", "controller", "--home", str(fleet.home.root), "simulate", "--devices", "5",
            "--broker", f"127.0.0.1:{fleet.broker.port}", "--duration", "4", "--events-per-min", "120",
            "--heartbeat", "2", "--resend-after", "2", "--skip-blobs", "--json",
        ]  # fmt: skip
        refused = subprocess.run(command[:-2], capture_output=True, text=True, timeout=60, check=False)
        assert refused.returncode == 2
        assert "--skip-blobs" in refused.stderr
        made = 0
        for _ in range(2):
            done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True, cwd=ROOT)
            counters = json.loads(done.stdout)
            assert counters["records_made"] == counters["records_acked"] > 5
            made += counters["records_made"]
        counts = fleet.counts()
        assert counts["audit_records"] == made
        assert counts["alerts"] == 0  # the second run's epochs continue the stored heads
        (epochs,) = fleet.query("SELECT count(DISTINCT epoch) FROM audit_records WHERE device = 'sim-00000'")[0]
        assert epochs == 2
