"""Audit ingest sharded over worker processes (controller.audit_shards): real processes, a real SQLite file, real keys.

Every test runs :class:`~controller.audit_shards.AuditShards` as ``serve`` does (its group loops as a task, the
workers ``spawn``ed) against a fleet DB created by :meth:`FleetStore.open`, with devices enrolled with real
Ed25519 keys and uploads encoded as the agent's uploader sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import multiprocessing
import os
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from audit_uploads import signed_uploads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import controller.audit_shards as audit_shards
from controller.audit_ingest import IngestResult, ingest_batch, ingest_upload, prepare_upload
from controller.audit_shards import AuditShards, shard_of
from controller.config import ConfigError, ControllerConfig, FleetConfig, validate
from controller.errors import AuditShardError
from controller.store import FleetStore
from protocols.audit import CheckedUpload
from protocols.keys import Ed25519PrivateKey, keyid, public_key_to_pem
from protocols.limits import DEFAULT_LIMITS

pytestmark = [pytest.mark.component, pytest.mark.timeout(120)]

DEVICES = [f"dev-{i}" for i in range(6)]
KEYS = {device: Ed25519PrivateKey.generate() for device in DEVICES}


def topic(device: str) -> str:
    return f"edgefleet/v1/devices/{device}/audit"


def uploads(device: str, count: int, size: int) -> list[tuple[bytes, int]]:
    """``count`` consecutive signed uploads of ``size`` records of ``device``: ``(payload, last seq)``."""
    return signed_uploads(device, KEYS[device], count, size)


def create_db(path: Path, devices: list[str] = DEVICES) -> None:
    """Create, migrate and enrol ``devices``, as serve does before it starts the shards."""
    store = FleetStore.open(path)
    try:
        with store.transaction():
            for device in devices:
                store.add_device(
                    device,
                    cert_serial=1,
                    cert_not_after=dt.datetime(2100, 1, 1, tzinfo=dt.UTC),
                    signing_keyid=keyid(KEYS[device]),
                    signing_key_pem=public_key_to_pem(KEYS[device]).decode(),
                )
    finally:
        store.close()


def query(path: Path, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    """Read committed rows through a connection of our own (what another process sees)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params or []).fetchall()


@contextlib.asynccontextmanager
async def running(path: Path, workers: int = 2, **options: Any) -> AsyncIterator[AuditShards]:
    """Shards started, their loops running as serve runs them; stopped (and the loops cancelled) on exit."""
    async with AuditShards(path, workers, **options) as shards:
        task = asyncio.create_task(shards.run())
        try:
            yield shards
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def upload_until_stored(shards: AuditShards, device: str, payload: bytes, *, attempts: int = 5) -> IngestResult:
    """Upload as a device does: re-send until acked (a failed upload is never acked)."""
    for _ in range(attempts):
        try:
            result: IngestResult = await (await shards.submit(topic(device), device, payload, now=1.0))
        except AuditShardError:
            continue
        return result
    raise AssertionError(f"{device}: no ack after {attempts} attempts")


def test_both_shards_are_used_and_a_device_always_maps_to_one() -> None:
    """The test devices spread over both shards; a device's shard is stable (crc32, not the salted hash())."""
    assert {shard_of(d, 2) for d in DEVICES} == {0, 1}
    assert shard_of("dev-0", 2) == shard_of("dev-0", 2) == __import__("zlib").crc32(b"dev-0") % 2


def test_audit_workers_setting_is_validated() -> None:
    """audit_workers accepts -1 (auto), 0 (in-process) and 1-64, nothing else."""
    for good in (-1, 0, 2, 64):
        validate(FleetConfig(controller=ControllerConfig(audit_workers=good)))
    for bad in (-2, 65):
        with pytest.raises(ConfigError, match="audit_workers"):
            validate(FleetConfig(controller=ControllerConfig(audit_workers=bad)))


async def test_many_devices_through_two_shards_stored_once_in_order_and_acked_after_commit(tmp_path: Path) -> None:
    """Six devices' batches, interleaved, through 2 workers: every record once, in order, heads right; each
    result arrives only once its records and head are committed (visible to another connection)."""
    db = tmp_path / "fleet.db"
    create_db(db)
    per_device = {device: uploads(device, 8, 25) for device in DEVICES}
    seen_before_result: list[bool] = []

    def check_committed(device: str, seq: int, future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            seen_before_result.append(False)
            return
        (head,) = query(db, "SELECT seq FROM audit_heads WHERE device = ?", [device])[0]
        stored = query(db, "SELECT count(*) FROM audit_records WHERE device = ? AND seq = ?", [device, seq])[0][0]
        seen_before_result.append(head >= seq and stored == 1)

    async with running(db, max_group=4) as shards:
        assert len({pid for pid in shards.pids}) == 2
        assert os.getpid() not in shards.pids
        futures: list[tuple[str, int, asyncio.Future[Any]]] = []
        for index in range(8):  # arrival order: devices interleaved batch by batch
            for device in DEVICES:
                payload, seq = per_device[device][index]
                future = await shards.submit(topic(device), device, payload, now=1.0)
                future.add_done_callback(lambda f, d=device, s=seq: check_committed(d, s, f))
                futures.append((device, seq, future))
        results = await asyncio.gather(*(f for _, _, f in futures))
        assert sum(s.committer.groups for s in shards.shards) < len(futures)  # queued uploads shared commits
        assert all(s.committer.jobs > 0 for s in shards.shards)
    assert seen_before_result == [True] * len(futures)
    for (device, seq, _), result in zip(futures, results, strict=True):
        assert result.head is not None, (device, result)
        assert result.head.seq == seq
        assert result.stored == 25
        assert result.duplicates == 0
    for device in DEVICES:
        seqs = [r[0] for r in query(db, "SELECT seq FROM audit_records WHERE device = ? ORDER BY seq", [device])]
        assert seqs == list(range(200))
        assert query(db, "SELECT seq, records FROM audit_heads WHERE device = ?", [device]) == [(199, 200)]
    assert query(db, "SELECT count(*) FROM audit_alerts") == [(0,)]


async def test_resent_batch_is_counted_as_duplicate_once(tmp_path: Path) -> None:
    """A batch uploaded again after it was stored: nothing stored twice, its records counted as duplicates once."""
    db = tmp_path / "fleet.db"
    create_db(db)
    (first, _), (second, _) = uploads("dev-0", 2, 10)
    async with running(db) as shards:
        stored = await upload_until_stored(shards, "dev-0", first)
        again = await upload_until_stored(shards, "dev-0", first)
        after = await upload_until_stored(shards, "dev-0", second)
    assert (stored.stored, stored.duplicates) == (10, 0)
    assert (again.stored, again.duplicates, again.head) == (0, 10, stored.head)
    assert (after.stored, after.duplicates) == (10, 0)
    assert query(db, "SELECT records, duplicates FROM audit_heads WHERE device = 'dev-0'") == [(20, 10)]
    assert query(db, "SELECT count(*) FROM audit_records") == [(20,)]


async def test_bad_batch_is_refused_with_an_alert_while_the_rest_of_its_group_commits(tmp_path: Path) -> None:
    """A byte changed in one device's record: refused, alerted, nothing of it stored; the other uploads of the
    same group (same worker, one transaction) are stored."""
    db = tmp_path / "fleet.db"
    create_db(db)
    same_shard = [d for d in DEVICES if shard_of(d, 2) == shard_of("dev-0", 2)]
    assert len(same_shard) >= 2
    bad_device, good_devices = same_shard[0], same_shard[1:]
    payload, _ = uploads(bad_device, 1, 10)[0]
    assert payload.count(b'"i":5}') == 1
    flipped = payload.replace(b'"i":5}', b'"i":7}')  # one byte: the record no longer hashes to its hash
    async with running(db) as shards:
        shard = shards.shards[shard_of(bad_device, 2)]
        futures = [await shards.submit(topic(bad_device), bad_device, flipped, now=1.0)]
        for device in good_devices:  # queued behind it before the loop runs: one group
            futures.append(await shards.submit(topic(device), device, uploads(device, 1, 10)[0][0], now=1.0))
        bad, *good = await asyncio.gather(*futures)
        assert shard.committer.groups == 1
        assert shard.committer.largest_group == len(futures)
    assert bad.head is None
    assert bad.alert == "chain"
    assert all(r.head is not None and r.stored == 10 for r in good)
    assert query(db, "SELECT device, kind FROM audit_alerts") == [(bad_device, "chain")]
    assert query(db, "SELECT count(*) FROM audit_records WHERE device = ?", [bad_device]) == [(0,)]
    assert query(db, "SELECT count(*) FROM audit_records") == [(10 * len(good_devices),)]


async def test_upload_from_an_unknown_device_is_recorded_as_a_rejection(tmp_path: Path) -> None:
    """An upload on the topic of a device that is not enrolled: not stored, not acked, recorded in rejections."""
    db = tmp_path / "fleet.db"
    create_db(db, devices=["dev-1"])
    payload, _ = uploads("dev-0", 1, 5)[0]
    async with running(db) as shards:
        result = await (await shards.submit(topic("dev-0"), "dev-0", payload, now=1.0))
    assert result.head is None
    assert result.alert is None
    assert query(db, "SELECT device, reason FROM rejections") == [("dev-0", "unknown or revoked device")]
    assert query(db, "SELECT count(*) FROM audit_records") == [(0,)]


async def test_killed_worker_loses_nothing_and_its_shard_comes_back(tmp_path: Path) -> None:
    """SIGKILL a worker while devices upload (each re-sending until acked, as agents do): every record ends up
    stored exactly once and in order, the shard gets a new worker, the other shard keeps its own."""
    db = tmp_path / "fleet.db"
    create_db(db)
    per_device = {device: uploads(device, 10, 40) for device in DEVICES}
    async with running(db, max_group=2) as shards:
        victim = shards.shards[0]
        killed_pid, other_pid = victim.pid, shards.shards[1].pid
        assert killed_pid is not None
        acked = asyncio.Event()

        async def device_uploads(device: str) -> None:
            for payload, seq in per_device[device]:
                result = await upload_until_stored(shards, device, payload)
                assert result.head is not None
                assert result.head.seq == seq
                if shard_of(device, 2) == 0:
                    acked.set()

        async with asyncio.TaskGroup() as tasks:
            for device in DEVICES:
                tasks.create_task(device_uploads(device))
            await acked.wait()  # shard 0 is busy with the next uploads now
            os.kill(killed_pid, signal.SIGKILL)
        assert victim.pid not in (None, killed_pid)
        assert victim.restarts
        assert shards.shards[1].pid == other_pid
        # Killed while idle: the next upload goes to a new worker (nothing of it reached the dead one).
        os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
        await asyncio.sleep(0.5)
        device = next(d for d in DEVICES if shard_of(d, 2) == 0)
        resent = await (await shards.submit(topic(device), device, per_device[device][-1][0], now=1.0))
        assert resent.duplicates == 40
    for device in DEVICES:
        seqs = [r[0] for r in query(db, "SELECT seq FROM audit_records WHERE device = ? ORDER BY seq", [device])]
        assert seqs == list(range(400))
    assert query(db, "SELECT count(*) FROM audit_alerts") == [(0,)]


async def test_a_worker_that_keeps_dying_ends_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """More restarts than allowed within the window: run() raises (serve exits non-zero, systemd restarts it)."""
    monkeypatch.setattr(audit_shards, "MAX_RESTARTS", 1)
    db = tmp_path / "fleet.db"
    create_db(db)
    device = next(d for d in DEVICES if shard_of(d, 2) == 0)
    payload, _ = uploads(device, 1, 5)[0]
    async with AuditShards(db, 2) as shards:
        task = asyncio.create_task(shards.run())
        try:
            for _ in range(2):
                pid = shards.shards[0].pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                await asyncio.sleep(0.5)
                with contextlib.suppress(AuditShardError, asyncio.CancelledError):  # cancelled: run() ended
                    await (await shards.submit(topic(device), device, payload, now=1.0))
            with pytest.raises(ExceptionGroup) as raised:
                await asyncio.wait_for(task, 10)
            assert raised.group_contains(AuditShardError, match="restarted more than 1 times")
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def test_stop_lets_the_running_group_commit_and_never_acks_queued_uploads(tmp_path: Path) -> None:
    """Stopping the shards mid-stream: uploads whose results came back are stored; the rest are either stored
    (their group was running) or not at all, never half; the workers are gone afterwards."""
    db = tmp_path / "fleet.db"
    create_db(db)
    per_device = {device: uploads(device, 10, 100) for device in DEVICES}
    async with running(db, max_group=2) as shards:
        pids = [pid for pid in shards.pids if pid is not None]
        futures = []
        for index in range(10):
            for device in DEVICES:
                futures.append(
                    (device, await shards.submit(topic(device), device, per_device[device][index][0], now=1.0))
                )
        await asyncio.wait([f for _, f in futures], return_when=asyncio.FIRST_COMPLETED)
    acked = [(device, f.result().head.seq) for device, f in futures if f.done() and not f.cancelled()]
    assert acked
    assert any(f.cancelled() for _, f in futures)
    for device, seq in acked:
        assert query(db, "SELECT count(*) FROM audit_records WHERE device = ? AND seq = ?", [device, seq]) == [(1,)]
    for device in DEVICES:
        seqs = [r[0] for r in query(db, "SELECT seq FROM audit_records WHERE device = ? ORDER BY seq", [device])]
        assert seqs == list(range(len(seqs)))  # a prefix: whole batches, in order
        assert len(seqs) % 100 == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_check_made_with_a_key_no_longer_enrolled_is_not_trusted(tmp_path: Path) -> None:
    """An upload checked before the transaction with the device's key, which is replaced (or revoked) before the
    transaction: it is verified again with the enrolled key (refused), not stored on the strength of the old check."""
    db = tmp_path / "fleet.db"
    create_db(db)
    payload, _ = uploads("dev-0", 1, 5)[0]
    store = FleetStore.open(db)
    try:
        prepared = prepare_upload(store, "dev-0", payload, now=1.0)
        assert isinstance(prepared.checked, CheckedUpload)
        other = Ed25519PrivateKey.generate()
        with store.transaction():
            store.db.execute(
                "UPDATE devices SET signing_key_pem = ?, signing_keyid = ? WHERE id = 'dev-0'",
                [public_key_to_pem(other).decode(), keyid(other)],
            )
        result = ingest_upload(store, topic("dev-0"), "dev-0", prepared, now=1.0)
        assert result.head is None
        assert result.alert == "bad_signature"
        revoked = prepare_upload(store, "dev-1", uploads("dev-1", 1, 5)[0][0], now=1.0)
        assert isinstance(revoked.checked, CheckedUpload)
        with store.transaction():
            store.revoke_device("dev-1")
        assert ingest_upload(store, topic("dev-1"), "dev-1", revoked, now=1.0).head is None
    finally:
        store.close()
    assert query(db, "SELECT count(*) FROM audit_records") == [(0,)]
    assert query(db, "SELECT device, kind FROM audit_alerts") == [("dev-0", "bad_signature")]
    assert query(db, "SELECT device, reason FROM rejections") == [("dev-1", "unknown or revoked device")]


@given(st.data())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_flipped_byte_gets_the_same_verdict_checked_before_the_transaction_as_inside(data: st.DataObject) -> None:
    """Flip any byte of an upload following a stored one: the workers' path (checked before the transaction) and
    ingest_batch (all inside it) store the same records and raise the same alert."""
    (first, _), (second, _) = uploads("dev-0", 2, 4)
    position = data.draw(st.integers(0, len(second) - 1))
    flipped = bytearray(second)
    flipped[position] ^= data.draw(st.integers(1, 255))
    verdicts = []
    for split in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "fleet.db"
            create_db(db)
            store = FleetStore.open(db)
            try:
                assert ingest_batch(store, "dev-0", first, now=1.0).stored == 4
                if split:
                    prepared = prepare_upload(store, "dev-0", bytes(flipped), now=1.0)
                    result = ingest_upload(store, topic("dev-0"), "dev-0", prepared, now=1.0)
                else:
                    result = ingest_batch(store, "dev-0", bytes(flipped), now=1.0)
            finally:
                store.close()
            rows = query(db, "SELECT seq, hash, data FROM audit_records ORDER BY seq")
            verdicts.append(
                (result.head, result.stored, result.alert, rows, query(db, "SELECT kind FROM audit_alerts"))
            )
    assert verdicts[0] == verdicts[1]


SERVE_STAND_IN = """
import asyncio, sys
from pathlib import Path
from controller.audit_shards import AuditShards

async def main() -> None:
    async with AuditShards(Path(sys.argv[1]), 2) as shards:
        print("PIDS", *shards.pids, flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_workers_exit_when_their_serve_is_killed(tmp_path: Path) -> None:
    """SIGKILL the process that owns the shards (serve): its workers notice and exit instead of lingering."""
    db = tmp_path / "fleet.db"
    create_db(db)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVE_STAND_IN, str(db), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    pids: list[int] = []
    try:
        line = b""
        while not line.startswith(b"PIDS "):  # after serve's log lines
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line, "the stand-in exited"
        pids = [int(pid) for pid in line.split()[1:]]
        assert len(pids) == 2
        assert all(_alive(pid) for pid in pids)
    finally:
        proc.kill()
        await proc.wait()
    for _ in range(100):
        if not any(_alive(pid) for pid in pids):
            break
        await asyncio.sleep(0.1)
    lingering = [pid for pid in pids if _alive(pid)]
    for pid in lingering:  # do not leave them behind (they ignore SIGTERM)
        os.kill(pid, signal.SIGKILL)
    assert not lingering


async def test_a_hung_worker_is_killed_after_the_group_timeout_and_its_shard_goes_on(tmp_path: Path) -> None:
    """A worker that stops answering (SIGSTOP: a native call that never returns, a wait on another process's
    hung writer) fails its group after the timeout, unacked; it is killed and replaced, and the device's re-sent
    upload is stored: serve's message loop is never held up for good."""
    db = tmp_path / "fleet.db"
    create_db(db)
    device = next(d for d in DEVICES if shard_of(d, 2) == 0)
    (payload, seq), *_ = uploads(device, 1, 10)
    async with running(db, group_timeout=2.0) as shards:
        hung = shards.shards[0].pid
        assert hung is not None
        os.kill(hung, signal.SIGSTOP)
        try:
            started = asyncio.get_running_loop().time()
            with pytest.raises(AuditShardError, match="did not finish the group in 2 s"):
                await (await shards.submit(topic(device), device, payload, now=1.0))
            assert asyncio.get_running_loop().time() - started < 30
            assert shards.shards[0].pid not in (None, hung)
            assert query(db, "SELECT count(*) FROM audit_records") == [(0,)]  # nothing of it was committed
            result = await upload_until_stored(shards, device, payload)  # the device re-sends
            assert result.head is not None
            assert result.head.seq == seq
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGKILL)


async def test_stop_kills_a_worker_that_does_not_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """serve's stop is bounded: a worker that does not end within STOP_TIMEOUT_S is killed."""
    monkeypatch.setattr(audit_shards, "STOP_TIMEOUT_S", 1.0)
    db = tmp_path / "fleet.db"
    create_db(db)
    shards = AuditShards(db, 2)
    await shards.__aenter__()
    hung = shards.shards[0].pid
    assert hung is not None
    os.kill(hung, signal.SIGSTOP)
    try:
        await asyncio.wait_for(shards.__aexit__(None, None, None), 20)
        with pytest.raises(ProcessLookupError):
            os.kill(hung, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGKILL)


# --- two groups in flight per worker (found missing by a review of the change) ---------------------------------


async def _two_groups(shards: AuditShards, device: str, payloads: list[bytes]) -> list[asyncio.Future[Any]]:
    """Submit ``payloads`` so that each is its own group: the shard's loop hands one over between two submits."""
    futures = []
    for payload in payloads:
        futures.append(await shards.submit(topic(device), device, payload, now=1.0))
        for _ in range(50):
            await asyncio.sleep(0)
    return futures


async def test_a_hung_worker_with_two_groups_fails_both_and_is_replaced_once(tmp_path: Path) -> None:
    """Both groups handed to a hung worker fail (not acked, nothing committed); one kill, one restart; re-sent,
    both are stored in order, with no alert."""
    db = tmp_path / "fleet.db"
    create_db(db)
    device = next(d for d in DEVICES if shard_of(d, 2) == 0)
    batches = uploads(device, 2, 10)
    async with running(db, group_timeout=2.0) as shards:
        shard = shards.shards[0]
        pid = shard.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            futures = await _two_groups(shards, device, [payload for payload, _ in batches])
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert all(isinstance(outcome, AuditShardError) for outcome in outcomes), outcomes
        assert len(shard.restarts) == 1
        assert shard.pid not in (None, pid)
        assert query(db, "SELECT count(*) FROM audit_records") == [(0,)]
        for payload, seq in batches:
            result = await (await shards.submit(topic(device), device, payload, now=1.0))
            assert result.head.seq == seq
        assert len(shard.restarts) == 1
    assert query(db, "SELECT count(*) FROM audit_alerts") == [(0,)]


async def test_a_worker_killed_with_two_groups_fails_both_and_is_replaced_once(tmp_path: Path) -> None:
    """SIGKILL of a worker holding two groups: both fail (not acked), one restart, and the shard goes on."""
    db = tmp_path / "fleet.db"
    create_db(db)
    device = next(d for d in DEVICES if shard_of(d, 2) == 0)
    batches = uploads(device, 2, 10)
    async with running(db) as shards:
        shard = shards.shards[0]
        pid = shard.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        futures = await _two_groups(shards, device, [payload for payload, _ in batches])
        os.kill(pid, signal.SIGKILL)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(outcome, AuditShardError) for outcome in outcomes), outcomes
        await asyncio.sleep(0.5)
        assert len(shard.restarts) == 1, shard.restarts
        result = await (await shards.submit(topic(device), device, batches[0][0], now=1.0))
        assert result.head.seq == batches[0][1]


# --- a worker's own loop: the next group prepared while the one ahead waits for the write turn (ADR 0014) -------


@contextlib.contextmanager
def group_loop(db: Path, monkeypatch: pytest.MonkeyPatch, calls: list[Any]) -> Any:
    """A worker's _GroupLoop on a thread of this process (real pipes, a real fleet DB, the real turn lock), with
    every upload prepared and every group stored recorded in ``events``; ``calls`` are in its pipe before it
    starts. Yields (replies, events)."""
    events: list[tuple[str, Any]] = []
    real_prepare, real_run_group = audit_shards.prepare_upload, audit_shards.run_group

    def prepare(store: FleetStore, device: str, payload: bytes, **kwargs: Any) -> Any:
        events.append(("prepared", payload))
        return real_prepare(store, device, payload, **kwargs)

    def run_group(store: FleetStore, jobs: list[Any]) -> Any:
        events.append(("stored", len(jobs)))
        return real_run_group(store, jobs)

    monkeypatch.setattr(audit_shards, "prepare_upload", prepare)
    monkeypatch.setattr(audit_shards, "run_group", run_group)
    calls_out, calls_in = multiprocessing.Pipe(duplex=False)
    results_out, results_in = multiprocessing.Pipe(duplex=False)
    store = FleetStore.open(db)
    checkpoints = audit_shards._Checkpointer(str(db))
    turn = os.open(str(db) + "-shards.lock", os.O_RDWR | os.O_CREAT, 0o600)
    replies = audit_shards._Syncer(str(db) + "-wal", results_in)
    loop = audit_shards._GroupLoop(store, DEFAULT_LIMITS, turn, calls_out, replies, checkpoints)
    for call in calls:
        calls_in.send(call)
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        yield results_out, events
    finally:
        calls_in.send(None)  # stop (an EOF would end this process: the worker's exit when serve is gone)
        thread.join(30)
        replies.close()
        checkpoints.close()
        os.close(turn)
        store.close()
    assert not thread.is_alive()


def wait_until(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_worker_prepares_the_next_group_while_the_one_ahead_waits_for_the_write_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another writer holds the shards' write turn, the worker prepares both groups handed to it (nothing is
    stored); once the turn is free it stores them in the order handed over, one transaction each, each reply
    after its commit."""
    db = tmp_path / "fleet.db"
    create_db(db)
    batches = uploads("dev-0", 4, 20)
    other_writer = os.open(str(db) + "-shards.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(other_writer, fcntl.LOCK_EX)
    first = [(topic("dev-0"), "dev-0", payload, 1.0) for payload, _ in batches[:2]]
    second = [(topic("dev-0"), "dev-0", payload, 1.0) for payload, _ in batches[2:]]
    try:
        with group_loop(db, monkeypatch, [(7, first), (8, second)]) as (replies, events):
            try:
                wait_until(lambda: len(events) == 4)
                time.sleep(0.2)  # a worker that waited for the turn instead would have stored by now if it could
                assert events == [("prepared", payload) for payload, _ in batches]
                assert not replies.poll()
                assert query(db, "SELECT count(*) FROM audit_records") == [(0,)]
            finally:
                fcntl.flock(other_writer, fcntl.LOCK_UN)  # the turn is free: the loop can store (and stop)
            answers = [replies.recv(), replies.recv()]
        assert [(kind, group) for kind, group, _ in answers] == [("done", 7), ("done", 8)]
        assert [result.head.seq for _, _, outcomes in answers for _, result in outcomes] == [s for _, s in batches]
        assert events[4:] == [("stored", 2), ("stored", 2)]
    finally:
        os.close(other_writer)
    seqs = [r[0] for r in query(db, "SELECT seq FROM audit_records ORDER BY seq")]
    assert seqs == list(range(80))


def test_a_worker_checkpoints_its_commits_on_its_own_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The WAL pages of a worker's commits reach the database file through its checkpoint thread (the worker's
    connection only checkpoints past the backstop, far above one small group)."""
    monkeypatch.setattr(audit_shards, "CHECKPOINT_BYTES", 1)
    db = tmp_path / "fleet.db"
    create_db(db)
    with contextlib.closing(sqlite3.connect(db)) as conn:  # everything so far in the database file
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = db.stat().st_size
    payload, seq = uploads("dev-0", 1, 200)[0]
    with group_loop(db, monkeypatch, [(1, [(topic("dev-0"), "dev-0", payload, 1.0)])]) as (replies, _):
        kind, _, outcomes = replies.recv()
        assert kind == "done"
        assert outcomes[0][1].head.seq == seq
        wait_until(lambda: db.stat().st_size > before)


def test_a_reply_waits_for_the_fsync_of_the_wal_which_runs_outside_the_write_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker commits without fsync (``synchronous = NORMAL``), hands the write turn on, and answers only once
    its syncer has fsynced the WAL: serve never acks what a power cut could take back, and the other worker stores
    meanwhile."""
    db = tmp_path / "fleet.db"
    create_db(db)
    synced = threading.Event()
    release = threading.Event()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        assert os.readlink(f"/proc/self/fd/{fd}").endswith("fleet.db-wal")
        release.wait(30)
        real_fsync(fd)
        synced.set()

    monkeypatch.setattr(audit_shards.os, "fsync", fsync)
    payload, seq = uploads("dev-0", 1, 50)[0]
    other_writer = os.open(str(db) + "-shards.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with group_loop(db, monkeypatch, [(1, [(topic("dev-0"), "dev-0", payload, 1.0)])]) as (replies, _):
            wait_until(lambda: query(db, "SELECT count(*) FROM audit_records") == [(50,)])  # committed
            fcntl.flock(other_writer, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the turn is free before the fsync ended
            fcntl.flock(other_writer, fcntl.LOCK_UN)
            time.sleep(0.2)
            assert not replies.poll()  # committed, not yet durable: no answer
            release.set()
            kind, group, outcomes = replies.recv()
            assert synced.is_set()
            assert (kind, group) == ("done", 1)
            assert outcomes[0][1].head.seq == seq
    finally:
        release.set()
        os.close(other_writer)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA synchronous").fetchone() == (2,)  # other connections keep FULL


def test_a_failed_fsync_ends_the_worker_without_a_reply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The WAL could not be made durable: nothing of what it holds may be acked, so the worker exits (its shard
    fails the groups it had not answered and starts a new one) instead of replying."""
    db = tmp_path / "fleet.db"
    create_db(db)
    exits: list[int] = []

    def fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    def exit_(status: int) -> None:
        exits.append(status)
        raise SystemExit(status)  # ends the syncer's thread, as os._exit would end the process

    monkeypatch.setattr(audit_shards.os, "fsync", fsync)
    monkeypatch.setattr(audit_shards.os, "_exit", exit_)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)
    payload, _ = uploads("dev-0", 1, 20)[0]
    with group_loop(db, monkeypatch, [(1, [(topic("dev-0"), "dev-0", payload, 1.0)])]) as (replies, _):
        wait_until(lambda: exits == [audit_shards.EXIT_UNSYNCED])
        assert not replies.poll(0.2)
