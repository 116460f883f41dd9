"""Hypothesis strategies for JSON values the canonical encoding accepts (no floats; integers in the signed
64-bit range), shared by the property tests of protocols/canonical.py and of the audit upload fast path."""

from __future__ import annotations

from hypothesis import strategies as st

from protocols.canonical import MAX_INT, MIN_INT

json_scalars = st.none() | st.booleans() | st.integers(MIN_INT, MAX_INT) | st.text(max_size=12)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=6)
