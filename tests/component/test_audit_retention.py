"""The audit log's retention caps and the token CLI's audit records (real ``registry.db``, real ``tokens.db``).

Retention (docs/audit.md): acknowledged records stay on the device until a cap (``[audit] max_records`` or
``max_bytes``) is reached; then the oldest acknowledged ones go first, and only when unacknowledged records must
go does a chained GAP record say which. The token commands of ``edge-agent`` record ``token_created`` /
``token_revoked`` when they write the state directory directly (no daemon running), and a clock jump is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from agent.audit import AuditLog, record_bytes, watch_clock
from agent.cli import AgentContext
from agent.cli_tokens import token as token_cli
from agent.config import AuditConfig, RegistryConfig, load_config
from agent.errors import ConfigError
from agent.registry import Registry
from protocols.audit import KIND_GAP, verify_chain

pytestmark = pytest.mark.component

DEVICE = "dev-retention"


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """A real registry whose audit log is started."""
    reg = Registry.open(tmp_path / "state", RegistryConfig(min_free_bytes=0))
    yield reg  # type: ignore[misc]
    reg.close()


def _open(registry: Registry, *, max_records: int = 100_000, max_bytes: int = 64 << 20) -> AuditLog:
    return AuditLog.open(registry, DEVICE, max_records=max_records, max_bytes=max_bytes)


def _ack_all(log: AuditLog) -> None:
    head = log.head()
    assert head is not None
    log.acked(head)


def _stored_bytes(registry: Registry) -> int:
    rows = registry.query_readonly("SELECT * FROM audit_log")
    return sum(len(r["data"]) + len(r["kind"]) + len(r["actor"]) + 192 for r in rows)


def test_acked_records_are_kept_until_the_cap(registry: Registry) -> None:
    """An ack does not delete: the records stay (for ``audit tail``) and are no longer offered for upload."""
    log = _open(registry, max_records=100)
    for i in range(30):
        log.append("test.event", "agent", {"i": i})
    _ack_all(log)
    status = log.status()
    assert status["stored"] == 31
    assert status["pending"] == 0
    assert log.batch(max_bytes=1 << 20, max_records=1000) == []
    assert len(log.tail(100)) == 31


def test_over_the_record_cap_the_oldest_acked_go_first_and_no_gap(registry: Registry) -> None:
    """Over ``max_records`` with acknowledged records: only acknowledged ones are deleted, oldest first."""
    log = _open(registry, max_records=40)
    for i in range(30):
        log.append("test.event", "agent", {"i": i})
    _ack_all(log)  # seq 0..30 acked
    for i in range(20):
        log.append("test.later", "agent", {"i": i})  # seq 31..50 unacked: 51 stored > 40
    rows = registry.query_readonly("SELECT seq, kind FROM audit_log ORDER BY seq")
    seqs = [r["seq"] for r in rows]
    assert len(seqs) <= 40
    assert seqs == list(range(seqs[0], 51))  # a suffix: the oldest went, nothing in between
    assert seqs[0] > 0
    assert all(r["kind"] != KIND_GAP for r in rows)
    assert set(range(31, 51)) <= set(seqs)  # every unacknowledged record is still there
    assert log.verify().ok
    assert log.status()["stored"] == len(seqs)


def test_unacked_over_the_cap_leaves_a_chained_gap_record(registry: Registry) -> None:
    """Over the cap with nothing acknowledged: a range is dropped and a GAP record, chained, names it."""
    log = _open(registry, max_records=20)
    for i in range(40):
        log.append("test.event", "agent", {"i": i})
    records = log.tail(1000)
    gaps = [r for r in records if r.kind == KIND_GAP]
    assert gaps, "a drop is never silent"
    gap = gaps[-1]
    assert records[0].seq == 0  # the oldest record, which anchors the chain, is kept
    dropped = range(gap.data["first_seq"], gap.data["last_seq"] + 1)
    assert not {r.seq for r in records} & set(dropped)
    assert log.verify().ok
    verify_chain([r for r in records if r.seq > gap.seq], after=gap.head)


def test_the_size_cap_drops_acked_records_by_bytes(registry: Registry) -> None:
    """``max_bytes``: big acknowledged records are deleted by size, oldest first; the byte count stays exact."""
    log = _open(registry, max_records=100_000, max_bytes=64 * 1024)
    for i in range(40):
        log.append("test.big", "agent", {"i": i, "blob": "x" * 1000})
    _ack_all(log)
    for i in range(40):
        log.append("test.big", "agent", {"i": 100 + i, "blob": "y" * 1000})
    status = log.status()
    assert status["stored_bytes"] <= 64 * 1024
    assert status["stored_bytes"] == _stored_bytes(registry)
    kinds = [r["kind"] for r in registry.query_readonly("SELECT kind FROM audit_log")]
    assert KIND_GAP not in kinds  # enough acknowledged records could go
    assert status["pending"] == 40
    assert log.verify().ok


def test_the_size_cap_with_nothing_acked_writes_a_gap(registry: Registry) -> None:
    """``max_bytes`` reached by unacknowledged records: a GAP record, and the byte count stays exact."""
    log = _open(registry, max_records=100_000, max_bytes=64 * 1024)
    for i in range(100):
        log.append("test.big", "agent", {"i": i, "blob": "z" * 1000})
    status = log.status()
    assert status["stored_bytes"] <= 64 * 1024 + 2 * 1300
    assert status["stored_bytes"] == _stored_bytes(registry)
    gaps = registry.query_readonly("SELECT data FROM audit_log WHERE kind = ?", [KIND_GAP])
    assert gaps
    assert json.loads(gaps[-1]["data"])["first_seq"] >= 1
    assert log.verify().ok


def test_record_bytes_matches_what_sqlite_counts(registry: Registry) -> None:
    """The Python and SQL sizes of a record agree (non-ASCII text included), so the counter never drifts."""
    log = _open(registry)
    record = log.append("test.text", "agent", {"text": "héllo wörld ✓"})
    assert record is not None
    assert log.status()["stored_bytes"] == _stored_bytes(registry)
    assert record_bytes(record) > 192


def test_audit_caps_come_from_the_config(tmp_path: Path) -> None:
    """``[audit] max_records / max_bytes`` are read from agent.toml; nonsense values are refused."""
    path = tmp_path / "agent.toml"
    path.write_text("[audit]\nmax_records = 500\nmax_bytes = 1048576\n")
    config = load_config(path)
    assert config.audit == AuditConfig(max_records=500, max_bytes=1048576)
    path.write_text("[audit]\nmax_bytes = 10\n")
    with pytest.raises(ConfigError):
        load_config(path)


def test_token_cli_changes_are_audited_without_a_daemon(registry: Registry, tmp_path: Path) -> None:
    """``edge-agent token create|revoke`` on the state directory record ``token_created`` / ``token_revoked``."""
    _open(registry)
    state_dir = registry.state_dir
    registry.close()  # as when no daemon runs: the CLI takes the registry's lock itself
    ctx = AgentContext(config_path=None, state_dir=state_dir, socket_path=tmp_path / "no-daemon.sock")
    runner = CliRunner()
    created = runner.invoke(token_cli, ["create", "ops", "--scope", "infer"], obj=ctx)
    assert created.exit_code == 0, created.output
    token_id = created.stdout.strip().splitlines()[-1].split("_")[1]
    revoked = runner.invoke(token_cli, ["revoke", token_id], obj=ctx)
    assert revoked.exit_code == 0, revoked.output
    with Registry.open(state_dir, RegistryConfig(min_free_bytes=0)) as reg:
        rows = reg.query_readonly("SELECT kind, actor, data FROM audit_log WHERE kind LIKE 'token%' ORDER BY seq")
        assert [r["kind"] for r in rows] == ["token_created", "token_revoked"]
        assert all(json.loads(r["data"])["token_id"] == token_id for r in rows)
        assert all(r["actor"].startswith("uid:") for r in rows)
        assert AuditLog(reg).verify().ok


async def test_a_clock_jump_is_recorded(registry: Registry) -> None:
    """The wall clock stepping 120 s ahead of the monotonic clock leaves an ``agent.clock_jump`` record."""
    log = _open(registry)
    wall = [1_000_000.0]
    mono = [50.0]

    def tick_wall() -> float:
        return wall[0]

    def tick_mono() -> float:
        mono[0] += 0.001
        wall[0] += 0.001
        return mono[0]

    task = asyncio.create_task(watch_clock(log, interval=0.01, threshold=30.0, wall=tick_wall, monotonic=tick_mono))
    try:
        await asyncio.sleep(0.05)
        assert not [r for r in log.tail(100) if r.kind == "agent.clock_jump"]  # steady clocks: nothing
        wall[0] += 120.0  # an NTP step
        for _ in range(200):
            await asyncio.sleep(0.01)
            jumps = [r for r in log.tail(100) if r.kind == "agent.clock_jump"]
            if jumps:
                break
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert len(jumps) == 1
    assert 119_000 <= jumps[0].data["skew_ms"] <= 121_000
    assert log.verify().ok


async def test_a_clock_jump_that_cannot_be_recorded_does_not_end_the_watch(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while recording a clock jump is logged; the watch (in the daemon's TaskGroup) keeps running."""
    log = _open(registry)
    wall = [1_000_000.0]
    mono = [50.0]
    failures = []

    def full(*args: object) -> None:  # the one fake: the registry's write fails like a full disk
        failures.append(args)
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(registry, "run_in_transaction", full)

    def tick_mono() -> float:
        mono[0] += 1.0
        wall[0] += 100.0  # every look: a jump
        return mono[0]

    with capture_logs() as logs:
        task = asyncio.create_task(watch_clock(log, interval=0.01, wall=lambda: wall[0], monotonic=tick_mono))
        try:
            for _ in range(200):
                await asyncio.sleep(0.01)
                if len(failures) >= 3:
                    break
            assert not task.done()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert len(failures) >= 3
    assert any(e["event"] == "audit.record_failed" and "disk is full" in e["error"] for e in logs)
