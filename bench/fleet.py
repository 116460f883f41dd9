"""Fleet-scale benchmark: simulated devices against one and two ``edge-fleet serve`` processes.

For each N in ``--devices`` (default 100, 1000, 5000) and each controller count in ``--controllers`` (default 1
and 2), in one run on this machine (tests/sim_harness.py; real parts only):

1. a fresh home (``FleetHome.init``) and a private Mosquitto running the configuration init generated (TLS with a
   client certificate per device, per-device ACL); ``serve`` as child processes (the second one with its own
   identity from ``controller add``, in the same shared-subscription group, on the same fleet DB file);
2. N simulated devices (:mod:`controller.simulate`, one asyncio process: this one) enrolled (timed apart), then
   connected at ``--connect-rate`` per second: **online** = seconds until the fleet DB shows all N online;
3. a steady phase of ``--steady`` seconds at ``--events-per-min`` audit events per device: **audit records/s**
   verified and stored (fleet DB row count over the window), next to the offered rate, with the controllers'
   CPU use;
4. **deploy**: a signed assignment for every device (what ``edge-fleet device assign`` writes; no waves, no blob
   transfer — the simulated devices skip it and say so in their reports): seconds until every device has its
   install report *acked by a controller*;
5. a **burst**: every device logs ``--burst``/N records at once; they go up in batches of up to 200 (one
   batch in flight per device, as the agent uploads), so the controllers' verify-and-store path is the limit:
   records/s from the burst to the last ack, and the CPU use of the controllers, the broker and the simulator
   meanwhile (also measured in the steady phase: where the first bottleneck is);
6. drain (no new events, everything acked), then the loss check: records made by the devices = records stored
   = records acked; install reports made = stored; duplicates counted;
7. per controller: CPU seconds and peak resident memory (psutil, sampled every 0.25 s).

Writes ``.cache/bench/fleet.json`` and ``docs/img/fleet.png`` (time and memory against N). A run that does not
finish a phase within ``--phase-timeout`` is recorded with the phase it reached (never silently dropped).

Usage: ``python bench/fleet.py [--devices 100 1000 5000] [--controllers 1 2] [--steady 15]``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import psutil  # noqa: E402
import structlog  # noqa: E402
from sim_harness import ScaleFleet, scale_fleet, wait_until  # noqa: E402

from controller.simulate import SimulationOptions  # noqa: E402

OUT = ROOT / ".cache" / "bench"
CHART = ROOT / "docs" / "img" / "fleet.png"


async def run_one(n: int, controllers: int, args: argparse.Namespace) -> dict[str, Any]:
    """One fleet of ``n`` simulated devices against ``controllers`` serve processes; every figure of one row."""
    row: dict[str, Any] = {"devices": n, "controllers": controllers, "reached": "start"}
    me = psutil.Process()
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
        async with scale_fleet(Path(tmp)) as fleet:
            names = ["main", "second"][:controllers]
            for name in names[1:]:
                fleet.add_controller_identity(name)
            procs = [fleet.start_controller(name) for name in names]

            def sample() -> None:
                for proc in procs:
                    proc.sample()

            def cpu() -> float:
                return sum(p.cpu_seconds() for p in procs)

            broker_ps = psutil.Process(fleet.broker_pid())

            def others() -> tuple[float, float]:
                """CPU seconds of the broker and of this (simulator) process."""
                return sum(broker_ps.cpu_times()[:2]), sum(me.cpu_times()[:2])

            started = time.monotonic()
            options = SimulationOptions(
                heartbeat_s=args.heartbeat,
                events_per_min=args.events_per_min,
                connect_rate=args.connect_rate,
                resend_after_s=30.0,
                seed=n,
            )
            sim = fleet.simulation(n, options)
            row["enroll_s"] = round(time.monotonic() - started, 2)
            timeout = args.phase_timeout
            try:
                async with sim:
                    sim_cpu0 = sum(me.cpu_times()[:2])
                    row["online_s"] = round(
                        await wait_until(
                            lambda: fleet.counts()["online"] == n, timeout, what="all online", sample=sample
                        ),
                        2,
                    )
                    row["reached"] = "online"
                    row["connected_in_sim_s"] = sim.stats.all_connected_s
                    # Steady phase: stored rate over a window, after a few seconds of warm-up.
                    await asyncio.sleep(3)
                    count0, cpu0, t0, (broker0, sim0) = _records(fleet), cpu(), time.monotonic(), others()
                    while time.monotonic() - t0 < args.steady:
                        sample()
                        await asyncio.sleep(0.25)
                    count1, cpu1, t1, (broker1, sim1) = _records(fleet), cpu(), time.monotonic(), others()
                    row["steady_broker_cpu_pct"] = round(100 * (broker1 - broker0) / (t1 - t0), 1)
                    row["steady_simulator_cpu_pct"] = round(100 * (sim1 - sim0) / (t1 - t0), 1)
                    row["audit_records_per_s"] = round((count1 - count0) / (t1 - t0), 1)
                    row["audit_offered_per_s"] = round(n * args.events_per_min / 60, 1)
                    row["steady_controller_cpu_pct"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 1)
                    row["reached"] = "steady"
                    # Deploy to all.
                    generation = fleet.deploy([d.device for d in sim.devices])
                    row["deploy_s"] = round(
                        await wait_until(
                            lambda: len(sim.installed.get(generation, ())) == n,
                            timeout,
                            what="every install report acked",
                            sample=sample,
                        ),
                        2,
                    )
                    row["reached"] = "deployed"
                    # Burst: every device logs --burst/N records at once; they go up in batches of up to
                    # max_batch, one in flight per device, so the controllers' ingest is what limits the rate.
                    assert await sim.drain(timeout), "no drain before the burst"
                    per_device = max(1, args.burst // n)
                    for device in sim.devices:  # without yielding: nothing is uploaded before the clock starts
                        for index in range(per_device):
                            device.add_event("bench.burst", {"i": index})
                    count0, cpu0, (broker0, sim0) = _records(fleet), cpu(), others()
                    burst_s = await wait_until(
                        lambda: all(d.idle for d in sim.devices), timeout, what="burst stored and acked", sample=sample
                    )
                    row["burst_records"] = _records(fleet) - count0
                    row["burst_records_per_s"] = round(row["burst_records"] / burst_s, 1)
                    row["burst_controller_cpu_pct"] = round(100 * (cpu() - cpu0) / burst_s, 1)
                    broker1, sim1 = others()
                    row["burst_broker_cpu_pct"] = round(100 * (broker1 - broker0) / burst_s, 1)
                    row["burst_simulator_cpu_pct"] = round(100 * (sim1 - sim0) / burst_s, 1)
                    row["reached"] = "burst"
                    drained = await sim.drain(timeout)
                    row["drained"] = drained
                    row["reached"] = "drained" if drained else "drain timed out"
                    row["sim_cpu_s"] = round(sum(me.cpu_times()[:2]) - sim_cpu0, 1)
            except AssertionError as exc:
                row["error"] = str(exc)
            counts = fleet.counts()
            stats = sim.summary()
            row["loss_check"] = {
                "records_made": stats["records_made"],
                "records_acked": stats["records_acked"],
                "records_stored": counts["audit_records"],
                "reports_made": stats["reports_made"],
                "reports_stored": counts["reports"],
                "audit_duplicates_counted": counts["audit_duplicates"],
                "report_duplicates_counted": counts["report_duplicates"],
                "batch_resends": stats["batch_resends"],
                "report_resends": stats["report_resends"],
                "alerts": counts["alerts"],
                "rejections": counts["rejections"],
                "lost": stats["records_made"] - counts["audit_records"] + stats["reports_made"] - counts["reports"],
            }
            sample()
            row["controller_cpu_s"] = [round(p.cpu_seconds(), 1) for p in procs]
            row["controller_peak_rss_mb"] = [round(p.peak_rss / 2**20, 1) for p in procs]
    return row


def _records(fleet: ScaleFleet) -> int:
    return int(fleet.query("SELECT count(*) FROM audit_records")[0][0])


def write_chart(rows: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for controllers, style in ((1, "o-"), (2, "s--")):
        mine = sorted((r for r in rows if r["controllers"] == controllers), key=lambda r: r["devices"])
        if not mine:
            continue
        ns = [r["devices"] for r in mine]
        for key, label in (("online_s", "all online"), ("deploy_s", "deploy acked")):
            points = [(r["devices"], r[key]) for r in mine if key in r]
            if points:
                left.plot(*zip(*points, strict=True), style, label=f"{label}, {controllers} ctl")
        right.plot(ns, [max(r["controller_peak_rss_mb"]) for r in mine], style, label=f"{controllers} controller(s)")
    left.set(xscale="log", xlabel="simulated devices", ylabel="seconds", title="time")
    right.set(xscale="log", xlabel="simulated devices", ylabel="MiB", title="peak controller RSS (serve + workers)")
    left.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--controllers", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--steady", type=float, default=15.0, help="seconds of the steady phase")
    parser.add_argument("--events-per-min", type=float, default=60.0, help="audit events per device per minute")
    parser.add_argument("--heartbeat", type=float, default=30.0, help="seconds between heartbeats")
    parser.add_argument("--connect-rate", type=float, default=200.0, help="new connections per second")
    parser.add_argument("--burst", type=int, default=100_000, help="audit records logged at once, over all devices")
    parser.add_argument("--phase-timeout", type=float, default=300.0, help="give up a phase after this long")
    parser.add_argument(
        "--merge", action="store_true", help="keep rows of other (N, controllers) already in fleet.json"
    )
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    logging.getLogger("mqtt").setLevel(logging.ERROR)
    rows = []
    for n in args.devices:
        for controllers in args.controllers:
            started = time.monotonic()
            row = asyncio.run(run_one(n, controllers, args))
            row["wall_s"] = round(time.monotonic() - started, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.merge and (OUT / "fleet.json").exists():
        done = {(r["devices"], r["controllers"]) for r in rows}
        old = json.loads((OUT / "fleet.json").read_text())["rows"]
        rows = sorted(
            [r for r in old if (r["devices"], r["controllers"]) not in done] + rows,
            key=lambda r: (r["devices"], r["controllers"]),
        )
    result = {
        "benchmark": "fleet_scale",
        "options": vars(args),
        "rows": rows,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "fleet.json").write_text(json.dumps(result, indent=2) + "\n")
    try:
        chart = write_chart(rows, CHART)
        print(f"chart: {chart.relative_to(ROOT)}")
    except Exception as exc:  # matplotlib missing: the JSON has every figure
        print(f"no chart: {exc}")
    print(f"written to {(OUT / 'fleet.json').relative_to(ROOT)}")
    header = (
        f"{'N':>6} {'ctl':>3} {'online s':>9} {'rec/s':>8} {'offered':>8} {'deploy s':>9} {'RSS MiB':>12} {'lost':>5}"
    )
    print(header)
    for r in rows:
        rss = "/".join(str(x) for x in r["controller_peak_rss_mb"])
        print(
            f"{r['devices']:>6} {r['controllers']:>3} {r.get('online_s', '-')!s:>9} "
            f"{r.get('audit_records_per_s', '-')!s:>8} {r.get('audit_offered_per_s', '-')!s:>8} "
            f"{r.get('deploy_s', '-')!s:>9} {r.get('burst_records_per_s', '-')!s:>8} {rss:>12} "
            f"{r['loss_check']['lost']:>5}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
