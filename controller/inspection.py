"""Describe a model file: what ``edge-fleet model inspect`` prints, and what ``model compare`` builds on.

GGUF files are described from their header alone (:mod:`protocols.gguf`; no tensor data is read): format,
architecture, parameters, quantization with a per-tensor type histogram (tensor count and bytes per ggml
type), context length, chat template, vocabulary size, file size, and the memory estimate of
:mod:`protocols.memory` at a given context and slot count, for the CPU of *this* machine (the llama.cpp CPU
backend repacks some tensor types depending on CPU features; :func:`local_cpu` reads them).

ONNX files: the ``onnx`` package is used when it is installed (it is a dev dependency today, and onnxruntime's
quantizer needs it anyway): inputs and outputs, opsets, IR version, producer, initializer count and bytes by
data type (weights stored in ``Constant`` nodes included, subgraphs included), operator histogram, and whether
the graph is dynamically quantized. Without ``onnx``, onnxruntime's session metadata gives the inputs, outputs
and producer only; the fields it cannot know are ``None`` and ``notes`` says why.

Invariant: a corrupt, truncated or foreign file raises :class:`~controller.errors.ModelFileError` with a
one-line reason (never another exception type).
"""

from __future__ import annotations

import collections
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from controller.errors import ModelFileError
from protocols.errors import DecodeError
from protocols.gguf import GGML_TYPES, GGUF_MAGIC, GgmlType, GgufInfo, parse_gguf
from protocols.memory import MemoryEstimate, ModelShape, estimate_memory, repack_types, repacked_bytes

__all__ = [
    "GgufDescription",
    "OnnxDescription",
    "describe",
    "describe_gguf",
    "describe_onnx",
    "detect_format",
    "local_cpu",
]

_QUANTIZED_ONNX_OPS: Final = frozenset(
    {"DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeLSTM", "QLinearMatMul", "QLinearConv"}
)


@dataclass(frozen=True, slots=True)
class GgufDescription:
    """What ``model inspect`` reports for a GGUF file."""

    path: str
    file_size: int
    gguf_version: int
    architecture: str
    name: str | None
    parameters: int
    quant: str
    tensor_types: dict[str, dict[str, int]]
    """ggml type name → {"tensors": count, "bytes": bytes}."""
    context_length: int | None
    chat_template: bool
    vocab_size: int | None
    memory: MemoryEstimate | None
    memory_error: str | None = None
    format: str = "gguf"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the memory estimate as its terms and total)."""
        out = {name: getattr(self, name) for name in self.__slots__}
        out["memory"] = self.memory.to_dict() if self.memory is not None else None
        return out


@dataclass(frozen=True, slots=True)
class OnnxDescription:
    """What ``model inspect`` reports for an ONNX file."""

    path: str
    file_size: int
    producer: str | None
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    ir_version: int | None
    opsets: dict[str, int] | None
    initializers: int | None
    initializer_bytes: dict[str, int] | None
    """ONNX data type name → bytes of weights of that type."""
    op_histogram: dict[str, int] | None
    quant: str | None
    notes: list[str] = field(default_factory=list)
    format: str = "onnx"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return {name: getattr(self, name) for name in self.__slots__}


def local_cpu() -> tuple[str, frozenset[str]]:
    """This machine's architecture and CPU feature flags (``/proc/cpuinfo`` names; best effort elsewhere)."""
    arch = platform.machine().lower()
    flags: set[str] = set()
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key.strip().lower() in ("flags", "features"):
                        flags.update(value.split())
                        break
        except OSError:
            pass
    elif sys.platform == "darwin" and arch == "arm64":
        flags.add("asimddp")  # every Apple Silicon CPU has the dot-product extension
    return arch, frozenset(flags)


def detect_format(path: Path) -> str:
    """``gguf`` or ``onnx``, from the first bytes (then the extension).

    Raises:
        ModelFileError: unreadable, empty, or neither format.
    """
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if head == GGUF_MAGIC:
        return "gguf"
    if not head:
        raise ModelFileError(f"{path} is empty")
    if path.suffix.lower() == ".gguf":
        raise ModelFileError(f"{path}: invalid GGUF: expected magic b'GGUF', found {head!r}")
    if path.suffix.lower() == ".onnx" or head[:1] == b"\x08":  # ModelProto starts with ir_version (field 1)
        return "onnx"
    raise ModelFileError(f"{path}: unknown model format (neither GGUF nor ONNX; starts with {head!r})")


def describe(
    path: Path, *, n_ctx: int = 2048, n_slots: int = 1, flash_attn: bool = True
) -> GgufDescription | OnnxDescription:
    """Describe a GGUF or ONNX file (format detected from its first bytes).

    Raises:
        ModelFileError: unreadable, corrupt or neither format.
    """
    if detect_format(path) == "gguf":
        return describe_gguf(path, n_ctx=n_ctx, n_slots=n_slots, flash_attn=flash_attn)
    return describe_onnx(path)


def _read_gguf(path: Path) -> GgufInfo:
    try:
        with path.open("rb") as f:
            return parse_gguf(f)
    except DecodeError as exc:
        raise ModelFileError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from exc


def describe_gguf(
    path: Path,
    *,
    n_ctx: int = 2048,
    n_slots: int = 1,
    flash_attn: bool = True,
    cpu: tuple[str, frozenset[str]] | None = None,
) -> GgufDescription:
    """Describe a GGUF file from its validated header, with a memory estimate at ``n_ctx`` × ``n_slots``.

    Args:
        path: the file.
        n_ctx: context per slot for the estimate.
        n_slots: parallel sequences for the estimate.
        flash_attn: estimate for llama.cpp with flash attention on (its CPU default) or off.
        cpu: (arch, flags) of the machine to estimate for; this machine's by default.

    Raises:
        ModelFileError: unreadable, truncated or not a valid GGUF.
    """
    info = _read_gguf(path)
    histogram: dict[str, dict[str, int]] = {}
    for tensor in sorted(info.tensors, key=lambda t: t.ggml_type.name):
        entry = histogram.setdefault(tensor.ggml_type.name, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += tensor.n_bytes
    memory: MemoryEstimate | None = None
    memory_error: str | None = None
    arch, flags = cpu or local_cpu()
    try:
        memory = estimate_memory(
            ModelShape.from_gguf(info),
            info.file_size,
            n_ctx=n_ctx,
            n_slots=n_slots,
            flash_attn=flash_attn,
            repack_bytes=repacked_bytes(info, repack_types(arch, flags)),
        )
    except DecodeError as exc:
        memory_error = str(exc)
    return GgufDescription(
        path=str(path),
        file_size=info.file_size,
        gguf_version=info.version,
        architecture=info.architecture,
        name=info.name,
        parameters=info.parameter_count,
        quant=info.quant,
        tensor_types=histogram,
        context_length=info.context_length,
        chat_template=info.has_chat_template,
        vocab_size=info.vocab_size,
        memory=memory,
        memory_error=memory_error,
    )


def bits_per_weight(description: GgufDescription) -> float:
    """Average stored bits per parameter (tensor data only)."""
    data = sum(entry["bytes"] for entry in description.tensor_types.values())
    return 8 * data / description.parameters if description.parameters else 0.0


def ggml_block_bits(type_name: str) -> float:
    """Bits per weight of one ggml type (e.g. 4.5 for Q4_0)."""
    block, size = GGML_TYPES[GgmlType[type_name]]
    return 8 * size / block


# --- ONNX ---------------------------------------------------------------------------------------------------


def describe_onnx(path: Path) -> OnnxDescription:
    """Describe an ONNX model (with the ``onnx`` package if installed, else onnxruntime's session metadata).

    Raises:
        ModelFileError: unreadable or not a valid ONNX model.
    """
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        import onnx
    except ImportError:
        return _describe_onnx_with_onnxruntime(path, size)
    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf's DecodeError, onnx's ValidationError, OSError: all mean "not ONNX"
        raise ModelFileError(f"{path} is not a valid ONNX model: {_first_line(exc)}") from exc
    ops: collections.Counter[str] = collections.Counter()
    weights: collections.Counter[str] = collections.Counter()
    count = 0

    def tensor_bytes(tensor: Any) -> int:
        if tensor.raw_data:
            return len(tensor.raw_data)
        n = 1
        for d in tensor.dims:
            n *= d
        return n * _onnx_itemsize(onnx, tensor.data_type)

    def walk(graph: Any) -> None:
        nonlocal count
        for init in graph.initializer:
            count += 1
            weights[onnx.TensorProto.DataType.Name(init.data_type)] += tensor_bytes(init)
        for node in graph.node:
            ops[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and node.op_type == "Constant":
                    count += 1
                    weights[onnx.TensorProto.DataType.Name(attr.t.data_type)] += tensor_bytes(attr.t)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(model.graph)
    if ops.keys() & _QUANTIZED_ONNX_OPS:
        quant = "int8 (dynamic)"
    elif weights:
        quant = {"FLOAT": "fp32", "FLOAT16": "fp16", "BFLOAT16": "bf16"}.get(weights.most_common(1)[0][0], "other")
    else:
        quant = None
    return OnnxDescription(
        path=str(path),
        file_size=size,
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p) or None,
        inputs=[_value_info(onnx, v) for v in model.graph.input],
        outputs=[_value_info(onnx, v) for v in model.graph.output],
        ir_version=int(model.ir_version),
        opsets={(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        initializers=count,
        initializer_bytes=dict(weights.most_common()),
        op_histogram=dict(ops.most_common()),
        quant=quant,
    )


def _onnx_itemsize(onnx: Any, data_type: int) -> int:
    try:
        return int(onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize)
    except (KeyError, TypeError, ValueError):
        return 0


def _value_info(onnx: Any, value: Any) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape: list[int | str | None] = []
    for dim in tensor.shape.dim:
        shape.append(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None))
    dtype = onnx.TensorProto.DataType.Name(tensor.elem_type).lower() if tensor.elem_type else None
    return {"name": value.name, "dtype": dtype, "shape": shape}


def _describe_onnx_with_onnxruntime(path: Path, size: int) -> OnnxDescription:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's exception types are not importable in a stable way
        raise ModelFileError(f"{path} is not a valid ONNX model: {_first_line(exc)}") from exc
    meta = session.get_modelmeta()

    def info(values: Any) -> list[dict[str, Any]]:
        return [{"name": v.name, "dtype": v.type, "shape": list(v.shape)} for v in values]

    return OnnxDescription(
        path=str(path),
        file_size=size,
        producer=meta.producer_name or None,
        inputs=info(session.get_inputs()),
        outputs=info(session.get_outputs()),
        ir_version=None,
        opsets=None,
        initializers=None,
        initializer_bytes=None,
        op_histogram=None,
        quant=None,
        notes=["install the 'onnx' package for opsets, weights and the operator histogram"],
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
