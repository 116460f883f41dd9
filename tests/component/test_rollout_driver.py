"""The rollout driver over a real fleet DB (SQLite file) with a controlled clock: deadlines, offline devices,
rollback, pause, and a driver that is replaced between ticks (what a controller restart does).

Devices and their reports are written into the fleet DB exactly as ``serve`` records them (``record_state``,
``record_report``); the end-to-end path over MQTT is ``tests/integration/test_rollouts.py``.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.releases import TargetEntry
from controller.rollout import (
    Candidate,
    FitPolicy,
    Gates,
    RolloutDriver,
    RolloutError,
    choose_variant,
    device_facts,
    issue_assignment,
    refuse_while_rolling_out,
    start_rollout,
    wave_plan,
)
from controller.store import FleetStore
from protocols.keys import generate_private_key
from protocols.messages import DesiredModel
from protocols.releases import ModelTargetFields

pytestmark = pytest.mark.component

GiB = 1 << 30
HEARTBEAT = 10.0
KEY = generate_private_key()
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _candidate(version: int, name: str = "m") -> Candidate:
    length = 1000
    fields = ModelTargetFields("gguf", "q4_0", 0, 0, 0, (), (), "mit", length, ("0" * 64,))
    entry = TargetEntry(f"models/{name}/{version}/q4_0.gguf", length, f"{version:064x}", fields, True)
    return Candidate(entry, name, version, "q4_0", None)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FleetStore]:
    store = FleetStore.open(tmp_path / "fleet.db")
    yield store
    store.close()


def _add(store: FleetStore, device: str, *, online: bool, now: float) -> None:
    with store.transaction():
        store.add_device(
            device,
            cert_serial=secrets.randbits(64),
            cert_not_after=dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
            signing_keyid="k",
            signing_key_pem="-",
        )
        issue_assignment(store, KEY, device, [_candidate(1).desired], now=now)  # v1 is the previous release
    hardware = {"arch": "x86_64", "cpu_features": [], "cores": 4, "ram_bytes": 4 * GiB, "ram_budget_bytes": 4 * GiB,
                "disk_free_bytes": 100 * GiB, "accelerators": []}  # fmt: skip
    store.record_state(
        device,
        status="online" if online else "offline",
        state={"hardware": hardware, "models": []},
        state_ts_ms=int(now * 1000),
        heartbeat=1,
        agent_version="t",
        seen=now,
        now=now,
    )


def _report(
    store: FleetStore,
    device: str,
    generation: int,
    outcome: str = "ok",
    kind: str = "install",
    *,
    version: int = 2,
    tps: float = 10.0,
) -> None:
    store.record_report(
        {
            "report_id": secrets.token_hex(16),
            "device": device,
            "ts_ms": int(T0 * 1000),
            "kind": kind,
            "outcome": outcome,
            "reason": "r",
            "generation": generation,
            "model": {"name": "m", "version": version, "variant": "q4_0"},
            "metrics": {"tokens_per_s": tps, "ttft_ms": 50.0},
        },
        received_ts=T0,
    )


def _start(store: FleetStore, clock: Clock, waves: tuple[float, ...], timeout: float = 60.0) -> str:
    facts = device_facts(store, heartbeat_timeout=HEARTBEAT, now=clock.now)
    choices = [choose_variant(f, [_candidate(2)], FitPolicy()) for f in facts]
    return start_rollout(
        store,
        choices,
        wave_plan(choices, waves),
        selector="all",
        waves=waves,
        wave_timeout_s=timeout,
        policy=FitPolicy(),
        gates=Gates(),
        now=clock.now,
    )


LINK_UP = T0 - 3600
"""The controller's link has been up since long before the tests' start (unless a test says otherwise)."""


def _tick(store: FleetStore, clock: Clock, *, link_up_since: float | None = LINK_UP) -> int:
    driver = RolloutDriver(KEY, heartbeat_timeout=HEARTBEAT, clock=clock, link_up_since=lambda: link_up_since)
    return driver.tick(store)  # a new driver each time: no state


def _devices(store: FleetStore, rollout_id: str) -> dict[str, dict[str, Any]]:
    return {d["device"]: d for d in store.rollout_devices(rollout_id)}


def _keep_online(store: FleetStore, clock: Clock, *devices: str) -> None:
    for device in devices:
        store.touch(device, clock.now)


def test_silent_device_times_out_at_the_deadline_and_the_rollout_halts_and_rolls_back(store: FleetStore) -> None:
    """An online canary that never reports fails at the wave deadline; it is rolled back, wave 2 never assigned."""
    clock = Clock()
    _add(store, "a", online=True, now=clock.now)
    _add(store, "b", online=True, now=clock.now)
    rollout_id = _start(store, clock, (50.0, 100.0), timeout=60.0)
    _tick(store, clock)
    assert _devices(store, rollout_id)["a"]["status"] == "assigned"
    assert store.assignments("a", limit=1)[0].generation == 2
    clock.now += 59
    _keep_online(store, clock, "a", "b")
    _tick(store, clock)
    assert store.rollout(rollout_id)["status"] == "running"  # type: ignore[index]
    clock.now += 2
    _keep_online(store, clock, "a", "b")
    _tick(store, clock)
    rollout = store.rollout(rollout_id)
    assert rollout is not None
    assert rollout["status"] == "halted"
    assert "install_rate 0.00 < 1.00" in rollout["reason"]
    devices = _devices(store, rollout_id)
    assert devices["a"]["status"] == "rolled_back"
    assert "timeout" in devices["a"]["reason"]
    newest = store.assignments("a", limit=1)[0]
    assert newest.generation == 3
    assert [m["version"] for m in newest.models] == [1]  # back on the previous release
    _tick(store, clock)
    assert _devices(store, rollout_id)["b"]["status"] == "skipped"
    assert [a.generation for a in store.assignments("b")] == [1]  # never received v2


def test_offline_device_does_not_block_and_catches_up(store: FleetStore) -> None:
    """An offline device stops blocking after a heartbeat window; its late report marks it caught up."""
    clock = Clock()
    _add(store, "a", online=True, now=clock.now)
    _add(store, "b", online=False, now=clock.now)
    rollout_id = _start(store, clock, (50.0, 100.0), timeout=600.0)
    _tick(store, clock)
    _report(store, "a", 2)
    _tick(store, clock)  # wave 1 passes on a's report
    _tick(store, clock)  # wave 2 starts: b is assigned (retained until it returns)
    assert _devices(store, rollout_id)["b"]["status"] == "assigned"
    clock.now += HEARTBEAT / 2
    _tick(store, clock)
    assert store.rollout(rollout_id)["status"] == "running"  # type: ignore[index]  # still in its grace window
    clock.now += HEARTBEAT
    _tick(store, clock)
    assert store.rollout(rollout_id)["status"] == "completed"  # type: ignore[index]
    assert _devices(store, rollout_id)["b"]["status"] == "offline"
    _report(store, "b", 2)  # b returns, installs the retained assignment, reports
    _tick(store, clock)
    b = _devices(store, rollout_id)["b"]
    assert (b["status"], b["caught_up"]) == ("ok", 1)
    assert json.loads(b["metrics_json"])["tokens_per_s"] == 10.0


def test_health_failure_halts_and_a_paused_rollout_waits(store: FleetStore) -> None:
    """A paused rollout does nothing past its deadline; resumed, a failed health check halts it."""
    clock = Clock()
    _add(store, "a", online=True, now=clock.now)
    _add(store, "b", online=True, now=clock.now)
    rollout_id = _start(store, clock, (50.0, 100.0), timeout=30.0)
    _tick(store, clock)
    with store.transaction():
        store.update_rollout(rollout_id, status="paused", paused_remaining_s=30.0)
    clock.now += 100
    _tick(store, clock)
    assert _devices(store, rollout_id)["a"]["status"] == "assigned"
    with store.transaction():
        store.update_rollout(rollout_id, status="running", wave_deadline_ts=clock.now + 30.0)
    _report(store, "a", 2, outcome="failed", kind="health")
    _keep_online(store, clock, "a", "b")
    _tick(store, clock)
    rollout = store.rollout(rollout_id)
    assert rollout is not None
    assert rollout["status"] == "halted"
    assert "health_rate 0.00 < 1.00" in rollout["reason"]
    with pytest.raises(RolloutError, match="nothing fits"):
        start_rollout(
            store, [], {}, selector="x", waves=(100.0,), wave_timeout_s=1, policy=FitPolicy(), gates=Gates(), now=T0
        )


def test_one_rollout_per_model_at_a_time(store: FleetStore) -> None:
    """A second rollout of a model whose rollout still runs is refused."""
    clock = Clock()
    _add(store, "a", online=True, now=clock.now)
    _start(store, clock, (100.0,))
    with pytest.raises(RolloutError, match="still running"):
        _start(store, clock, (100.0,))
    with pytest.raises(RolloutError, match="still running"):  # what a direct `deploy` (no waves) checks too
        refuse_while_rolling_out(store, "m")
    refuse_while_rolling_out(store, "another-model")


def test_slower_than_the_previous_model_on_the_same_device_halts(store: FleetStore) -> None:
    """The canary decodes at 10 % of its own v1 speed: the tokens/s gate fails and the rollout halts."""
    clock = Clock()
    _add(store, "a", online=True, now=clock.now)
    _add(store, "b", online=True, now=clock.now)
    _report(store, "a", 1, version=1, tps=100.0)  # what a measured when it installed v1
    rollout_id = _start(store, clock, (50.0, 100.0))
    _tick(store, clock)
    assert json.loads(_devices(store, rollout_id)["a"]["baseline_json"])["tokens_per_s"] == 100.0
    _report(store, "a", 2, tps=10.0)
    _keep_online(store, clock, "a", "b")
    _tick(store, clock)
    rollout = store.rollout(rollout_id)
    assert rollout is not None
    assert rollout["status"] == "halted"
    assert "tps_ratio 0.10 < 0.50" in rollout["reason"]


def test_rollback_keeps_what_was_assigned_since_and_only_reverts_this_family(store: FleetStore) -> None:
    """Another model assigned after the canary was reached survives the rollback; only ``m`` goes back to v1."""
    clock = Clock()
    _add(store, "a", online=True, now=clock.now)
    _add(store, "b", online=True, now=clock.now)
    rollout_id = _start(store, clock, (50.0, 100.0), timeout=60.0)
    _tick(store, clock)
    reached = store.assignments("a", limit=1)[0]
    other = Candidate(
        TargetEntry("models/vad/1/fp32.onnx", 10, "ab" * 32, _candidate(1).entry.fields, True), "vad", 1, "fp32", None
    )
    with store.transaction():  # an operator deploys another model to the canary meanwhile
        models = [*(DesiredModel(**dict(m)) for m in reached.models), other.desired]
        issue_assignment(store, KEY, "a", models, now=clock.now)
    _report(store, "a", reached.generation, outcome="failed", kind="health")
    _keep_online(store, clock, "a", "b")
    _tick(store, clock)
    assert store.rollout(rollout_id)["status"] == "halted"  # type: ignore[index]
    newest = store.assignments("a", limit=1)[0]
    assert sorted((m["name"], m["version"]) for m in newest.models) == [("m", 1), ("vad", 1)]


def test_a_report_on_a_newer_generation_about_the_same_release_counts(store: FleetStore) -> None:
    """The rollout's assignment is re-issued (a key rotation re-signs it) before the device applies it: the
    device's report on the newer generation completes the wave instead of a timeout and a rollback."""
    clock = Clock()
    _add(store, "a", online=True, now=clock.now)
    rollout_id = _start(store, clock, (100.0,), timeout=60.0)
    _tick(store, clock)
    reached = store.assignments("a", limit=1)[0]
    with store.transaction():
        newer = issue_assignment(store, KEY, "a", [DesiredModel(**dict(m)) for m in reached.models], now=clock.now)
    assert newer == reached.generation + 1
    _report(store, "a", newer + 5, version=3)  # about another release: does not count
    _tick(store, clock)
    assert _devices(store, rollout_id)["a"]["status"] == "assigned"
    _report(store, "a", newer)
    _keep_online(store, clock, "a")
    _tick(store, clock)
    assert _devices(store, rollout_id)["a"]["status"] == "ok"
    assert store.rollout(rollout_id)["status"] == "completed"  # type: ignore[index]


# --- offline only on this controller's own observation (docs/rollouts.md, Restarts) -----------------------


def test_a_restarted_controller_does_not_pass_a_wave_on_stale_last_seen(store: FleetStore) -> None:
    """After a downtime longer than the heartbeat window, a wave is not passed before the link is up and the
    devices' states and queued reports are in: the canary's failure report, read in after the restart, halts."""
    clock = Clock()
    for device in ("d1", "d2", "d3"):
        _add(store, device, online=True, now=clock.now)
    rollout_id = _start(store, clock, (30.0, 100.0), timeout=900.0)
    _tick(store, clock)
    assert [d for d, row in _devices(store, rollout_id).items() if row["status"] == "assigned"] == ["d1"]
    generation = _devices(store, rollout_id)["d1"]["generation"]
    clock.now += HEARTBEAT + 5  # the controller was down; nobody touched last_seen
    _tick(store, clock, link_up_since=None)  # the first tick after the restart: the link is not up yet
    rollout = store.rollout(rollout_id)
    assert rollout is not None
    assert (rollout["status"], rollout["wave"]) == ("running", 0)
    assert _devices(store, rollout_id)["d1"]["status"] == "assigned"
    restarted = clock.now
    _tick(store, clock, link_up_since=restarted)  # the link just came up: a stale last_seen is still no evidence
    assert _devices(store, rollout_id)["d1"]["status"] == "assigned"
    _keep_online(store, clock, "d1", "d2", "d3")  # retained state and the queued report arrive
    _report(store, "d1", generation, outcome="failed", kind="health")
    clock.now += 1
    _tick(store, clock, link_up_since=restarted)
    rollout = store.rollout(rollout_id)
    assert rollout is not None
    assert rollout["status"] == "halted"
    assert "health_rate 0.00 < 1.00" in rollout["reason"]
    assert _devices(store, rollout_id)["d2"]["status"] in ("pending", "skipped")  # wave 2 never started


def test_a_device_is_judged_offline_only_after_a_heartbeat_window_of_link_up_time(store: FleetStore) -> None:
    """A silent device holds its wave, even past the deadline, while the link is down or up for less than a
    heartbeat window; after a whole window of link time it is `offline` and the wave passes (counted: 0)."""
    clock = Clock()
    _add(store, "a", online=True, now=clock.now)
    rollout_id = _start(store, clock, (100.0,), timeout=30.0)
    _tick(store, clock)
    clock.now += 100  # past the wave's deadline and the heartbeat window: a stale last_seen
    _tick(store, clock, link_up_since=None)  # a broker outage: the link is down
    assert _devices(store, rollout_id)["a"]["status"] == "assigned"
    up = clock.now
    clock.now += HEARTBEAT / 2
    _tick(store, clock, link_up_since=up)
    assert _devices(store, rollout_id)["a"]["status"] == "assigned"
    assert store.rollout(rollout_id)["status"] == "running"  # type: ignore[index]
    clock.now += HEARTBEAT
    _tick(store, clock, link_up_since=up)
    rollout = store.rollout(rollout_id)
    assert rollout is not None
    assert (rollout["status"], _devices(store, rollout_id)["a"]["status"]) == ("completed", "offline")
    assert json.loads(rollout["gate_log_json"])[-1]["counted"] == 0


# --- pause, resume, and one bad rollout -------------------------------------------------------------------


def test_a_pause_landing_mid_tick_is_obeyed(store: FleetStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rollout pause` committed after tick() listed the rollouts but before its step: no wave starts."""
    clock = Clock()
    _add(store, "a", online=True, now=clock.now)
    _add(store, "b", online=True, now=clock.now)
    rollout_id = _start(store, clock, (50.0, 100.0))
    _tick(store, clock)
    _report(store, "a", _devices(store, rollout_id)["a"]["generation"])
    _tick(store, clock)  # wave 1 passed; wave 2 not started yet
    assert store.rollout(rollout_id)["wave_started_ts"] is None  # type: ignore[index]
    listed = store.rollouts

    def rollouts_then_pause(**kw: Any) -> list[dict[str, Any]]:  # the operator's pause, between list and step
        rows = listed(**kw)
        with store.transaction():
            store.update_rollout(rollout_id, status="paused", paused_remaining_s=None)
        monkeypatch.setattr(store, "rollouts", listed)
        return rows

    monkeypatch.setattr(store, "rollouts", rollouts_then_pause)
    _tick(store, clock)
    rollout = store.rollout(rollout_id)
    assert rollout is not None
    assert (rollout["status"], rollout["wave_started_ts"]) == ("paused", None)
    assert _devices(store, rollout_id)["b"]["status"] == "pending"


def test_a_wave_without_a_deadline_gets_one_and_a_failing_rollout_does_not_stop_the_others(
    store: FleetStore,
) -> None:
    """A started wave with no deadline (what the pause race left behind) gets a whole one instead of raising on
    every tick; a rollout whose step raises is logged and the rollouts listed after it still advance."""
    clock = Clock()
    _add(store, "a", online=True, now=clock.now)
    jammed = _start(store, clock, (100.0,), timeout=30.0)
    _tick(store, clock)
    with store.transaction():
        store.update_rollout(jammed, wave_deadline_ts=None)
    _tick(store, clock)
    assert store.rollout(jammed)["wave_deadline_ts"] == clock.now + 30.0  # type: ignore[index]
    clock.now += 31
    _keep_online(store, clock, "a")
    _tick(store, clock)
    assert store.rollout(jammed)["status"] == "halted"  # type: ignore[index]  # silent online canary: timeout
    # two rollouts of other models: the first listed has a corrupt row, the second must still start its wave
    _add(store, "b", online=True, now=clock.now)
    facts = [f for f in device_facts(store, heartbeat_timeout=HEARTBEAT, now=clock.now) if f.id == "b"]
    ids = []
    for name in ("x-broken", "y-fine"):
        choices = [choose_variant(f, [_candidate(2, name)], FitPolicy()) for f in facts]
        ids.append(
            start_rollout(
                store,
                choices,
                wave_plan(choices, (100.0,)),
                selector="b",
                waves=(100.0,),
                wave_timeout_s=60.0,
                policy=FitPolicy(),
                gates=Gates(),
                now=clock.now,
            )
        )
    with store.transaction():
        store.update_rollout(ids[0], wave_timeout_s="not a number")
    _tick(store, clock)
    assert store.rollout(ids[0])["wave_started_ts"] is None  # type: ignore[index]  # its step was rolled back
    assert store.rollout(ids[1])["wave_started_ts"] == clock.now  # type: ignore[index]


def test_an_ended_rollout_with_an_offline_straggler_costs_no_write_transaction(store: FleetStore) -> None:
    """A completed rollout whose offline device never returns is not stepped (no BEGIN IMMEDIATE per tick); its
    report, when it does return, is still recorded as caught up."""
    clock = Clock()
    _add(store, "a", online=False, now=clock.now)
    rollout_id = _start(store, clock, (100.0,), timeout=600.0)
    _tick(store, clock)
    clock.now += HEARTBEAT + 1
    _tick(store, clock)
    assert store.rollout(rollout_id)["status"] == "completed"  # type: ignore[index]
    assert _devices(store, rollout_id)["a"]["status"] == "offline"
    statements: list[str] = []
    store.db.conn.set_trace_callback(statements.append)
    try:
        for _ in range(3):
            clock.now += 1
            assert _tick(store, clock) == 0
    finally:
        store.db.conn.set_trace_callback(None)
    assert not [s for s in statements if s.startswith("BEGIN")]
    _report(store, "a", _devices(store, rollout_id)["a"]["generation"])
    assert _tick(store, clock) == 1
    a = _devices(store, rollout_id)["a"]
    assert (a["status"], a["caught_up"]) == ("ok", 1)


def test_after_a_restart_past_the_deadline_a_queued_report_is_read_before_a_timeout(store: FleetStore) -> None:
    """The wave's deadline passed while the controller was down: a device whose fresh state arrived first is not
    timed out before the link has been up for a heartbeat window, so its queued report still counts."""
    clock = Clock()
    _add(store, "a", online=True, now=clock.now)
    rollout_id = _start(store, clock, (100.0,), timeout=30.0)
    _tick(store, clock)
    clock.now += 100  # down past the deadline
    up = clock.now
    _keep_online(store, clock, "a")  # its retained state is read in first
    _tick(store, clock, link_up_since=up)
    assert _devices(store, rollout_id)["a"]["status"] == "assigned"
    _report(store, "a", _devices(store, rollout_id)["a"]["generation"])  # then the report queued for us
    clock.now += 1
    _tick(store, clock, link_up_since=up)
    assert store.rollout(rollout_id)["status"] == "completed"  # type: ignore[index]
    assert _devices(store, rollout_id)["a"]["status"] == "ok"
