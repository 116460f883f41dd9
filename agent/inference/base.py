"""The engine interface: what every inference engine offers, and the value types it speaks.

A *loaded model* (:class:`LoadedModel`) is one model file opened by one engine (``llama`` for GGUF,
``onnx`` for ONNX). The local API, the residency pool and the health check only ever see this interface;
engine modules are the only places that import a native library.

Invariants:

* Every blocking native call of an engine runs on that model's own worker thread, never on the event loop.
  The one exception is :meth:`LoadedModel.count_tokens`, a short read-only tokenizer call that is documented
  as safe to call from any thread.
* Requests to one model are admitted in arrival order within their priority class (:data:`Priority`:
  ``interactive`` before ``batch``); a request in flight is never interrupted by a later one. An engine may
  decode several admitted requests together (the llama engine's continuous batching); each still sees
  exactly the events below, and batching never changes a request's result.
* Admission is bounded (:class:`Admission` carries a request's priority and deadline) for every kind of work
  (generations, embeddings, tensor runs): a full queue raises :class:`~agent.errors.OverloadedError` and a
  passed deadline :class:`~agent.errors.DeadlineExceededError` (from the generation's iterator, or from
  ``embed``/``infer``). A request whose deadline passed or whose caller left is not started, and a multi-part
  one (an embeddings request of several texts) stops at its next part.
* A generation is an async iterator of :data:`GenerationEvent`: zero or more :class:`TextDelta`, then exactly
  one :class:`Finished`, then the iterator ends. Errors (bad input, prompt longer than the context, native
  failures) are raised *before* the first event when they depend only on the request, so a caller that
  awaits the first event before committing a response can still answer with an error status.
* Closing the iterator early (``aclose()``, or cancelling the task that iterates it, which is what a client
  disconnect does) stops the generation at the next token and frees the model for the next request. Use
  ``contextlib.aclosing`` so that this happens at once rather than when the iterator is garbage-collected.
* A capability a model lacks (see :attr:`LoadedModel.capabilities`) raises :class:`BadRequestError`.
* Value types are frozen and validate themselves; invalid sampling parameters raise
  :class:`BadRequestError` with a message naming the field.
"""

from __future__ import annotations

import abc
import ctypes
import functools
import math
import re
import sys
import threading
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, TypeAlias

import psutil

from agent.errors import BadRequestError, EngineLoadError

if TYPE_CHECKING:  # only tensor models' engine (ONNX) imports numpy: ~20 MiB the daemon otherwise does not carry
    import numpy as np

__all__ = [
    "CAPABILITIES",
    "PRIORITIES",
    "Admission",
    "MAX_STOP_STRINGS",
    "MAX_STOP_STRING_CHARS",
    "Capability",
    "ChatMessage",
    "EmbeddingResult",
    "FinishReason",
    "Finished",
    "GenerationEvent",
    "LoadStats",
    "LoadedModel",
    "ModelFormat",
    "ModelSpec",
    "Priority",
    "QueueKind",
    "SamplingParams",
    "TensorSpec",
    "TextDelta",
    "Usage",
    "check_model_file",
    "native_load_lock",
    "resident_bytes",
    "resolve_threads",
    "trim_heap",
]

ModelFormat: TypeAlias = Literal["gguf", "onnx"]
FinishReason: TypeAlias = Literal["stop", "length", "cancelled"]
Capability: TypeAlias = Literal["chat", "completion", "embedding", "tensor"]
QueueKind: TypeAlias = Literal["generation", "embeddings", "tensor"]
"""Which admission queue of a model: generations, embedding requests, or tensor (ONNX) runs."""
Priority: TypeAlias = Literal["interactive", "batch"]
"""Admission class of a generation request: ``interactive`` requests leave the queue before ``batch`` ones."""
PRIORITIES: Final[tuple[Priority, ...]] = ("interactive", "batch")

CAPABILITIES: Final[frozenset[str]] = frozenset({"chat", "completion", "embedding", "tensor"})
CHAT_ROLES: Final[frozenset[str]] = frozenset({"system", "user", "assistant", "tool"})
MAX_STOP_STRINGS: Final = 4
"""Most stop strings per request (OpenAI's limit)."""
MAX_STOP_STRING_CHARS: Final = 256
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_SEED_LIMIT: Final = 2**63


native_load_lock: Final = threading.Lock()
"""Held by every engine while it opens a model and measures the memory it took, process-wide: two loads never
disturb each other's measurement, and the llama engine's redirection of file descriptors 1 and 2 during a
load (as llama-cpp-python's ``verbose=False``) never interleaves with another one (which could leave stdout
pointing at ``/dev/null`` for good)."""


def resident_bytes() -> int:
    """The process's resident set size in bytes."""
    return int(psutil.Process().memory_info().rss)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    Engines call it before each resident-set measurement, so a load is charged what the model keeps rather
    than the parse buffers it freed, and after freeing a model, so its memory really leaves the process.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def resolve_threads(n_threads: int) -> int:
    """Return the thread count an engine uses: ``n_threads``, or the number of physical cores when it is 0.

    Args:
        n_threads: configured threads; 0 means "one per physical core".

    Returns:
        At least 1.
    """
    if n_threads > 0:
        return n_threads
    return max(1, psutil.cpu_count(logical=False) or psutil.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Everything an engine needs to open one model file (built by the registry from an active record).

    Attributes:
        name: model family, e.g. ``smollm2-135m-instruct``; the residency pool keys models by name.
        variant: e.g. ``q4_1`` or ``onnx-fp32``.
        path: the blob on disk.
        format: ``gguf`` (llama engine) or ``onnx`` (onnx engine).
        sha256: the blob's hash; a different hash for the same name is a different version.
        size: the blob's length in bytes; checked before the engine opens the file.
        n_ctx: context length per sequence (GGUF); the caller caps it at the model's trained context.
        n_threads: engine threads; 0 means one per physical core.
        n_parallel: parallel sequences (GGUF): the number of KV-cache slots decoded together.
        pinned: the residency pool never unloads a pinned model to make room.
        n_batch: most tokens decoded per native call (GGUF): one step's running tokens plus prompt chunks.
        max_queue: most generation requests waiting for a slot; more are refused (``OverloadedError``).
        max_queue_tokens: most prompt tokens waiting for a slot; more are refused (``OverloadedError``). Also
            bounds the tokens of the embedding requests waiting (a queue of their own).
        max_queue_bytes: most input bytes of tensor (ONNX) runs waiting; more are refused (``OverloadedError``).
    """

    name: str
    variant: str
    path: Path
    format: ModelFormat
    sha256: str
    size: int
    n_ctx: int
    n_threads: int
    n_parallel: int
    pinned: bool = False
    n_batch: int = 512
    max_queue: int = 64
    max_queue_tokens: int = 65536
    max_queue_bytes: int = 64 * 2**20

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ModelSpec.name must not be empty")
        if self.format not in ("gguf", "onnx"):
            raise ValueError(f"ModelSpec.format must be 'gguf' or 'onnx', not {self.format!r}")
        if not _SHA256_RE.fullmatch(self.sha256):
            raise ValueError("ModelSpec.sha256 must be 64 lowercase hex digits")
        if self.size < 0:
            raise ValueError("ModelSpec.size must not be negative")
        if self.n_ctx < 1 or self.n_parallel < 1 or self.n_batch < 1:
            raise ValueError("ModelSpec.n_ctx, n_parallel and n_batch must be at least 1")
        if self.n_threads < 0:
            raise ValueError("ModelSpec.n_threads must not be negative (0 = physical cores)")
        if self.max_queue < 1 or self.max_queue_tokens < 1 or self.max_queue_bytes < 1:
            raise ValueError("ModelSpec.max_queue, max_queue_tokens and max_queue_bytes must be at least 1")

    @property
    def threads(self) -> int:
        """The resolved thread count (:func:`resolve_threads` of :attr:`n_threads`)."""
        return resolve_threads(self.n_threads)


def check_model_file(spec: ModelSpec) -> None:
    """Check that ``spec.path`` is a regular file of ``spec.size`` bytes before an engine opens it.

    Raises:
        EngineLoadError: missing, not a regular file, or a different size (the blob was changed or truncated).
    """
    try:
        size = spec.path.stat().st_size
    except OSError as exc:
        raise EngineLoadError(f"model {spec.name!r}: cannot open {spec.path}: {exc.strerror}") from exc
    if not spec.path.is_file():
        raise EngineLoadError(f"model {spec.name!r}: {spec.path} is not a regular file")
    if size != spec.size:
        raise EngineLoadError(f"model {spec.name!r}: {spec.path} is {size} bytes, expected {spec.size}")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat turn."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in CHAT_ROLES:
            raise BadRequestError(f"message role must be one of {sorted(CHAT_ROLES)}, not {self.role!r}")
        if not isinstance(self.content, str):
            raise BadRequestError("message content must be a string")


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequestError(f"{name} must be a finite number")
    if not low <= value <= high:
        raise BadRequestError(f"{name} must be between {low} and {high}, got {value}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample a completion. Validated on construction.

    Attributes:
        max_tokens: most tokens to generate (at least 1); capped by the context left after the prompt,
            in which case the generation finishes with ``length``.
        temperature: 0 means greedy decoding (deterministic whatever the seed); 0 to 2.
        top_p: nucleus sampling, in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; 0 disables it.
        min_p: drop tokens less likely than ``min_p`` times the most likely one; 0 disables it.
        repeat_penalty: llama.cpp's repetition penalty over recent tokens; 1 disables it.
        presence_penalty: OpenAI's presence penalty, -2 to 2.
        frequency_penalty: OpenAI's frequency penalty, -2 to 2.
        seed: same seed, same parameters, same prompt → same completion; ``None`` = a fresh random seed.
        stop: up to :data:`MAX_STOP_STRINGS` strings; the completion ends before the first occurrence of any,
            which is not part of the output.
    """

    max_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise BadRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0.0:
            raise BadRequestError("top_p must be greater than 0")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise BadRequestError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("repeat_penalty", self.repeat_penalty, 0.0, 10.0)
        if self.repeat_penalty == 0.0:
            raise BadRequestError("repeat_penalty must be greater than 0")
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -_SEED_LIMIT <= self.seed < _SEED_LIMIT
        ):
            raise BadRequestError("seed must be a 64-bit integer or null")
        stop: object = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, tuple | list) or not all(isinstance(s, str) for s in stop):
            raise BadRequestError("stop must be a string or a list of strings")
        if len(stop) > MAX_STOP_STRINGS:
            raise BadRequestError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}")
        if any(not s or len(s) > MAX_STOP_STRING_CHARS for s in stop):
            raise BadRequestError(f"stop strings must be 1 to {MAX_STOP_STRING_CHARS} characters long")
        object.__setattr__(self, "stop", tuple(stop))


@dataclass(frozen=True, slots=True)
class Admission:
    """How the scheduler treats one inference request (generation, embeddings or tensor run; not how it is sampled).

    Attributes:
        priority: ``interactive`` (default) or ``batch``.
        timeout_s: the request's deadline, in seconds from the call; when it passes, the request ends with
            :class:`~agent.errors.DeadlineExceededError` whether it is still waiting or already running (a
            tensor run already started finishes on its thread, its result discarded). ``None``: no deadline.
        on_admitted: called on the event loop with the seconds the request waited for a slot, once it has one
            (for a time-in-queue metric).
    """

    priority: Priority = "interactive"
    timeout_s: float | None = None
    on_admitted: Callable[[float], None] | None = None

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise BadRequestError(f"priority must be one of {list(PRIORITIES)}, not {self.priority!r}")
        if self.timeout_s is not None:
            _check_range("timeout", self.timeout_s, 0.0, math.inf)
            if self.timeout_s <= 0:
                raise BadRequestError("timeout must be greater than 0")


@dataclass(frozen=True, slots=True)
class LoadStats:
    """A snapshot of one admission queue of a model and its slots (for ``/metrics`` and tests).

    Attributes:
        waiting: requests waiting for a slot (``waiting_interactive + waiting_batch``).
        waiting_tokens: their cost: prompt tokens (generation), tokens to embed (embeddings), input bytes
            (tensor runs).
        slots_busy: slots running a request (requests in flight).
        slots_total: requests the queue's engine runs at once (parallel sequences for generation, 1 otherwise).
        admitted_total: requests that got a slot since the model was loaded.
        rejected_total: requests refused because the queue was full.
        queue_seconds_total: seconds admitted requests spent waiting, summed.
    """

    waiting: int
    waiting_interactive: int
    waiting_batch: int
    waiting_tokens: int
    slots_busy: int
    slots_total: int
    admitted_total: int
    rejected_total: int
    queue_seconds_total: float


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class TextDelta:
    """The next piece of generated text (whole UTF-8 characters; never contains a stop string)."""

    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of a generation.

    ``finish_reason`` is ``stop`` (end-of-generation token or a stop string), ``length`` (``max_tokens`` or the
    context is exhausted) or ``cancelled`` (the model was closed while the request was queued or running).
    """

    finish_reason: FinishReason
    usage: Usage


GenerationEvent: TypeAlias = TextDelta | Finished
"""What a generation yields: ``TextDelta`` events, then one ``Finished``."""


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    """Embedding vectors, one per input text and in input order, each with unit L2 norm."""

    vectors: list[list[float]]
    prompt_tokens: int

    @property
    def dimensions(self) -> int:
        """Length of each vector (0 when there are none)."""
        return len(self.vectors[0]) if self.vectors else 0


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A named tensor a tensor model takes or returns.

    Attributes:
        name: the graph's input or output name.
        dtype: numpy dtype name (``float32``, ``int64``, …; ``object`` for strings).
        shape: one entry per dimension: a fixed size, or a symbolic name / ``None`` for a free dimension.
    """

    name: str
    dtype: str
    shape: tuple[int | str | None, ...] = field(default=())


class LoadedModel(abc.ABC):
    """One model opened by an engine. Subclasses implement the capabilities they list.

    ``memory_bytes`` is what the residency pool charges against its budget: the larger of the process's
    resident-set growth measured around the load (under :data:`native_load_lock`; the llama engine decodes one
    token first so that memory-mapped weights are paged in) and the engine's estimate (file size plus buffers
    such as the KV cache, whose pages become resident only as contexts fill up). It may grow later (the llama
    engine's embedding context is created on first use); the residency pool reads it live.
    """

    @property
    @abc.abstractmethod
    def spec(self) -> ModelSpec:
        """The spec this model was loaded from."""

    @property
    @abc.abstractmethod
    def memory_bytes(self) -> int:
        """Memory charged to this model (see the class docstring)."""

    @property
    @abc.abstractmethod
    def capabilities(self) -> frozenset[str]:
        """A subset of :data:`CAPABILITIES`."""

    def _unsupported(self, capability: str) -> BadRequestError:
        return BadRequestError(f"model {self.spec.name!r} does not support {capability}")

    def chat(
        self, messages: Sequence[ChatMessage], params: SamplingParams, admission: Admission | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Generate the assistant's next turn, formatted with the model's own chat template.

        Args:
            messages: the conversation so far (at least one message).
            params: sampling parameters.
            admission: priority and deadline (default: interactive, no deadline).

        Returns:
            An async generator of :class:`TextDelta` events then one :class:`Finished`; close it (``aclose()``,
            e.g. with ``contextlib.aclosing``) to stop early.

        Raises:
            BadRequestError: no chat capability, a template that rejects the messages, or a prompt that does
                not fit the context (raised before the first event).
            OverloadedError: the admission queue is full (raised before the first event).
            DeadlineExceededError: ``admission.timeout_s`` passed, while waiting or while generating.
            InferenceError: the engine failed.
        """
        raise self._unsupported("chat")

    def complete(
        self, prompt: str, params: SamplingParams, admission: Admission | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Continue raw text ``prompt`` (no template). Events and errors as for :meth:`chat`."""
        raise self._unsupported("completion")

    async def embed(self, texts: Sequence[str], admission: Admission | None = None) -> EmbeddingResult:
        """Embed each text into one unit-norm vector.

        Args:
            texts: at least one non-empty text.
            admission: priority and deadline (default: interactive, no deadline).

        Raises:
            BadRequestError: no embedding capability, an empty list, an empty text or one that is too long.
            OverloadedError: the model's embeddings queue is full.
            DeadlineExceededError: ``admission.timeout_s`` passed, while waiting or between two texts.
            InferenceError: the engine failed.
        """
        raise self._unsupported("embeddings")

    async def infer(
        self, inputs: Mapping[str, np.ndarray], admission: Admission | None = None
    ) -> dict[str, np.ndarray]:
        """Run a tensor model on named inputs and return its named outputs.

        Args:
            inputs: named tensors.
            admission: priority and deadline (default: interactive, no deadline).

        Raises:
            BadRequestError: no tensor capability, or an input with a wrong name, dtype or shape.
            OverloadedError: the model's queue is full.
            DeadlineExceededError: ``admission.timeout_s`` passed (a run whose deadline passed is not started).
            InferenceError: the engine failed.
        """
        raise self._unsupported("tensor inference")

    def input_specs(self) -> tuple[TensorSpec, ...]:
        """The inputs a tensor model declares (empty for other models)."""
        return ()

    def output_specs(self) -> tuple[TensorSpec, ...]:
        """The outputs a tensor model declares (empty for other models)."""
        return ()

    def load_stats(self) -> LoadStats | None:
        """The model's generation queue and slots now, or ``None`` for an engine without one."""
        return None

    def queue_stats(self) -> dict[QueueKind, LoadStats]:
        """Each of the model's admission queues now, by kind (the generation queue of :meth:`load_stats`, if any)."""
        stats = self.load_stats()
        return {} if stats is None else {"generation": stats}

    def stalled_s(self) -> float:
        """Seconds the engine's worker thread has owed progress: busy on one step, or woken and not yet running.

        0.0 when it is idle with nothing to do or keeps making progress; engines without a worker thread of
        their own always report 0.0. The daemon's systemd watchdog withholds its pings while any model stalls
        for too long (``agent/daemon.py``), so a native call that never returns gets the agent restarted.
        """
        return 0.0

    def count_tokens(self, text: str) -> int:
        """Number of tokens ``text`` tokenizes to (no special tokens added). Safe to call from any thread.

        Raises:
            BadRequestError: the model has no tokenizer.
        """
        raise self._unsupported("tokenization")

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Free the model. Requests still queued or running end with ``Finished("cancelled")``. Idempotent."""
