"""The rollout commands against a real fleet home (``FleetHome.init``) and its fleet DB: `rollout resume` after a
pause between waves, `deploy` without waves as one transaction, and `device assign` refused during a rollout."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from controller.cli import main as fleet_cli
from controller.cli_rollouts import _deploy_now
from controller.config import BrokerConfig, FleetConfig
from controller.home import FleetHome
from controller.rollout import FitPolicy, Gates, choose_variant, device_facts, start_rollout, wave_plan
from controller.store import FleetStore
from tests.component.test_rollout_driver import _candidate

pytestmark = pytest.mark.component

DEVICE = "dev-1"
GiB = 1 << 30


@pytest.fixture
def home(tmp_path: Path) -> FleetHome:
    home = FleetHome.init(tmp_path / "home", FleetConfig(broker=BrokerConfig(host="127.0.0.1", port=1883)))
    result = CliRunner().invoke(
        fleet_cli, ["--home", str(home.root), "device", "enroll", DEVICE, "--out", str(tmp_path / "bundle")]
    )
    assert result.exit_code == 0, result.output
    return home


def fleet(home: FleetHome, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(fleet_cli, ["--home", str(home.root), *args])
    return result.exit_code, result.output


def _rollout(store: FleetStore) -> str:
    """A running rollout of ``m`` v2 to the device (its hardware reported as ``serve`` records it)."""
    now = time.time()
    hardware = {"arch": "x86_64", "cpu_features": [], "cores": 4, "ram_bytes": GiB, "ram_budget_bytes": GiB,
                "disk_free_bytes": 10 * GiB, "accelerators": []}  # fmt: skip
    store.record_state(
        DEVICE, status="online", state={"hardware": hardware}, state_ts_ms=int(now * 1000), heartbeat=1,
        agent_version="t", seen=now, now=now,
    )  # fmt: skip
    facts = device_facts(store, heartbeat_timeout=180, now=now)
    choices = [choose_variant(f, [_candidate(2)], FitPolicy()) for f in facts]
    return start_rollout(
        store, choices, wave_plan(choices, (100.0,)), selector="all", waves=(100.0,), wave_timeout_s=600.0,
        policy=FitPolicy(), gates=Gates(), now=now,
    )  # fmt: skip


def test_resume_after_a_pause_taken_as_a_wave_started_gives_the_wave_a_whole_deadline(home: FleetHome) -> None:
    """`rollout resume` of a rollout paused before its wave had a deadline, whose wave then started: the wave gets
    a whole `--wave-timeout`, never a missing deadline the driver cannot compare with."""
    store = home.open_store()
    try:
        rollout_id = _rollout(store)
        with store.transaction():
            store.update_rollout(rollout_id, status="paused", paused_remaining_s=None, wave_started_ts=time.time())
        code, output = fleet(home, "rollout", "resume", rollout_id)
        assert code == 0, output
        rollout = store.rollout(rollout_id)
        assert rollout is not None
        assert rollout["status"] == "running"
        assert rollout["wave_deadline_ts"] == pytest.approx(time.time() + 600.0, abs=30)
        with store.transaction():  # paused between waves: the next wave starts with its own deadline
            store.update_rollout(rollout_id, status="paused", paused_remaining_s=None, wave_started_ts=None)
        assert fleet(home, "rollout", "resume", rollout_id)[0] == 0
        assert store.rollout(rollout_id)["wave_deadline_ts"] is None  # type: ignore[index]
    finally:
        store.close()


def test_device_assign_is_refused_during_a_rollout_of_its_model_unless_forced(home: FleetHome) -> None:
    """`device assign` of a model whose rollout includes the device is refused (it would race the waves and the
    rollback); --force assigns anyway; another device or model is not affected."""
    store = home.open_store()
    try:
        rollout_id = _rollout(store)
        before = store.next_generation(DEVICE)
        spec = ["device", "assign", DEVICE, "--model", "m@1:q4_0", "--sha256", "ab" * 32, "--length", "1000"]
        code, output = fleet(home, *spec)
        assert code != 0
        assert rollout_id in output
        assert store.next_generation(DEVICE) == before  # nothing written
        code, output = fleet(home, *spec, "--force")
        assert code == 0, output
        assert store.next_generation(DEVICE) == before + 1
    finally:
        store.close()


def test_deploy_without_waves_checks_and_assigns_in_one_transaction(home: FleetHome) -> None:
    """The no-rollout check and every assignment of `deploy` (no --waves) are one BEGIN IMMEDIATE transaction, so a
    concurrent `deploy --waves` cannot start between them."""
    store = home.open_store()
    try:
        now = time.time()
        store.record_state(
            DEVICE, status="online", state={}, state_ts_ms=int(now * 1000), heartbeat=1, agent_version="t",
            seen=now, now=now,
        )  # fmt: skip
        facts = device_facts(store, heartbeat_timeout=180, now=now)
        choices = [choose_variant(f, [_candidate(2)], FitPolicy()) for f in facts]
        statements: list[str] = []
        store.db.conn.set_trace_callback(statements.append)
        try:
            _deploy_now(store, home.assignment_key(), facts, choices, [_candidate(2)])
        finally:
            store.db.conn.set_trace_callback(None)
        begins = [i for i, s in enumerate(statements) if s.startswith(("BEGIN", "SAVEPOINT"))]
        check = next(i for i, s in enumerate(statements) if "FROM rollouts" in s)
        insert = max(i for i, s in enumerate(statements) if s.startswith("INSERT INTO assignments"))
        commits = [i for i, s in enumerate(statements) if s.startswith("COMMIT")]
        assert len(begins) == 1
        assert begins[0] < check < insert < commits[0]
    finally:
        store.close()


def test_group_add_with_an_unknown_device_changes_nothing(home: FleetHome) -> None:
    """`group add g2 dev-1 typo` fails (exit 1) and creates no group: every id is checked before any change."""
    status, output = fleet(home, "group", "add", "g2", DEVICE, "dev-typo")
    assert status == 1
    assert "dev-typo" in output
    with contextlib.closing(home.open_store()) as store:
        assert store.groups() == {}


def test_group_remove_of_a_non_member_is_an_error(home: FleetHome) -> None:
    """`group remove g1 typo` fails (exit 1) and removes nobody, even listed with a real member."""
    assert fleet(home, "group", "add", "g1", DEVICE)[0] == 0
    status, output = fleet(home, "group", "remove", "g1", DEVICE, "dev-typo")
    assert status == 1
    assert "dev-typo" in output
    with contextlib.closing(home.open_store()) as store:
        assert store.groups() == {"g1": [DEVICE]}
    assert fleet(home, "group", "remove", "g1", DEVICE) == (0, "g1: (empty)\n")


def test_keys_rotate_assignments_help_does_not_ask_for_a_restart(home: FleetHome) -> None:
    """serve hot-reloads the assignment key: the command's help must not tell operators to restart it."""
    status, output = fleet(home, "keys", "rotate", "--help")
    assert status == 0
    assert "restart" not in output.lower()


def test_keys_renew_targets_gives_a_fresh_expiry(home: FleetHome) -> None:
    """`keys renew targets` writes a new targets version and reports it."""
    from controller.releases import ReleaseRepository

    repo = ReleaseRepository(home.repo_dir)
    before = repo.versions("targets")[-1]
    status, output = fleet(home, "keys", "renew", "targets")
    assert status == 0, output
    assert repo.versions("targets")[-1] == before + 1
    assert f"targets: v{before + 1}" in output
