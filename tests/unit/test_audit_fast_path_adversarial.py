"""Adversarial checks of the canonical audit-upload fast path against the strict decoder.

For every input, ``AuditBatch.decode_canonical`` must give None or exactly what ``decode`` gives (same records,
same field values, digests equal to ``record_hash`` computed the slow way), must never raise, and
``decode_upload`` must accept or refuse (with a ``ProtocolError``) exactly as ``decode`` does. The uploads
here are hostile: hashes are recomputed over the tampered fields, so the fast path's record reader runs on
them instead of stopping at the hash check.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.audit import (
    AuditRecord,
    Checkpoint,
    canonical_record,
    make_record,
    sign_checkpoint,
    start_epoch,
)
from protocols.canonical import MAX_DEPTH, MAX_INT, MIN_INT, canonical_json
from protocols.errors import DecodeError, ProtocolError
from protocols.keys import generate_private_key
from protocols.limits import DEFAULT_LIMITS
from protocols.messages import AuditBatch, decode, decode_upload

pytestmark = pytest.mark.unit

KEY = generate_private_key()
DEVICE = "edge-01"
EPOCH = 7


# --- building hostile uploads ---------------------------------------------------------------------------


def encode_like_the_agent(obj: Any) -> bytes:
    """Canonical JSON text of ``obj``; a lone surrogate (which canonical_json refuses) is written as ``\\uXXXX``."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace")


def rehash(fields: dict[str, Any]) -> str:
    """The sha256 the fast path would compute over ``fields`` (every field but ``hash``), even if invalid."""
    return hashlib.sha256(encode_like_the_agent(fields)).hexdigest()


def upload_object(data: Any, *, record_epoch: int = EPOCH, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """An audit_batch object whose second record carries ``data`` (anything), its hash recomputed over it."""
    first = start_epoch(DEVICE, EPOCH, previous=None, reason="r", actor="agent", ts_ms=1)
    fields = {**make_record(first, "model.activated", "agent", {}, 2).hashed_fields(), "data": data}
    fields["epoch"] = record_epoch
    fields.update(extra or {})
    digest = rehash(fields)
    checkpoint = sign_checkpoint(Checkpoint(DEVICE, EPOCH, 1, digest, 3), KEY)
    return {
        "checkpoint": checkpoint.to_dict(),
        "device": DEVICE,
        "epoch": EPOCH,
        "records": [first.to_dict(), {**fields, "hash": digest}],
        "type": "audit_batch",
        "v": 1,
    }


def hostile_upload(data: Any, **kwargs: Any) -> bytes:
    """:func:`upload_object`, encoded canonically (lone surrogates escaped)."""
    return encode_like_the_agent(upload_object(data, **kwargs))


def strict(payload: bytes) -> tuple[str, Any]:
    """``decode``'s result, or the class of its error."""
    try:
        return "ok", decode(payload)
    except ProtocolError as exc:
        return "error", type(exc)


def upload(payload: bytes) -> tuple[str, Any]:
    """``decode_upload``'s result, or the class of its error (anything but a ProtocolError propagates)."""
    try:
        return "ok", decode_upload(payload)
    except ProtocolError as exc:
        return "error", type(exc)


def assert_fast_path_agrees(payload: bytes) -> None:
    """The invariant: fast path None or decode()'s value with honest digests; decode_upload behaves as decode."""
    expected = strict(payload)
    fast = AuditBatch.decode_canonical(payload)  # must never raise
    if fast is not None:
        assert expected == ("ok", fast)
        for record in fast.records:
            fresh = AuditRecord(**{**record.hashed_fields(), "hash": record.hash})  # no caches
            assert record._digest == hashlib.sha256(canonical_record(fresh)).hexdigest() == record.hash
            assert record.canonical_data() == canonical_json(record.data)
    assert upload(payload) == expected


# --- the counterexample: a lone surrogate in record data ------------------------------------------------

HIGH, LOW = chr(0xD800), chr(0xDFFF)  # lone surrogates (spelled so that linters see two values)
BIG_FILLER = "x" * (DEFAULT_LIMITS.max_audit_data_bytes // 4 + 1)


@pytest.mark.parametrize(
    "data",
    [
        {"v": HIGH},
        {"v": LOW},
        {HIGH: 1},
        {"v": [HIGH]},
        {"v": {"w": LOW}},
        {"v": HIGH, "w": BIG_FILLER},  # past max_data // 4 characters: fails at the size check instead
    ],
    ids=["value", "low", "key", "nested-list", "nested-object", "large-data"],
)
def test_lone_surrogate_in_record_data_is_refused_as_a_decode_error(data: dict[str, Any]) -> None:
    """A lone-surrogate escape in a record's data: the fast path gives None, decode_upload a DecodeError.

    Fails on d548156: read_canonical_records encodes the rebuilt record (``.encode()``) outside any try, so a
    UnicodeEncodeError escapes decode_canonical and decode_upload, and ingest_batch records no "malformed" alert.
    """
    payload = hostile_upload(data)
    assert b"\\ud" in payload
    assert strict(payload)[0] == "error"
    assert_fast_path_agrees(payload)


MINIMAL_COUNTEREXAMPLE = (
    b'{"checkpoint":{"body":"","keyid":"' + b"0" * 64 + b'","sig":"' + b"A" * 86 + b'=="},"device":"edge-01",'
    b'"epoch":0,"records":[{"actor":"a","data":{"x":"\\ud800"},"epoch":0,"hash":"' + b"0" * 64 + b'",'
    b'"kind":"k","prev_hash":"' + b"0" * 64 + b'","seq":0,"ts_ms":0}],"type":"audit_batch","v":1}'
)


def test_minimal_counterexample_needs_no_valid_hash_or_signature() -> None:
    """The smallest trigger (wrong hash, zero signature): decode() names the lone surrogate, decode_upload must too.

    Fails on d548156: decode_canonical raises UnicodeEncodeError before it compares the record's hash.
    """
    assert strict(MINIMAL_COUNTEREXAMPLE) == ("error", DecodeError)
    assert_fast_path_agrees(MINIMAL_COUNTEREXAMPLE)


# --- crafted edge cases ---------------------------------------------------------------------------------


def _replace_once(payload: bytes, old: bytes, new: bytes) -> bytes:
    assert old in payload, old
    return payload.replace(old, new, 1)


def _base() -> bytes:
    return hostile_upload({"n": 5, "s": "abc"})


EDGE_CASES: dict[str, Any] = {
    "canonical": lambda: _base(),
    "dup-top-device": lambda: _replace_once(_base(), b'"device":', b'"device":"edge-02","device":'),
    "dup-top-escaped-key": lambda: _replace_once(_base(), b'"device":', b'"\\u0064evice":"edge-02","device":'),
    "dup-top-records": lambda: _replace_once(_base(), b'"records":', b'"records":[],"records":'),
    "dup-record-actor-escaped": lambda: _replace_once(
        _base(), b'"actor":"agent"', b'"\\u0061ctor":"x","actor":"agent"'
    ),
    "dup-record-hash": lambda: _replace_once(_base(), b'"hash":', b'"hash":"' + b"0" * 64 + b'","hash":'),
    "dup-data-key": lambda: _replace_once(_base(), b'"n":5', b'"n":6,"n":5'),
    "dup-data-key-escaped": lambda: _replace_once(_base(), b'"n":5', b'"\\u006e":6,"n":5'),
    "escaped-value": lambda: _replace_once(_base(), b'"s":"abc"', b'"s":"\\u0061bc"'),
    "escaped-slash": lambda: _replace_once(_base(), b'"s":"abc"', b'"s":"a\\/c"'),
    "negative-zero": lambda: _replace_once(_base(), b'"n":5', b'"n":-0'),
    "leading-zero": lambda: _replace_once(_base(), b'"n":5', b'"n":05'),
    "float": lambda: _replace_once(_base(), b'"n":5', b'"n":5.0'),
    "exponent": lambda: _replace_once(_base(), b'"n":5', b'"n":5e0'),
    "nan": lambda: _replace_once(_base(), b'"n":5', b'"n":NaN'),
    "infinity": lambda: _replace_once(_base(), b'"n":5', b'"n":-Infinity'),
    "huge-exponent": lambda: _replace_once(_base(), b'"n":5', b'"n":1e999'),
    "whitespace": lambda: _replace_once(_base(), b'"n":5', b'"n": 5'),
    "trailing-newline": lambda: _base() + b"\n",
    "bom": lambda: b"\xef\xbb\xbf" + _base(),
    "epoch-true": lambda: hostile_upload({}, extra={"epoch": True}),
    "epoch-true-batch": lambda: encode_like_the_agent({**upload_object({}), "epoch": True}),
    "upper-hash": lambda: re.sub(rb'"hash":"([0-9a-f]{64})"', lambda m: b'"hash":"' + m[1].upper() + b'"', _base()),
    "empty-records": lambda: encode_like_the_agent({**upload_object({}), "records": []}),
    "u2028-raw": lambda: hostile_upload({"s": "\u2028\u2029\x7f"}),
    "u2028-escaped": lambda: _replace_once(hostile_upload({"s": "\u2028"}), "\u2028".encode(), b"\\u2028"),
    "control-chars": lambda: hostile_upload({"s": "".join(map(chr, range(32))) + '"\\","hash":"'}),
    "surrogate-pair-escaped": lambda: _replace_once(
        hostile_upload({"s": "\U0001f600"}), "\U0001f600".encode(), b"\\ud83d\\ude00"
    ),
    "int-bounds": lambda: hostile_upload({"a": MAX_INT, "b": MIN_INT, "c": [MAX_INT, MIN_INT]}),
    "int-past-bounds": lambda: hostile_upload({"a": MAX_INT + 1}),
    "int-past-bounds-neg": lambda: hostile_upload({"a": MIN_INT - 1}),
    "int-past-bounds-nested": lambda: hostile_upload({"a": [{"b": 2**64}]}),
    "int-20-digits-string-nested": lambda: hostile_upload({"a": ["12345678901234567890"]}),
    "bool-vs-int": lambda: hostile_upload({"a": True, "b": 1}),
    "epoch-mismatch": lambda: hostile_upload({}, record_epoch=EPOCH + 1),
    "extra-field": lambda: hostile_upload({}, extra={"zz": 1}),
    "kind-64": lambda: hostile_upload({}, extra={"kind": "k" * 64}),
    "kind-65": lambda: hostile_upload({}, extra={"kind": "k" * 65}),
    "actor-128": lambda: hostile_upload({}, extra={"actor": "a" * 128}),
    "actor-129": lambda: hostile_upload({}, extra={"actor": "a" * 129}),
    "actor-needs-escape": lambda: hostile_upload({}, extra={"actor": 'a","hash":"'}),
    "kind-newline": lambda: hostile_upload({}, extra={"kind": "a\n"}),
    "seq-negative": lambda: hostile_upload({}, extra={"seq": -1}),
    "ts-past-bounds": lambda: hostile_upload({}, extra={"ts_ms": MAX_INT + 1}),
    "data-not-object": lambda: hostile_upload([1]),
    "data-at-size-limit": lambda: hostile_upload({"s": "x" * (DEFAULT_LIMITS.max_audit_data_bytes - 8)}),
    "data-past-size-limit": lambda: hostile_upload({"s": "x" * (DEFAULT_LIMITS.max_audit_data_bytes - 7)}),
    "data-multibyte-past-limit": lambda: hostile_upload({"s": "\u20ac" * (DEFAULT_LIMITS.max_audit_data_bytes // 3)}),
    "data-max-keys": lambda: hostile_upload({str(i): i for i in range(DEFAULT_LIMITS.max_list)}),
    "data-too-many-keys": lambda: hostile_upload({str(i): i for i in range(DEFAULT_LIMITS.max_list + 1)}),
    "depth-at-limit": lambda: hostile_upload({"d": _nest(MAX_DEPTH - 4)}),  # upload, records, record, data above
    "depth-past-limit": lambda: hostile_upload({"d": _nest(MAX_DEPTH - 3)}),
    "depth-braces-in-strings": lambda: hostile_upload({"d": ["{" * 40]}),
    "unknown-top-field-deep": lambda: encode_like_the_agent({**upload_object({}), "zz": _nest(MAX_DEPTH - 1)}),
    "unknown-top-field-too-deep": lambda: encode_like_the_agent({**upload_object({}), "zz": _nest(MAX_DEPTH)}),
    "unknown-top-field-surrogate": lambda: encode_like_the_agent({**upload_object({}), "zz": "\ud800"}),
    "unknown-top-field-bigint": lambda: encode_like_the_agent({**upload_object({}), "zz": 2**80}),
}


def _nest(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_crafted_edge_cases_decode_the_same_either_way(name: str) -> None:
    """Duplicate/escaped keys, number spellings, bounds, depth and size limits: fast path None or decode()'s."""
    assert_fast_path_agrees(EDGE_CASES[name]())


TAKEN_BY_THE_FAST_PATH = [
    "canonical",
    "actor-128",
    "kind-64",
    "bool-vs-int",
    "control-chars",
    "u2028-raw",
    "data-at-size-limit",
    "data-max-keys",
    "depth-at-limit",
    "empty-records",
    "unknown-top-field-deep",
    "unknown-top-field-bigint",
]


@pytest.mark.parametrize("name", TAKEN_BY_THE_FAST_PATH)
def test_valid_canonical_edge_cases_are_taken_by_the_fast_path(name: str) -> None:
    """Valid canonical uploads at the bounds are decoded by the fast path itself (so the checks above bite)."""
    payload = EDGE_CASES[name]()
    fast = AuditBatch.decode_canonical(payload)
    assert fast is not None
    assert fast == decode(payload)


# --- differential fuzz ----------------------------------------------------------------------------------

hostile_text = st.text(
    st.characters(codec=None, exclude_categories=()) | st.sampled_from([HIGH, LOW, "\u2028", '"', "\\", "\x00"]),
    max_size=6,
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(MIN_INT, MAX_INT)
    | st.sampled_from([MAX_INT + 1, MIN_INT - 1, 2**64, 10**19, -(10**19), 0])
    | hostile_text
)
hostile_data = st.dictionaries(
    hostile_text,
    st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3)),
    max_size=4,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_data)
def test_hostile_data_with_a_recomputed_hash_is_read_the_same_way(data: dict[str, Any]) -> None:
    """Any data (lone surrogates, out-of-range integers, nesting) under a matching hash: same result either way."""
    assert_fast_path_agrees(hostile_upload(data))


MUTATIONS = ["flip", "dup-key", "escape-char", "number", "surrogate", "insert"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.text(max_size=4), st.integers(MIN_INT, MAX_INT) | st.text(max_size=4), max_size=3),
    st.sampled_from(MUTATIONS),
    st.data(),
)
def test_mutated_uploads_are_read_the_same_way(base: dict[str, Any], how: str, draw: Any) -> None:
    """Flip a byte, duplicate a key, escape a character, respell a number or insert text: same result either way."""
    payload = hostile_upload(base)
    index = draw.draw(st.integers(0, len(payload) - 1))
    head, tail = payload[:index], payload[index:]
    if how == "flip":
        tampered = head + bytes([draw.draw(st.integers(0, 255))]) + tail[1:]
    elif how == "dup-key":
        keys = [m for m in re.finditer(rb'"([a-z_]+)":', payload)]
        match = draw.draw(st.sampled_from(keys))
        key = match[1]
        spelled = draw.draw(st.sampled_from([key, b"\\u%04x" % key[0] + key[1:]]))
        value = draw.draw(st.sampled_from([b"0", b'"x"', b"null", b"{}", b"[]", b'"' + b"0" * 64 + b'"']))
        first = draw.draw(st.booleans())
        start, end = match.start(), match.end()
        if first:  # the extra key before the real one (the plain parser keeps the last)
            tampered = payload[:start] + b'"' + spelled + b'":' + value + b"," + payload[start:]
        else:  # after the real one's value: find the next comma or closing brace at this level (best effort)
            rest = payload[end:]
            cut = min(i for i in (rest.find(b","), rest.find(b"}")) if i >= 0)
            tampered = payload[: end + cut] + b',"' + spelled + b'":' + value + payload[end + cut :]
    elif how == "escape-char":
        tampered = head + (b"\\u%04x" % tail[0]) + tail[1:]
    elif how == "number":
        numbers = list(re.finditer(rb":(-?[0-9]+)", payload))
        match = draw.draw(st.sampled_from(numbers))
        spelling = draw.draw(st.sampled_from([b"-0", b"0%s", b"%s.0", b"%se0", b"-%s", b"true", b"%s0"]))
        new = spelling % match[1] if b"%s" in spelling else spelling
        tampered = payload[: match.start(1)] + new + payload[match.end(1) :]
    elif how == "surrogate":
        tampered = head + draw.draw(st.sampled_from([b"\\ud800", b"\\udfff", b"\\ud83d\\ude00", b"\\u0000"])) + tail
    else:
        tampered = head + draw.draw(st.binary(min_size=1, max_size=4)) + tail
    assert_fast_path_agrees(tampered)
