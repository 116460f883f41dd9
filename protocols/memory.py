"""How much memory a GGUF model needs to run: pure arithmetic over its header, shared by both sides.

The controller's variant choice (pick the best variant whose estimate fits a device's budget) and
``edge-fleet model inspect`` use :func:`estimate_memory`; the estimate is validated against the measured peak
resident memory of llama.cpp running each SmolLM2 variant (``tests/component/test_model_tooling.py``: within
25 %).

The model, term by term (bytes)::

    total = weights + repack + runtime + kv_cache + compute

    weights  = the file's size                     mmap'd; every page is touched by the first forward pass
    repack   = bytes of the weight matrices llama.cpp's CPU backend copies into an interleaved layout
               for faster kernels (e.g. Q4_0 on AVX2, Q8_0 on ARM with dotprod; :func:`repack_types`); the
               mmap'd originals stay resident too, so these bytes count twice (measured: +57 MiB for
               SmolLM2 Q4_0 on AVX2)
    runtime  = n_vocab × 320 + 4 MiB               vocabulary tables, token-piece cache, context and graph
                                                   bookkeeping (measured: 17.8 MiB for SmolLM2's 49 152 tokens)
    kv_cache = n_layer × n_ctx × n_slots × n_head_kv × (head_dim_k + head_dim_v) × bytes_per_element (f16: 2)
                                                   allocated and cleared when the context is created
    compute  = 4 MiB + n_ubatch × (4 × (4 × n_embd + 3 × n_ff) + mask + scores)
               mask   = n_kv × 2 (f16) with flash attention, n_kv × 4 (f32) without
               scores = 0 with flash attention, n_kv × n_head × 4 × 4/3 without (K·Q and its softmax)
               n_kv   = n_ctx × n_slots            (one KV cache shared by every slot)

The compute term is the *touched* part of llama.cpp's compute buffer while a server decodes prompts in
ubatches and samples from the last position only. llama.cpp reserves more address space than that (the worst
case also holds a logits row per ubatch token, e.g. 96 MiB for SmolLM2 at ``n_ubatch`` 512), but pages never
written are never resident. Its coefficients were fitted on llama.cpp as vendored by llama-cpp-python 0.3.36
(CPU backend): with flash attention the formula gives 18.6 / 19.8 / 26.1 MiB for SmolLM2 at n_ctx 512 / 2048 /
8192 against 18.1 / 19.8 / 26.3 MiB measured. Every other term is exact or within a few MiB.

Invariants: pure (no I/O, stdlib only); every input is validated (:class:`~protocols.errors.DecodeError`
when a header lacks the hyperparameters, ``ValueError`` for a non-positive context or slot count); the result
is monotonic in ``n_ctx``, ``n_slots`` and the file size.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Final

from protocols.errors import DecodeError
from protocols.gguf import GgmlType, GgufArraySummary, GgufInfo, MetadataValue

__all__ = [
    "DEFAULT_N_UBATCH",
    "MemoryEstimate",
    "ModelShape",
    "estimate_memory",
    "kv_cache_bytes",
    "repack_types",
    "repacked_bytes",
]

MiB: Final = 1 << 20
DEFAULT_N_UBATCH: Final = 512
"""llama.cpp's default physical batch (tokens decoded per native call)."""
KV_F16_BYTES: Final = 2
_RUNTIME_FIXED: Final = 4 * MiB
_RUNTIME_PER_VOCAB_TOKEN: Final = 320
_COMPUTE_FIXED: Final = 4 * MiB
_T = GgmlType
_REPACK_RULES: Final[dict[str, tuple[tuple[str, frozenset[GgmlType]], ...]]] = {
    # ggml-cpu/repack.cpp (ggml_repack_get_optimal_repack_type): (CPU flag, tensor types it repacks)
    "x86_64": (
        ("avx2", frozenset({_T.Q4_0, _T.Q4_K, _T.IQ4_NL, _T.MXFP4})),
        ("avx512f", frozenset({_T.Q2_K})),
    ),
    "aarch64": (
        ("asimddp", frozenset({_T.Q4_0, _T.Q4_K, _T.Q5_K, _T.Q6_K, _T.IQ4_NL, _T.MXFP4, _T.Q8_0})),
        ("i8mm", frozenset({_T.Q4_0, _T.Q4_K, _T.Q5_K, _T.Q6_K, _T.Q8_0})),
    ),
}
_ARCH_ALIASES: Final = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}
_NOT_REPACKED: Final = frozenset({"token_embd.weight"})
"""Input-layer tensors are read with GET_ROWS, which the repacked layouts do not support."""


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The hyperparameters of a transformer that decide its runtime memory.

    Attributes:
        n_layer: transformer blocks.
        n_embd: embedding width.
        n_head: attention (query) heads.
        n_head_kv: key/value heads (fewer than ``n_head`` with grouped-query attention).
        head_dim_k: width of one key head.
        head_dim_v: width of one value head.
        n_ff: feed-forward width.
        n_vocab: vocabulary size.
    """

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_vocab: int

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DecodeError(f"model shape: {name} must be a positive integer, got {value!r}")

    @classmethod
    def from_gguf(cls, info: GgufInfo) -> ModelShape:
        """Read the shape from a GGUF header's ``{architecture}.*`` keys (llama.cpp's names).

        Per-layer arrays (``head_count_kv`` or ``feed_forward_length`` as arrays, as some hybrid models have)
        count with their largest entry, which keeps the estimate an upper bound.

        Raises:
            DecodeError: a key the estimate needs is missing or not a positive integer.
        """
        arch = info.architecture
        meta = info.metadata

        def need(key: str) -> int:
            value = _positive(meta, f"{arch}.{key}")
            if value is None:
                raise DecodeError(f"GGUF: cannot estimate memory: {arch}.{key} is missing or not a positive integer")
            return value

        n_embd = need("embedding_length")
        n_head = need("attention.head_count")
        n_head_kv = _positive(meta, f"{arch}.attention.head_count_kv") or n_head
        head_dim = n_embd // n_head
        n_vocab = info.vocab_size or _positive(meta, f"{arch}.vocab_size")
        if not n_vocab:
            raise DecodeError("GGUF: cannot estimate memory: the vocabulary size is unknown")
        return cls(
            n_layer=need("block_count"),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim_k=_positive(meta, f"{arch}.attention.key_length") or head_dim,
            head_dim_v=_positive(meta, f"{arch}.attention.value_length") or head_dim,
            n_ff=_positive(meta, f"{arch}.feed_forward_length") or 4 * n_embd,
            n_vocab=n_vocab,
        )


def _positive(meta: Mapping[str, MetadataValue], key: str) -> int | None:
    value = meta.get(key)
    if isinstance(value, list):
        ints = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
        value = max(ints) if ints else None
    if isinstance(value, GgufArraySummary | bool) or not isinstance(value, int):
        return None
    return value if value > 0 else None


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """An estimate of the resident memory needed to serve a model, term by term (bytes)."""

    weights_bytes: int
    repack_bytes: int
    runtime_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    n_ctx: int
    n_slots: int
    n_ubatch: int
    flash_attn: bool

    @property
    def total_bytes(self) -> int:
        """The sum of every term."""
        return self.weights_bytes + self.repack_bytes + self.runtime_bytes + self.kv_cache_bytes + self.compute_bytes

    def to_dict(self) -> dict[str, int | bool]:
        """A JSON-able dict of every term and the total."""
        return {**asdict(self), "total_bytes": self.total_bytes}


def repack_types(arch: str, cpu_flags: Iterable[str]) -> frozenset[GgmlType]:
    """Tensor types llama.cpp's CPU backend repacks on a CPU of ``arch`` with ``cpu_flags``.

    Args:
        arch: ``x86_64``/``amd64`` or ``aarch64``/``arm64`` (others repack nothing we model).
        cpu_flags: the CPU's feature flags as Linux's ``/proc/cpuinfo`` names them (``avx2``, ``avx512f``,
            ``asimddp`` for the dot-product extension, ``i8mm``).
    """
    flags = {flag.lower() for flag in cpu_flags}
    rules = _REPACK_RULES.get(_ARCH_ALIASES.get(arch.lower(), arch.lower()), ())
    types: set[GgmlType] = set()
    for flag, kinds in rules:
        if flag in flags:
            types |= kinds
    return frozenset(types)


def repacked_bytes(info: GgufInfo, types: Iterable[GgmlType]) -> int:
    """Bytes of the weight matrices of ``info`` whose type is in ``types`` (see :func:`repack_types`)."""
    kinds = frozenset(types)
    return sum(
        t.n_bytes for t in info.tensors if len(t.dims) >= 2 and t.ggml_type in kinds and t.name not in _NOT_REPACKED
    )


def kv_cache_bytes(shape: ModelShape, n_ctx: int, n_slots: int = 1, bytes_per_element: int = KV_F16_BYTES) -> int:
    """Bytes of the K and V caches for ``n_slots`` sequences of ``n_ctx`` tokens each.

    ``n_layer × n_ctx × n_slots × n_head_kv × (head_dim_k + head_dim_v) × bytes_per_element``.
    """
    _check_counts(n_ctx, n_slots)
    return shape.n_layer * n_ctx * n_slots * shape.n_head_kv * (shape.head_dim_k + shape.head_dim_v) * bytes_per_element


def estimate_memory(
    shape: ModelShape,
    model_bytes: int,
    *,
    n_ctx: int,
    n_slots: int = 1,
    n_ubatch: int = DEFAULT_N_UBATCH,
    flash_attn: bool = True,
    repack_bytes: int = 0,
) -> MemoryEstimate:
    """Estimate the resident memory of serving a model (see the module docstring for each term).

    Args:
        shape: the model's hyperparameters (:meth:`ModelShape.from_gguf`).
        model_bytes: the GGUF file's size.
        n_ctx: context length per slot.
        n_slots: parallel sequences (each gets ``n_ctx`` cells of the KV cache).
        n_ubatch: tokens per native decode call (llama.cpp's ``n_ubatch``; capped at the total context).
        flash_attn: whether llama.cpp's flash attention is on (its default on CPU when supported).
        repack_bytes: :func:`repacked_bytes` for the CPU the model will run on (0 if unknown).

    Raises:
        ValueError: a non-positive context, slot count or ubatch; a negative size.
    """
    _check_counts(n_ctx, n_slots)
    if n_ubatch < 1 or model_bytes < 0 or repack_bytes < 0:
        raise ValueError("n_ubatch must be positive; model_bytes and repack_bytes non-negative")
    n_kv = n_ctx * n_slots
    ubatch = min(n_ubatch, n_kv)
    mask = n_kv * (2 if flash_attn else 4)
    scores = 0 if flash_attn else n_kv * shape.n_head * 4 * 4 // 3
    per_token = 4 * (4 * shape.n_embd + 3 * shape.n_ff) + mask + scores
    return MemoryEstimate(
        weights_bytes=model_bytes,
        repack_bytes=repack_bytes,
        runtime_bytes=_RUNTIME_FIXED + shape.n_vocab * _RUNTIME_PER_VOCAB_TOKEN,
        kv_cache_bytes=kv_cache_bytes(shape, n_ctx, n_slots),
        compute_bytes=_COMPUTE_FIXED + ubatch * per_token,
        n_ctx=n_ctx,
        n_slots=n_slots,
        n_ubatch=ubatch,
        flash_attn=flash_attn,
    )


def _check_counts(n_ctx: int, n_slots: int) -> None:
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(f"n_ctx must be a positive integer, got {n_ctx!r}")
    if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1:
        raise ValueError(f"n_slots must be a positive integer, got {n_slots!r}")
