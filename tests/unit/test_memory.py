"""Unit tests for protocols/memory.py (the memory estimate) and the pure GGUF parser of protocols/gguf.py.

GGUF inputs are built with ``build_gguf``; the estimate's agreement with llama.cpp's real resident memory is
checked against measurements in ``tests/component/test_model_tooling.py``.
"""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import DecodeError
from protocols.gguf import GgmlType, GgufValueType, build_gguf, parse_gguf, parse_gguf_bytes
from protocols.memory import (
    ModelShape,
    estimate_memory,
    kv_cache_bytes,
    repack_types,
    repacked_bytes,
)

pytestmark = pytest.mark.unit

SMOLLM2_META = {
    "general.architecture": "llama",
    "llama.block_count": 30,
    "llama.context_length": 8192,
    "llama.embedding_length": 576,
    "llama.feed_forward_length": 1536,
    "llama.attention.head_count": 9,
    "llama.attention.head_count_kv": 3,
    "llama.vocab_size": 49152,
}
SMOLLM2 = ModelShape(
    n_layer=30, n_embd=576, n_head=9, n_head_kv=3, head_dim_k=64, head_dim_v=64, n_ff=1536, n_vocab=49152
)
MiB = 1 << 20


def test_shape_is_read_from_llama_cpp_keys() -> None:
    """ModelShape.from_gguf reads block count, widths, heads and vocabulary from the {arch}.* keys."""
    info = parse_gguf_bytes(build_gguf(SMOLLM2_META, [("blk.0.attn_q.weight", [576, 576], GgmlType.Q4_0)]))
    assert ModelShape.from_gguf(info) == SMOLLM2


def test_kv_heads_default_to_heads_and_explicit_key_lengths_win() -> None:
    """Without head_count_kv every head has its own KV; key_length/value_length override n_embd / n_head."""
    meta = {k: v for k, v in SMOLLM2_META.items() if k != "llama.attention.head_count_kv"}
    meta |= {"llama.attention.key_length": 128, "llama.attention.value_length": 96}
    shape = ModelShape.from_gguf(parse_gguf_bytes(build_gguf(meta)))
    assert (shape.n_head_kv, shape.head_dim_k, shape.head_dim_v) == (9, 128, 96)


@pytest.mark.parametrize(
    "missing", ["llama.block_count", "llama.embedding_length", "llama.attention.head_count", "llama.vocab_size"]
)
def test_missing_hyperparameters_are_a_decode_error(missing: str) -> None:
    """A header without a hyperparameter the estimate needs raises DecodeError naming the key."""
    meta = {k: v for k, v in SMOLLM2_META.items() if k != missing}
    with pytest.raises(DecodeError, match="cannot estimate memory"):
        ModelShape.from_gguf(parse_gguf_bytes(build_gguf(meta)))


def test_kv_cache_matches_llama_cpp() -> None:
    """SmolLM2's f16 KV cache at n_ctx 2048 is 45.00 MiB, what llama.cpp reports for it."""
    assert kv_cache_bytes(SMOLLM2, 2048) == 45 * MiB
    assert kv_cache_bytes(SMOLLM2, 1024, 4) == 4 * kv_cache_bytes(SMOLLM2, 1024)


def test_estimate_terms_add_up() -> None:
    """total_bytes is the sum of the terms; the dict form carries every term and the total."""
    estimate = estimate_memory(SMOLLM2, 98_362_432, n_ctx=1024, repack_bytes=1234)
    terms = ("weights_bytes", "repack_bytes", "runtime_bytes", "kv_cache_bytes", "compute_bytes")
    assert estimate.total_bytes == sum(getattr(estimate, t) for t in terms)
    assert estimate.to_dict()["total_bytes"] == estimate.total_bytes


def test_flash_attention_off_costs_more() -> None:
    """Without flash attention the K·Q scores are materialised: the compute term grows."""
    on = estimate_memory(SMOLLM2, 0, n_ctx=2048)
    off = estimate_memory(SMOLLM2, 0, n_ctx=2048, flash_attn=False)
    assert off.compute_bytes > on.compute_bytes + 30 * MiB


@pytest.mark.parametrize(("n_ctx", "n_slots"), [(0, 1), (1, 0), (-5, 1), (True, 1)])
def test_non_positive_context_or_slots_are_refused(n_ctx: int, n_slots: int) -> None:
    """A context or slot count below 1 (or a bool) raises ValueError."""
    with pytest.raises(ValueError, match="must be a positive integer"):
        estimate_memory(SMOLLM2, 1, n_ctx=n_ctx, n_slots=n_slots)


@given(
    n_ctx=st.integers(1, 1 << 17),
    n_slots=st.integers(1, 64),
    size=st.integers(0, 1 << 36),
    extra=st.integers(1, 4096),
    flash=st.booleans(),
)
def test_estimate_is_monotonic(n_ctx: int, n_slots: int, size: int, extra: int, flash: bool) -> None:
    """More context, more slots or a bigger file never lowers the estimate."""
    base = estimate_memory(SMOLLM2, size, n_ctx=n_ctx, n_slots=n_slots, flash_attn=flash).total_bytes
    assert estimate_memory(SMOLLM2, size, n_ctx=n_ctx + extra, n_slots=n_slots, flash_attn=flash).total_bytes > base
    assert estimate_memory(SMOLLM2, size, n_ctx=n_ctx, n_slots=n_slots + 1, flash_attn=flash).total_bytes > base
    assert estimate_memory(SMOLLM2, size + extra, n_ctx=n_ctx, n_slots=n_slots, flash_attn=flash).total_bytes > base


def test_repack_rules_follow_the_cpu() -> None:
    """AVX2 repacks Q4_0 but not Q8_0; ARM with dot-product repacks both; unknown CPUs repack nothing."""
    x86 = repack_types("x86_64", ["fpu", "avx2"])
    arm = repack_types("arm64", ["asimddp"])
    assert GgmlType.Q4_0 in x86
    assert GgmlType.Q8_0 not in x86
    assert {GgmlType.Q4_0, GgmlType.Q8_0} <= arm
    assert repack_types("riscv64", ["v"]) == frozenset()
    assert repack_types("x86_64", []) == frozenset()


def test_repacked_bytes_skip_vectors_and_the_token_embedding() -> None:
    """Only weight matrices of a repacked type count; 1-D tensors and token_embd (read by rows) do not."""
    data = build_gguf(
        SMOLLM2_META,
        [
            ("token_embd.weight", [64, 8], GgmlType.Q4_0),
            ("blk.0.attn_q.weight", [64, 8], GgmlType.Q4_0),
            ("blk.0.ffn_up.weight", [64, 8], GgmlType.Q8_0),
            ("blk.0.attn_norm.weight", [64], GgmlType.F32),
        ],
    )
    info = parse_gguf_bytes(data)
    one_q4_0_matrix = 64 * 8 // 32 * 18
    assert repacked_bytes(info, repack_types("x86_64", ["avx2"])) == one_q4_0_matrix


# --- protocols/gguf.py: the pure parser -------------------------------------------------------------------

VALID = build_gguf(
    {**SMOLLM2_META, "tokenizer.chat_template": "{{ messages }}"},
    [("blk.0.attn_q.weight", [64, 4], GgmlType.Q4_0), ("output_norm.weight", [8], GgmlType.F32)],
    types={"llama.block_count": GgufValueType.UINT32},
)


def test_parser_reads_a_file_object_and_bytes_alike() -> None:
    """parse_gguf (file object) and parse_gguf_bytes give the same header."""
    assert parse_gguf(io.BytesIO(VALID)) == parse_gguf_bytes(VALID)


@settings(max_examples=200)
@given(cut=st.integers(0, len(VALID) - 1))
def test_every_truncation_is_a_decode_error(cut: int) -> None:
    """A GGUF cut anywhere before its end raises DecodeError, never another exception."""
    with pytest.raises(DecodeError, match="invalid GGUF"):
        parse_gguf_bytes(VALID[:cut])


@settings(max_examples=300)
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_parse_or_raise_decode_error(data: bytes) -> None:
    """Any bytes either parse or raise DecodeError (with or without the GGUF magic in front)."""
    for blob in (data, b"GGUF\x03\x00\x00\x00" + data):
        with contextlib.suppress(DecodeError):
            parse_gguf_bytes(blob)
