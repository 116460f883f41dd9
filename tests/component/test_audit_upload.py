"""The audit uploader never wedges and never loops, and disagreements with the controller are flagged.

Real parts: an enrolled device (``edge-fleet device enroll``), its real ``registry.db`` audit log, its real
``link.db`` outbox and :class:`agent.link.mqtt.AgentLink`, and the controller's real
:func:`controller.audit_ingest.ingest_batch` on the fleet DB made by ``edge-fleet init``. The broker is left out
(tests/integration/test_audit.py covers transport): :meth:`World.deliver` does what a healthy connection and
``serve`` do with each due audit batch. The one fake is :class:`DyingClient`, at the link's publish seam, standing
for a connection that dies while a message is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import sqlite_utils
from click.testing import CliRunner

from agent.audit import EPOCH_FILE, HOLD_S, AuditLog, AuditUploader, _delete, append_record
from agent.config import LinkConfig, RegistryConfig
from agent.link.enrollment import install_bundle, load_enrollment
from agent.link.mqtt import AgentLink
from agent.link.outbox import OutboxItem
from agent.link.store import LinkStore
from agent.registry import Registry
from controller.audit_ingest import IngestResult, decode_batch, ingest_batch
from controller.cli import main as fleet_cli
from controller.config import BrokerConfig, FleetConfig
from controller.home import FleetHome
from protocols.audit import KIND_GAP, AuditHead, AuditRecord, gap_data
from protocols.errors import ProtocolError
from protocols.keys import keyid
from protocols.limits import DEFAULT_LIMITS
from protocols.link import open_sealed
from protocols.messages import Ack, AuditBatch, Report
from protocols.topics import TopicKind, device_topic

pytestmark = [pytest.mark.component, pytest.mark.timeout(120)]

DEVICE = "dev-upload"
SMALL = dataclasses.replace(DEFAULT_LIMITS, max_audit_batch=100)


class DyingClient:
    """The fake at the publish seam: the connection dies while the message is in flight."""

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("connection lost mid-publish")


class World:
    """An enrolled device (registry.db, link.db, AgentLink, AuditUploader) and the controller's fleet DB."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.home = FleetHome.init(tmp / "home", FleetConfig(broker=BrokerConfig(host="127.0.0.1", port=1883)))
        self.state_dir = tmp / "state"
        self.enroll()
        self.registry = Registry.open(self.state_dir, RegistryConfig(min_free_bytes=0))
        self.audit = AuditLog.open(self.registry, DEVICE)
        self.store = self.home.open_store()
        self.lstore = LinkStore.open(self.state_dir / "link" / "link.db")
        self.now = [1000.0]
        self.make_link()

    def enroll(self, *, force: bool = False) -> None:
        bundle = self.tmp / "bundle"
        args = ["--home", str(self.home.root), "device", "enroll", DEVICE, "--out", str(bundle)]
        result = CliRunner().invoke(fleet_cli, [*args, "--force"] if force else args)
        assert result.exit_code == 0, result.output
        install_bundle(self.state_dir, bundle.read_bytes())
        enrollment = load_enrollment(self.state_dir)
        assert enrollment is not None
        self.enrollment = enrollment

    def make_link(self, limits: Any = DEFAULT_LIMITS) -> None:
        self.link = AgentLink(
            config=LinkConfig(),
            enrollment=self.enrollment,
            store=self.lstore,
            registry=self.registry,
            state=None,
            tls=None,
        )
        self.uploader = AuditUploader(self.audit, self.link, limits=limits, monotonic=lambda: self.now[0])

    def reopen_registry(self, restore_from: Path | None = None, *, delete: bool = False) -> None:
        """Restart the agent's audit log, after replacing (or deleting) registry.db."""
        self.registry.close()
        if restore_from is not None or delete:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.state_dir / 'registry.db'}{suffix}").unlink(missing_ok=True)
        if restore_from is not None:
            restore_from.rename(self.state_dir / "registry.db")
        self.registry = Registry.open(self.state_dir, RegistryConfig(min_free_bytes=0))
        self.audit = AuditLog.open(self.registry, DEVICE, reason="restart")

    def append(self, count: int, kind: str = "api.auth_failed", size: int = 0) -> None:
        for i in range(count):
            pad = {f"p{k}": "x" * min(1000, size - 1000 * k) for k in range(-(-size // 1000))}
            self.audit.append(kind, "uid:1000", {"i": i, **pad})

    async def audit_items(self) -> list[OutboxItem]:
        return [i for i in await self.link.outbox.due(1000) if i.msg_id.startswith("audit:")]

    async def deliver(self) -> list[IngestResult]:
        """Every due audit batch to the controller's ingest; the controller's ack back to the link's listeners."""
        results = []
        for item in await self.audit_items():
            result = ingest_batch(self.store, DEVICE, item.payload, now=time.time())
            results.append(result)
            await self.link.outbox.sent(item)
            if result.head is not None:
                ack = Ack(device=DEVICE, ts_ms=1, audit=result.head, duplicate=result.duplicates)
                for listener in self.link.ack_listeners:
                    await listener(ack)
        return results

    async def drain(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            await self.uploader.step()
            if not await self.deliver():
                return

    def controller_head(self) -> tuple[int, int] | None:
        row = self.store.db.execute("SELECT epoch, seq FROM audit_heads WHERE device = ?", [DEVICE]).fetchone()
        return None if row is None else (row[0], row[1])

    def alerts(self) -> set[str]:
        return {r[0] for r in self.store.db.execute("SELECT kind FROM audit_alerts WHERE device = ?", [DEVICE])}

    async def reports(self, key: Any = None) -> list[Report]:
        """The reports waiting in the outbox, verified with the device key (``key``: another one)."""
        public = (key or self.enrollment.signing_key).public_key()
        out = []
        for item in await self.link.outbox.due(1000):
            if item.kind is TopicKind.REPORT:
                topic = device_topic(DEVICE, TopicKind.REPORT)
                message = open_sealed(topic, item.payload, {keyid(public): public}).message
                assert isinstance(message, Report)
                out.append(message)
        return out

    def close(self) -> None:
        self.lstore.close()
        self.store.close()
        self.registry.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


def _records(item: OutboxItem) -> tuple[Any, ...]:
    batch = decode_batch(DEVICE, item.payload)
    assert isinstance(batch, AuditBatch)
    return batch.records


async def _kill_in_flight(w: World, times: int) -> None:
    for _ in range(times):
        [item] = await w.audit_items()
        with contextlib.suppress(ConnectionError):
            await w.link._send_one(DyingClient(), item)  # type: ignore[arg-type]


# --- 1. an undeliverable batch does not block -------------------------------------------------------------------


async def test_an_undeliverable_full_batch_is_rebuilt_smaller_and_the_log_still_reaches_the_controller(
    world: World,
) -> None:
    """A full batch set aside after the connection died on every send is dropped and rebuilt at half the size."""
    world.append(1500)
    assert await world.uploader.step()
    [first] = await world.audit_items()
    await _kill_in_flight(world, world.link.config.max_send_attempts + 1)
    assert (await world.link.outbox.counts())["undeliverable"] == 1
    assert await world.uploader.step()  # dropped from the outbox, rebuilt under a new id
    [rebuilt] = await world.audit_items()
    assert rebuilt.msg_id != first.msg_id
    assert len(_records(rebuilt)) <= len(_records(first)) // 2
    assert (await world.link.outbox.counts())["undeliverable"] == 0
    await world.drain()
    head = world.audit.head()
    assert head is not None
    assert world.controller_head() == (head.epoch, head.seq)
    assert world.audit.status()["pending"] == 0


async def test_batches_fit_the_brokers_maximum_packet_size(world: World) -> None:
    """A broker that takes less than max_message_bytes gets batches it accepts, not ones set aside."""
    world.append(600, size=200)
    world.link._max_packet = 32 * 1024  # as learnt from a broker's CONNACK
    assert await world.uploader.step()
    [item] = await world.audit_items()
    assert len(item.payload) <= world.link.max_payload_bytes(TopicKind.AUDIT)
    await world.drain()
    assert world.audit.status()["pending"] == 0
    assert (await world.link.outbox.counts())["undeliverable"] == 0


async def test_a_single_record_too_large_for_the_broker_is_reported_and_retried_after_a_hold(world: World) -> None:
    """One record over the broker's limit: an error report goes out, and it is retried after a hold, not in a loop."""
    await world.drain()
    world.link._max_packet = 6000  # as learnt from a broker's CONNACK
    world.append(1, size=7000)
    assert await world.uploader.step()
    [item] = await world.audit_items()
    await world.link._send_one(DyingClient(), item)  # type: ignore[arg-type]  # refused for its size, unpublished
    assert (await world.link.outbox.counts())["undeliverable"] == 1
    assert not await world.uploader.step()  # dropped from the outbox, and held back
    assert (await world.link.outbox.counts())["undeliverable"] == 0
    assert not await world.uploader.step()
    assert any("undeliverable" in r.reason for r in await world.reports())
    world.now[0] += HOLD_S + 1
    world.link._max_packet = 64 * 1024  # the operator raised the broker's limit
    await world.drain()
    assert world.audit.status()["pending"] == 0


async def test_a_batch_after_a_gap_carries_its_gap_record_whatever_the_budget(world: World) -> None:
    """After a hole, every batch (even at a budget of one record) carries the GAP record that explains it."""
    world.audit = AuditLog.open(world.registry, DEVICE, max_records=20)
    world.make_link()
    world.append(5)
    await world.drain()
    world.append(40)  # over the cap with nothing acknowledged: a hole and a GAP record
    assert await world.uploader.step()  # the records before the hole
    await world.deliver()
    for _ in range(10):  # the batch after the hole dies in flight on every connection until the budget is 1
        assert await world.uploader.step()
        [item] = await world.audit_items()
        assert any(r.kind == KIND_GAP for r in _records(item))
        if world.uploader.max_records == 1:
            break
        await _kill_in_flight(world, world.link.config.max_send_attempts + 1)
    assert world.uploader.max_records == 1
    await world.drain()
    head = world.audit.head()
    assert head is not None
    assert world.controller_head() == (head.epoch, head.seq)
    assert world.alerts() == {"dropped"}


def _legacy_gap_layout(world: World) -> AuditRecord:
    """Seqs 0..9 kept, 10..29 dropped, 30 kept, then the GAP record at 31: what earlier versions left on disk (the
    GAP record after the first record past the hole). Returns record 30."""
    world.append(30)
    [after_hole] = world.audit.tail(1)

    def drop(db: sqlite_utils.Database) -> None:
        _delete(db, 10, 29)
        append_record(db, KIND_GAP, "agent", gap_data(10, 29, after_hole.prev_hash))

    world.registry.run_in_transaction(drop)
    assert [r.seq for r in world.audit.tail(100)] == [*range(10), 30, 31]
    assert world.audit.verify().ok
    return after_hole


async def test_a_batch_after_a_hole_never_leaves_out_its_gap_record(world: World) -> None:
    """A log whose GAP record comes after the first record past the hole still uploads at a budget of one."""
    after_hole = _legacy_gap_layout(world)
    world.uploader.max_records = 1
    while world.audit.batch(max_bytes=1 << 20, max_records=1)[0].seq < after_hole.seq:
        assert await world.uploader.step()
        await world.deliver()
        world.uploader.max_records = 1
    assert [r.seq for r in world.audit.batch(max_bytes=1, max_records=1)] == [30, 31]
    await world.drain()
    head = world.audit.head()
    assert head is not None
    assert world.controller_head() == (head.epoch, head.seq)
    assert world.alerts() == {"dropped"}


async def test_a_minimal_batch_the_link_cannot_deliver_is_held_not_resent_in_a_loop(world: World) -> None:
    """A batch that cannot shrink (its GAP record must stay with it) is held like a single record, not looped."""
    after_hole = _legacy_gap_layout(world)
    world.audit.acked(AuditHead(after_hole.epoch, 9, world.audit.tail(100)[9].hash))
    world.uploader.max_records = 1
    assert await world.uploader.step()
    [item] = await world.audit_items()
    assert [r.seq for r in _records(item)] == [30, 31]
    await _kill_in_flight(world, world.link.config.max_send_attempts + 1)
    assert not await world.uploader.step()  # dropped from the outbox and held back
    assert not await world.uploader.step()
    assert not await world.audit_items()
    world.now[0] += HOLD_S + 1
    assert await world.uploader.step()


# --- 2. a restored registry.db is detected and the uploader does not loop ----------------------------------


async def test_a_restored_registry_db_is_alerted_and_nothing_is_resent_in_a_loop(world: World) -> None:
    """An old registry.db restored: the device advances over what the controller has, then a regression is alerted."""
    world.make_link(SMALL)
    world.append(299)
    backup = world.tmp / "registry.db.bak"
    head = world.audit.head()
    assert head is not None
    backup_epoch = head.epoch
    with sqlite3.connect(world.state_dir / "registry.db") as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    await world.drain()
    world.append(50, kind="registry.model_activated")
    await world.drain()
    assert world.controller_head() == (backup_epoch, 349)
    world.reopen_registry(restore_from=backup)
    world.make_link(SMALL)
    world.audit.append("agent.started", "agent", {"pid": 1})
    sent = []
    for _ in range(10):
        await world.uploader.step()
        sent += [r.head.seq if r.head else r.alert for r in await world.deliver()]
    assert world.audit.status()["acked_seq"] == 299  # acked batch by batch up to the records that differ
    assert sent == [99, 199, 299, "regression"]  # then refused once, and not rebuilt and re-sent at once
    assert "regression" in world.alerts()


async def test_an_agent_stopped_while_applying_an_ack_keeps_no_outbox_copy_of_acked_records(world: World) -> None:
    """The outbox copy goes before the log marks its records acked: stopped between the two, the agent re-sends a
    batch the controller has (acked again) instead of keeping a copy of records its log counts as acked.

    Fails before the fix: the log was marked first, so a copy outlived the ack; after an old registry.db was
    restored, that copy came back acked past the log's head, and uploads paused (a flaky integration test).
    """
    world.append(5)
    await world.uploader.step()
    [item] = await world.audit_items()
    result = ingest_batch(world.store, DEVICE, item.payload, now=time.time())
    assert result.head is not None

    class Stopped(Exception):
        pass

    def stop(head: Any) -> Any:
        raise Stopped

    with mock.patch.object(world.audit, "apply_ack", stop), contextlib.suppress(Stopped):
        await world.uploader.on_ack(Ack(device=DEVICE, ts_ms=1, audit=result.head))
    assert await world.audit_items() == []  # no copy of what the controller acked
    assert world.audit.status()["pending"] == 6  # nothing marked: the batch is rebuilt and re-sent
    await world.drain()
    assert world.controller_head() == (result.head.epoch, result.head.seq)
    assert world.audit.status()["pending"] == 0


async def test_an_ack_past_the_local_head_is_refused_recorded_reported_and_not_looped(world: World) -> None:
    """An ack naming a seq the device does not have is an error: an audit record, a report, and a held batch."""
    world.append(5)
    assert await world.uploader.step()
    [item] = await world.audit_items()
    head = world.audit.head()
    assert head is not None
    ack = Ack(device=DEVICE, ts_ms=1, audit=AuditHead(head.epoch, head.seq + 100, "ab" * 32))
    for listener in world.link.ack_listeners:
        await listener(ack)
    assert world.audit.status()["acked_seq"] == -1
    assert [r.kind for r in world.audit.tail(1)] == ["audit.ack_refused"]
    assert any("audit ack refused" in r.reason for r in await world.reports())
    assert not await world.uploader.step()  # paused: no batch at once
    world.now[0] += HOLD_S + 1
    assert await world.uploader.step()
    [again] = await world.audit_items()
    assert again.msg_id != item.msg_id  # the refusal record is in it
    for listener in world.link.ack_listeners:  # the same ack again: refused, but recorded once
        await listener(ack)
    assert [r.kind for r in world.audit.tail(2)] == ["api.auth_failed", "audit.ack_refused"]


async def test_an_ack_with_another_hash_is_refused_and_uploads_pause(world: World) -> None:
    """An ack naming a local seq with another hash marks nothing, and no batch is re-sent before the pause."""
    world.make_link(dataclasses.replace(DEFAULT_LIMITS, max_audit_batch=3))
    world.append(10)
    assert await world.uploader.step()
    [item] = await world.audit_items()
    _, epoch, seq, _ = item.msg_id.split(":")
    for listener in world.link.ack_listeners:
        await listener(Ack(device=DEVICE, ts_ms=1, audit=AuditHead(int(epoch), int(seq), "cd" * 32)))
    assert world.audit.status()["acked_seq"] == -1
    assert not await world.uploader.step()  # not re-sent at once
    world.now[0] += HOLD_S / 2
    assert not await world.uploader.step()
    world.now[0] += HOLD_S / 2 + 1
    assert await world.uploader.step()


# --- 3. a new epoch is newer than every epoch the device used, whatever the clock says ---------------------


async def test_a_new_epoch_taken_while_the_clock_is_behind_is_still_accepted(world: World) -> None:
    """registry.db lost and the clock an hour behind: the new epoch is above the accepted one (epoch_reset only)."""
    await world.drain()
    accepted = world.controller_head()
    assert accepted is not None
    assert (world.state_dir / EPOCH_FILE).read_text().strip() == str(accepted[0])
    with mock.patch("time.time", return_value=time.time() - 3600):
        world.reopen_registry(delete=True)
    head = world.audit.head()
    assert head is not None
    assert head.epoch > accepted[0]
    world.make_link()
    world.append(3)
    await world.drain()
    assert world.controller_head() == (head.epoch, 3)
    assert world.alerts() == {"epoch_reset"}


async def test_epochs_go_up_when_registry_db_is_lost_twice_within_a_second(world: World) -> None:
    """Two new logs within the same wall-clock second still get increasing epochs."""
    epochs = []
    with mock.patch("time.time", return_value=time.time()):
        for _ in range(3):
            world.reopen_registry(delete=True)
            head = world.audit.head()
            assert head is not None
            epochs.append(head.epoch)
    assert epochs == sorted(set(epochs))
    assert (world.state_dir / EPOCH_FILE).read_text().strip() == str(epochs[-1])


# --- 4. re-enrolled under the same id: nothing queued keeps the old key's signature ------------------------


async def test_a_reenrolled_device_rebuilds_its_queued_audit_batch_and_resigns_its_reports(world: World) -> None:
    """After a new device key, the queued audit batch is rebuilt and signed anew, and queued reports re-signed."""
    world.append(20)
    assert await world.uploader.step()
    report = Report(report_id="ab" * 16, device=DEVICE, ts_ms=1, kind="error", outcome="failed", reason="queued")
    await world.link.send_report(report)
    old_key = world.enrollment.signing_key
    world.enroll(force=True)  # same device id, new key; link.db kept
    world.make_link()
    await world.drain()
    assert world.audit.status()["pending"] == 0
    assert world.alerts() == set()
    assert [r.report_id for r in await world.reports()] == [report.report_id]  # verifies with the new key
    with pytest.raises(ProtocolError):
        await world.reports(old_key)


# --- 5. the uploader survives a failing offline checkpoint ---------------------------------------------------


async def test_a_failing_offline_checkpoint_does_not_end_the_uploader(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk error while storing an offline checkpoint is logged; the uploader keeps running and uploading."""

    def broken(*args: Any) -> None:  # the one fake: the checkpoint store fails like a full disk
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(world.audit, "store_checkpoint", broken)
    uploader = AuditUploader(world.audit, world.link, interval=0.01, checkpoint_interval=0.0)
    task = asyncio.create_task(uploader.run())
    try:
        await asyncio.sleep(0.2)
        assert not task.done()
        assert uploader.batches == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
