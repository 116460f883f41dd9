"""Unit tests for agent/registry/gguf.py: the GGUF header validator that runs before llama.cpp sees a file.

Hostile headers are built byte by byte with ``struct.pack``; valid ones with ``build_gguf``. Every rejection
must be an InvalidModelError whose message names the field (and, for structural errors, the offset).
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import InvalidModelError
from agent.registry.gguf import (
    GGML_TYPES,
    GgmlType,
    GgufArraySummary,
    GgufLimits,
    GgufValueType,
    build_gguf,
    validate_gguf_bytes,
)

pytestmark = pytest.mark.unit

ARCH = {"general.architecture": "llama"}
TENSORS: list[tuple[str, list[int], GgmlType]] = [
    ("token_embd.weight", [64, 4], GgmlType.Q4_0),
    ("output_norm.weight", [8], GgmlType.F32),
]


def s(text: str | bytes) -> bytes:
    """A GGUF string: uint64 length + bytes."""
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def kv(key: str, kind: GgufValueType, payload: bytes) -> bytes:
    """One metadata entry with a raw payload."""
    return s(key) + struct.pack("<I", kind) + payload


def header(n_tensors: int, n_kv: int, *, version: int = 3, magic: bytes = b"GGUF") -> bytes:
    return magic + struct.pack("<IQQ", version, n_tensors, n_kv)


ARCH_KV = kv("general.architecture", GgufValueType.STRING, s("llama"))


def tensor_info(name: str, dims: list[int], ggml_type: int, offset: int) -> bytes:
    return (
        s(name)
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


def with_data(head: bytes, data_bytes: int, alignment: int = 32) -> bytes:
    """Pad a header to the alignment and append ``data_bytes`` of tensor data."""
    return head + bytes(-len(head) % alignment) + bytes(data_bytes)


def rejected(data: bytes, match: str, limits: GgufLimits | None = None) -> str:
    with pytest.raises(InvalidModelError, match=match) as info:
        validate_gguf_bytes(data, limits) if limits else validate_gguf_bytes(data)
    return str(info.value)


# --- valid files ----------------------------------------------------------------------------------------------


def test_valid_synthetic_file_accepted() -> None:
    """A small well-formed GGUF is accepted and its header facts are reported."""
    data = build_gguf(
        {
            **ARCH,
            "general.name": "tiny",
            "general.license": "apache-2.0",
            "general.file_type": 2,
            "llama.context_length": 2048,
            "tokenizer.chat_template": "{{ messages }}",
            "tokenizer.ggml.tokens": [f"t{i}" for i in range(100)],
            "tokenizer.ggml.scores": [0.5] * 100,
        },
        TENSORS,
    )
    info = validate_gguf_bytes(data)
    assert info.version == 3
    assert info.architecture == "llama"
    assert info.name == "tiny"
    assert info.licence == "apache-2.0"
    assert info.context_length == 2048
    assert info.has_chat_template is True
    assert info.vocab_size == 100
    assert info.quant == "Q4_0"
    assert info.tensor_count == 2
    assert info.parameter_count == 64 * 4 + 8
    assert info.tensor_types == {"Q4_0": 1, "F32": 1}
    assert info.metadata["tokenizer.ggml.tokens"] == GgufArraySummary("string", 100)
    assert info.metadata["tokenizer.ggml.scores"] == GgufArraySummary("float32", 100)
    assert info.data_offset % 32 == 0
    assert info.data_offset + max(t.offset + t.n_bytes for t in info.tensors) == len(data)


def test_version_2_and_custom_alignment_accepted() -> None:
    """GGUF v2 files and a power-of-two general.alignment other than 32 are accepted."""
    info = validate_gguf_bytes(build_gguf(ARCH, TENSORS, version=2, alignment=64))
    assert info.version == 2
    assert info.alignment == 64
    assert info.data_offset % 64 == 0


def test_quant_falls_back_to_dominant_tensor_type() -> None:
    """Without general.file_type the quant name is the type holding most bytes of 2-D tensors."""
    info = validate_gguf_bytes(build_gguf(ARCH, [("w", [256, 2], GgmlType.Q6_K), ("n", [32], GgmlType.F32)]))
    assert info.file_type is None
    assert info.quant == "Q6_K"


@pytest.mark.parametrize("ggml_type", list(GgmlType))
def test_every_known_type_has_a_consistent_size(ggml_type: GgmlType) -> None:
    """Each supported ggml type validates with its block size, and its data length is computed exactly."""
    block, type_size = GGML_TYPES[ggml_type]
    info = validate_gguf_bytes(build_gguf(ARCH, [("t", [block * 2, 3], ggml_type)]))
    assert info.tensors[0].n_bytes == 6 * type_size
    assert info.tensor_types == {ggml_type.name: 1}


# --- hostile files --------------------------------------------------------------------------------------------


def test_bad_magic_rejected() -> None:
    """A file that does not start with GGUF is rejected at offset 0."""
    message = rejected(header(0, 1, magic=b"GGML") + ARCH_KV, "magic")
    assert "offset 0" in message


def test_empty_and_tiny_files_rejected() -> None:
    """Files too short to hold the header are rejected as truncated or bad magic."""
    rejected(b"", "magic")
    rejected(b"GG", "magic")
    rejected(b"GGUF\x03\x00", "version")


@pytest.mark.parametrize("version", [0, 1, 4, 0x03000000, 0xFFFFFFFF])
def test_bad_version_rejected(version: int) -> None:
    """Only versions 2 and 3 are accepted; byte-swapped (big-endian) ones are called out."""
    message = rejected(header(0, 1, version=version) + ARCH_KV, "version")
    if version == 0x03000000:
        assert "big-endian" in message


def test_oversized_tensor_count_rejected() -> None:
    """A tensor count over the bound is rejected before any tensor is read."""
    message = rejected(header(2**63, 1) + ARCH_KV, "tensor count")
    assert "offset 8" in message


def test_oversized_kv_count_rejected() -> None:
    """A key/value count over the bound is rejected before any entry is read."""
    message = rejected(header(0, 2**40) + ARCH_KV, "key/value count")
    assert "offset 16" in message


def test_kv_count_larger_than_entries_rejected() -> None:
    """A count that promises more entries than the file holds is rejected as truncated."""
    rejected(header(0, 3) + ARCH_KV, "truncated")


def test_string_length_past_eof_rejected() -> None:
    """A key whose length runs past the end of the file is rejected with its offset."""
    message = rejected(header(0, 1) + struct.pack("<Q", 500) + b"general", "past the end of the file")
    assert "key of metadata entry #0" in message
    assert "offset 24" in message


def test_huge_string_rejected() -> None:
    """A string value claiming 2**40 bytes is rejected by the string bound, not allocated."""
    data = header(0, 2) + ARCH_KV + s("x.big") + struct.pack("<IQ", GgufValueType.STRING, 2**40) + b"abc"
    rejected(data, "exceeds the bound")


def test_huge_key_rejected() -> None:
    """A key longer than the key bound is rejected."""
    rejected(header(0, 1) + s("k" * 5000) + struct.pack("<I", GgufValueType.UINT8) + b"\x01", "exceeds the bound")


def test_invalid_utf8_key_rejected() -> None:
    """Keys must be valid UTF-8."""
    rejected(header(0, 1) + s(b"\xff\xfe") + struct.pack("<IB", GgufValueType.UINT8, 1), "UTF-8")


def test_unknown_value_type_rejected() -> None:
    """A metadata value type outside the GGUF set is rejected with the key named."""
    message = rejected(header(0, 2) + ARCH_KV + s("x.y") + struct.pack("<I", 13) + b"\x00" * 8, "value type 13")
    assert "'x.y'" in message


def test_bool_outside_zero_one_rejected() -> None:
    """A BOOL value must be 0 or 1."""
    rejected(header(0, 2) + ARCH_KV + kv("x.flag", GgufValueType.BOOL, b"\x02"), "bool")


def test_duplicate_key_rejected() -> None:
    """The same key twice is rejected."""
    rejected(header(0, 2) + ARCH_KV + ARCH_KV, "duplicate metadata key")


def test_missing_architecture_rejected() -> None:
    """general.architecture is required and must be a string."""
    rejected(header(0, 1) + kv("general.name", GgufValueType.STRING, s("x")), "general.architecture")
    rejected(header(0, 1) + kv("general.architecture", GgufValueType.UINT32, b"\x01\0\0\0"), "general.architecture")


def test_array_length_past_eof_rejected() -> None:
    """An array claiming more items than the file can hold is rejected before it is walked."""
    data = header(0, 2) + ARCH_KV + s("x.arr") + struct.pack("<IIQ", GgufValueType.ARRAY, GgufValueType.UINT32, 10**6)
    rejected(data, "runs past the end")


def test_oversized_array_rejected() -> None:
    """An array longer than the array bound is rejected."""
    data = header(0, 2) + ARCH_KV + s("x.arr") + struct.pack("<IIQ", GgufValueType.ARRAY, GgufValueType.UINT8, 2**40)
    rejected(data, "array length")


def test_array_of_strings_with_bad_item_rejected() -> None:
    """A long array of strings is walked: one item whose length runs past the end is found and named."""
    items = b"".join(s(f"tok{i}") for i in range(99)) + struct.pack("<Q", 10**5)
    data = (
        header(0, 2)
        + ARCH_KV
        + s("tokenizer.ggml.tokens")
        + struct.pack("<IIQ", GgufValueType.ARRAY, GgufValueType.STRING, 100)
        + items
    )
    assert "[99]" in rejected(data, "past the end")


def test_nested_arrays_too_deep_rejected() -> None:
    """Arrays nested deeper than the bound are rejected (an array of arrays of arrays)."""
    inner = struct.pack("<IQ", GgufValueType.UINT8, 1) + b"\x01"
    level2 = struct.pack("<IQ", GgufValueType.ARRAY, 1) + inner
    level3 = struct.pack("<IQ", GgufValueType.ARRAY, 1) + level2
    data = header(0, 2) + ARCH_KV + s("x.nest") + struct.pack("<I", GgufValueType.ARRAY) + level3
    rejected(data, "nested deeper")
    ok = header(0, 2) + ARCH_KV + s("x.nest") + struct.pack("<I", GgufValueType.ARRAY) + level2
    assert validate_gguf_bytes(ok).metadata["x.nest"] == [[1]]


def test_metadata_bigger_than_bound_rejected() -> None:
    """A header bigger than max_metadata_bytes is rejected, even when every string is individually fine."""
    data = build_gguf({**ARCH, **{f"x.k{i}": "v" * 1000 for i in range(8)}})
    rejected(data, "metadata bound", GgufLimits(max_metadata_bytes=4096))
    assert validate_gguf_bytes(data, GgufLimits(max_metadata_bytes=16384)).architecture == "llama"


def test_default_metadata_bound_is_64_mib() -> None:
    """By default a header claiming more than 64 MiB of metadata is refused without reading it."""
    assert GgufLimits().max_metadata_bytes == 64 * 1024 * 1024
    data = (
        header(0, 2)
        + ARCH_KV
        + s("x.arr")
        + struct.pack("<IIQ", GgufValueType.ARRAY, GgufValueType.UINT64, 9 * 1024 * 1024)
    )
    rejected(data, "past the end of the file or the metadata bound")


def test_tensor_offset_past_end_rejected() -> None:
    """A tensor whose data runs past the end of the file is rejected."""
    head = header(1, 1) + ARCH_KV + tensor_info("w", [32], GgmlType.F32, 1 << 20)
    message = rejected(with_data(head, 128), "past the end of the file")
    assert "tensor 'w'" in message


def test_tensor_data_truncated_rejected() -> None:
    """Tensor data shorter than dims times type size is rejected."""
    head = header(1, 1) + ARCH_KV + tensor_info("w", [64], GgmlType.F32, 0)
    rejected(with_data(head, 255), "past the end of the file")
    assert validate_gguf_bytes(with_data(head, 256)).tensor_data_bytes == 256


def test_huge_dims_rejected() -> None:
    """Dimensions whose product needs more bytes than the file has are rejected."""
    head = header(1, 1) + ARCH_KV + tensor_info("w", [2**32, 2**32], GgmlType.F32, 0)
    rejected(with_data(head, 64), "more than the whole file")


def test_misaligned_offset_rejected() -> None:
    """A tensor offset that is not a multiple of the alignment is rejected."""
    head = header(1, 1) + ARCH_KV + tensor_info("w", [8], GgmlType.F32, 4)
    message = rejected(with_data(head, 64), "not aligned to 32")
    assert "offset" in message


def test_data_section_start_past_end_rejected() -> None:
    """A file that ends before the aligned start of the data section is rejected."""
    head = header(1, 1) + ARCH_KV + tensor_info("w", [0], GgmlType.F32, 0)
    assert len(head) % 32 != 0
    rejected(head, "data section")


@pytest.mark.parametrize("ggml_type", [4, 5, 31, 36, 40, 1000])
def test_unknown_ggml_type_rejected(ggml_type: int) -> None:
    """Retired or unknown ggml types are rejected with the type id named."""
    head = header(1, 1) + ARCH_KV + tensor_info("w", [32], ggml_type, 0)
    assert f"unknown ggml tensor type {ggml_type}" in rejected(with_data(head, 1024), "tensor 'w'")


def test_block_size_mismatch_rejected() -> None:
    """A quantized tensor whose first dimension is not a multiple of its block size is rejected."""
    head = header(1, 1) + ARCH_KV + tensor_info("w", [33], GgmlType.Q4_0, 0)
    rejected(with_data(head, 1024), "block size")


@pytest.mark.parametrize("dims", [[], [1, 1, 1, 1, 1]])
def test_bad_dimension_count_rejected(dims: list[int]) -> None:
    """Tensors need 1 to 4 dimensions."""
    head = header(1, 1) + ARCH_KV + tensor_info("w", dims, GgmlType.F32, 0)
    rejected(with_data(head, 64), "n_dims")


def test_duplicate_tensor_name_rejected() -> None:
    """Two tensors with the same name are rejected."""
    head = header(2, 1) + ARCH_KV + tensor_info("w", [8], 0, 0) + tensor_info("w", [8], 0, 32)
    rejected(with_data(head, 64), "duplicate tensor name")


def test_overlapping_tensors_rejected() -> None:
    """Tensors whose data ranges overlap are rejected."""
    head = header(2, 1) + ARCH_KV + tensor_info("a", [64], 0, 0) + tensor_info("b", [8], 0, 32)
    rejected(with_data(head, 512), "overlaps")


def test_long_tensor_name_rejected() -> None:
    """A tensor name longer than the bound is rejected."""
    head = header(1, 1) + ARCH_KV + tensor_info("w" * 300, [8], 0, 0)
    rejected(with_data(head, 64), "exceeds the bound")


@pytest.mark.parametrize(
    ("kind", "payload", "match"),
    [
        (GgufValueType.UINT32, struct.pack("<I", 48), "power of two"),
        (GgufValueType.UINT32, struct.pack("<I", 0), "power of two"),
        (GgufValueType.UINT32, struct.pack("<I", 1 << 30), "power of two"),
        (GgufValueType.UINT64, struct.pack("<Q", 32), "must be uint32"),
    ],
)
def test_bad_alignment_rejected(kind: GgufValueType, payload: bytes, match: str) -> None:
    """general.alignment must be a uint32 power of two within the bound."""
    rejected(header(0, 2) + ARCH_KV + kv("general.alignment", kind, payload), match)


# --- properties -----------------------------------------------------------------------------------------------

keys = st.from_regex(r"[a-z][a-z0-9_]{0,8}(\.[a-z0-9_]{1,8}){0,2}", fullmatch=True).filter(
    lambda k: not k.startswith("general.")
)
scalars: st.SearchStrategy[Any] = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(width=32, allow_nan=False),
    st.booleans(),
    st.text(max_size=40),
)
values: st.SearchStrategy[Any] = st.one_of(
    scalars,
    st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8),
    st.lists(st.text(max_size=10), max_size=8),
    st.lists(st.lists(st.integers(0, 255), min_size=1, max_size=3), min_size=1, max_size=3),
)
metadata_maps = st.dictionaries(keys, values, max_size=8)
tensor_lists = st.lists(
    st.tuples(st.sampled_from([GgmlType.F32, GgmlType.F16, GgmlType.Q8_0, GgmlType.Q4_K]), st.integers(1, 3)),
    max_size=3,
)


def build_valid(metadata: dict[str, Any], tensors: list[tuple[GgmlType, int]]) -> bytes:
    """A valid file whose last tensor ends exactly at EOF (its size is a multiple of the alignment)."""
    specs = [(f"t{i}", [GGML_TYPES[t][0] * 32, rows], t) for i, (t, rows) in enumerate(tensors)]
    specs.append(("last", [8], GgmlType.F32))
    return build_gguf({**ARCH, **metadata}, specs, fill=0x5A)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(metadata=metadata_maps, tensors=tensor_lists)
def test_round_trip_metadata(metadata: dict[str, Any], tensors: list[tuple[GgmlType, int]]) -> None:
    """Every metadata map written by build_gguf parses back to the same values (small arrays kept whole)."""
    info = validate_gguf_bytes(build_valid(metadata, tensors))
    assert dict(info.metadata) == {**ARCH, **metadata}
    assert info.tensor_count == len(tensors) + 1


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(metadata=metadata_maps, tensors=tensor_lists, data=st.data())
def test_truncation_anywhere_rejected(
    metadata: dict[str, Any], tensors: list[tuple[GgmlType, int]], data: st.DataObject
) -> None:
    """Cutting a valid file at any byte is rejected with InvalidModelError, never another exception."""
    full = build_valid(metadata, tensors)
    cut = data.draw(st.integers(0, len(full) - 1), label="cut")
    with pytest.raises(InvalidModelError):
        validate_gguf_bytes(full[:cut])


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(metadata=metadata_maps, tensors=tensor_lists, data=st.data())
def test_flipping_a_header_byte_never_crashes(
    metadata: dict[str, Any], tensors: list[tuple[GgmlType, int]], data: st.DataObject
) -> None:
    """Flipping any header byte gives InvalidModelError or a successful parse, never another exception."""
    full = build_valid(metadata, tensors)
    header_end = validate_gguf_bytes(full).data_offset
    position = data.draw(st.integers(0, header_end - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="mask")
    mutated = bytearray(full)
    mutated[position] ^= mask
    try:
        info = validate_gguf_bytes(bytes(mutated))
    except InvalidModelError:
        return
    assert info.data_offset + info.tensor_data_bytes <= len(mutated)


@settings(max_examples=300)
@given(body=st.binary(max_size=300), counts=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)))
def test_random_bytes_after_magic_never_crash(body: bytes, counts: tuple[int, int]) -> None:
    """Arbitrary bytes behind a valid magic and version are rejected cleanly (or parse), never crash."""
    data = header(0, 0)[:8] + struct.pack("<QQ", *counts) + body
    with contextlib.suppress(InvalidModelError):
        validate_gguf_bytes(data)
