"""Unit tests for protocols/releases.py: the custom fields of a model target and the chunk arithmetic."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import DecodeError
from protocols.releases import ModelTargetFields, chunk_count, chunk_digests, chunk_span

pytestmark = pytest.mark.unit


def _fields(length: int, chunk_size: int) -> ModelTargetFields:
    return ModelTargetFields(
        format="gguf",
        quant="q4_0",
        params=1,
        context_length=2,
        min_ram_bytes=3,
        arch=("x86_64",),
        accelerators=(),
        licence="apache-2.0",
        chunk_size=chunk_size,
        chunks=tuple("ab" * 32 for _ in range(chunk_count(length, chunk_size))),
    )


@given(length=st.integers(1, 10_000_000), chunk_size=st.integers(4096, 1 << 20))
def test_fields_round_trip_and_chunks_cover_the_length(length: int, chunk_size: int) -> None:
    """to_custom → from_custom is the identity, and the chunk spans tile exactly [0, length)."""
    fields = _fields(length, chunk_size)
    assert ModelTargetFields.from_custom(fields.to_custom(), length) == fields
    spans = [chunk_span(i, length, chunk_size) for i in range(chunk_count(length, chunk_size))]
    assert spans[0][0] == 0
    assert sum(size for _, size in spans) == length
    assert all(size > 0 for _, size in spans)


@given(length=st.integers(2, 1_000_000), extra=st.sampled_from([-1, 1]))
def test_a_chunk_list_that_does_not_cover_the_length_is_rejected(length: int, extra: int) -> None:
    """One chunk digest too many or too few for the signed length is a DecodeError."""
    custom = _fields(length, 1000).to_custom()
    chunks = custom["edgefleet"]["chunks"]
    custom["edgefleet"]["chunks"] = [*chunks, "cd" * 32] if extra > 0 else chunks[:-1]
    with pytest.raises(DecodeError, match="chunks"):
        ModelTargetFields.from_custom(custom, length)


@pytest.mark.parametrize(
    ("field", "value"),
    [("format", "exe"), ("chunk_size", 0), ("chunk_size", 2 << 20), ("arch", ["X86 64"]), ("params", -1)],
)
def test_invalid_fields_are_rejected(field: str, value: object) -> None:
    """Each field is typed and bounded."""
    custom = _fields(5000, 1000).to_custom()
    custom["edgefleet"][field] = value
    with pytest.raises(DecodeError):
        ModelTargetFields.from_custom(custom, 5000)


def test_fit_problem_names_the_constraint() -> None:
    """Architecture and RAM constraints are checked; an empty list means any."""
    fields = _fields(10, 10)
    assert fields.fit_problem(arch="x86_64", ram_bytes=10) is None
    assert "aarch64" in (fields.fit_problem(arch="aarch64", ram_bytes=10) or "")
    assert "RAM" in (fields.fit_problem(arch="x86_64", ram_bytes=1) or "")
    assert chunk_digests([b""]) == ["e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]
