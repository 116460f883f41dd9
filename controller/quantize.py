"""Quantize model files: GGUF through llama.cpp's quantizer, ONNX through onnxruntime's dynamic int8 quantizer.

Native libraries: this module and :mod:`controller.evaluate` are the only controller modules that import
``llama_cpp`` (both lazily, inside functions, so ``edge-fleet --help`` never loads a native library); this
module is the only one that imports ``onnxruntime`` (and ``onnx``, which onnxruntime's quantizer needs).

GGUF (:func:`quantize_gguf`), invariants:

* The source header is validated by :mod:`protocols.gguf` before llama.cpp opens the file, and the output's
  header after it is written; the output must declare the requested ``general.file_type``.
* A source whose weight matrices are already quantized (anything but F32/F16/BF16) is refused unless
  ``allow_requantize`` is set: requantizing compounds two rounding errors, so the result is worse than the same
  type made from the F16 original.
* The output appears atomically: llama.cpp writes ``.NAME.partial`` next to it, which is validated and then
  renamed; a failure or an interrupt leaves no output behind (the partial file is removed).
* llama.cpp's log is process-global; it is captured while a quantization runs (one at a time, under a lock):
  the ``[ i/ N]`` lines drive the progress callback and error lines are quoted in :class:`QuantizeError`.

ONNX (:func:`quantize_onnx`), ``int8`` only: onnxruntime's ``quantize_dynamic`` (int8 weights, activations
quantized at run time). Two preparation steps make it useful on real exports:

1. onnxruntime's *basic* graph optimisation (constant folding only; no hardware-specific fusions, so the
   result is portable) turns weights computed from ``Constant`` nodes (PyTorch exports, e.g. silero-vad's LSTM
   weights) into initializers the quantizer can see;
2. only the operator types onnxruntime recommends for *dynamic* quantization are quantized by default
   (:data:`ONNX_DYNAMIC_OPS`: MatMul, Gemm, LSTM, GRU, Attention); ``Conv`` is opt-in (``op_types``), because
   dynamic activation quantization of convolutions is lossy (on silero-vad it moves the speech probability by up
   to 0.7; onnxruntime's docs recommend static quantization for CNNs).

Subgraphs (``If``/``Loop`` bodies) are quantized too.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from controller.errors import ModelFileError, ModelToolError, QuantizeError
from protocols.errors import DecodeError
from protocols.gguf import FILE_TYPE_NAMES, GgmlType, GgufInfo, parse_gguf

__all__ = [
    "GGUF_TARGETS",
    "ONNX_DYNAMIC_OPS",
    "ONNX_TARGETS",
    "QuantizeResult",
    "is_quantized",
    "output_path",
    "quantize_gguf",
    "quantize_onnx",
    "read_gguf",
]

GGUF_TARGETS: Final[dict[str, int]] = {
    # name (lower case, as on the command line) -> llama.cpp ``enum llama_ftype`` (LLAMA_FTYPE_MOSTLY_*)
    "f32": 0,
    "f16": 1,
    "q4_0": 2,
    "q4_1": 3,
    "q8_0": 7,
    "q5_0": 8,
    "q5_1": 9,
    "q2_k": 10,
    "q3_k_s": 11,
    "q3_k_m": 12,
    "q3_k_l": 13,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_s": 16,
    "q5_k_m": 17,
    "q6_k": 18,
    "iq4_nl": 25,
    "iq4_xs": 30,
    "bf16": 32,
}
"""Targets that need no importance matrix. The values equal ``llama_cpp.LLAMA_FTYPE_*`` (checked on use)."""

ONNX_TARGETS: Final = ("int8",)
ONNX_DYNAMIC_OPS: Final = ("MatMul", "Gemm", "LSTM", "GRU", "Attention")
_FLOAT_TYPES: Final = frozenset({GgmlType.F32, GgmlType.F16, GgmlType.BF16})
_PROGRESS_RE: Final = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\]")
_QUANT_SUFFIX_RE: Final = re.compile(
    r"[.\-_](f32|f16|bf16|q\d(_[0-9a-z]+)*|iq\d(_[a-z]+)*|tq\d_\d|int8|fp32|fp16)$", re.IGNORECASE
)
_GGML_LOG_LEVEL_ERROR: Final = 3

Progress = Callable[[int, int], None]
"""``progress(done, total)``: tensors written so far out of the total."""


@dataclass(frozen=True, slots=True)
class QuantizeResult:
    """One quantized file."""

    source: Path
    output: Path
    target: str
    source_bytes: int
    output_bytes: int
    seconds: float


def read_gguf(path: Path) -> GgufInfo:
    """Validate a GGUF file's header (:mod:`protocols.gguf`) and return it.

    Raises:
        ModelFileError: unreadable, truncated or not a valid GGUF (the message names the field and offset).
    """
    try:
        with path.open("rb") as f:
            return parse_gguf(f)
    except DecodeError as exc:
        raise ModelFileError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from exc


def is_quantized(info: GgufInfo) -> bool:
    """Whether any weight matrix (a tensor of two or more dimensions) is stored in a quantized type."""
    return any(len(t.dims) >= 2 and t.ggml_type not in _FLOAT_TYPES for t in info.tensors)


def output_path(source: Path, target: str, out_dir: Path | None = None) -> Path:
    """``DIR/STEM.TARGET.EXT`` where STEM is the source's name without a quantization suffix.

    ``SmolLM2-135M-Instruct.Q4_1.gguf`` → ``SmolLM2-135M-Instruct.Q4_0.gguf``; ``silero_vad.onnx`` →
    ``silero_vad.int8.onnx``. GGUF targets are upper-cased (llama.cpp's convention), ONNX ones are not.
    """
    stem = _QUANT_SUFFIX_RE.sub("", source.stem) or source.stem
    tag = target if source.suffix.lower() == ".onnx" else target.upper()
    return (out_dir or source.parent) / f"{stem}.{tag}{source.suffix}"


# --- llama.cpp's log ----------------------------------------------------------------------------------------

_log_lock = threading.Lock()
_log_sink: Callable[[int, str], None] | None = None
_log_callback: Any = None


def _install_log_callback() -> None:
    """Point llama.cpp's process-global log at :data:`_log_sink`.

    Installed on every capture, not once: another library in the process (a test, an embedding host) may
    have installed its own callback since.
    """
    global _log_callback
    import llama_cpp

    if _log_callback is None:

        @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
        def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            sink = _log_sink
            if sink is not None and text:
                sink(level, text.decode("utf-8", "replace"))

        _log_callback = on_log  # keep a reference: llama.cpp holds only the raw pointer
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def captured_llama_log(sink: Callable[[int, str], None]) -> Iterator[None]:
    """Send llama.cpp's log to ``sink(level, text)`` for the duration (one capture at a time, process-wide)."""
    global _log_sink
    with _log_lock:
        _install_log_callback()
        _log_sink = sink
        try:
            yield
        finally:
            _log_sink = None


# --- GGUF ---------------------------------------------------------------------------------------------------


def quantize_gguf(
    source: Path,
    target: str,
    output: Path,
    *,
    allow_requantize: bool = False,
    threads: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> QuantizeResult:
    """Quantize a GGUF file with ``llama_model_quantize``. Blocking (one native call): run it in a thread.

    Args:
        source: the GGUF to read (validated first).
        target: a key of :data:`GGUF_TARGETS` (case-insensitive).
        output: where the result goes (atomically).
        allow_requantize: accept a source whose weights are already quantized (loses quality).
        threads: quantization threads; 0 = every hardware thread.
        overwrite: replace an existing output instead of refusing.
        progress: called with (tensors done, tensors total) as llama.cpp logs each tensor.

    Raises:
        ModelFileError: the source (or the output llama.cpp wrote) is not a valid GGUF.
        QuantizeError: unknown target, already-quantized source without ``allow_requantize``, an existing
            output without ``overwrite``, or llama.cpp failed.
    """
    import time

    import llama_cpp

    name = target.lower()
    if name not in GGUF_TARGETS:
        raise QuantizeError(f"unknown GGUF target {target!r}; choose from {', '.join(GGUF_TARGETS)}")
    ftype = GGUF_TARGETS[name]
    expected = getattr(llama_cpp, f"LLAMA_FTYPE_{'ALL' if name == 'f32' else 'MOSTLY'}_{name.upper()}", None)
    if expected != ftype:  # the table above drifted from the installed llama.cpp
        raise QuantizeError(f"llama-cpp-python has no LLAMA_FTYPE for {name} = {ftype} (found {expected})")
    info = read_gguf(source)
    if info.tensor_count == 0:
        raise ModelFileError(f"{source}: the GGUF has no tensors (a vocabulary-only file cannot be quantized)")
    if is_quantized(info) and not allow_requantize:
        raise QuantizeError(
            f"{source} is already quantized ({info.quant}): requantizing it to {name} loses quality compared "
            "with quantizing the F16/F32 original; pass --allow-requantize to do it anyway"
        )
    _check_output(source, output, overwrite)
    partial = output.with_name(f".{output.name}.partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = allow_requantize
    params.nthread = threads
    errors: list[str] = []

    def on_log(level: int, text: str) -> None:
        if level == _GGML_LOG_LEVEL_ERROR and text.strip():
            errors.append(text.strip())
        match = _PROGRESS_RE.search(text)
        if match and progress is not None:
            progress(int(match.group(1)), int(match.group(2)))

    started = time.monotonic()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with captured_llama_log(on_log):
            status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
        if status != 0:
            detail = " | ".join(line for line in errors if "=====" not in line)[-500:] or f"status {status}"
            raise QuantizeError(f"llama.cpp could not quantize {source} to {name}: {detail}")
        result = read_gguf(partial)
        if result.file_type != ftype:
            found = FILE_TYPE_NAMES.get(result.file_type or -1, result.file_type)
            raise QuantizeError(f"llama.cpp wrote {found} instead of {name.upper()} for {source}")
        _fsync_file(partial)
        os.replace(partial, output)
        _fsync_dir(output.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return QuantizeResult(
        source=source,
        output=output,
        target=name,
        source_bytes=info.file_size,
        output_bytes=result.file_size,
        seconds=time.monotonic() - started,
    )


# --- ONNX ---------------------------------------------------------------------------------------------------


def quantize_onnx(
    source: Path,
    target: str,
    output: Path,
    *,
    op_types: Sequence[str] = ONNX_DYNAMIC_OPS,
    overwrite: bool = False,
) -> QuantizeResult:
    """Quantize an ONNX model's weights to int8 with onnxruntime's ``quantize_dynamic`` (see the module doc).

    Args:
        source: the ONNX model (checked with ``onnx.checker`` first).
        target: ``int8``.
        output: where the result goes (atomically); it must load in onnxruntime.
        op_types: operator types to quantize (add ``Conv`` to quantize convolutions too).
        overwrite: replace an existing output instead of refusing.

    Raises:
        ModelFileError: the source is not a valid ONNX model.
        QuantizeError: unknown target, an existing output without ``overwrite``, or onnxruntime failed.
        ModelToolError: the ``onnx`` package (which onnxruntime's quantizer needs) is not installed.
    """
    import time

    if target.lower() not in ONNX_TARGETS:
        raise QuantizeError(f"unknown ONNX target {target!r}; choose from {', '.join(ONNX_TARGETS)}")
    try:
        import onnx
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise ModelToolError(
            f"ONNX quantization needs the 'onnx' package ({exc}); install it next to edgefleet"
        ) from exc
    try:
        onnx.checker.check_model(str(source))
    except Exception as exc:  # ValidationError, OSError, protobuf's DecodeError (no stable import path)
        raise ModelFileError(f"{source} is not a valid ONNX model: {_first_line(exc)}") from exc
    _check_output(source, output, overwrite)
    partial = output.with_name(f".{output.name}.partial")
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="edgefleet-onnx-") as tmp:
            folded = Path(tmp) / "folded.onnx"
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            options.optimized_model_filepath = str(folded)
            options.log_severity_level = 3
            ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
            with _quiet_root_logger():
                quantize_dynamic(
                    str(folded),
                    str(partial),
                    weight_type=QuantType.QInt8,
                    op_types_to_quantize=list(op_types),
                    extra_options={"EnableSubgraph": True},
                )
        ort.InferenceSession(str(partial), providers=["CPUExecutionProvider"])  # the result must load
        _fsync_file(partial)
        os.replace(partial, output)
        _fsync_dir(output.parent)
    except ModelToolError:
        partial.unlink(missing_ok=True)
        raise
    except Exception as exc:  # onnxruntime raises its own (unexported) exception types
        partial.unlink(missing_ok=True)
        raise QuantizeError(f"onnxruntime could not quantize {source}: {_first_line(exc)}") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return QuantizeResult(
        source=source,
        output=output,
        target="int8",
        source_bytes=source.stat().st_size,
        output_bytes=output.stat().st_size,
        seconds=time.monotonic() - started,
    )


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantizer warns through the root logger ("consider pre-processing"): silence that."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# --- helpers ------------------------------------------------------------------------------------------------


def _check_output(source: Path, output: Path, overwrite: bool) -> None:
    if output.resolve() == source.resolve():
        raise QuantizeError(f"the output {output} would overwrite the source")
    if output.exists() and not overwrite:
        raise QuantizeError(f"{output} exists; pass --force to replace it")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
