"""Tampering with a device's audit log is detected by the controller's ingest (real SQLite files, real keys).

The device side is the real :class:`agent.audit.AuditLog` in a real ``registry.db`` of an enrolled device; the
controller side is :func:`controller.audit_ingest.ingest_batch` on the real fleet DB made by ``edge-fleet
init``. The broker is left out (the integration tests cover transport): each test hands the ingest exactly
the bytes the device's uploader would publish, then edits the device's files the way root on it could.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agent.audit import AuditLog, _record
from agent.cli import main as agent_cli
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


# --- the device's own check: ``edge-agent audit verify`` -------------------------------------------------------


def _offline_checkpoint(device: Device) -> None:
    """Sign and keep an offline checkpoint of the head, as the uploader does while offline."""
    head = device.log.head()
    assert head is not None
    checkpoint = Checkpoint(DEVICE, head.epoch, head.seq, head.hash, 1)
    device.log.store_checkpoint(sign_checkpoint(checkpoint, device.key), checkpoint)


def _verify_cli(device: Device) -> Result:
    return CliRunner().invoke(agent_cli, ["--state-dir", str(device.state_dir), "audit", "verify"])


def test_local_verify_passes_an_honest_log_with_a_gap_and_an_offline_checkpoint(device: Device) -> None:
    """A capped log (a hole explained by its GAP record, acknowledged records deleted) verifies, CLI included."""
    device.registry.run_in_transaction(lambda db: db.execute("UPDATE audit_state SET max_records = 20"))
    device.append(30)
    _offline_checkpoint(device)
    batch = device.log.batch(max_bytes=200_000, max_records=3)
    device.log.acked(batch[-1].head)
    device.append(30)
    assert device.log.verify(device.key.public_key()).errors == ()
    result = _verify_cli(device)
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("ok")


def test_local_verify_fails_on_a_hole_no_gap_record_explains(device: Device) -> None:
    """A record deleted from the middle of the stored log is found, and the CLI exits non-zero."""
    device.append(10)
    device.sql("DELETE FROM audit_log WHERE seq = ?", [5])
    result = device.log.verify(device.key.public_key())
    assert [e for e in result.errors if "5..5 are missing" in e], result.errors
    cli = _verify_cli(device)
    assert cli.exit_code == 1
    assert "missing" in cli.output


def test_local_verify_fails_when_unacknowledged_records_are_missing_at_the_front(device: Device) -> None:
    """Records deleted before the first stored one, never acknowledged and with no GAP record: found."""
    device.append(10)
    device.sql("DELETE FROM audit_log WHERE seq <= ?", [3])
    result = device.log.verify()
    assert [e for e in result.errors if "0..3 are missing" in e], result.errors


def test_local_verify_compares_offline_checkpoints_with_the_records(device: Device) -> None:
    """A stored record rewritten and the chain re-hashed (no key needed) contradicts a signed offline checkpoint."""
    device.append(10)
    _offline_checkpoint(device)
    records = device.records()
    forged = rechain([*records[:3], AuditRecord(**{**records[3].to_dict(), "data": {"i": 999}}), *records[4:]])
    device.sql("DELETE FROM audit_log WHERE seq >= ?", [3])
    for r in forged[3:]:
        device.sql(
            "INSERT INTO audit_log (seq, epoch, ts_ms, kind, actor, data, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?)",
            [r.seq, r.epoch, r.ts_ms, r.kind, r.actor, json.dumps(r.data), r.prev_hash, r.hash],
        )
    device.sql("UPDATE audit_state SET head_hash = ?", [forged[-1].hash])
    result = device.log.verify(device.key.public_key())
    assert [e for e in result.errors if "checkpoint" in e and "rewritten" in e], result.errors


def test_local_verify_finds_the_end_removed_below_an_offline_checkpoint(device: Device) -> None:
    """The newest records deleted and the head moved back: the offline checkpoint names a seq past the head."""
    device.append(10)
    _offline_checkpoint(device)
    seventh = device.records()[7]
    device.sql("DELETE FROM audit_log WHERE seq > ?", [7])
    device.sql("UPDATE audit_state SET head_seq = 7, head_hash = ?, stored = 8", [seventh.hash])
    result = device.log.verify(device.key.public_key())
    assert [e for e in result.errors if "past the stored head" in e], result.errors


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda path: path.write_bytes(b"this is not an SQLite database" * 4), id="not-sqlite"),
        pytest.param(lambda path: sqlite3.connect(path).execute("CREATE TABLE other (x)"), id="no-audit-tables"),
        pytest.param(
            lambda path: sqlite3.connect(path).executescript(
                "CREATE TABLE audit_state (x); CREATE TABLE audit_log (x); CREATE TABLE audit_checkpoints (x);"
            ),
            id="other-columns",
        ),
    ],
)
@pytest.mark.parametrize("command", ["tail", "verify"])
def test_audit_cli_on_an_unreadable_registry_is_a_one_line_error(
    tmp_path: Path, make: Callable[[Path], object], command: str
) -> None:
    """``edge-agent audit tail|verify`` on a registry.db it cannot read: exit 1 and one line, no traceback."""
    (tmp_path / "state").mkdir()
    make(tmp_path / "state" / "registry.db")
    result = CliRunner().invoke(agent_cli, ["--state-dir", str(tmp_path / "state"), "audit", command])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.output.startswith("Error: cannot read the audit log in ")
    assert len(result.output.strip().splitlines()) == 1
