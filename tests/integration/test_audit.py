"""The audit log end to end: device log → outbox → private Mosquitto (generated config) → serve → fleet DB.

Real parts only (see ``tests/fleet_harness.py``): the agent's :class:`agent.audit.AuditLog` in its real
``registry.db``, the real :class:`agent.audit.AuditUploader` on the real link, the real ``serve`` with its
:class:`controller.audit_ingest.AuditIngest`, and ``edge-fleet audit ...`` run as the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import resource
import signal
import sqlite3
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fleet_harness import FAST_LINK, ROOT, Agent, Fleet, run_subprocess, running_fleet, wait_for

from agent.audit import AuditLog, AuditUploader
from agent.config import RegistryConfig
from agent.registry import Registry
from protocols.topics import TopicKind

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def stored(fleet: Fleet, device: str) -> list[tuple[int, int, str]]:
    """``(epoch, seq, kind)`` of the records the controller stored for ``device``, in order."""
    store = fleet.home.open_store()
    try:
        return [
            (r[0], r[1], r[2])
            for r in store.db.execute(
                "SELECT epoch, seq, kind FROM audit_records WHERE device = ? ORDER BY epoch, seq", [device]
            ).fetchall()
        ]
    finally:
        store.close()


def alert_kinds(fleet: Fleet, device: str) -> set[str]:
    store = fleet.home.open_store()
    try:
        return {r[0] for r in store.db.execute("SELECT kind FROM audit_alerts WHERE device = ?", [device]).fetchall()}
    finally:
        store.close()


@contextlib.asynccontextmanager
async def uploading(agent: Agent, audit: AuditLog) -> AsyncIterator[AuditUploader]:
    """Start the agent's link and an audit uploader on it; stop both on exit."""
    link = await agent.start()
    uploader = AuditUploader(audit, link, interval=0.1)
    task = asyncio.create_task(uploader.run(), name="audit-uploader")
    try:
        yield uploader
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await agent.stop()


async def append_many(audit: AuditLog, count: int, kind: str = "api.auth_failed") -> None:
    def run() -> None:
        for i in range(count):
            audit.append(kind, "uid:1000", {"i": i})

    await asyncio.to_thread(run)
    audit.changed.set()


async def test_crash_right_after_an_audited_action_keeps_its_record(tmp_path: Path) -> None:
    """A process SIGKILLed right after `activate` returned: after restart its audit record is in the log."""
    state_dir = tmp_path / "state"
    registry = Registry.open(state_dir, RegistryConfig())
    model = ROOT / ".cache" / "models" / "silero_vad.onnx"
    for version in (1, 2):
        registry.import_file(model, name="silero-vad", variant="onnx-fp32", version=version, activate=version == 1)
    AuditLog.open(registry, "dev-crash")
    registry.close()
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from agent.config import RegistryConfig
        from agent.registry import Registry
        registry = Registry.open(Path({str(state_dir)!r}), RegistryConfig())
        registry.activate("silero-vad", version=2)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, cwd=ROOT)
    assert await proc.wait() == -signal.SIGKILL
    registry = Registry.open(state_dir, RegistryConfig())
    try:
        records = AuditLog(registry).tail(10)
        activated = [r for r in records if r.kind == "registry.model_activated"]
        assert activated
        assert activated[-1].data["version"] == 2
        assert AuditLog(registry).verify().ok
    finally:
        registry.close()


async def test_ten_thousand_events_while_the_broker_is_down_arrive_exactly_once_in_order(tmp_path: Path) -> None:
    """10,000 events while the broker is down, then back: the controller stores exactly 10,000, in order, verified."""
    async with running_fleet(tmp_path) as fleet:
        await fleet.start_server()
        agent = fleet.enroll("dev-10k", models=(1,))
        audit = await asyncio.to_thread(AuditLog.open, agent.registry, "dev-10k")
        async with uploading(agent, audit) as uploader:
            await wait_for(lambda: len(stored(fleet, "dev-10k")) == 1, what="the epoch_start record")
            fleet.broker.stop()
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            await append_many(audit, 10_000)
            await asyncio.sleep(0.5)
            # Bounded: one batch at a time waits in the outbox, the rest stays on disk.
            pending = await agent.link.outbox.items() if agent.link else []
            assert sum(1 for item in pending if item["kind"] == str(TopicKind.AUDIT)) <= 1
            fleet.broker.start()
            await wait_for(lambda: len(stored(fleet, "dev-10k")) == 10_001, within=60, what="10,001 records stored")
            assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200_000  # KiB
            assert uploader.batches >= 10
            await wait_for(lambda: audit.status()["pending"] == 0, what="the device to record every ack")
        rows = stored(fleet, "dev-10k")
        assert [seq for _, seq, _ in rows] == list(range(10_001))
        assert fleet.cli("audit", "verify", "--device", "dev-10k").count("ok") == 1
        assert alert_kinds(fleet, "dev-10k") == set()


async def test_agent_killed_before_recording_the_ack_resends_and_the_controller_stores_once(tmp_path: Path) -> None:
    """Agent SIGKILLed after its batch was stored but before it recorded the ack: re-sent, stored once, counted."""
    async with running_fleet(tmp_path) as fleet:
        server = await fleet.start_server()
        agent = fleet.enroll("dev-k", models=(1,))
        audit = await asyncio.to_thread(AuditLog.open, agent.registry, "dev-k")
        await append_many(audit, 50)
        agent.registry.close()  # the agent process owns the registry from now on
        link_json = json.dumps(dataclasses.asdict(FAST_LINK))
        proc = await run_subprocess(
            "tests/audit_agent_proc.py", str(agent.state_dir), link_json, "dev-k", "--crash-on-ack"
        )
        try:
            assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
            assert proc.stdout is not None
            assert "CRASHING on the ack of seq 50" in (await proc.stdout.read()).decode()
            assert server.audit.stored == 51
            assert device_pending(agent.state_dir) == 51  # nothing counts as acked without a recorded ack
            proc = await run_subprocess("tests/audit_agent_proc.py", str(agent.state_dir), link_json, "dev-k")
            await wait_for(lambda: device_pending(agent.state_dir) == 0, within=30, what="the re-sent batch acked")
            assert server.audit.duplicates >= 51
            assert server.audit.stored == 51
            assert [seq for _, seq, _ in stored(fleet, "dev-k")] == list(range(51))
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            await asyncio.wait_for(proc.wait(), 10)
            agent.registry = Registry.open(agent.state_dir, RegistryConfig())  # for the fleet's cleanup


def device_pending(state_dir: Path) -> int:
    """Records of the device's audit log not acknowledged yet (read-only, while the agent process runs)."""
    with contextlib.closing(sqlite3.connect(f"file:{state_dir / 'registry.db'}?mode=ro", uri=True)) as conn:
        query = "SELECT count(*) FROM audit_log WHERE seq > (SELECT acked_seq FROM audit_state)"
        return int(conn.execute(query).fetchone()[0])


@pytest.mark.parametrize("audit_workers", [0, 2], ids=["in-process", "2-shards"])
async def test_batch_resent_after_a_lost_ack_is_stored_once_and_counted_as_duplicate(
    tmp_path: Path, audit_workers: int
) -> None:
    """The agent stops after sending a batch but before recording the ack: it is re-sent, stored once, counted
    (verified on serve's writer thread, and by audit shards' worker processes)."""
    async with running_fleet(tmp_path, audit_workers=audit_workers) as fleet:
        server = await fleet.start_server()
        assert (server.audit_shards is not None) == (audit_workers > 0)
        agent = fleet.enroll("dev-dup", models=(1,))
        audit = await asyncio.to_thread(AuditLog.open, agent.registry, "dev-dup")
        await append_many(audit, 50)
        link = await agent.start()
        uploader = AuditUploader(audit, link, interval=0.1)
        link.ack_listeners.remove(uploader.on_ack)  # the ack arrives but is never recorded (as if killed)
        task = asyncio.create_task(uploader.run())
        await wait_for(lambda: server.audit.batches >= 1, what="the first batch stored")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await agent.stop()
        assert audit.status()["pending"] == 51  # nothing counts as acked without a recorded ack
        async with uploading(agent, audit):
            await wait_for(lambda: server.audit.duplicates >= 51, what="the re-sent batch counted as duplicate")
            await wait_for(lambda: audit.status()["pending"] == 0, what="the device to record the ack")
        assert [seq for _, seq, _ in stored(fleet, "dev-dup")] == list(range(51))


async def test_broker_killed_mid_upload_loses_nothing(tmp_path: Path) -> None:
    """The broker is SIGKILLed while batches flow: after it restarts every record arrives, once, in order."""
    async with running_fleet(tmp_path) as fleet:
        server = await fleet.start_server()
        agent = fleet.enroll("dev-kill", models=(1,))
        audit = await asyncio.to_thread(AuditLog.open, agent.registry, "dev-kill")
        await append_many(audit, 5000)
        async with uploading(agent, audit):
            await wait_for(lambda: server.audit.batches >= 1, what="the first batch stored")
            fleet.broker.kill()
            await append_many(audit, 500)
            fleet.broker.start()
            await wait_for(lambda: len(stored(fleet, "dev-kill")) == 5501, within=60, what="all 5501 records")
        assert [seq for _, seq, _ in stored(fleet, "dev-kill")] == list(range(5501))
        assert alert_kinds(fleet, "dev-kill") == set()


async def test_retention_cap_writes_a_gap_record_and_the_controller_alerts(tmp_path: Path) -> None:
    """Past the cap while offline the device drops a range with a chained GAP record; the controller alerts."""
    async with running_fleet(tmp_path) as fleet:
        await fleet.start_server()
        agent = fleet.enroll("dev-cap", models=(1,))
        audit = await asyncio.to_thread(AuditLog.open, agent.registry, "dev-cap", max_records=100)
        await append_many(audit, 300)
        assert audit.status()["stored"] <= 100
        assert any(r.kind == "gap" for r in audit.tail(100))
        async with uploading(agent, audit):
            await wait_for(lambda: audit.status()["pending"] == 0, what="the capped log uploaded and acked")
        assert "dropped" in alert_kinds(fleet, "dev-cap")
        alerts = json.loads(fleet.cli("audit", "alerts", "--json"))
        assert any(a["kind"] == "dropped" and a["device"] == "dev-cap" for a in alerts)
        assert "ok" in fleet.cli("audit", "verify", "--device", "dev-cap")


@pytest.mark.parametrize("audit_workers", [0, 2], ids=["in-process", "2-shards"])
async def test_restored_old_copy_of_the_state_directory_is_flagged_as_a_regression(
    tmp_path: Path, audit_workers: int
) -> None:
    """The device's registry.db restored from an old copy after uploading newer records: a regression alert."""
    async with running_fleet(tmp_path, audit_workers=audit_workers) as fleet:
        server = await fleet.start_server()
        agent = fleet.enroll("dev-old", models=(1,))
        audit = await asyncio.to_thread(AuditLog.open, agent.registry, "dev-old")
        await append_many(audit, 10)
        backup = tmp_path / "registry-backup.db"
        await asyncio.to_thread(_backup, agent.state_dir / "registry.db", backup)
        await append_many(audit, 20)
        async with uploading(agent, audit):
            await wait_for(lambda: audit.status()["pending"] == 0, what="31 records uploaded and acked")
        agent.registry.close()
        _restore(backup, agent.state_dir / "registry.db")
        agent.registry = Registry.open(agent.state_dir, RegistryConfig())
        audit = AuditLog(agent.registry)
        await append_many(audit, 2)
        async with uploading(agent, audit):
            await wait_for(lambda: server.audit.refused >= 1, what="the restored log refused")
        assert "regression" in alert_kinds(fleet, "dev-old")
        assert len(stored(fleet, "dev-old")) == 31


def _backup(source: Path, target: Path) -> None:
    with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(target)) as dst:
        src.backup(dst)


def _restore(backup: Path, target: Path) -> None:
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(target) + suffix)
    target.write_bytes(backup.read_bytes())


async def test_daemon_audits_start_auth_failures_and_stop_and_uploads_them(tmp_path: Path) -> None:
    """`edge-agent run` starts the log, records an API auth failure and its start/stop; the controller gets them."""
    import aiohttp
    from click.testing import CliRunner

    from agent import daemon
    from agent.cli import main as agent_cli

    async with running_fleet(tmp_path) as fleet:
        await fleet.start_server()
        agent = fleet.enroll("dev-run", models=(1,))
        agent.registry.close()  # the daemon opens the registry itself
        socket_path = tmp_path / "api.sock"
        config = dataclasses.replace(agent.config, api=dataclasses.replace(agent.config.api, socket_path=socket_path))
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(config, stop=stop))
        try:
            await wait_for(lambda: "agent.started" in kinds(fleet, "dev-run"), within=30, what="agent.started stored")
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path))) as http:
                headers = {"Authorization": "Bearer ef_0000000000000000_" + "0" * 64}
                async with http.get("http://agent/v1/models", headers=headers) as response:
                    assert response.status == 401
            await wait_for(lambda: "api.auth_failed" in kinds(fleet, "dev-run"), what="the auth failure stored")
        finally:
            stop.set()
            assert await asyncio.wait_for(task, 30) == 0
        runner = CliRunner()
        out = runner.invoke(agent_cli, ["--state-dir", str(agent.state_dir), "audit", "tail", "--json"])
        assert out.exit_code == 0, out.output
        assert "agent.stopping" in out.output
        verified = runner.invoke(agent_cli, ["--state-dir", str(agent.state_dir), "audit", "verify"])
        assert verified.exit_code == 0, verified.output
        assert "ok" in verified.output
        agent.registry = Registry.open(agent.state_dir, RegistryConfig())  # for the fleet's cleanup


def kinds(fleet: Fleet, device: str) -> set[str]:
    return {kind for _, _, kind in stored(fleet, device)}
