"""canonical_json's fast path accepts and rejects exactly what the full check does, with the same bytes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.canonical import MAX_DEPTH, _check_encodable, canonical_json

pytestmark = pytest.mark.unit

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0xDFFF)),  # lone surrogates included
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(0, 3)), children, max_size=4),
    ),
    max_leaves=20,
)


def reference(value: Any, allow_floats: bool) -> bytes:
    """The encoder as it was before the fast path: full check, then dumps."""
    _check_encodable(value, allow_floats=allow_floats, depth=1, path="$")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except (ValueError, TypeError) as exc:
        return "error", type(exc)


@settings(max_examples=400, deadline=None)
@given(values, st.booleans())
def test_fast_path_matches_the_full_check(value: Any, allow_floats: bool) -> None:
    """Any value: same bytes, or the same kind of error (ValueError or TypeError), as the full check."""
    got = outcome(lambda v: canonical_json(v, allow_floats=allow_floats), value)
    expected = outcome(reference, value, allow_floats)
    assert got[0] == expected[0]
    if got[0] == "ok":
        assert got[1] == expected[1]
    else:
        assert issubclass(got[1], ValueError) == issubclass(expected[1], ValueError)


def test_depth_limit_is_kept() -> None:
    """Nesting deeper than MAX_DEPTH is refused by the fast path too."""
    value: Any = "x"
    for _ in range(MAX_DEPTH):
        value = [value]
    with pytest.raises(ValueError, match="nested deeper"):
        canonical_json(value)
