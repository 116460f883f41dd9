"""Tampering with a device's audit log is detected by the controller's ingest (real SQLite files, real keys).

The device side is the real :class:`agent.audit.AuditLog` in a real ``registry.db`` of an enrolled device; the
controller side is :func:`controller.audit_ingest.ingest_batch` on the real fleet DB made by ``edge-fleet
init``. The broker is left out (the integration tests cover transport): each test hands the ingest exactly
the bytes the device's uploader would publish, then edits the device's files the way root on it could.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.audit import AuditLog, _record
from agent.config import RegistryConfig
from agent.link.enrollment import install_bundle, load_enrollment
from agent.registry import Registry
from controller.audit_ingest import IngestResult, ingest_batch, verify_stored
from controller.cli import main as fleet_cli
from controller.config import BrokerConfig, FleetConfig
from controller.home import FleetHome
from protocols.audit import AuditRecord, Checkpoint, make_record, sign_checkpoint
from protocols.keys import Ed25519PrivateKey
from protocols.messages import AuditBatch

pytestmark = [pytest.mark.component, pytest.mark.timeout(60)]

DEVICE = "dev-tamper"


class Device:
    """An enrolled device's audit log plus the controller's fleet DB."""

    def __init__(self, tmp: Path) -> None:
        self.home = FleetHome.init(tmp / "home", FleetConfig(broker=BrokerConfig(host="127.0.0.1", port=1883)))
        bundle = tmp / "bundle"
        result = CliRunner().invoke(
            fleet_cli, ["--home", str(self.home.root), "device", "enroll", DEVICE, "--out", str(bundle)]
        )
        assert result.exit_code == 0, result.output
        self.state_dir = tmp / "state"
        install_bundle(self.state_dir, bundle.read_bytes())
        enrollment = load_enrollment(self.state_dir)
        assert enrollment is not None
        self.key: Ed25519PrivateKey = enrollment.signing_key
        self.registry = Registry.open(self.state_dir, RegistryConfig())
        self.log = AuditLog.open(self.registry, DEVICE)
        self.store = self.home.open_store()

    def append(self, count: int) -> None:
        for i in range(count):
            self.log.append("api.auth_failed", "uid:1000", {"i": i})

    def records(self) -> list[AuditRecord]:
        return [_record(r) for r in self.registry.query_readonly("SELECT * FROM audit_log ORDER BY seq")]

    def payload(self, records: list[AuditRecord]) -> bytes:
        head = records[-1].head
        checkpoint = sign_checkpoint(Checkpoint(DEVICE, head.epoch, head.seq, head.hash, records[-1].ts_ms), self.key)
        return AuditBatch(DEVICE, head.epoch, tuple(records), checkpoint).encode()

    def upload(self, records: list[AuditRecord] | None = None) -> IngestResult:
        return ingest_batch(self.store, DEVICE, self.payload(records or self.records()), now=1.0)

    def alerts(self) -> set[str]:
        return {r[0] for r in self.store.db.execute("SELECT kind FROM audit_alerts").fetchall()}

    def sql(self, statement: str, params: list[object]) -> None:
        """Edit registry.db behind the agent's back, as root could."""
        with sqlite3.connect(self.state_dir / "registry.db") as conn:
            conn.execute(statement, params)

    def close(self) -> None:
        self.store.close()
        self.registry.close()


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    d = Device(tmp_path)
    yield d
    d.close()


def rechain(records: list[AuditRecord]) -> list[AuditRecord]:
    """Recompute every hash after the first record, as an attacker who knows the format would."""
    out = [records[0]]
    for r in records[1:]:
        out.append(make_record(out[-1], r.kind, r.actor, r.data, r.ts_ms))
    return out


def test_honest_uploads_verify_and_a_resent_batch_is_a_counted_duplicate(device: Device) -> None:
    """An honest log verifies; uploading the same records again stores nothing and counts duplicates."""
    device.append(9)
    first = device.upload()
    assert first.head is not None
    assert first.stored == 10
    again = device.upload()
    assert again.head == first.head
    assert again.stored == 0
    assert again.duplicates == 10
    assert device.alerts() == set()
    assert all(not chain.errors for chain in verify_stored(device.store))


def test_record_changed_on_disk_after_upload_is_detected(device: Device) -> None:
    """A record edited in registry.db after it was uploaded: its hash no longer matches, the batch is refused."""
    device.append(9)
    assert device.upload().head is not None
    device.sql("UPDATE audit_log SET data = ? WHERE seq = 5", [json.dumps({"i": 999})])
    device.append(3)
    result = device.upload()
    assert result.head is None
    assert result.alert == "chain"


def test_record_changed_and_rehashed_after_upload_is_a_fork(device: Device) -> None:
    """A record edited after upload and the whole chain re-hashed and re-signed: a fork with what was accepted."""
    device.append(9)
    assert device.upload().head is not None
    records = device.records()
    forged = [*records[:5], AuditRecord(**{**records[5].to_dict(), "data": {"i": 999}}), *records[6:]]
    result = device.upload(rechain(forged))
    assert result.head is None
    assert result.alert == "fork"


def test_tail_deleted_and_rechained_is_a_fork(device: Device) -> None:
    """The uploaded tail deleted and new records chained in its place, checkpoint re-signed: a fork."""
    device.append(9)
    assert device.upload().head is not None
    records = device.records()[:6]
    tail = list(records)
    for i in range(6):
        tail.append(make_record(tail[-1], "api.auth_failed", "uid:0", {"forged": i}, tail[-1].ts_ms))
    result = device.upload(tail)
    assert result.head is None
    assert result.alert == "fork"
    assert "fork" in device.alerts()


def test_checkpoint_resigned_after_truncation_is_a_regression(device: Device) -> None:
    """The log truncated below the accepted head, new records appended and signed: refused as a regression."""
    device.append(9)
    assert device.upload().head is not None
    records = device.records()[:4]
    records.append(make_record(records[-1], "api.auth_failed", "uid:0", {"forged": True}, records[-1].ts_ms))
    result = device.upload(records)
    assert result.head is None
    assert result.alert == "regression"


def test_record_inserted_in_the_middle_is_detected(device: Device) -> None:
    """A record slipped into the middle of an uploaded range (with or without re-hashing): never accepted."""
    device.append(9)
    assert device.upload().head is not None
    records = device.records()
    inserted = make_record(records[4], "model.activated", "uid:0", {"forged": True}, records[4].ts_ms)
    raw = [*records[:5], inserted, *records[5:]]
    assert device.upload(raw).head is None
    shifted = rechain(
        [*records[:5], inserted, *[AuditRecord(**{**r.to_dict(), "seq": r.seq + 1}) for r in records[5:]]]
    )
    assert device.upload(shifted).head is None
    assert device.alerts() & {"chain", "fork"}


def test_checkpoint_signed_by_another_key_is_a_bad_signature(device: Device) -> None:
    """A batch whose checkpoint is not signed by the enrolled device key is refused."""
    device.append(3)
    device.key = Ed25519PrivateKey.generate()
    result = device.upload()
    assert result.head is None
    assert result.alert == "bad_signature"


def test_a_refused_batch_behind_the_head_is_alerted_by_what_failed(device: Device) -> None:
    """Behind the accepted head, another key is still a bad signature and a tampered record still a chain error.

    Fails before the fix: both were filed as ``regression`` (an old state restored), hiding a key or impostor
    problem and an edited record behind the head.
    """
    device.append(9)
    assert device.upload().head is not None
    behind = device.records()[:5]
    honest_key, device.key = device.key, Ed25519PrivateKey.generate()
    assert device.upload(behind).alert == "bad_signature"
    device.key = honest_key
    edited = [*behind[:3], AuditRecord(**{**behind[3].to_dict(), "data": {"edited": True}}), behind[4]]
    assert device.upload(edited).alert == "chain"


def test_a_bare_checkpoint_s_alert_does_not_follow_the_unsigned_batch_epoch(device: Device) -> None:
    """A checkpoint without records, signed by another key: ``bad_signature`` whatever epoch the batch claims."""
    device.append(3)
    head = device.upload().head
    assert head is not None
    other = Ed25519PrivateKey.generate()
    checkpoint = sign_checkpoint(Checkpoint(DEVICE, head.epoch, head.seq, head.hash, 1), other)
    for claimed_epoch in (0, head.epoch):
        payload = AuditBatch(DEVICE, claimed_epoch, (), checkpoint).encode()
        assert ingest_batch(device.store, DEVICE, payload, now=1.0).alert == "bad_signature"


def test_a_stored_batch_of_an_older_epoch_re_sent_is_acked_as_duplicates(device: Device) -> None:
    """Its ack was lost and the device moved to a new epoch: the re-sent batch is all duplicates, not a regression.

    Fails before the fix: refused as ``regression`` and never acked, so the device re-sent it without end.
    """
    device.append(9)
    first = device.records()
    assert device.upload(first).head == first[-1].head
    device.registry.close()  # registry.db lost (reinstalled): a new log, a new epoch
    for path in device.state_dir.glob("registry.db*"):
        path.unlink()
    device.registry = Registry.open(device.state_dir, RegistryConfig())
    device.log = AuditLog.open(device.registry, DEVICE)
    device.append(2)
    newer = device.records()
    assert newer[-1].epoch > first[-1].epoch
    assert device.upload(newer).head == newer[-1].head
    result = device.upload(first)
    assert result.alert is None
    assert result.head == first[-1].head  # the ack names the batch's own last record (ADR 0016)
    assert result.stored == 0
    assert result.duplicates == len(first)
    assert device.alerts() <= {"epoch_reset"}
    forged = [*first[:-1], AuditRecord(**{**first[-1].to_dict(), "data": {"forged": True}})]
    assert device.upload(rechain(forged)).alert == "regression"


def test_gap_record_is_accepted_and_alerted(device: Device) -> None:
    """A capped log's GAP record explains its hole: the batch is stored and a `dropped` alert recorded."""
    device.registry.run_in_transaction(lambda db: db.execute("UPDATE audit_state SET max_records = 20"))
    device.append(60)
    # As the uploader does: consecutive runs, each deleted on the device once acked.
    while batch := device.log.batch(max_bytes=200_000, max_records=1000):
        result = device.upload(batch)
        assert result.head is not None
        assert result.head == batch[-1].head
        assert device.log.acked(result.head) == len(batch)
    assert device.log.status()["pending"] == 0
    assert "dropped" in device.alerts()
    assert all(not chain.errors for chain in verify_stored(device.store))


def test_records_dropped_while_their_batch_waits_for_its_ack_still_get_deleted_and_explained(device: Device) -> None:
    """The cap drops records of a batch in flight: its ack still clears them, and the GAP record is accepted."""
    device.registry.run_in_transaction(lambda db: db.execute("UPDATE audit_state SET max_records = 20"))
    device.append(14)
    in_flight = device.log.batch(max_bytes=200_000, max_records=1000)
    assert [r.seq for r in in_flight] == list(range(15))
    device.append(40)  # past the cap: seqs from 10 on, part of the batch in flight, are dropped
    result = device.upload(in_flight)
    assert result.head == in_flight[-1].head
    assert device.log.acked(result.head) > 0
    while batch := device.log.batch(max_bytes=200_000, max_records=1000):
        stored = device.upload(batch)
        assert stored.head == batch[-1].head, stored.alert
        device.log.acked(stored.head)
    assert device.log.status()["pending"] == 0
    assert device.alerts() == {"dropped"}
