"""``edge-fleet audit tail|verify|export|alerts`` on a real fleet DB filled by the real ingest (real keys).

The controller home is made by ``edge-fleet init``, devices by ``edge-fleet device enroll``; uploads are signed
with the enrolled keys and stored by :func:`controller.audit_ingest.ingest_batch`, as ``serve`` does. The one
seam replaced is ``time.sleep`` in :mod:`controller.cli_audit` for ``tail --follow``: each call runs the next
step of the test (more uploads) instead of sleeping, and the last one ends the command.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import controller.cli_audit as cli_audit
from agent.link.enrollment import install_bundle, load_enrollment
from controller.audit_ingest import ALERT_FLOOD_CAP, IngestResult, ingest_batch, record_alert
from controller.cli import main as fleet_cli
from controller.config import BrokerConfig, FleetConfig
from controller.home import FleetHome
from controller.store import FleetStore
from protocols.audit import AuditHead, AuditRecord, Checkpoint, make_record, sign_checkpoint, start_epoch
from protocols.keys import Ed25519PrivateKey
from protocols.messages import AuditBatch

pytestmark = [pytest.mark.component, pytest.mark.timeout(120)]


class Fleet:
    """A controller home with enrolled devices, their signing keys and the open fleet DB."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.home = FleetHome.init(tmp / "home", FleetConfig(broker=BrokerConfig(host="127.0.0.1", port=1883)))
        self.keys: dict[str, Ed25519PrivateKey] = {}
        self.store = self.home.open_store()

    def enroll(self, device: str) -> None:
        bundle = self.tmp / f"bundle-{device}"
        result = self.cli("device", "enroll", device, "--out", str(bundle))
        assert result.exit_code == 0, result.output
        install_bundle(self.tmp / f"state-{device}", bundle.read_bytes())
        enrollment = load_enrollment(self.tmp / f"state-{device}")
        assert enrollment is not None
        self.keys[device] = enrollment.signing_key

    def upload(self, device: str, records: list[AuditRecord], *, now: float) -> IngestResult:
        head = records[-1]
        checkpoint = sign_checkpoint(Checkpoint(device, head.epoch, head.seq, head.hash, 1000), self.keys[device])
        payload = AuditBatch(device, head.epoch, tuple(records), checkpoint).encode()
        return ingest_batch(self.store, device, payload, now=now)

    def cli(self, *args: str) -> Result:
        return CliRunner().invoke(fleet_cli, ["--home", str(self.home.root), *args])


def chain(
    device: str, count: int, *, epoch: int = 1, previous: AuditHead | None = None, data: dict[str, Any] | None = None
) -> list[AuditRecord]:
    """``count`` records of one epoch of ``device``, starting with its epoch_start."""
    records = [start_epoch(device, epoch, previous=previous, reason="t", actor="agent", ts_ms=1000)]
    while len(records) < count:
        records.append(
            make_record(records[-1], "test.event", "agent", data or {"i": len(records)}, 1000 + len(records))
        )
    return records


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A fleet home with devices dev-a and dev-b enrolled."""
    made = Fleet(tmp_path)
    made.enroll("dev-a")
    made.enroll("dev-b")
    yield made
    made.store.close()  # closing twice is harmless (some tests close it to replace fleet.db)


def follow(fleet: Fleet, monkeypatch: pytest.MonkeyPatch, steps: list[Callable[[], object]], *args: str) -> list[str]:
    """Run ``audit tail --follow``; each poll-loop sleep runs the next step; the output's record lines."""
    pending = list(steps)

    def sleep(_: float) -> None:
        if not pending:
            raise KeyboardInterrupt
        pending.pop(0)()

    monkeypatch.setattr(cli_audit.time, "sleep", sleep)
    result = fleet.cli("audit", "tail", "--follow", *args)
    assert result.exit_code == 1, result.output
    assert "Aborted" in result.output  # the KeyboardInterrupt that ended it
    return [line for line in result.output.splitlines() if line.startswith("1970")]


def keys(lines: list[str]) -> list[tuple[str, int, int]]:
    """``(device, epoch, seq)`` of each printed record line."""
    out = []
    for line in lines:
        device, where = line.split()[1:3]
        epoch, seq = where.split(":")
        out.append((device, int(epoch), int(seq)))
    return out


# --- tail --follow -----------------------------------------------------------------------------------


def test_follow_does_not_reprint_older_records_of_the_newest_batch(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the newest N records, an idle poll prints nothing: not the rest of the batch they came from."""
    fleet.upload("dev-a", chain("dev-a", 100), now=100.0)
    printed = keys(follow(fleet, monkeypatch, [lambda: None]))
    assert printed == [("dev-a", 1, seq) for seq in range(80, 100)]


def test_follow_prints_a_burst_larger_than_one_poll_completely_and_in_order(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """11,000 records stored between two polls are all printed, in seq order (no fixed per-poll limit loses any)."""
    records = chain("dev-a", 12_000)
    fleet.upload("dev-a", records[:1000], now=100.0)

    def burst() -> None:
        for i, start in enumerate(range(1000, 12_000, 1000)):
            assert fleet.upload("dev-a", records[start : start + 1000], now=200.0 + i).stored == 1000

    printed = keys(follow(fleet, monkeypatch, [burst, lambda: None], "-n", "1"))
    assert printed == [("dev-a", 1, seq) for seq in range(999, 12_000)]


def test_follow_prints_a_batch_committed_later_though_received_earlier(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commit order, not received_ts: a batch another audit shard commits later with an older received_ts shows."""
    a, b = chain("dev-a", 20), chain("dev-b", 20)
    fleet.upload("dev-a", a[:10], now=100.0)
    steps = [
        lambda: fleet.upload("dev-a", a[10:], now=300.0),  # shard 1 commits first
        lambda: fleet.upload("dev-b", b, now=200.0),  # shard 2, received earlier, commits after
        lambda: None,
    ]
    printed = keys(follow(fleet, monkeypatch, steps, "-n", "1"))
    assert printed == [("dev-a", 1, s) for s in range(9, 20)] + [("dev-b", 1, s) for s in range(20)]


def test_follow_prints_a_batch_committed_while_the_newest_records_are_read_exactly_once(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch committed between taking the cursor and reading the newest N is neither lost nor printed twice."""
    a = chain("dev-a", 30)
    fleet.upload("dev-a", a[:10], now=100.0)
    real_tail = cli_audit.tail

    def tail_after_a_commit(store: FleetStore, **kwargs: Any) -> list[dict[str, Any]]:
        fleet.upload("dev-a", a[10:20], now=110.0)
        return real_tail(store, **kwargs)

    monkeypatch.setattr(cli_audit, "tail", tail_after_a_commit)
    printed = keys(follow(fleet, monkeypatch, [lambda: fleet.upload("dev-a", a[20:], now=120.0), lambda: None]))
    assert printed == [("dev-a", 1, seq) for seq in range(30)]


def test_follow_with_device_shows_only_that_device(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--device`` filters the followed batches too."""
    a, b = chain("dev-a", 10), chain("dev-b", 10)
    steps = [lambda: (fleet.upload("dev-a", a, now=1.0), fleet.upload("dev-b", b, now=2.0)), lambda: None]
    printed = keys(follow(fleet, monkeypatch, steps, "--device", "dev-b"))
    assert printed == [("dev-b", 1, seq) for seq in range(10)]


# --- verify ------------------------------------------------------------------------------------------


def test_verify_fails_when_the_end_of_an_older_epoch_is_deleted(fleet: Fleet) -> None:
    """Deleting the records the next epoch's epoch_start continues from fails verify, though each epoch links."""
    a1 = chain("dev-a", 40)
    fleet.upload("dev-a", a1, now=1.0)
    assert fleet.upload("dev-a", chain("dev-a", 10, epoch=2, previous=a1[-1].head), now=2.0).alert is None
    assert fleet.cli("audit", "verify").exit_code == 0
    fleet.store.db.execute("DELETE FROM audit_records WHERE device = 'dev-a' AND epoch = 1 AND seq >= 30")
    result = fleet.cli("audit", "verify")
    assert result.exit_code == 1, result.output
    assert "epoch 2: its epoch_start continues from epoch 1 seq 39, but that record is not stored" in result.output
    assert "50 records were accepted from this device but 40 are stored" in result.output


def test_verify_fails_when_every_record_of_a_device_is_deleted(fleet: Fleet) -> None:
    """A device with an accepted head but no stored record is listed as failed, not left out with exit 0."""
    fleet.upload("dev-a", chain("dev-a", 10), now=1.0)
    fleet.upload("dev-b", chain("dev-b", 10), now=1.0)
    fleet.store.db.execute("DELETE FROM audit_records WHERE device = 'dev-b'")
    result = fleet.cli("audit", "verify")
    assert result.exit_code == 1, result.output
    assert "dev-b  epoch 1  0 records  head -  FAILED" in result.output
    assert "the accepted head seq 9 is not stored" in result.output


def test_verify_passes_an_epoch_reset_that_names_a_record_never_received(fleet: Fleet) -> None:
    """An epoch change already alerted as epoch_reset (records lost on the device) is not a verify failure."""
    fleet.upload("dev-a", chain("dev-a", 40), now=1.0)
    lost = AuditHead(1, 50, "ab" * 32)
    assert fleet.upload("dev-a", chain("dev-a", 10, epoch=2, previous=lost), now=2.0).head is not None
    result = fleet.cli("audit", "verify")
    assert result.exit_code == 0, result.output


# --- alerts ------------------------------------------------------------------------------------------


def _alerts(fleet: Fleet, entries: list[tuple[str, str, str]]) -> None:
    with fleet.store.transaction() as db:
        for i, (device, kind, detail) in enumerate(entries):
            record_alert(db, device, kind, detail, now=1000.0 + i)


def test_alerts_limit_says_how_many_were_not_shown(fleet: Fleet) -> None:
    """``--limit N`` shows the newest N and ends with how many more there are."""
    _alerts(fleet, [("dev-a", "chain", f"bad record {i}") for i in range(5)])
    result = fleet.cli("audit", "alerts", "--limit", "2")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 3
    assert "bad record 4" in lines[0]
    assert "bad record 3" in lines[1]
    assert lines[2] == "3 more alerts not shown (--limit)"
    assert "not shown" not in fleet.cli("audit", "alerts", "--limit", "5").output


def test_alerts_filter_by_kind_and_device(fleet: Fleet) -> None:
    """``--kind`` and ``--device`` select alerts."""
    _alerts(fleet, [("dev-a", "chain", "x"), ("dev-a", "fork", "y"), ("dev-b", "fork", "z")])
    result = fleet.cli("audit", "alerts", "--kind", "fork", "--device", "dev-a")
    assert result.exit_code == 0, result.output
    assert [line.split()[1:3] for line in result.output.splitlines()] == [["dev-a", "fork"]]


def test_a_flood_of_different_alerts_is_folded_into_a_count(fleet: Fleet) -> None:
    """Past the hourly cap a (device, kind)'s new alerts are counted in one row; other devices are unaffected."""
    flood = ALERT_FLOOD_CAP + 50
    _alerts(fleet, [("dev-b", "chain", f"bad record at seq {i}") for i in range(flood)] + [("dev-a", "gap", "hole")])
    rows = fleet.store.db.execute("SELECT device, count(*), sum(count) FROM audit_alerts GROUP BY device").fetchall()
    assert sorted(rows) == [("dev-a", 1, 1), ("dev-b", ALERT_FLOOD_CAP + 1, flood)]
    with fleet.store.transaction() as db:  # an hour later, new details get rows again
        record_alert(db, "dev-b", "chain", "a new one", now=1000.0 + flood + 3601)
    assert fleet.store.db.execute("SELECT count(*) FROM audit_alerts WHERE detail = 'a new one'").fetchone() == (1,)


# --- errors, missing DB ------------------------------------------------------------------------------

COMMANDS = [["audit", "tail"], ["audit", "verify"], ["audit", "export"], ["audit", "alerts"]]


@pytest.mark.parametrize("command", COMMANDS)
def test_audit_commands_report_a_missing_home_without_a_traceback(tmp_path: Path, command: list[str]) -> None:
    """A wrong --home is a one-line ``Error:`` with a hint and exit 1."""
    result = CliRunner().invoke(fleet_cli, ["--home", str(tmp_path / "nohome"), *command])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Error: no edge-fleet home" in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_audit_commands_report_a_corrupt_fleet_db_without_a_traceback(fleet: Fleet, command: list[str]) -> None:
    """A fleet.db that is not a database is a one-line ``Error:``, not a traceback."""
    fleet.store.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{fleet.home.db_path}{suffix}").unlink(missing_ok=True)
    fleet.home.db_path.write_bytes(b"garbage" * 1000)
    result = fleet.cli(*command)
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Error: cannot use the fleet database" in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_read_only_commands_do_not_create_a_missing_fleet_db(fleet: Fleet, command: list[str]) -> None:
    """Without fleet.db the commands fail clearly and do not create an empty one (that would "verify")."""
    fleet.upload("dev-a", chain("dev-a", 3), now=1.0)
    fleet.store.close()
    os.remove(fleet.home.db_path)
    result = fleet.cli(*command)
    assert result.exit_code == 1, result.output
    assert "Error: no fleet database at" in result.output
    assert not fleet.home.db_path.exists()


# --- export --since ----------------------------------------------------------------------------------


def test_export_since_includes_records_received_since_from_a_device_whose_clock_says_1970(fleet: Fleet) -> None:
    """``--since`` selects what happened *or* was received since then: a device without RTC is not left out."""
    fleet.upload("dev-a", chain("dev-a", 5), now=time.time())  # ts_ms ~ 1000: 1970
    fleet.upload("dev-b", chain("dev-b", 5), now=1000.0)  # received long ago, device clock 1970 too
    result = fleet.cli("audit", "export", "--since", "2h")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["device"] for line in result.output.splitlines()] == ["dev-a"] * 5


def test_export_since_too_far_back_is_a_usage_error(fleet: Fleet) -> None:
    """An overflowing duration is click's usage error naming --since, not an OverflowError traceback."""
    result = fleet.cli("audit", "export", "--since", "99999999999999999999d")
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--since'" in result.output


def test_since_without_a_zone_is_utc() -> None:
    """An ISO-8601 time without a zone is read as UTC (as documented)."""
    assert cli_audit.parse_since("1970-01-02T00:00") == 86_400_000


# --- terminal safety ---------------------------------------------------------------------------------


def test_tail_and_alerts_escape_control_and_bidi_characters_but_export_keeps_them(fleet: Fleet) -> None:
    """C0/C1 controls and bidi overrides from a device reach the terminal escaped; é stays; export is unchanged."""
    text = "\u009b2J\x1b[31m caf\u00e9 \u202eevil\u2028"
    fleet.upload("dev-a", chain("dev-a", 3, data={"msg": text}), now=1.0)
    _alerts(fleet, [("dev-a", "chain", text)])
    for command in (["audit", "tail"], ["audit", "alerts"]):
        result = fleet.cli(*command)
        assert result.exit_code == 0, result.output
        shown = result.output.splitlines()[-1]
        assert shown.isprintable(), repr(shown)
        assert "\\u009b2J\\u001b[31m caf\u00e9 \\u202eevil\\u2028" in shown
    exported = fleet.cli("audit", "export").output.splitlines()[-1]
    assert json.loads(exported)["data"] == {"msg": text}


# --- the accepted head's checkpoint ------------------------------------------------------------------


def test_a_duplicate_batch_behind_the_head_keeps_the_head_checkpoint(fleet: Fleet) -> None:
    """Re-sent records behind the head count as duplicates but leave the stored checkpoint at the head."""
    records = chain("dev-a", 20)
    fleet.upload("dev-a", records, now=1.0)
    before = fleet.store.db.execute("SELECT checkpoint, updated_ts FROM audit_heads").fetchone()
    result = fleet.upload("dev-a", records[:10], now=2.0)
    assert result.duplicates == 10
    assert result.stored == 0
    after = fleet.store.db.execute("SELECT checkpoint, updated_ts, duplicates FROM audit_heads").fetchone()
    assert after == (*before, 10)
