"""The controller's fast path for canonical audit uploads accepts a subset of what the strict decoder accepts.

``AuditBatch.decode_canonical`` (with ``parse_plain``, ``canonical_text`` and ``scan_canonical_records``) must,
for any input, either give None or exactly what ``decode`` gives, with digests and ``data`` encodings that are
the ones the full encoder computes; ``decode_upload`` must accept and reject exactly what ``decode`` does.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from json_strategies import json_objects, json_scalars

from protocols.audit import (
    KIND_EPOCH_START,
    KIND_GAP,
    KIND_RE,
    AuditRecord,
    ChainVerifier,
    Checkpoint,
    canonical_record,
    make_record,
    sign_checkpoint,
    start_epoch,
)
from protocols.canonical import MAX_DEPTH, MAX_INT, MIN_INT, canonical_json, canonical_text, parse_plain
from protocols.errors import DecodeError, ProtocolError
from protocols.keys import generate_private_key
from protocols.messages import AuditBatch, decode, decode_upload

pytestmark = pytest.mark.unit

KEY = generate_private_key()
PUB = KEY.public_key()
DEVICE = "edge-01"


audit_data = st.dictionaries(
    st.text(max_size=8),
    st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6),
    max_size=4,
)
kinds = st.from_regex(KIND_RE, fullmatch=True).filter(lambda k: k not in (KIND_GAP, KIND_EPOCH_START))
actors = st.sampled_from(["agent", "controller", "uid:1000", "token:3f2a9c"])
timestamps = st.integers(0, 2**45)


@st.composite
def uploads(draw: st.DrawFn, *, min_records: int = 1) -> tuple[AuditBatch, bytes]:
    """A valid upload from seq 0 (a real chain, a signed checkpoint) and its encoding, as the agent sends it."""
    epoch = draw(st.integers(0, 2**40))
    prev = start_epoch(DEVICE, epoch, previous=None, reason="first start", actor="agent", ts_ms=draw(timestamps))
    records = [prev]
    for _ in range(draw(st.integers(min_records - 1, 4))):
        prev = make_record(prev, draw(kinds), draw(actors), draw(audit_data), draw(timestamps))
        records.append(prev)
    checkpoint = sign_checkpoint(Checkpoint(DEVICE, epoch, prev.seq, prev.hash, draw(timestamps)), KEY)
    batch = AuditBatch(DEVICE, epoch, tuple(records), checkpoint)
    return batch, batch.encode()


def strict(payload: bytes) -> tuple[str, Any]:
    """``decode``'s result, or the class of its error."""
    try:
        return "ok", decode(payload)
    except ProtocolError as exc:
        return "error", type(exc)


def assert_caches_are_fresh(batch: AuditBatch) -> None:
    """Every cached digest and data encoding is what the full encoder computes for that record."""
    for record in batch.records:
        fresh = AuditRecord(**{**record.hashed_fields(), "hash": record.hash})  # no caches
        assert record._digest == hashlib.sha256(canonical_record(fresh)).hexdigest()
        assert record.canonical_data() == canonical_json(record.data)


def ingest(payload: bytes) -> None:
    """What the controller does with an upload of DEVICE on first contact; raises ProtocolError if refused."""
    message = decode_upload(payload)
    if not isinstance(message, AuditBatch) or message.device != DEVICE:
        raise DecodeError("not this device's audit batch")
    ChainVerifier().verify_batch(DEVICE, message.records, message.checkpoint, PUB)


# --- canonical parsing ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(json_objects)
def test_plain_parse_of_canonical_json_round_trips(obj: dict[str, Any]) -> None:
    """Canonical JSON parses to the same object, whose canonical text is the received text exactly."""
    text = canonical_json(obj).decode()
    value = parse_plain(text)
    assert value == obj
    assert canonical_text(value) == text


@settings(max_examples=200, deadline=None)
@given(json_objects.filter(lambda o: len(o) >= 2), st.sampled_from(["spaces", "reversed", "duplicate", "ascii"]))
def test_every_non_canonical_variant_fails_the_canonical_text_check(obj: dict[str, Any], how: str) -> None:
    """Whitespace, keys out of order, a duplicate key or an escape the encoder would not write: the check fails."""
    if how == "spaces":
        data = json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()
    elif how == "reversed":
        data = json.dumps(dict(sorted(obj.items(), reverse=True)), separators=(",", ":"), ensure_ascii=False).encode()
    elif how == "duplicate":
        first = canonical_json({min(obj): None})
        data = first[:-1] + b"," + canonical_json(obj)[1:]
    else:
        obj = {**obj, "\u00e9": "\u00e9"}
        data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    value = parse_plain(data.decode())
    assert value is None or canonical_text(value) != data.decode()


def test_plain_parse_refuses_floats_constants_and_what_is_not_json() -> None:
    """Floats, NaN/Infinity, text that is not JSON or has more after the value, and huge integers give None."""
    for text in ('{"a":1.5}', '{"a":NaN}', '{"a":-Infinity}', "{", '{"a":1} {}', "[1e3]", "1" * 5000):
        assert parse_plain(text) is None
    assert parse_plain("[1]") == [1]


# --- canonical audit uploads ----------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(uploads(min_records=0))
def test_fast_path_takes_what_the_agent_sends_and_equals_the_strict_decoder(upload: tuple[AuditBatch, bytes]) -> None:
    """A canonical upload is decoded by the fast path to exactly what decode() gives, with fresh caches."""
    batch, payload = upload
    fast = AuditBatch.decode_canonical(payload)
    if fast is None:  # only where the fast path is cautious by design: 19 digits in a row in nested data
        assert any(
            any(isinstance(v, list | dict) for v in r.data.values()) and re.search("[0-9]{19}", r.canonical_data_text())
            for r in batch.records
        )
        return
    assert fast == decode(payload) == batch
    assert_caches_are_fresh(fast)
    ingest(payload)


@settings(max_examples=300, deadline=None)
@given(uploads(), st.data())
def test_flip_any_byte_is_rejected_and_never_read_differently(upload: tuple[AuditBatch, bytes], data: Any) -> None:
    """Any one changed byte: the upload is refused, and the fast path gives None or exactly decode()'s value."""
    _, payload = upload
    index = data.draw(st.integers(0, len(payload) - 1))
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != payload[index]))
    tampered = payload[:index] + bytes([byte]) + payload[index + 1 :]
    fast = AuditBatch.decode_canonical(tampered)
    if fast is not None:
        assert strict(tampered) == ("ok", fast)
        assert_caches_are_fresh(fast)
    with pytest.raises(ProtocolError):
        ingest(tampered)


@settings(max_examples=100, deadline=None)
@given(uploads(), st.sampled_from(["spaces", "reversed", "ascii"]))
def test_non_canonical_uploads_take_the_strict_path_with_the_same_result(
    upload: tuple[AuditBatch, bytes], how: str
) -> None:
    """A valid upload encoded another way is left to decode(), which still accepts it unchanged."""
    batch, payload = upload
    obj = json.loads(payload)
    if how == "spaces":
        variant = json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()
    elif how == "reversed":
        variant = json.dumps(dict(sorted(obj.items(), reverse=True)), separators=(",", ":")).encode()
    else:
        obj["zz_note"] = "\u00e9"  # an unknown field, escaped as \u00e9: valid, not canonical
        variant = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    assert AuditBatch.decode_canonical(variant) is None
    assert decode_upload(variant) == decode(variant) == batch
    ingest(variant)


def test_duplicate_key_in_a_record_is_refused() -> None:
    """A record with a duplicate key never reaches the fast path's reader and is refused by decode()."""
    first = start_epoch(DEVICE, 1, previous=None, reason="r", actor="agent", ts_ms=1)
    record = make_record(first, "model.activated", "agent", {"a": 1}, 2)
    checkpoint = sign_checkpoint(Checkpoint(DEVICE, 1, 1, record.hash, 3), KEY)
    payload = AuditBatch(DEVICE, 1, (first, record), checkpoint).encode()
    needle = b'"kind":"model.activated"'
    tampered = payload.replace(needle, b'"kind":"x",' + needle)
    assert AuditBatch.decode_canonical(tampered) is None
    with pytest.raises(DecodeError, match="duplicate key"):
        decode_upload(tampered)


def _with_data(value: Any) -> bytes:
    """A canonical upload whose second record carries ``value`` in its data (hash recomputed over it)."""
    first = start_epoch(DEVICE, 1, previous=None, reason="r", actor="agent", ts_ms=1)
    fields = {**make_record(first, "model.activated", "agent", {}, 2).hashed_fields(), "data": {"v": value}}
    digest = hashlib.sha256(
        json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()
    checkpoint = sign_checkpoint(Checkpoint(DEVICE, 1, 1, digest, 3), KEY)
    obj = {
        "type": "audit_batch",
        "v": 1,
        "device": DEVICE,
        "epoch": 1,
        "records": [first.to_dict(), {**fields, "hash": digest}],
        "checkpoint": checkpoint.to_dict(),
    }
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.parametrize("value", [MAX_INT + 1, MIN_INT - 1, [MAX_INT + 1], 10**30])
def test_integers_outside_64_bits_in_data_are_refused(value: Any) -> None:
    """Record data with an integer outside the signed 64-bit range: not taken by the fast path, refused."""
    payload = _with_data(value)
    assert AuditBatch.decode_canonical(payload) is None
    with pytest.raises(DecodeError):
        decode_upload(payload)


@pytest.mark.parametrize("value", [MAX_INT, MIN_INT, [MAX_INT, "1234567890123456789"], "9" * 30])
def test_data_at_the_limits_decodes_the_same_either_way(value: Any) -> None:
    """Integers at the 64-bit bounds and long digit strings: whichever path decodes them, the result is decode()'s."""
    payload = _with_data(value)
    fast = AuditBatch.decode_canonical(payload)
    expected = decode(payload)
    assert fast is None or fast == expected
    assert decode_upload(payload) == expected
    ingest(payload)


def test_nesting_beyond_the_depth_limit_is_refused() -> None:
    """Data nested past the message's depth bound is not taken by the fast path and is refused by decode()."""
    deep: Any = 1
    for _ in range(MAX_DEPTH - 3):  # upload, records, record, data: four levels above, one too many
        deep = [deep]
    assert AuditBatch.decode_canonical(_with_data(deep)) is None
    with pytest.raises(DecodeError, match="nested deeper"):
        decode_upload(_with_data(deep))
    shallow: Any = 1
    for _ in range(MAX_DEPTH - 4):  # exactly at the bound: valid
        shallow = [shallow]
    assert decode_upload(_with_data(shallow)) == decode(_with_data(shallow))


@pytest.mark.parametrize("depth", [40, 900, 990, 5000])
def test_deeply_nested_unknown_field_is_refused_without_escaping_errors(depth: int) -> None:
    """An upload with a very deep unknown field: the fast path gives None (never raises) and decode() refuses it."""
    first = start_epoch(DEVICE, 1, previous=None, reason="r", actor="agent", ts_ms=1)
    checkpoint = sign_checkpoint(Checkpoint(DEVICE, 1, 0, first.hash, 1), KEY)
    payload = AuditBatch(DEVICE, 1, (first,), checkpoint).encode()
    payload = payload[:-1] + b',"zz":' + b"[" * depth + b"]" * depth + b"}"
    assert AuditBatch.decode_canonical(payload) is None
    with pytest.raises(DecodeError, match="nested deeper"):
        decode_upload(payload)
