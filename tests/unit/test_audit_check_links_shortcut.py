"""``ChainVerifier.check_upload`` gives the same verdict for fast-path records as for strictly decoded ones.

The chain check skips the per-record rules for a record whose ``hash`` is the digest the fast path
(``read_canonical_records``) kept and to which no seq 0, ``epoch_start`` or ``gap`` rule applies. Records from
the strict decoder carry no digest and always go through every rule, so for any upload, including hostile ones
whose hashes were recomputed over tampered fields (the fast path then accepts them), both must end in the same
``CheckedUpload`` or the same error with the same message.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.audit import (
    KIND_EPOCH_START,
    KIND_GAP,
    ZERO_HASH,
    ChainVerifier,
    Checkpoint,
    gap_data,
    make_record,
    sign_checkpoint,
    start_epoch,
)
from protocols.canonical import canonical_json
from protocols.errors import ProtocolError
from protocols.keys import generate_private_key
from protocols.messages import AuditBatch, decode

pytestmark = pytest.mark.unit

KEY = generate_private_key()
PUB = KEY.public_key()
DEVICE = "edge-01"

MUTATIONS = ["none", "seq", "prev_hash", "kind", "data", "swap", "drop", "zero_prev"]


def rehashed(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with ``hash`` recomputed over the others, as a device with the key would."""
    body = {k: v for k, v in fields.items() if k != "hash"}
    return {**body, "hash": hashlib.sha256(canonical_json(body)).hexdigest()}


@st.composite
def hostile_uploads(draw: st.DrawFn) -> tuple[str, bytes]:
    """A chain (from seq 0, or starting later), one mutation with hashes recomputed, a valid signed checkpoint."""
    epoch = draw(st.integers(1, 5))
    prev = start_epoch(DEVICE, epoch, previous=None, reason="r", actor="agent", ts_ms=1)
    chain = [prev]
    for i in range(draw(st.integers(2, 6))):
        if draw(st.booleans()) and prev.seq >= 1:
            prev = make_record(prev, KIND_GAP, "agent", gap_data(prev.seq, prev.seq, prev.hash), 2 + i)
        else:
            prev = make_record(prev, "model.activated", "uid:1000", {"v": i, "m": "x"}, 2 + i)
        chain.append(prev)
    start = draw(st.integers(0, len(chain) - 2))
    dicts = [r.to_dict() for r in chain[start:]]
    how = draw(st.sampled_from(MUTATIONS))
    at = draw(st.integers(0, len(dicts) - 1))
    if how == "seq":
        dicts[at] = rehashed({**dicts[at], "seq": dicts[at]["seq"] + draw(st.sampled_from([-1, 1, 2]))})
    elif how == "prev_hash":
        dicts[at] = rehashed({**dicts[at], "prev_hash": "ab" * 32})
    elif how == "kind":
        dicts[at] = rehashed({**dicts[at], "kind": draw(st.sampled_from([KIND_EPOCH_START, KIND_GAP, "x.y"]))})
    elif how == "data":
        dicts[at] = rehashed({**dicts[at], "data": draw(st.sampled_from([{}, {"device": DEVICE}, {"first_seq": 0}]))})
    elif how == "swap" and len(dicts) > 1:
        dicts[at], dicts[at - 1] = dicts[at - 1], dicts[at]
    elif how == "drop" and len(dicts) > 1:
        del dicts[at]
    elif how == "zero_prev":
        dicts[at] = rehashed({**dicts[at], "prev_hash": ZERO_HASH})
    last = dicts[-1]
    checkpoint = sign_checkpoint(Checkpoint(DEVICE, epoch, last["seq"], last["hash"], 9), KEY)
    upload = {
        "checkpoint": checkpoint.to_dict(),
        "device": DEVICE,
        "epoch": epoch,
        "records": dicts,
        "type": "audit_batch",
        "v": 1,
    }
    return how, canonical_json(upload)


def check(batch: AuditBatch) -> tuple[str, Any]:
    """``check_upload``'s result, or its error's class and message."""
    try:
        return "ok", ChainVerifier.check_upload(DEVICE, batch.records, batch.checkpoint, PUB)
    except ProtocolError as exc:
        return type(exc).__name__, str(exc)


@settings(max_examples=400, deadline=None)
@given(hostile_uploads())
def test_fast_path_records_get_the_strict_records_verdict(upload: tuple[str, bytes]) -> None:
    """check_upload on the fast path's records (digests kept) equals check_upload on decode()'s (none kept)."""
    how, payload = upload
    fast = AuditBatch.decode_canonical(payload)
    try:
        strict = decode(payload)
    except ProtocolError:  # e.g. a negative seq: the fast path refuses it too
        assert fast is None
        return
    if how == "none":
        assert fast is not None  # the shortcut is exercised: canonical uploads take the fast path
    if fast is None:
        return
    assert all(r._digest is not None for r in fast.records)
    assert all(r._digest is None for r in strict.records)
    assert check(fast) == check(strict)
