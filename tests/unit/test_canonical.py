"""Unit tests for protocols/canonical.py: canonical encoding, strict bounded decoding, typed field access."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from json_strategies import json_objects

from protocols.canonical import (
    MAX_DEPTH,
    MAX_INT,
    MIN_INT,
    ObjectReader,
    canonical_json,
    check_int,
    check_number,
    loads_object,
)
from protocols.errors import DecodeError
from protocols.limits import Limits

pytestmark = pytest.mark.unit

QUICK = settings(max_examples=40, deadline=None)
"""Most properties here are cheap to state; 40 examples each keep the file at a few seconds."""

BIG = 1 << 20

finite_floats = st.floats(allow_nan=False, allow_infinity=False)


def nested(depth: int) -> bytes:
    """A JSON object nested ``depth`` levels deep (the top-level object counts as one)."""
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


@QUICK
@given(json_objects)
def test_round_trip(obj: dict[str, Any]) -> None:
    """Decoding the canonical encoding gives the same object, and re-encoding gives the same bytes."""
    data = canonical_json(obj)
    assert loads_object(data, max_bytes=BIG) == obj
    assert canonical_json(loads_object(data, max_bytes=BIG)) == data


@QUICK
@given(json_objects)
def test_encoding_is_the_documented_form(obj: dict[str, Any]) -> None:
    """The encoding is json.dumps with sorted keys, compact separators and unescaped UTF-8."""
    expected = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert canonical_json(obj) == expected


@QUICK
@given(st.dictionaries(st.text(max_size=8), st.integers(MIN_INT, MAX_INT), min_size=2, max_size=8), st.randoms())
def test_key_order_does_not_matter(obj: dict[str, int], rnd: Any) -> None:
    """The same mapping inserted in a different key order encodes to the same bytes."""
    items = list(obj.items())
    rnd.shuffle(items)
    assert canonical_json(dict(items)) == canonical_json(obj)


@QUICK
@given(finite_floats)
def test_floats_rejected_unless_allowed(value: float) -> None:
    """Floats are refused by default (hashed JSON), and round-trip exactly when allowed."""
    with pytest.raises(ValueError, match="float"):
        canonical_json({"x": value})
    decoded = loads_object(canonical_json({"x": value}, allow_floats=True), max_bytes=BIG)["x"]
    assert decoded == value
    assert math.copysign(1.0, decoded) == math.copysign(1.0, value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_never_encoded(value: float) -> None:
    """NaN and ±Infinity are refused even when floats are allowed."""
    with pytest.raises(ValueError, match="NaN"):
        canonical_json({"x": [value]}, allow_floats=True)


@pytest.mark.parametrize(
    ("obj", "error"),
    [
        ({1: "a"}, TypeError),
        ({"a": {b"x"}}, TypeError),
        ({"a": b"bytes"}, TypeError),
        ({"a": MAX_INT + 1}, ValueError),
        ({"a": MIN_INT - 1}, ValueError),
        ({"a": "\ud800"}, ValueError),
        ({"\udfff": 1}, ValueError),
    ],
)
def test_unencodable_values_rejected(obj: object, error: type[Exception]) -> None:
    """Non-str keys, non-JSON types, ints beyond 64 bits and lone surrogates are refused."""
    with pytest.raises(error):
        canonical_json(obj)


def test_too_deep_value_not_encoded() -> None:
    """Encoding refuses values nested deeper than MAX_DEPTH."""
    value: Any = {}
    for _ in range(MAX_DEPTH):
        value = {"a": value}
    with pytest.raises(ValueError, match="deeper"):
        canonical_json(value)


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":1,"a":1}',
        b'{"a":1,"b":2,"a":3}',
        b'{"x":{"a":1,"a":2}}',
        b'{"x":[{"k":true,"k":false}]}',
    ],
)
def test_duplicate_keys_rejected(data: bytes) -> None:
    """An object with a repeated key, at any depth, is rejected."""
    with pytest.raises(DecodeError, match="duplicate"):
        loads_object(data, max_bytes=BIG)


@QUICK
@given(json_objects.filter(bool), st.data())
def test_any_duplicated_key_rejected(obj: dict[str, Any], data: st.DataObject) -> None:
    """Prepending a copy of any existing key to a valid object makes it rejected."""
    key = data.draw(st.sampled_from(sorted(obj)))
    encoded = canonical_json(obj)
    tampered = b"{" + canonical_json({key: None})[1:-1] + b"," + encoded[1:]
    with pytest.raises(DecodeError, match="duplicate"):
        loads_object(tampered, max_bytes=BIG)


@QUICK
@given(json_objects)
def test_size_bound_checked(obj: dict[str, Any]) -> None:
    """Input longer than max_bytes is rejected; input of exactly max_bytes is accepted."""
    data = canonical_json(obj)
    assert loads_object(data, max_bytes=len(data)) == obj
    with pytest.raises(DecodeError, match="limit"):
        loads_object(data, max_bytes=len(data) - 1)


def test_depth_bound() -> None:
    """Nesting up to max_depth is accepted; one more level is rejected."""
    assert loads_object(nested(MAX_DEPTH), max_bytes=BIG)
    assert loads_object(nested(5), max_bytes=BIG, max_depth=5)
    with pytest.raises(DecodeError, match="deeper"):
        loads_object(nested(MAX_DEPTH + 1), max_bytes=BIG)
    with pytest.raises(DecodeError, match="deeper"):
        loads_object(b'{"a":[[[[[1]]]]]}', max_bytes=BIG, max_depth=5)


def test_pathological_depth_is_a_decode_error() -> None:
    """Nesting far beyond the interpreter's recursion limit is a DecodeError, not a crash."""
    with pytest.raises(DecodeError):
        loads_object(b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}", max_bytes=1 << 21)


@pytest.mark.parametrize(
    "data",
    [
        b'{"x":NaN}',
        b'{"x":Infinity}',
        b'{"x":-Infinity}',
        b'{"x":1e999}',
        b'{"x":-1e999}',
    ],
)
def test_nan_and_infinity_rejected(data: bytes) -> None:
    """NaN, Infinity and number literals that overflow to infinity are rejected."""
    with pytest.raises(DecodeError):
        loads_object(data, max_bytes=BIG)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b"1",
        b'"x"',
        b"null",
        b"{",
        b'{"a":1} x',
        b"\xef\xbb\xbf{}",
        b'{"a":"\xff"}',
        b'{"a":"\\ud800"}',
        b'{"\\udc00":1}',
        b"{'a':1}",
        b'{"a":1,}',
    ],
)
def test_malformed_input_rejected(data: bytes) -> None:
    """Non-objects, broken JSON, a BOM, invalid UTF-8 and lone surrogates are rejected."""
    with pytest.raises(DecodeError):
        loads_object(data, max_bytes=BIG)


def test_reader_rejects_bool_as_int_and_names_the_field() -> None:
    """An integer field holding true is rejected, and the error names the field's path."""
    reader = ObjectReader({"outer": {"n": True}})
    with pytest.raises(DecodeError, match=r"^outer\.n: expected an integer"):
        reader.obj("outer").integer("n")
    with pytest.raises(DecodeError, match="number"):
        check_number(False, "x")


@pytest.mark.parametrize(("value", "ok"), [(0, True), (MAX_INT, True), (-1, False), (MAX_INT + 1, False), (1.0, False)])
def test_check_int_range(value: object, ok: bool) -> None:
    """Integers default to [0, 2**63 - 1]; floats are not integers."""
    if ok:
        assert check_int(value, "n") == value
    else:
        with pytest.raises(DecodeError):
            check_int(value, "n")


def test_reader_bounds_strings_and_lists() -> None:
    """Strings and lists longer than the limits are rejected; null counts as missing."""
    limits = Limits(max_string=3, max_list=2)
    reader = ObjectReader({"s": "abcd", "l": [1, 2, 3], "n": None}, limits=limits)
    with pytest.raises(DecodeError, match="longer"):
        reader.string("s")
    with pytest.raises(DecodeError, match="limit"):
        reader.array("l", check_int)
    with pytest.raises(DecodeError, match="missing"):
        reader.integer("n")
    assert not reader.present("n")
    assert not reader.present("absent")
