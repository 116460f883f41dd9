"""Unit tests for protocols/audit.py: hash chain, tamper detection, signed checkpoints, batch verification."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.audit import (
    CHECKPOINT_DOMAIN,
    KIND_EPOCH_START,
    KIND_GAP,
    KIND_RE,
    ZERO_HASH,
    AuditHead,
    AuditRecord,
    ChainVerifier,
    Checkpoint,
    SignedCheckpoint,
    VerifiedBatch,
    canonical_record,
    gap_data,
    make_record,
    record_hash,
    sign_checkpoint,
    start_epoch,
    verify_chain,
    verify_checkpoint,
)
from protocols.canonical import MAX_INT, canonical_json
from protocols.errors import (
    ChainError,
    DecodeError,
    RollbackError,
    UnknownKeyError,
    VerificationError,
)
from protocols.keys import generate_private_key, keyid

pytestmark = pytest.mark.unit

QUICK = settings(max_examples=40, deadline=None)
"""Most properties here are cheap to state; 40 examples each keep the file at a few seconds."""

KEY = generate_private_key()
PUB = KEY.public_key()
OTHER_KEY = generate_private_key()
DEVICE = "edge-01"
TAMPER = (ChainError, VerificationError, RollbackError)

# --- strategies and helpers -----------------------------------------------------------------------------

kinds = st.from_regex(KIND_RE, fullmatch=True).filter(lambda k: k not in (KIND_GAP, KIND_EPOCH_START))
actors = st.sampled_from(["agent", "controller", "uid:1000", "token:3f2a9c"])
data_values = st.none() | st.booleans() | st.integers(-(2**63), MAX_INT) | st.text(max_size=10)
audit_data = st.dictionaries(st.text(max_size=6), data_values | st.lists(data_values, max_size=3), max_size=3)
timestamps = st.integers(0, 2**45)


def extend(prev: AuditRecord | AuditHead, count: int, *, kind: str = "model.activated") -> list[AuditRecord]:
    """``count`` simple records after ``prev``."""
    records = []
    for index in range(count):
        prev = make_record(prev, kind, "agent", {"i": index}, 1_700_000_000_000 + index)
        records.append(prev)
    return records


def chain(length: int, *, epoch: int = 0, device: str = DEVICE, previous: AuditHead | None = None) -> list[AuditRecord]:
    """A valid chain of ``length`` records of ``epoch``, starting at seq 0."""
    first = start_epoch(device, epoch, previous=previous, reason="test", actor="agent", ts_ms=1_700_000_000_000)
    return [first, *extend(first, length - 1)]


@st.composite
def chains(draw: st.DrawFn, min_size: int = 1, max_size: int = 12) -> list[AuditRecord]:
    """Valid chains of random length with random kinds, actors, data and timestamps."""
    epoch = draw(st.integers(0, 2**40))
    record = start_epoch(DEVICE, epoch, previous=None, reason="boot", actor="agent", ts_ms=draw(timestamps))
    records = [record]
    for _ in range(draw(st.integers(min_size, max_size)) - 1):
        record = make_record(record, draw(kinds), draw(actors), draw(audit_data), draw(timestamps))
        records.append(record)
    return records


def signed(head: AuditRecord | AuditHead, *, key: Any = KEY, device: str = DEVICE) -> SignedCheckpoint:
    """A checkpoint of ``head`` signed by ``key``."""
    return sign_checkpoint(Checkpoint(device, head.epoch, head.seq, head.hash, 1_700_000_000_000), key)


def accept(verifier: ChainVerifier, records: list[AuditRecord]) -> VerifiedBatch:
    """Verify a batch with a checkpoint of its last record and commit it."""
    result = verifier.verify_batch(DEVICE, records, signed(records[-1]), PUB)
    verifier.commit(result)
    return result


def other_value(record: AuditRecord, name: str) -> Any:
    """A different value of the same type for field ``name`` of ``record``."""
    value = getattr(record, name)
    if name == "data":
        return {**value, "tampered": True}
    if name in ("hash", "prev_hash"):
        return ("1" if value[0] == "0" else "0") + value[1:]
    if name == "kind":
        return "x.tampered" if value != "x.tampered" else "y.tampered"
    if name == "actor":
        return value + "x"
    return value + 1


HASHED_FIELDS = ["epoch", "seq", "ts_ms", "kind", "actor", "data", "prev_hash"]
FIELDS = [*HASHED_FIELDS, "hash"]

# --- records and chains ---------------------------------------------------------------------------------


@QUICK
@given(chains())
def test_intact_chain_verifies(records: list[AuditRecord]) -> None:
    """An untouched chain verifies from genesis, and every suffix verifies from the head before it."""
    assert verify_chain(records) == records[-1].head
    for cut in range(1, len(records)):
        assert verify_chain(records[cut:], after=records[cut - 1].head) == records[-1].head


@QUICK
@given(chains())
def test_record_dict_round_trip(records: list[AuditRecord]) -> None:
    """Records survive to_dict/from_dict unchanged and their hash is sha256 of the canonical record."""
    for record in records:
        assert AuditRecord.from_dict(record.to_dict()) == record
        encoded = canonical_record(record)
        assert set(json.loads(encoded)) == set(HASHED_FIELDS)
        assert record.hash == record_hash(record) == hashlib.sha256(encoded).hexdigest()


def test_genesis_binds_device_and_epoch() -> None:
    """Seq 0 is an epoch_start with the all-zero prev_hash naming the device; other devices get other hashes."""
    first = chain(1)[0]
    assert (first.seq, first.kind, first.prev_hash) == (0, KIND_EPOCH_START, ZERO_HASH)
    assert first.data["device"] == DEVICE
    assert chain(1, device="edge-02")[0].hash != first.hash
    assert chain(1, epoch=1)[0].hash != first.hash


@settings(max_examples=100, deadline=None)
@given(chains(), st.data())
def test_modified_field_detected(records: list[AuditRecord], data: st.DataObject) -> None:
    """Changing any field of any record is detected by the chain, and by the verifier with its checkpoint."""
    index = data.draw(st.integers(0, len(records) - 1), label="index")
    name = data.draw(st.sampled_from(FIELDS), label="field")
    tampered = list(records)
    tampered[index] = dataclasses.replace(records[index], **{name: other_value(records[index], name)})
    with pytest.raises(ChainError):
        verify_chain(tampered)
    with pytest.raises(TAMPER):
        ChainVerifier().verify_batch(DEVICE, tampered, signed(records[-1]), PUB)


@settings(max_examples=150, deadline=None)
@given(chains(min_size=2), st.data())
def test_modified_and_rehashed_record_detected(records: list[AuditRecord], data: st.DataObject) -> None:
    """Changing a record and recomputing its hash breaks the next link, or the checkpoint for the last one."""
    index = data.draw(st.integers(1, len(records) - 1), label="index")
    name = data.draw(st.sampled_from(["ts_ms", "kind", "actor", "data"]), label="field")
    forged = dataclasses.replace(records[index], **{name: other_value(records[index], name)})
    forged = dataclasses.replace(forged, hash=record_hash(forged))
    tampered = [*records[:index], forged, *records[index + 1 :]]
    if index < len(records) - 1:
        with pytest.raises(ChainError):
            verify_chain(tampered)
    with pytest.raises(TAMPER):
        ChainVerifier().verify_batch(DEVICE, tampered, signed(records[-1]), PUB)


@QUICK
@given(chains(min_size=2), st.data())
def test_deleted_record_detected(records: list[AuditRecord], data: st.DataObject) -> None:
    """Deleting any record is detected (a hole, or for the last one a mismatch with the checkpoint)."""
    index = data.draw(st.integers(0, len(records) - 1))
    tampered = records[:index] + records[index + 1 :]
    with pytest.raises(TAMPER):
        ChainVerifier().verify_batch(DEVICE, tampered, signed(records[-1]), PUB)


@QUICK
@given(chains(min_size=2), st.data())
def test_reordered_records_detected(records: list[AuditRecord], data: st.DataObject) -> None:
    """Swapping any two records is detected."""
    i = data.draw(st.integers(0, len(records) - 2))
    j = data.draw(st.integers(i + 1, len(records) - 1))
    tampered = list(records)
    tampered[i], tampered[j] = tampered[j], tampered[i]
    with pytest.raises(ChainError):
        verify_chain(tampered)
    with pytest.raises(TAMPER):
        ChainVerifier().verify_batch(DEVICE, tampered, signed(records[-1]), PUB)


@QUICK
@given(chains(), st.data())
def test_inserted_record_detected(records: list[AuditRecord], data: st.DataObject) -> None:
    """Inserting a record (a well-formed successor of any record, or a copy) anywhere is detected."""
    after = data.draw(st.integers(0, len(records) - 1), label="after")
    at = data.draw(st.integers(0, len(records)), label="at")
    extra = data.draw(
        st.sampled_from([make_record(records[after], "x.inserted", "agent", {}, 1), records[after]]), label="record"
    )
    tampered = [*records[:at], extra, *records[at:]]
    with pytest.raises(TAMPER):
        ChainVerifier().verify_batch(DEVICE, tampered, signed(records[-1]), PUB)


@QUICK
@given(chains(min_size=2), st.data())
def test_truncated_tail_detected_by_checkpoint(records: list[AuditRecord], data: st.DataObject) -> None:
    """Dropping the tail of a batch still chains, but does not match the signed checkpoint of the full head."""
    keep = data.draw(st.integers(1, len(records) - 1))
    assert verify_chain(records[:keep]) == records[keep - 1].head
    with pytest.raises(VerificationError, match="checkpoint"):
        ChainVerifier().verify_batch(DEVICE, records[:keep], signed(records[-1]), PUB)


def test_mixed_epochs_in_one_list_rejected() -> None:
    """A list mixing records of two epochs is rejected."""
    with pytest.raises(ChainError, match="epoch"):
        verify_chain([*chain(2, epoch=0), *chain(2, epoch=1)])


def test_epoch_start_only_at_seq_zero() -> None:
    """Seq 0 must be an epoch_start with the zero prev_hash, and no other seq may be one."""
    records = chain(3)
    not_start = dataclasses.replace(records[0], kind="model.activated")
    with pytest.raises(ChainError, match="epoch_start"):
        verify_chain([dataclasses.replace(not_start, hash=record_hash(not_start))])
    late = dataclasses.replace(records[2], kind=KIND_EPOCH_START, data=dict(records[0].data))
    with pytest.raises(ChainError, match="epoch_start"):
        verify_chain([*records[:2], dataclasses.replace(late, hash=record_hash(late))])
    with pytest.raises(ValueError, match="epoch_start"):
        make_record(records[-1], KIND_EPOCH_START, "agent", records[0].data, 1)


@pytest.mark.parametrize(
    "data",
    [{"x": 1.5}, {"x": [float("inf")]}, {"big": "x" * 20_000}, {1: "int key"}],
)
def test_make_record_refuses_unhashable_data(data: dict[Any, Any]) -> None:
    """Floats, oversized data and non-string keys are refused when a record is made."""
    with pytest.raises(ValueError, match="invalid audit record"):
        make_record(chain(1)[0], "config.changed", "agent", data, 1)


def test_make_record_refuses_bad_kind_actor_and_gap_data() -> None:
    """Bad kinds and actors, and gap records with inconsistent data, cannot be made."""
    head = chain(3)[-1]
    for kind, actor, data in [
        ("Bad Kind", "agent", {}),
        ("ok", "bad actor", {}),
        (KIND_GAP, "agent", {"first_seq": 0}),
        (KIND_GAP, "agent", {**gap_data(1, 2, "a" * 64), "count": 5}),
        (KIND_GAP, "agent", gap_data(1, 3, "a" * 64)),  # must end before the gap record itself (seq 3)
    ]:
        with pytest.raises(ValueError, match="invalid audit record"):
            make_record(head, kind, actor, data, 1)


def test_verify_chain_empty() -> None:
    """An empty list returns the accepted head unchanged, and is an error with nothing accepted."""
    head = chain(2)[-1].head
    assert verify_chain([], after=head) == head
    with pytest.raises(ChainError):
        verify_chain([])


# --- checkpoints ----------------------------------------------------------------------------------------


@QUICK
@given(chains())
def test_checkpoint_round_trip(records: list[AuditRecord]) -> None:
    """A checkpoint signs, encodes, decodes and verifies back to itself."""
    checkpoint = Checkpoint(DEVICE, records[-1].epoch, records[-1].seq, records[-1].hash, 5)
    sealed = sign_checkpoint(checkpoint, KEY)
    assert sealed.keyid == keyid(KEY)
    assert SignedCheckpoint.decode(sealed.encode()) == sealed
    assert verify_checkpoint(SignedCheckpoint.decode(sealed.encode()), PUB) == checkpoint


def test_checkpoint_signed_by_another_key_rejected() -> None:
    """A checkpoint signed by another key is rejected, whether it names that key or claims the device's."""
    head = chain(2)[-1]
    with pytest.raises(UnknownKeyError):
        verify_checkpoint(signed(head, key=OTHER_KEY), PUB)
    forged = dataclasses.replace(signed(head, key=OTHER_KEY), keyid=keyid(KEY))
    with pytest.raises(VerificationError):
        verify_checkpoint(forged, PUB)
    with pytest.raises(UnknownKeyError):
        ChainVerifier().verify_batch(DEVICE, chain(2), signed(head, key=OTHER_KEY), PUB)


def test_checkpoint_signature_is_domain_separated() -> None:
    """The signature covers the domain prefix: a signature over the bare body does not verify."""
    sealed = signed(chain(1)[0])
    bare = dataclasses.replace(sealed, signature=KEY.sign(sealed.body))
    with pytest.raises(VerificationError):
        verify_checkpoint(bare, PUB)
    KEY.public_key().verify(sealed.signature, CHECKPOINT_DOMAIN + sealed.body)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_checkpoint_byte_flip_rejected(data: st.DataObject) -> None:
    """Flipping any bits of any byte of an encoded signed checkpoint makes it fail to decode or verify."""
    encoded = bytearray(signed(chain(2)[-1]).encode())
    position = data.draw(st.integers(0, len(encoded) - 1), label="position")
    encoded[position] ^= data.draw(st.integers(1, 255), label="mask")
    with pytest.raises((DecodeError, VerificationError)):
        verify_checkpoint(SignedCheckpoint.decode(bytes(encoded)), PUB)


def test_non_canonical_checkpoint_body_rejected() -> None:
    """A correctly signed body that is not canonical JSON is rejected."""
    body = b'{ "device":"edge-01","epoch":0,"seq":0,"head_hash":"' + b"a" * 64 + b'","ts_ms":1}'
    sealed = SignedCheckpoint(keyid(KEY), KEY.sign(CHECKPOINT_DOMAIN + body), body)
    with pytest.raises(DecodeError, match="canonical"):
        verify_checkpoint(sealed, PUB)


def test_non_canonical_base64_rejected() -> None:
    """A signed checkpoint whose base64 has non-zero unused bits (a second encoding) is rejected."""
    obj = signed(chain(1)[0]).to_dict()
    sig = obj["sig"]
    assert sig.endswith("==")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    obj["sig"] = sig[:-3] + alphabet[alphabet.index(sig[-3]) ^ 1] + "=="
    with pytest.raises(DecodeError, match="canonical"):
        SignedCheckpoint.decode(canonical_json(obj))


def test_checkpoint_not_matching_records_rejected() -> None:
    """A checkpoint naming another seq or hash than the batch's last record is rejected."""
    records = chain(4)
    for head in (records[2].head, AuditHead(0, 3, "f" * 64), AuditHead(1, 3, records[3].hash)):
        with pytest.raises(VerificationError, match="checkpoint"):
            ChainVerifier().verify_batch(DEVICE, records, signed(head), PUB)


def test_checkpoint_of_another_device_rejected() -> None:
    """A checkpoint naming another device than the upload's is rejected."""
    records = chain(2)
    with pytest.raises(VerificationError, match="device"):
        ChainVerifier().verify_batch(DEVICE, records, signed(records[-1], device="edge-02"), PUB)


# --- the verifier ---------------------------------------------------------------------------------------


def test_batches_accepted_in_sequence() -> None:
    """Consecutive batches are accepted, each continuing from the committed head."""
    records = chain(10)
    verifier = ChainVerifier()
    first = accept(verifier, records[:4])
    assert (first.previous, first.head, first.duplicates) == (None, records[3].head, 0)
    assert first.records == tuple(records[:4])
    second = accept(verifier, records[4:])
    assert second.previous == records[3].head
    assert second.records == tuple(records[4:])
    assert verifier.head(DEVICE) == records[-1].head


def test_first_contact_must_start_at_genesis() -> None:
    """With nothing accepted, a batch that starts after seq 0 without a GAP record is rejected."""
    records = chain(5)
    with pytest.raises(ChainError, match="missing"):
        ChainVerifier().verify_batch(DEVICE, records[2:], signed(records[-1]), PUB)


@QUICK
@given(st.integers(2, 12), st.data())
def test_duplicates_counted(length: int, data: st.DataObject) -> None:
    """Re-sent records already accepted are counted as duplicates, not errors, and only new ones returned."""
    records = chain(length + 3)
    verifier = ChainVerifier()
    accept(verifier, records[:length])
    start = data.draw(st.integers(0, length - 1))
    result = verifier.verify_batch(DEVICE, records[start:], signed(records[-1]), PUB)
    assert result.duplicates == length - start
    assert result.records == tuple(records[length:])
    again = verifier.verify_batch(DEVICE, records[start:length], signed(records[length - 1]), PUB)
    assert (again.duplicates, again.records, again.head) == (length - start, (), records[length - 1].head)


def test_batch_behind_head_is_rollback_unless_known() -> None:
    """A batch that ends before the accepted head is a regression, unless stored hashes show it is a re-send."""
    records = chain(10)
    verifier = ChainVerifier()
    accept(verifier, records)
    old = records[2:5]
    with pytest.raises(RollbackError):
        verifier.verify_batch(DEVICE, old, signed(old[-1]), PUB)
    stored = {(r.epoch, r.seq): r.hash for r in records}
    result = verifier.verify_batch(DEVICE, old, signed(old[-1]), PUB, known=lambda e, s: stored.get((e, s)))
    assert (result.duplicates, result.records, result.head) == (3, (), records[-1].head)
    forked = extend(records[1], 3, kind="x.forked")
    with pytest.raises(ChainError, match="fork"):
        verifier.verify_batch(DEVICE, forked, signed(forked[-1]), PUB, known=lambda e, s: stored.get((e, s)))


def test_checkpoint_only_uploads() -> None:
    """A checkpoint alone must equal the head: older is a rollback, another hash a fork, newer unverifiable."""
    records = chain(6)
    verifier = ChainVerifier()
    with pytest.raises(VerificationError):
        verifier.verify_batch(DEVICE, [], signed(records[-1]), PUB)
    accept(verifier, records)
    assert verifier.verify_batch(DEVICE, [], signed(records[-1]), PUB).head == records[-1].head
    with pytest.raises(RollbackError):
        verifier.verify_batch(DEVICE, [], signed(records[2]), PUB)
    stored = {r.seq: r.hash for r in records}
    assert verifier.verify_batch(DEVICE, [], signed(records[2]), PUB, known=lambda e, s: stored.get(s)).duplicates == 0
    with pytest.raises(ChainError, match="fork"):
        verifier.verify_batch(DEVICE, [], signed(AuditHead(0, 5, "e" * 64)), PUB)
    with pytest.raises(VerificationError, match="ahead"):
        verifier.verify_batch(DEVICE, [], signed(AuditHead(0, 9, "e" * 64)), PUB)
    with pytest.raises(RollbackError):
        ChainVerifier({DEVICE: AuditHead(3, 0, "e" * 64)}).verify_batch(DEVICE, [], signed(records[-1]), PUB)


@QUICK
@given(st.integers(1, 10), st.data())
def test_fork_detected(accepted: int, data: st.DataObject) -> None:
    """A batch that differs from accepted records at any overlapping seq (genesis included) is a fork."""
    records = chain(accepted + 1)  # seqs 0..accepted
    verifier = ChainVerifier()
    accept(verifier, records)
    diverge = data.draw(st.integers(0, accepted), label="first differing seq")
    extra = data.draw(st.integers(1, 3), label="records beyond the head")
    if diverge == 0:
        first = start_epoch(DEVICE, 0, previous=None, reason="forked", actor="agent", ts_ms=1)
        batch = [first, *extend(first, accepted + extra - 1)]
    else:
        shared = records[diverge - 1]
        forked = extend(shared, accepted - diverge + extra, kind="x.forked")
        batch = [shared, *forked] if data.draw(st.booleans(), label="resend shared") else forked
    assert batch[-1].seq >= accepted
    with pytest.raises(ChainError, match="fork"):
        verifier.verify_batch(DEVICE, batch, signed(batch[-1]), PUB)


def test_fork_right_after_head_detected() -> None:
    """A batch starting at head + 1 whose prev_hash is not the head's hash is a fork."""
    records = chain(5)
    verifier = ChainVerifier()
    accept(verifier, records)
    foreign = extend(AuditHead(0, 4, "d" * 64), 2)
    with pytest.raises(ChainError, match="fork"):
        verifier.verify_batch(DEVICE, foreign, signed(foreign[-1]), PUB)


def test_older_epoch_is_rollback() -> None:
    """Records of an epoch older than the accepted one are a regression."""
    verifier = ChainVerifier()
    accept(verifier, chain(3, epoch=5))
    old = chain(4, epoch=4)
    with pytest.raises(RollbackError, match="epoch"):
        verifier.verify_batch(DEVICE, old, signed(old[-1]), PUB)


def test_declared_gap_accepted_and_flagged() -> None:
    """A hole accounted for by a GAP record in the same batch is accepted and reported with its size."""
    records = chain(5)  # seqs 0..4 accepted
    verifier = ChainVerifier()
    accept(verifier, records)
    dropped = extend(records[-1], 4)  # seqs 5..8, dropped on the device before upload
    kept = extend(dropped[-1], 2)  # seqs 9, 10
    gap = make_record(kept[-1], KIND_GAP, "agent", gap_data(3, 8, dropped[-1].hash), 9)  # seq 11
    batch = [*kept, gap]
    result = verifier.verify_batch(DEVICE, batch, signed(gap), PUB)
    assert result.records == tuple(batch)
    assert [(d.first_seq, d.last_seq, d.missing, d.declared_at) for d in result.dropped] == [(3, 8, 4, 11)]
    verifier.commit(result)
    assert verifier.head(DEVICE) == gap.head


def test_unexplained_or_wrong_gap_rejected() -> None:
    """A hole without a GAP record, or with one that does not cover it or names the wrong hash, is rejected."""
    records = chain(5)
    verifier = ChainVerifier()
    accept(verifier, records)
    dropped = extend(records[-1], 3)  # seqs 5..7
    kept = extend(dropped[-1], 2)  # seqs 8, 9
    with pytest.raises(ChainError, match="missing"):
        verifier.verify_batch(DEVICE, kept, signed(kept[-1]), PUB)
    for data in (gap_data(6, 7, dropped[-1].hash), gap_data(5, 6, dropped[1].hash), gap_data(5, 7, "c" * 64)):
        gap = make_record(kept[-1], KIND_GAP, "agent", data, 9)
        with pytest.raises(ChainError, match="missing"):
            verifier.verify_batch(DEVICE, [*kept, gap], signed(gap), PUB)


def test_gap_already_received_flags_nothing_missing() -> None:
    """A GAP record for records the verifier already accepted reports zero missing."""
    records = chain(8)
    verifier = ChainVerifier()
    accept(verifier, records)
    gap = make_record(records[-1], KIND_GAP, "agent", gap_data(2, 5, records[5].hash), 1)
    result = verifier.verify_batch(DEVICE, [gap], signed(gap), PUB)
    assert [d.missing for d in result.dropped] == [0]


@pytest.mark.parametrize("linked", [True, False])
def test_new_epoch_reported(linked: bool) -> None:
    """A newer epoch starting at seq 0 is accepted and reported, linked when it names the accepted head."""
    old = chain(4, epoch=0)
    verifier = ChainVerifier()
    accept(verifier, old)
    new = chain(3, epoch=1, previous=old[-1].head if linked else None)
    result = verifier.verify_batch(DEVICE, new, signed(new[-1]), PUB)
    assert result.epoch_change is not None
    assert result.epoch_change.linked is linked
    assert result.epoch_change.accepted == old[-1].head
    verifier.commit(result)
    assert verifier.head(DEVICE) == new[-1].head


def test_epoch_start_of_another_device_rejected() -> None:
    """An epoch_start record naming another device is rejected even with a valid checkpoint."""
    records = chain(2, device="edge-02")
    with pytest.raises(ChainError, match="device"):
        ChainVerifier().verify_batch(DEVICE, records, signed(records[-1]), PUB)


def test_epoch_start_must_name_an_older_epoch() -> None:
    """An epoch_start naming a previous epoch that is not older is malformed."""
    with pytest.raises(ValueError, match="invalid audit record"):
        start_epoch(DEVICE, 2, previous=AuditHead(2, 5, "a" * 64), reason="r", actor="agent", ts_ms=1)


def test_stale_result_cannot_be_committed() -> None:
    """A verified batch cannot be committed once the head moved (verify again instead)."""
    records = chain(6)
    verifier = ChainVerifier()
    first = verifier.verify_batch(DEVICE, records[:3], signed(records[2]), PUB)
    verifier.commit(first)
    with pytest.raises(VerificationError, match="changed"):
        verifier.commit(first)
    assert verifier.head(DEVICE) == records[2].head
