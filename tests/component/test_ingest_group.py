"""Group commit (controller.ingest): many uploads in one transaction, each verified and undone alone."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from audit_uploads import signed_uploads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.audit_ingest import IngestResult, ingest_batch
from controller.ingest import GroupCommitter, WriteBatcher, run_group
from controller.store import FleetStore
from protocols.keys import Ed25519PrivateKey, keyid, public_key_to_pem

pytestmark = pytest.mark.component

KEY = Ed25519PrivateKey.generate()


def open_store(directory: Path) -> FleetStore:
    store = FleetStore.open(directory / "fleet.db")
    with store.transaction():
        store.add_device(
            "dev-1",
            cert_serial=1,
            cert_not_after=dt.datetime(2100, 1, 1, tzinfo=dt.UTC),
            signing_keyid=keyid(KEY),
            signing_key_pem=public_key_to_pem(KEY).decode(),
        )
    return store


def batches(count: int, size: int) -> list[bytes]:
    """``count`` consecutive signed uploads of ``size`` records of device dev-1."""
    return [payload for payload, _ in signed_uploads("dev-1", KEY, count, size)]


def job(payload: bytes) -> Any:
    def run(store: FleetStore) -> IngestResult:
        return ingest_batch(store, "dev-1", payload, now=1.0)

    return run


def stored(store: FleetStore) -> int:
    return int(store.db.execute("SELECT count(*) FROM audit_records").fetchone()[0])


def test_group_stores_in_order_and_dedupes(tmp_path: Path) -> None:
    """Consecutive uploads in one group are all stored; a re-sent one in the same group is counted, not stored."""
    store = open_store(tmp_path)
    try:
        uploads = batches(3, 5)
        outcomes = run_group(store, [job(uploads[0]), job(uploads[1]), job(uploads[1]), job(uploads[2])])
        assert all(ok for ok, _ in outcomes)
        results = [value for _, value in outcomes]
        assert [r.stored for r in results] == [5, 5, 0, 5]
        assert results[2].duplicates == 5
        assert stored(store) == 15
    finally:
        store.close()


def test_failing_job_is_undone_alone(tmp_path: Path) -> None:
    """A job that raises is rolled back to its savepoint; the jobs around it commit."""
    store = open_store(tmp_path)
    try:
        uploads = batches(2, 4)

        def broken(s: FleetStore) -> None:
            s.db.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")
            raise RuntimeError("boom")

        outcomes = run_group(store, [job(uploads[0]), broken, job(uploads[1])])
        assert [ok for ok, _ in outcomes] == [True, False, True]
        assert isinstance(outcomes[1][1], RuntimeError)
        assert stored(store) == 8
        assert store.db.execute("SELECT count(*) FROM meta WHERE key = 'x'").fetchone()[0] == 0
    finally:
        store.close()


@given(st.data())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_flipped_byte_in_a_group_is_refused_and_others_commit(data: st.DataObject) -> None:
    """Flip any byte of an upload: it is refused (never stored, never acked) and the next valid one still is."""
    uploads = batches(2, 3)
    position = data.draw(st.integers(0, len(uploads[0]) - 1))
    flipped = bytearray(uploads[0])
    flipped[position] ^= data.draw(st.integers(1, 255))
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(tmp))
        try:
            outcomes = run_group(store, [job(bytes(flipped)), job(uploads[0]), job(uploads[1])])
            assert all(ok for ok, _ in outcomes)
            bad, good, after = (value for _, value in outcomes)
            if bad.head is not None:  # the flip left an equivalent encoding (e.g. JSON whitespace): same content
                assert bad.stored == 3
                assert good.duplicates == 3
            else:
                assert bad.stored == 0
                assert good.stored == 3
            assert after.stored == 3
            assert stored(store) == 6
        finally:
            store.close()


async def test_batcher_groups_queued_jobs_and_resolves_after_commit(tmp_path: Path) -> None:
    """Jobs queued while the writer is busy run as one group, in order; each future resolves after the commit."""
    store = open_store(tmp_path)
    loop = asyncio.get_running_loop()

    async def on_writer(fn: Any, *args: Any) -> Any:
        return await loop.run_in_executor(None, lambda: fn(*args))

    batcher = WriteBatcher(on_writer, lambda: store, max_group=100)
    runner = asyncio.create_task(batcher.run())
    try:
        uploads = batches(20, 2)
        futures = [await batcher.submit(job(p)) for p in uploads]
        results = await asyncio.gather(*futures)
        assert [r.head.seq for r in results] == [2 * i + 1 for i in range(20)]
        assert stored(store) == 40
        assert batcher.jobs == 20
        assert batcher.groups < 20  # queued jobs shared commits
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner
        store.close()


async def test_two_groups_in_flight_are_handed_over_in_order_and_resolve_with_their_own_group() -> None:
    """max_in_flight=2: the next group is handed over while one runs (never a third), groups start in
    submission order, and each future resolves with its own group's result."""
    started: list[list[int]] = []
    gates = [asyncio.Event() for _ in range(4)]
    running = 0
    most_running = 0

    async def run_group_in_order(items: list[int]) -> list[tuple[bool, Any]]:
        nonlocal running, most_running
        started.append(items)
        running += 1
        most_running = max(most_running, running)
        await gates[len(started) - 1].wait()
        running -= 1
        return [(True, item * 10) for item in items]

    async def settle() -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    committer: GroupCommitter[int] = GroupCommitter(run_group_in_order, max_group=2, max_in_flight=2)
    runner = asyncio.create_task(committer.run())
    try:
        futures = [await committer.submit(i) for i in range(7)]
        await settle()
        assert started == [[0, 1], [2, 3]]  # two handed over, the rest waits for room
        gates[0].set()
        await settle()
        assert started == [[0, 1], [2, 3], [4, 5]]
        assert futures[0].done()
        assert not futures[2].done()
        for gate in gates[1:]:
            gate.set()
        assert await asyncio.gather(*futures) == [i * 10 for i in range(7)]
        assert started == [[0, 1], [2, 3], [4, 5], [6]]
        assert most_running == 2
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


async def test_two_groups_in_flight_an_unexpected_error_still_ends_run() -> None:
    """max_in_flight=2: a group whose results do not match it (a bug) ends run() as with one group in flight."""

    async def wrong_count(items: list[int]) -> list[tuple[bool, Any]]:
        return []

    committer: GroupCommitter[int] = GroupCommitter(wrong_count, max_in_flight=2)
    runner = asyncio.create_task(committer.run())
    await committer.submit(1)
    with pytest.raises(ValueError, match="zip"):
        await asyncio.wait_for(runner, 5)


def test_a_failed_commit_leaves_no_transaction_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite can keep a transaction open after a failed COMMIT (disk full, I/O error). Left open, the next
    transaction() would nest in it as a savepoint and "commit" nothing — and its caller would ack work that is
    rolled back later. The failed transaction is ended; the next one commits for real."""
    store = open_store(tmp_path)
    try:
        real_execute = store.db.execute
        failures = [sqlite3.OperationalError("database or disk is full")]

        def execute(sql: str, *args: Any) -> Any:
            if sql == "COMMIT" and failures:
                raise failures.pop()  # the COMMIT did not happen: the transaction is still open
            return real_execute(sql, *args)

        monkeypatch.setattr(store.db, "execute", execute)
        with pytest.raises(sqlite3.OperationalError, match="disk is full"), store.transaction():
            store.db.conn.execute("INSERT INTO meta (key, value) VALUES ('lost', '1')")
        assert not store.db.conn.in_transaction
        with store.transaction():
            store.db.conn.execute("INSERT INTO meta (key, value) VALUES ('kept', '1')")
        assert not store.db.conn.in_transaction  # committed, not a savepoint of a transaction left open
        other = sqlite3.connect(tmp_path / "fleet.db")
        try:
            keys = {row[0] for row in other.execute("SELECT key FROM meta WHERE key IN ('lost', 'kept')")}
        finally:
            other.close()
        assert keys == {"kept"}
    finally:
        store.close()


async def test_a_group_cancelled_from_outside_fails_alone_and_the_loop_goes_on() -> None:
    """With two groups in flight, a group whose call ends cancelled though run() was not (the pool cancelled it)
    fails its items (cancelled, never acked) and the loop runs the next group: it must not end as if stopped,
    which a TaskGroup would not notice (every later submit would wait forever)."""
    calls = 0

    async def run_group(items: list[int]) -> list[tuple[bool, Any]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            cancelled = asyncio.get_running_loop().create_future()
            cancelled.cancel()
            await cancelled  # a cancelled call, not a cancellation of this task
        return [(True, item) for item in items]

    committer: GroupCommitter[int] = GroupCommitter(run_group, max_in_flight=2)
    runner = asyncio.create_task(committer.run())
    try:
        first = await committer.submit(1)
        with pytest.raises(asyncio.CancelledError):
            await first
        second = await committer.submit(2)
        assert await asyncio.wait_for(second, 5) == 2
        assert not runner.done()
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
