"""Inference: the engine interface, the two engines, and model residency.

Public surface (everything else is private to the package)::

    ModelSpec ──load_model()──> LoadedModel            (base.py: the interface and its value types)
                                 ├── LlamaModel         (llama.py: GGUF via llama-cpp-python, continuous batching
                                 │                       behind an AdmissionQueue: scheduler.py)
                                 └── OnnxModel          (onnx.py: ONNX via onnxruntime)
    ModelPool.use(spec) ──> LoadedModel                (residency.py: load on first use, LRU under a budget)

Errors come from :mod:`agent.errors`: ``BadRequestError`` (invalid input or an unsupported capability),
``EngineLoadError``, ``MemoryBudgetError``, ``InferenceError``, ``OverloadedError`` (admission queue full),
``DeadlineExceededError`` (a request's deadline passed).

Engine modules are imported only when a model of their format is loaded, so importing this package never
loads a native inference library.
"""

from __future__ import annotations

from agent.errors import EngineLoadError
from agent.inference.base import (
    CAPABILITIES,
    MAX_STOP_STRINGS,
    PRIORITIES,
    Admission,
    ChatMessage,
    EmbeddingResult,
    Finished,
    FinishReason,
    GenerationEvent,
    LoadedModel,
    LoadStats,
    ModelFormat,
    ModelSpec,
    Priority,
    QueueKind,
    SamplingParams,
    TensorSpec,
    TextDelta,
    Usage,
    resolve_threads,
)
from agent.inference.residency import LoadedInfo, ModelPool

__all__ = [
    "CAPABILITIES",
    "MAX_STOP_STRINGS",
    "PRIORITIES",
    "Admission",
    "ChatMessage",
    "EmbeddingResult",
    "FinishReason",
    "Finished",
    "GenerationEvent",
    "LoadStats",
    "LoadedInfo",
    "LoadedModel",
    "ModelFormat",
    "ModelPool",
    "ModelSpec",
    "Priority",
    "QueueKind",
    "SamplingParams",
    "TensorSpec",
    "TextDelta",
    "Usage",
    "load_model",
    "resolve_threads",
]


def load_model(spec: ModelSpec) -> LoadedModel:
    """Open ``spec`` with the engine for its format. Blocking: call it in a thread (the pool does).

    Raises:
        EngineLoadError: unknown format, missing file, wrong size, or the engine refused the file.
    """
    if spec.format == "gguf":
        from agent.inference.llama import LlamaModel

        return LlamaModel.load(spec)
    if spec.format == "onnx":
        from agent.inference.onnx import OnnxModel

        return OnnxModel.load(spec)
    raise EngineLoadError(f"model {spec.name!r}: no engine for format {spec.format!r}")
