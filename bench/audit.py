"""Audit ingest benchmark: records/s verified and stored by the controller, next to a bare SQLite insert.

In one run, on this machine:

1. builds, for ``--devices`` devices with real Ed25519 keys, ``--records`` hash-chained audit records each
   (:func:`protocols.audit.start_epoch` / :func:`~protocols.audit.make_record`), cut into upload batches the
   way the device's uploader cuts them (at most ``limits.max_audit_batch`` records and
   ``limits.max_message_bytes`` encoded), each with a signed checkpoint, encoded as on the wire;
2. times the controller's ingest of every batch on a fresh fleet DB, devices interleaved (decode, checkpoint
   signature, chain verification, dedupe, insert, head update: everything ``serve`` does but MQTT), through the
   classes ``serve`` uses, on an asyncio loop, from the first upload submitted to the last result returned (all
   committed), at most ``--group`` batches per commit: with 0 workers in-process
   (:class:`controller.ingest.WriteBatcher` running :meth:`controller.audit_ingest.AuditIngest.job` on one writer
   thread, each batch in a savepoint, one commit per group), and with ``--workers N`` (default: ``serve``'s
   ``audit_workers`` default) through :class:`controller.audit_shards.AuditShards`: N worker processes sharded by
   device, each committing its own groups;
3. times a bare SQLite insert of the same rows into the same table (same primary key *and* the same
   ``received_ts`` index as the fleet DB's ``audit_records``; the PK-only figure is reported too) in a
   database with the same settings (WAL, ``synchronous=FULL``): one ``executemany`` per batch and one commit
   per ``--group`` batches, so both sides pay the same number of fsyncs;
4. prints both rates and their ratio (target: ingest >= 50 % of the bare insert) and writes
   ``.cache/bench/audit.json``.

Usage: ``python bench/audit.py [--devices N] [--records N] [--rounds N] [--group N ...] [--workers N]``. Exit status 0
whether or not the target is met (this is a benchmark, not a test).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import sqlite3
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controller.audit_ingest import AuditIngest  # noqa: E402
from controller.audit_shards import AuditShards, default_workers  # noqa: E402
from controller.ingest import WriteBatcher  # noqa: E402
from controller.store import FleetStore  # noqa: E402
from protocols.audit import AuditRecord, Checkpoint, make_record, sign_checkpoint, start_epoch  # noqa: E402
from protocols.canonical import canonical_json  # noqa: E402
from protocols.keys import Ed25519PrivateKey, keyid, public_key_to_pem  # noqa: E402
from protocols.limits import DEFAULT_LIMITS  # noqa: E402
from protocols.messages import AuditBatch  # noqa: E402

BARE_SCHEMA = """
CREATE TABLE audit_records (
    device TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL,
    kind TEXT NOT NULL, actor TEXT NOT NULL, data TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL,
    received_ts REAL NOT NULL, PRIMARY KEY (device, epoch, seq)
) WITHOUT ROWID
"""

BARE_INDEX = "CREATE INDEX audit_records_received ON audit_records (received_ts)"
"""The fleet DB's second index on ``audit_records`` (controller/store.py ``m002_audit``)."""


def build(
    devices: int, records: int
) -> tuple[list[tuple[str, Ed25519PrivateKey]], list[tuple[str, bytes, list[AuditRecord]]]]:
    """Keys and encoded batches (device, payload, records), devices interleaved batch by batch."""
    keys = [(f"bench-{i:03d}", Ed25519PrivateKey.generate()) for i in range(devices)]
    per_device: list[list[tuple[str, bytes, list[AuditRecord]]]] = []
    budget = DEFAULT_LIMITS.max_message_bytes - 2048
    for device, key in keys:
        ts = 1_790_000_000_000
        chain = [start_epoch(device, 1, previous=None, reason="bench", actor="agent", ts_ms=ts)]
        for i in range(records - 1):
            data = {"model": "smollm2-135m-instruct", "variant": "q4_0", "version": i % 7 + 1, "uid": 1000 + i % 3}
            chain.append(make_record(chain[-1], "registry.model_activated", "uid:1000", data, ts + i))
        batches = []
        start = 0
        while start < len(chain):
            used, end = 0, start
            while end < len(chain) and end - start < DEFAULT_LIMITS.max_audit_batch:
                size = len(canonical_json(chain[end].to_dict())) + 1
                if used + size > budget:
                    break
                used += size
                end += 1
            part = chain[start:end]
            head = part[-1].head
            checkpoint = sign_checkpoint(Checkpoint(device, head.epoch, head.seq, head.hash, part[-1].ts_ms), key)
            batches.append((device, AuditBatch(device, 1, tuple(part), checkpoint).encode(), part))
            start = end
        per_device.append(batches)
    interleaved = []
    for index in range(max(len(b) for b in per_device)):
        interleaved += [batches[index] for batches in per_device if index < len(batches)]
    return keys, interleaved


def run_ingest(
    directory: Path, keys: list[tuple[str, Ed25519PrivateKey]], batches: list[Any], group: int, workers: int
) -> float:
    """Seconds from the first upload submitted to the last result returned (everything committed).

    Through the classes ``serve`` uses: with ``workers`` 0, :class:`controller.ingest.WriteBatcher` running
    :meth:`controller.audit_ingest.AuditIngest.job` on one writer thread; otherwise
    :class:`controller.audit_shards.AuditShards` with that many worker processes. Either commits at most
    ``group`` uploads per transaction (per worker); all uploads are submitted at once, in arrival order.
    """
    store = FleetStore.open(directory / "fleet.db")
    try:
        with store.transaction():
            for device, key in keys:
                store.add_device(
                    device,
                    cert_serial=1,
                    cert_not_after=dt.datetime(2100, 1, 1, tzinfo=dt.UTC),
                    signing_keyid=keyid(key),
                    signing_key_pem=public_key_to_pem(key).decode(),
                )
        elapsed, results = asyncio.run(_ingest(store, batches, group, workers))
        for result in results:
            if result.head is None:
                raise RuntimeError(f"a batch was refused: {result.alert}")
        (count,) = store.db.execute("SELECT count(*) FROM audit_records").fetchone()
        assert count == sum(len(b[2]) for b in batches)
        return elapsed
    finally:
        store.close()


async def _ingest(store: FleetStore, batches: list[Any], group: int, workers: int) -> tuple[float, list[Any]]:
    topic = "edgefleet/v1/devices/{}/audit"
    async with contextlib.AsyncExitStack() as stack:
        if workers == 0:
            writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-db")
            stack.callback(writer.shutdown, wait=True)
            loop = asyncio.get_running_loop()

            async def on_writer(fn: Any, *args: Any) -> Any:
                return await loop.run_in_executor(writer, lambda: fn(*args))

            batcher = WriteBatcher(on_writer, lambda: store, max_group=group)
            ingest = AuditIngest()

            async def submit(device: str, payload: bytes, now: float) -> asyncio.Future[Any]:
                return await batcher.submit(ingest.job(topic.format(device), device, payload, now=now))

            runner = batcher.run()
        else:
            shards = await stack.enter_async_context(AuditShards(store.path, workers, max_group=group))

            async def submit(device: str, payload: bytes, now: float) -> asyncio.Future[Any]:
                return await shards.submit(topic.format(device), device, payload, now=now)

            runner = shards.run()
        task = asyncio.create_task(runner)
        try:
            started = time.perf_counter()
            futures = [await submit(device, payload, time.time()) for device, payload, _ in batches]
            results = await asyncio.gather(*futures)
            elapsed = time.perf_counter() - started
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return elapsed, results


def run_bare(directory: Path, batches: list[Any], group: int, *, index: bool, name: str) -> float:
    conn = sqlite3.connect(directory / f"{name}.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute(BARE_SCHEMA)
        if index:
            conn.execute(BARE_INDEX)
        rows = [
            [
                (
                    device,
                    r.epoch,
                    r.seq,
                    r.ts_ms,
                    r.kind,
                    r.actor,
                    canonical_json(r.data).decode(),
                    r.prev_hash,
                    r.hash,
                    time.time(),
                )
                for r in records
            ]
            for device, _, records in batches
        ]
        started = time.perf_counter()
        for start in range(0, len(rows), group):
            conn.execute("BEGIN IMMEDIATE")
            for batch_rows in rows[start : start + group]:
                conn.executemany("INSERT INTO audit_records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", batch_rows)
            conn.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--devices",
        type=int,
        default=100,
        help="devices, each with its own chain and key (default 100: 200,000 records, about a second of ingest, so"
        " that the rate is the steady state's, not the start and the end of one short burst)",
    )
    parser.add_argument("--records", type=int, default=2000, help="records per device")
    parser.add_argument("--rounds", type=int, default=3, help="best of N rounds for each side")
    parser.add_argument(
        "--group", type=int, nargs="+", default=[1, 16], help="batches per commit, on both sides (default: 1 16)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help=f"audit shards' worker processes, measured next to 0 = in-process (default: serve's, {default_workers()})",
    )
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # no per-run info
    keys, batches = build(args.devices, args.records)
    total = sum(len(b[2]) for b in batches)
    workers_measured = sorted({0, max(0, args.workers)})
    modes = []
    lines = [f"audit ingest: {total} records from {args.devices} devices in {len(batches)} batches"]
    for group in args.group:
        ingest_times: dict[int, list[float]] = {w: [] for w in workers_measured}
        bare_times, pk_times = [], []
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
                for workers in workers_measured:
                    (Path(tmp) / str(workers)).mkdir()
                    ingest_times[workers].append(run_ingest(Path(tmp) / str(workers), keys, batches, group, workers))
                bare_times.append(run_bare(Path(tmp), batches, group, index=True, name="bare"))
                pk_times.append(run_bare(Path(tmp), batches, group, index=False, name="bare_pk"))
        bare_rate, pk_rate = (total / min(t) for t in (bare_times, pk_times))
        lines += [
            f"  {group} batch(es) per commit:",
            f"    bare SQLite insert: {bare_rate:,.0f} records/s (PK only: {pk_rate:,.0f})",
        ]
        for workers in workers_measured:
            ingest_rate = total / min(ingest_times[workers])
            ratio = ingest_rate / bare_rate
            modes.append(
                {
                    "batches_per_commit": group,
                    "workers": workers,
                    "ingest_records_per_s": round(ingest_rate),
                    "bare_insert_records_per_s": round(bare_rate),
                    "bare_insert_pk_only_records_per_s": round(pk_rate),
                    "ratio": round(ratio, 3),
                    "ratio_vs_pk_only": round(ingest_rate / pk_rate, 3),
                    "met": ratio >= 0.5,
                }
            )
            where = "in-process (writer thread)" if workers == 0 else f"{workers} worker processes"
            lines += [
                f"    verified + stored, {where}: {ingest_rate:,.0f} records/s",
                f"      ratio: {ratio:.0%} (target >= 50 %){'' if ratio >= 0.5 else '  -- MISSED'};"
                f" against the PK-only table {ingest_rate / pk_rate:.0%}",
            ]
    result = {
        "benchmark": "audit_ingest",
        "devices": args.devices,
        "records": total,
        "batches": len(batches),
        "rounds": args.rounds,
        "workers": args.workers,
        "modes": modes,
        "target_ratio": 0.5,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    out = ROOT / ".cache" / "bench" / "audit.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join([*lines, f"  written to {out.relative_to(ROOT)}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
