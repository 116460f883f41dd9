"""Signed audit uploads for the ingest tests: one device's hash chain cut into consecutive batches."""

from __future__ import annotations

from protocols.audit import AuditRecord, Checkpoint, make_record, sign_checkpoint, start_epoch
from protocols.keys import Ed25519PrivateKey
from protocols.messages import AuditBatch


def signed_uploads(device: str, key: Ed25519PrivateKey, count: int, size: int) -> list[tuple[bytes, int]]:
    """``count`` consecutive signed uploads of ``size`` records of ``device``: ``(payload, last seq)`` each."""
    records: list[AuditRecord] = [start_epoch(device, 1, previous=None, reason="t", actor="agent", ts_ms=1000)]
    while len(records) < count * size:
        records.append(make_record(records[-1], "test.event", "agent", {"i": len(records)}, 1000 + len(records)))
    out = []
    for start in range(0, len(records), size):
        part = records[start : start + size]
        head = part[-1]
        checkpoint = sign_checkpoint(Checkpoint(device, 1, head.seq, head.hash, head.ts_ms), key)
        out.append((AuditBatch(device, 1, tuple(part), checkpoint).encode(), head.seq))
    return out
