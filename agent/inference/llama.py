"""The llama engine: GGUF models through llama-cpp-python's low-level API, with continuous batching.

The only module that imports ``llama_cpp``. One :class:`LlamaModel` per loaded GGUF file::

    event loop                                   decode thread (one per model)
    ──────────                                   ─────────────────────────────
    chat()/complete()                            loop: reap cancelled → admit free slots → one llama_batch
      template + tokenize (state lock)                 of running tokens → sample each natively → prompt
      AdmissionQueue.submit ──────────────────▶        chunks → text, stop strings, limits → Inbox.put
      await Inbox.get()  ◀── one call_soon_threadsafe per step (WakeBatch.flush)

Invariants:

* **One decode thread per model** owns the llama context, the batch and every sampler chain; nothing else
  touches them. Tokenizing (a read-only vocabulary call) may run on any thread under the state lock, which the
  decode thread also takes before it frees the model.
* **Continuous batching.** Each step decodes *one* ``llama_batch``: the next token of every running sequence
  plus chunks of the prompts of newly admitted requests, at most ``n_batch`` tokens in all (running tokens
  first, then prompts in admission order), in slot order, then samples every sequence that produced logits.
  Running sequences always get their token and prompts fill the rest (chunked prefill), so a long prompt
  slows the others for a few steps but never stalls them; several new prompts are decoded together. A
  request joins at the next step after a slot frees up.
* **Slots.** ``n_parallel`` sequences (``seq_id`` 0…n-1), each with its own KV stream of ``n_ctx`` cells
  (llama.cpp's ``kv_unified = false``); a request may use at most ``n_ctx`` of them (prompt + completion).
  New requests take the lowest free slot, so running sequences tend to have consecutive ids, which llama.cpp
  decodes as one ubatch. Which requests get a slot, in what order, and which are refused is the
  :class:`~agent.inference.scheduler.AdmissionQueue`'s decision.
* **Native sampling.** Each request has its own ``llama_sampler`` chain (penalties, top-k, top-p, min-p,
  temperature, seeded dist; or greedy at temperature 0), applied by ``llama_sampler_sample``: no per-token
  sampling in Python.
* **Batching never changes a result** (tested, at temperature 0 and with a fixed seed; logits compared
  bit for bit). llama.cpp's CPU kernels can round differently with the *shape* of the work: with a unified
  cache a sequence's cells sit at positions that depend on the other sequences; with an f16 cache, flash
  attention takes a split-KV path for a lone query over 512+ cells and a tiled path for 64+ queries, and
  without flash attention one row and many rows go through different matrix kernels. With one KV stream per
  slot (cells in position order) and K and V caches of *different* types with flash attention (K f16, V
  q8_0: the CPU kernel's split-KV and tiled paths both require ``k->type == v->type``, so it always works one
  query row at a time, skipping masked cells), every row of a batch is computed exactly as it would be
  alone: the logits of a token are bit-identical whether it is decoded alone, with other sequences, as part
  of a prompt chunk of any size, or mixed with other prompts. Measured on SmolLM2 (12 greedy completions,
  short and ~700-token prompts, alone, four at a time, staggered, cold): with a unified cache or an f16 cache
  with flash attention, 4 to 9 of 12 changed; with a one-row configuration none did. K stays f16 because the
  attention scores are what a small model is most sensitive to: with K in q8_0 too (or f16 without flash
  attention), SmolLM2's greedy answer to "What is the capital of France?" turns into French nonsense, with K
  f16 it is "The capital of France is Paris." as with llama-server's default f16 cache. The q8_0 V cache
  saves a quarter of the KV memory; decoding speed is that of f16 with flash attention.
* **Prompt-prefix reuse.** A slot keeps the token history whose KV it holds (prompt and decoded completion)
  after its request ends. A new request goes to the free slot whose history shares the longest prefix with
  its prompt (at least :data:`_REUSE_MIN_TOKENS` tokens, else the lowest free slot; any shared prefix when the
  step's admissions fill every free slot); only the KV past that prefix is removed (``llama_memory_seq_rm``)
  and only the rest of the prompt is decoded. Since rows are computed alike whatever the batch, a reused
  prefix holds exactly the KV a cold start would compute: chat turns, which re-send the whole conversation,
  skip it and get the same reply.
* **Streaming.** Each sampled token is turned into text (whole UTF-8 characters; stop strings held back until
  they can be ruled out) and appended to the request's :class:`~agent.inference.streams.Inbox` in the same
  step; consumers are woken once per step.
* **Cancellation and deadlines.** A consumer that stops (client gone, ``aclose()``, task cancelled) or whose
  deadline passes marks its request cancelled: a waiting request leaves the queue at once, a running one frees
  its slot at the next step. A passed deadline ends the stream with
  :class:`~agent.errors.DeadlineExceededError` saying whether the request was waiting or generating.
* **Chat template** from the GGUF metadata (``tokenizer.chat_template``) rendered in jinja2's sandbox exactly as
  llama-cpp-python's ``Jinja2ChatFormatter`` does (:class:`_ChatTemplate`); a model without one has no ``chat``
  capability.
* **Embeddings** by a second llama context on the same weights (mean pooling, L2-normalised), created on first
  use. Embedding requests have an :class:`~agent.inference.scheduler.AdmissionQueue` of their own (bounded in
  requests and tokens, priority classes, one request embedding at a time) and run on the decode thread in
  units of *one text* between two decode steps: running generations keep producing a token per text embedded
  (a request of 64 long texts is 64 short pauses, not one long one). Before each text the decode thread checks
  the request: one whose caller left stops there, one past its deadline ends with
  :class:`~agent.errors.DeadlineExceededError`. Large inputs are tokenized on a thread, not the event loop.
* **Lean.** Only llama-cpp-python's ctypes bindings are imported, not its high-level package (which imports
  numpy, ~20 MiB resident): a daemon serving GGUF models, embeddings included, does not carry numpy.
* **One module.** Everything that touches ``llama_cpp`` lives here (one module per foreign library), which is
  why it is long; the engine-agnostic parts are :mod:`~agent.inference.scheduler` (who waits, who goes next)
  and :mod:`~agent.inference.streams` (thread → event-loop hand-off, stop strings).
* **Quiet and wrapped.** llama.cpp's log goes to a bounded buffer quoted in our errors; file descriptors 1 and
  2 point at ``/dev/null`` while the model and context are created (under
  :data:`~agent.inference.base.native_load_lock`). Native failures become
  :class:`~agent.errors.EngineLoadError` (load) or :class:`~agent.errors.InferenceError` (requests).
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import concurrent.futures
import contextlib
import ctypes
import functools
import importlib
import importlib.util
import json
import math
import os
import secrets
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, TextIO

import jinja2
import jinja2.ext
import jinja2.sandbox
import structlog

from agent.errors import AgentError, BadRequestError, DeadlineExceededError, EngineLoadError, InferenceError
from agent.inference.base import (
    Admission,
    ChatMessage,
    EmbeddingResult,
    Finished,
    FinishReason,
    GenerationEvent,
    LoadedModel,
    LoadStats,
    ModelSpec,
    QueueKind,
    SamplingParams,
    TextDelta,
    Usage,
    check_model_file,
    native_load_lock,
    resident_bytes,
    trim_heap,
)
from agent.inference.scheduler import AdmissionQueue, Ticket, await_turn
from agent.inference.streams import Inbox, StopScanner, WakeBatch


def _import_bindings() -> ModuleType:
    """llama-cpp-python's ctypes bindings, ``llama_cpp.llama_cpp``, without running the package's ``__init__``.

    The package's ``__init__`` also imports its high-level ``Llama`` class and with it numpy (~20 MiB resident
    for the life of the daemon), none of which this engine uses. While the bindings are imported, ``llama_cpp``
    in :data:`sys.modules` is the package *not executed* (its spec and ``__path__`` only); it is removed
    afterwards, so a later ``import llama_cpp`` (the controller's tools, tests) runs the real ``__init__``,
    which finds these same bindings in :data:`sys.modules` and reuses them.
    """
    name = "llama_cpp.llama_cpp"
    if name in sys.modules or "llama_cpp" in sys.modules:
        return importlib.import_module(name)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.submodule_search_locations is None:
        raise ModuleNotFoundError("llama-cpp-python is not installed", name="llama_cpp")
    package = importlib.util.module_from_spec(spec)
    sys.modules["llama_cpp"] = package
    try:
        return importlib.import_module(name)
    finally:
        if sys.modules.get("llama_cpp") is package:
            del sys.modules["llama_cpp"]


if TYPE_CHECKING:
    import llama_cpp.llama_cpp as llama_cpp
else:
    llama_cpp = _import_bindings()

__all__ = ["EMBEDDING_MAX_TOKENS", "LlamaModel"]

_log = structlog.get_logger(__name__)

EMBEDDING_MAX_TOKENS: Final = 512
"""Most tokens per text for embeddings (the embedding context's size; longer texts are refused)."""
_SEED_MODULUS: Final = 0xFFFFFFFF  # llama.cpp's seeds are uint32 and 0xFFFFFFFF means "random"
_F16_BYTES: Final = 2
_PENALTY_LAST_N: Final = 64
"""Tokens the repetition penalties look back over (llama.cpp's default), prompt included."""
_INLINE_PREPARE_CHARS: Final = 16384
"""Prompts up to this many characters are templated and tokenized on the event loop (well under a
millisecond); longer ones on a thread."""
_DEFAULT_ADMISSION: Final = Admission()
_FLASH_ATTN_ENABLED: Final = 1  # llama_flash_attn_type: -1 auto, 0 disabled, 1 enabled
_GGML_TYPE_F16: Final = 1
_GGML_TYPE_Q8_0: Final = 8
_Q8_0_BLOCK: Final = (34, 32)  # bytes per block, values per block (32 int8 + one f16 scale)
_REUSE_MIN_TOKENS: Final = 16
"""A slot's cached prefix decides the slot only when it saves at least this many tokens (otherwise the lowest
free slot is used, which keeps running sequences on consecutive ids: one ubatch per step) — unless the requests
admitted in this step take every free slot: the running set is then all slots whatever goes where, so each
request takes the free slot sharing the longest prefix with it, however short."""


# --- llama.cpp's log -----------------------------------------------------------------------------------------

# ggml.h's enum ggml_log_level (llama-cpp-python's comment in llama_cpp.py still gives the older numbering)
_GGML_LOG_LEVEL_WARN: Final = 3
_GGML_LOG_LEVEL_ERROR: Final = 4
_GGML_LOG_LEVEL_CONT: Final = 5  # the rest of the previous message
_native_log: collections.deque[str] = collections.deque(maxlen=32)
_native_keep = False  # whether the previous message was kept (its continuations are)
_native_ready = False


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _on_native_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Keep llama.cpp's warnings and errors in a small buffer (quoted in our errors); drop the rest."""
    global _native_keep
    if level == _GGML_LOG_LEVEL_CONT:
        if _native_keep and text and _native_log:
            _native_log[-1] = (_native_log[-1] + " " + text.decode("utf-8", "replace").strip()).strip()
        return
    _native_keep = level in (_GGML_LOG_LEVEL_WARN, _GGML_LOG_LEVEL_ERROR)
    if _native_keep and text:
        _native_log.append(text.decode("utf-8", "replace").strip())


def _init_native() -> None:
    """Install the log callback, and initialise llama.cpp's backends once per process (under the load lock).

    The callback is installed again before every load: importing llama-cpp-python's package (a tool or test in
    the same process) sets its own, and llama.cpp keeps only the last one.
    """
    global _native_ready
    llama_cpp.llama_log_set(_on_native_log, ctypes.c_void_p(0))
    if not _native_ready:
        llama_cpp.llama_backend_init()
        _native_ready = True


def _native_detail() -> str:
    """The last few llama.cpp warnings/errors, for an error message."""
    lines = [line for line in list(_native_log)[-3:] if line]
    return f" (llama.cpp: {' | '.join(lines)})" if lines else ""


# --- native handles ------------------------------------------------------------------------------------------


def _kv_cache_bytes(model: Any, n_ctx: int, *, v_q8_0: bool = False) -> int:
    """Bytes of a KV cache holding ``n_ctx`` tokens: K f16, V f16 or q8_0 (an estimate: equal K and V heads)."""
    n_layer = int(llama_cpp.llama_model_n_layer(model))
    n_head = max(1, int(llama_cpp.llama_model_n_head(model)))
    n_head_kv = int(llama_cpp.llama_model_n_head_kv(model))
    head_dim = int(llama_cpp.llama_model_n_embd(model)) // n_head
    values = n_ctx * n_layer * n_head_kv * head_dim  # of K, and of V
    if v_q8_0:
        size, per = _Q8_0_BLOCK
        return values * _F16_BYTES + values * size // per
    return 2 * values * _F16_BYTES


@functools.cache
def _devnull() -> TextIO:
    """``/dev/null`` opened once and never closed: another thread may still hold it as ``sys.stdout`` after a load."""
    return open(os.devnull, "w")  # kept open for the life of the process, as upstream's


@contextlib.contextmanager
def _quiet_stdio() -> Iterator[None]:
    """Point file descriptors 1 and 2, and ``sys.stdout``/``sys.stderr``, at ``/dev/null`` meanwhile.

    What llama-cpp-python's ``suppress_stdout_stderr(disable=False)`` (its ``verbose=False``) does, without its
    high-level package: llama.cpp prints to the process's stdout and stderr while it opens a model. Called under
    :data:`~agent.inference.base.native_load_lock`, so two redirections never interleave.
    """
    null = _devnull()
    saved = os.dup(1), os.dup(2)
    stdout, stderr = sys.stdout, sys.stderr
    try:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        sys.stdout = sys.stderr = null
        yield
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _c_array(pointer: Any, length: int) -> Any:
    """The ``length`` elements at ``pointer`` as a ctypes array: slice assignments run in C."""
    return ctypes.cast(pointer, ctypes.POINTER(pointer._type_ * length)).contents


class _Batch:
    """One ``llama_batch`` and ctypes arrays over its fields, rewritten in place every step (no allocation).

    Every token belongs to exactly one sequence: ``n_seq_id`` is 1 throughout, and ``seq_id[i]`` points into
    a small constant array holding 0…n_seq-1, so assigning a sequence is one pointer store. A prompt chunk's
    positions, sequence pointers and logit flags are block copies from constant arrays (:meth:`put_prompt`).
    The original pointers are restored before the batch is freed.
    """

    def __init__(self, capacity: int, n_seq: int, max_pos: int) -> None:
        self.capacity = capacity
        self.raw = llama_cpp.llama_batch_init(capacity, 0, 1)
        self.token = _c_array(self.raw.token, capacity)
        self.pos = _c_array(self.raw.pos, capacity)
        self.logits = _c_array(self.raw.logits, capacity)
        _c_array(self.raw.n_seq_id, capacity)[:] = [1] * capacity
        address = ctypes.cast(self.raw.seq_id, ctypes.c_void_p).value
        assert address is not None
        self.seq: Any = (ctypes.c_size_t * capacity).from_address(address)  # the seq_id pointers, as addresses
        self._original_seq = self.seq[:]
        self._seq_values = (ctypes.c_int32 * n_seq)(*range(n_seq))
        base = ctypes.addressof(self._seq_values)
        self.seq_address = [base + i * ctypes.sizeof(ctypes.c_int32) for i in range(n_seq)]
        # Sources of put_prompt's block copies: 0…max_pos-1, and per sequence its pointer repeated.
        self._positions = (self.pos._type_ * max_pos)(*range(max_pos))
        self._seq_runs = [(ctypes.c_size_t * capacity)(*[a] * capacity) for a in self.seq_address]
        self._pos_size = ctypes.sizeof(self.pos._type_)
        self._seq_size = ctypes.sizeof(ctypes.c_size_t)
        self._logit_size = ctypes.sizeof(self.logits._type_)

    def put_prompt(self, n: int, tokens: list[int], start: int, seq: int) -> None:
        """Write prompt ``tokens`` (at positions ``start``… of sequence ``seq``) to entries ``n``…, no logits."""
        count = len(tokens)
        if n + count > self.capacity or start + count > len(self._positions):  # the copies below are unchecked
            raise IndexError(f"prompt chunk [{start}, {start + count}) at entry {n} does not fit the batch")
        self.token[n : n + count] = tokens
        ctypes.memmove(
            ctypes.addressof(self.pos) + n * self._pos_size,
            ctypes.addressof(self._positions) + start * self._pos_size,
            count * self._pos_size,
        )
        ctypes.memmove(ctypes.addressof(self.seq) + n * self._seq_size, self._seq_runs[seq], count * self._seq_size)
        ctypes.memset(ctypes.addressof(self.logits) + n * self._logit_size, 0, count * self._logit_size)

    def free(self) -> None:
        self.seq[:] = self._original_seq
        llama_cpp.llama_batch_free(self.raw)


class _Native:
    """The model, its decoding context, and vocabulary helpers."""

    def __init__(self, spec: ModelSpec) -> None:
        """Open ``spec``'s file and create a context of ``n_parallel`` slots (caller holds the load lock)."""
        threads = spec.threads
        params = llama_cpp.llama_model_default_params()
        params.use_mmap = True
        with _quiet_stdio():
            model = llama_cpp.llama_model_load_from_file(str(spec.path).encode(), params)
        if not model:
            raise EngineLoadError(f"model {spec.name!r}: llama.cpp cannot load it: failed to load{_native_detail()}")
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_slots = spec.n_parallel
        n_ctx = spec.n_ctx * spec.n_parallel
        self.n_batch = max(spec.n_parallel + 2, min(spec.n_batch, n_ctx))
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = spec.n_parallel
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        # Batch invariance (see the module docstring): one KV stream per slot, so a sequence's cells are its own
        # and in position order whatever else runs; K f16 and V q8_0, so llama.cpp's CPU flash attention always
        # takes its one-row-at-a-time path (its split-KV and tiled paths, taken when K and V share an f16/f32
        # type depending on the batch's shape, round differently).
        cparams.kv_unified = False
        cparams.flash_attn_type = _FLASH_ATTN_ENABLED
        cparams.type_k = _GGML_TYPE_F16
        cparams.type_v = _GGML_TYPE_Q8_0
        cparams.no_perf = True
        with _quiet_stdio():
            ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise EngineLoadError(f"model {spec.name!r}: llama.cpp cannot create a context{_native_detail()}")
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.slot_ctx = min(spec.n_ctx, int(llama_cpp.llama_n_ctx_seq(ctx)))
        self.batch = _Batch(self.n_batch, spec.n_parallel, self.slot_ctx)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.eos = int(llama_cpp.llama_vocab_eos(self.vocab))
        self.kv_bytes = _kv_cache_bytes(model, n_ctx, v_q8_0=True)
        self.embedder: _EmbeddingContext | None = None
        """The embedding context, made on first use (decode thread)."""

    def tokenize(self, text: str, add_special: bool, special: bool) -> list[int]:
        """Tokens of ``text`` (any thread: a read-only vocabulary call).

        Raises:
            BadRequestError: ``text`` holds a lone UTF-16 surrogate (not Unicode text: UTF-8 cannot encode it).
        """
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRequestError("the text holds a lone UTF-16 surrogate; it must be valid Unicode") from exc
        size = len(data) + 8
        while True:
            buffer = (llama_cpp.llama_token * size)()
            n = int(llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, size, add_special, special))
            if n >= 0:
                return buffer[:n]
            size = -n

    def piece(self, token: int) -> bytes:
        """The bytes token ``token`` stands for (special tokens render as nothing)."""
        size = 32
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = int(llama_cpp.llama_token_to_piece(self.vocab, token, buffer, size, 0, False))
            if n >= 0:
                return buffer.raw[:n]
            size = -n

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(llama_cpp.llama_vocab_get_text(self.vocab, token)).decode("utf-8", "replace")

    def warm_up(self) -> None:
        """Decode one token in slot 0 (pages the weights in, builds the compute graph), then forget it."""
        batch = self.batch
        batch.token[0] = self.bos if self.bos >= 0 else 0
        batch.pos[0] = 0
        batch.seq[0] = batch.seq_address[0]
        batch.logits[0] = 1
        batch.raw.n_tokens = 1
        status = llama_cpp.llama_decode(self.ctx, batch.raw)
        llama_cpp.llama_memory_clear(self.memory, True)
        if status != 0:
            raise EngineLoadError(f"warm-up decode failed with status {status}{_native_detail()}")

    def close(self) -> None:
        if self.embedder is not None:  # built on this model: freed before it
            self.embedder.close()
            self.embedder = None
        self.batch.free()
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


class _EmbeddingContext:
    """A second llama context on the same weights with embeddings on and mean pooling (decode thread only)."""

    def __init__(self, model: Any, n_threads: int) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = EMBEDDING_MAX_TOKENS
        params.n_batch = EMBEDDING_MAX_TOKENS
        params.n_ubatch = EMBEDDING_MAX_TOKENS
        params.n_seq_max = 1
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            raise InferenceError(f"cannot create the embedding context{_native_detail()}")
        self._ctx = ctx
        self._batch = llama_cpp.llama_batch_init(EMBEDDING_MAX_TOKENS, 0, 1)
        self._n_embd = int(llama_cpp.llama_model_n_embd_out(model))  # the pooled vector's length (a head may resize)

    def embed(self, tokens: Sequence[int]) -> list[float]:
        """Mean-pooled, L2-normalised embedding of one token sequence (at most EMBEDDING_MAX_TOKENS)."""
        batch = self._batch
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1  # every token is an output: mean pooling reads them all
        batch.n_tokens = len(tokens)
        memory = llama_cpp.llama_get_memory(self._ctx)
        if memory:
            llama_cpp.llama_memory_clear(memory, True)
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise InferenceError(f"llama_decode failed with status {status}{_native_detail()}")
        pointer = llama_cpp.llama_get_embeddings_seq(self._ctx, 0)
        if not pointer:
            raise InferenceError(f"no pooled embedding was produced{_native_detail()}")
        vector = pointer[: self._n_embd]  # llama.cpp's float32 values, as Python floats
        norm = math.hypot(*vector)
        if not math.isfinite(norm) or norm == 0.0:
            raise InferenceError("the embedding has no direction (zero or non-finite norm)")
        return [v / norm for v in vector]

    def close(self) -> None:
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)


# --- the chat template ---------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """Pass-through for Hugging Face's ``{% generation %}…{% endgeneration %}`` chat-template tag."""

    tags = {"generation"}  # noqa: RUF012 - jinja2's Extension API: a class attribute

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise ValueError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Transformers' chat-template ``tojson`` (jinja2's own escapes HTML and sorts keys)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _ChatTemplate:
    """A GGUF's chat template (``tokenizer.chat_template``), rendered exactly as llama-cpp-python's
    ``Jinja2ChatFormatter`` renders it — which follows Transformers' chat templates — without importing its
    high-level package (numpy).

    Same environment: jinja2's immutable sandbox, ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
    extension and a pass-through ``{% generation %}`` tag, Transformers' ``tojson`` filter. Same variables:
    ``messages``, ``bos_token``, ``eos_token``, ``add_generation_prompt`` (true: the prompt ends where the
    assistant's turn starts), ``raise_exception``, ``strftime_now``, and ``tools``, ``tool_choice``,
    ``functions``, ``function_call`` (all ``None``: a template may test whether they are defined). The prompt
    holds its own special tokens (none is added when it is tokenized) and the EOS text is a stop string.
    ``tests/component/test_chat_template.py`` checks the prompts against upstream's formatter.
    """

    def __init__(self, template: str, *, bos_token: str, eos_token: str) -> None:
        """Compile ``template``; raises jinja2's ``TemplateSyntaxError`` (and friends) when it does not compile."""
        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
            loader=jinja2.BaseLoader(),
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[_GenerationTag, jinja2.ext.loopcontrols],
        )
        environment.filters["tojson"] = _tojson
        self._template = environment.from_string(template)
        self._bos_token = bos_token
        self._eos_token = eos_token
        self.stop: tuple[str, ...] = (eos_token,)
        """Stop strings the template implies: the EOS token's text."""

    def render(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt for ``messages`` (OpenAI-style ``role``/``content`` dicts), up to the assistant's turn.

        Raises:
            Exception: whatever the template raises (``raise_exception`` raises ``ValueError``; jinja2's errors).
        """
        return self._template.render(
            messages=messages,
            eos_token=self._eos_token,
            bos_token=self._bos_token,
            raise_exception=_raise_exception,
            add_generation_prompt=True,
            functions=None,
            function_call=None,
            tools=None,
            tool_choice=None,
            strftime_now=_strftime_now,
        )


def _make_sampler(params: SamplingParams, prompt: Sequence[int], n_vocab: int) -> Any:
    """A native sampler chain for ``params`` (decode thread); penalties have already seen the prompt's tail."""
    chain_params = llama_cpp.llama_sampler_chain_default_params()
    chain_params.no_perf = True
    chain = llama_cpp.llama_sampler_chain_init(chain_params)
    add = llama_cpp.llama_sampler_chain_add
    penalised = params.repeat_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
    if penalised:
        add(
            chain,
            llama_cpp.llama_sampler_init_penalties(
                n_vocab, _PENALTY_LAST_N, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
            ),
        )
    if params.temperature == 0.0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
    else:
        if params.top_k > 0:
            add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
        seed = params.seed % _SEED_MODULUS if params.seed is not None else secrets.randbelow(_SEED_MODULUS)
        add(chain, llama_cpp.llama_sampler_init_dist(seed))
    if penalised:
        for token in prompt[-_PENALTY_LAST_N:]:
            llama_cpp.llama_sampler_accept(chain, token)
    return chain


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (slice comparisons run in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[low:mid] == b[low:mid]:
            low = mid
        else:
            high = mid
    return low


# --- requests and slots --------------------------------------------------------------------------------------


class _Admitted:
    """Inbox marker: the request got a slot after waiting ``waited`` seconds."""

    __slots__ = ("waited",)

    def __init__(self, waited: float) -> None:
        self.waited = waited


_Event = TextDelta | Finished | AgentError | _Admitted
_EOG: Final = b"\x00<eog>"  # piece-cache marker for end-of-generation tokens (never a real piece: pieces are text)


class _Embedding:
    """One embeddings request: its tokenized texts, the vectors so far, and its future (decode thread fills it).

    ``cancelled`` is set by the caller's side (caller gone, deadline passed); the decode thread reads it before
    each text. ``vectors`` grows by one per text embedded.
    """

    __slots__ = ("batches", "cancelled", "deadline", "future", "ticket", "timeout_s", "vectors")

    def __init__(self, batches: list[list[int]], timeout_s: float | None) -> None:
        self.batches = batches
        self.vectors: list[list[float]] = []
        self.timeout_s = timeout_s
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.cancelled = False
        self.future: concurrent.futures.Future[EmbeddingResult] = concurrent.futures.Future()
        self.ticket: Ticket[_Embedding] | None = None


class _Request:
    """One generation request. Fields after ``ticket`` belong to the decode thread."""

    __slots__ = (
        "budget",
        "cancelled",
        "chain",
        "chunk",
        "decoder",
        "done",
        "fed",
        "generated",
        "inbox",
        "next_token",
        "out",
        "params",
        "prefilling",
        "report_admission",
        "scanner",
        "seq_address",
        "slot",
        "ticket",
        "tokens",
    )

    def __init__(
        self,
        tokens: list[int],
        params: SamplingParams,
        stops: tuple[str, ...],
        budget: int,
        inbox: Inbox[_Event],
        report_admission: bool,
    ) -> None:
        self.tokens = tokens
        self.params = params
        self.budget = budget
        self.inbox = inbox
        self.report_admission = report_admission
        self.cancelled = False  # set by the consumer's side; read by the decode thread at each step
        self.done = False  # set by the decode thread once the last event is in the inbox
        self.ticket: Ticket[_Request] | None = None
        self.scanner = StopScanner(stops) if stops else None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chain: Any = None
        self.slot: _Slot | None = None
        self.seq_address = 0
        self.prefilling = True  # until the prompt's last token is decoded and the first token sampled
        self.fed = 0  # prompt tokens whose KV is in the slot
        self.chunk = 0  # prompt tokens to decode in the current step
        self.generated = 0
        self.next_token = 0  # sampled, to be decoded at the next step
        self.out = -1  # batch index of this step's logits


class _Slot:
    """One KV-cache sequence: its id, the tokens whose KV it holds, and the request using it (if any)."""

    __slots__ = ("history", "request", "seq")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.history: list[int] = []
        self.request: _Request | None = None


def _choose_slot(slots: list[_Slot], tokens: list[int], min_reuse: int) -> tuple[_Slot, int]:
    """The free slot for a prompt of ``tokens`` and how many of them its history holds already.

    The free slot sharing the longest prefix with the prompt if that is at least ``min_reuse`` tokens, else the
    lowest free one (ties: the lowest); its shared prefix is reused either way. Needs a free slot.
    """
    slot, shared, best = None, 0, -1
    for candidate in slots:  # in id order: ties go to the lowest free id
        if candidate.request is not None:
            continue
        common = _common_prefix(candidate.history, tokens)
        score = common if common >= min_reuse else 0
        if score > best:
            slot, shared, best = candidate, common, score
    assert slot is not None, "no free slot"
    return slot, shared


# --- the decode thread ---------------------------------------------------------------------------------------


class _DecodeLoop:
    """Runs the steps of one model on its own thread (see the module docstring)."""

    def __init__(
        self,
        name: str,
        opener: Callable[[], tuple[_Native, int]],
        queue: AdmissionQueue[_Request],
        state_lock: threading.Lock,
        embed_queue: AdmissionQueue[_Embedding],
        embed_one: Callable[[list[int]], list[float]],
    ) -> None:
        """Start the thread; it opens the model with ``opener`` first (see :attr:`ready`)."""
        self._name = name
        self._opener = opener
        self._queue = queue
        self._state_lock = state_lock
        self._embed_queue = embed_queue
        self._embed_one = embed_one
        self._embedding: _Embedding | None = None  # the embeddings request in progress, one text per loop
        self.embedded_texts = 0
        """Texts embedded since the start; for tests."""
        self._slots: list[_Slot] = []
        self._active: list[_Request] = []
        self._decoding = 0  # running requests past their prompt
        self._prefilling: list[_Request] = []  # running requests still decoding their prompt, in admission order
        self._outputs: list[_Request] = []
        self._pieces: dict[int, bytes] = {}
        self._wakes = WakeBatch()
        self._wake = threading.Event()
        self._jobs: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = collections.deque()
        self._closing = False
        self._beat = time.monotonic()  # heartbeat: the decode thread's last step, job or wake-up
        self._busy = False  # the decode thread is inside a step or a job (else waiting for work)
        self._woken = 0.0  # when wake() last found the thread's event clear
        self.reused_tokens = 0
        """Prompt tokens whose KV a slot already held (not decoded again), since the start; for tests."""
        self.ready: concurrent.futures.Future[tuple[_Native, int]] = concurrent.futures.Future()
        """The opened model and its measured memory, or the error that prevented opening it."""
        self.closed: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name=f"llama-{name}", daemon=True)
        self._thread.start()

    # -- any thread

    def wake(self) -> None:
        if not self._wake.is_set():
            self._woken = time.monotonic()
        self._wake.set()

    def beat(self) -> None:
        """Record progress inside a long job (decode thread)."""
        self._beat = time.monotonic()

    def stalled_s(self) -> float:
        """Seconds the thread has owed progress (see :meth:`LoadedModel.stalled_s`); any thread, lock-free.

        Busy: time since its last heartbeat (one per step or job). Idle: time since a wake-up it has not
        acted on, if any. Reads of floats and bools written by one thread are atomic under the GIL; a race at
        worst reports the stall of the moment before, which only matters if it lasts.
        """
        now = time.monotonic()
        if self._busy:
            return now - self._beat
        woken = self._woken
        return now - woken if woken > self._beat else 0.0

    def submit_job(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run ``fn`` on the decode thread between two steps."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.append((fn, future))
        self.wake()
        return future

    def stop(self) -> concurrent.futures.Future[None]:
        """Cancel everything, free the model and end the thread; the future resolves when it is done."""
        self._closing = True
        self.wake()
        return self.closed

    def slot_histories(self) -> list[tuple[int, int, bool]]:
        """Per slot: tokens in its history, highest KV position + 1, in use (decode thread: run it as a job)."""
        memory = self._native.memory
        return [
            (len(s.history), int(llama_cpp.llama_memory_seq_pos_max(memory, s.seq)) + 1, s.request is not None)
            for s in self._slots
        ]

    # -- the thread

    def _run(self) -> None:
        # Every native call of this model runs on this one thread, opening included: llama.cpp's CPU backend
        # runs an OpenMP team per calling thread, and with more OpenMP threads than cores libgomp stops spinning
        # at barriers (measured: a decode step 45 % slower when the model was warmed up on another thread).
        try:
            self._native, memory = self._opener()
        except BaseException as exc:
            self.ready.set_exception(exc)
            self.closed.set_result(None)
            return
        self._slots = [_Slot(i) for i in range(self._native.n_slots)]
        self.ready.set_result((self._native, memory))
        monotonic = time.monotonic
        try:
            while not self._closing:
                self._beat = monotonic()
                self._busy = True
                if self._jobs:
                    self._run_job()
                if self._embedding is not None or len(self._embed_queue):
                    self._embed_text()  # one text, then a decode step: generations keep their pace
                if self._active or len(self._queue):
                    try:
                        self._step()
                    except Exception as exc:  # a bug or a native failure: fail what runs, keep serving
                        _log.exception("llama_step_failed", model=self._name)
                        self._outputs.clear()  # the step's sampling list: its requests are failed just below
                        self._fail(list(self._active), InferenceError(f"model {self._name!r}: {exc}"))
                    self._wakes.flush()
                elif not self._jobs and self._embedding is None and not len(self._embed_queue):
                    self._busy = False
                    self._wake.wait()
                    self._wake.clear()
        finally:
            self._shutdown()
            self._busy = False  # the thread has ended: nothing is owed any more

    def _run_job(self) -> None:
        fn, future = self._jobs.popleft()
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    def _embed_text(self) -> None:
        """Embed the next text of the embeddings request in progress (taking the next one from its queue if
        none is); a request whose caller left, or past its deadline, ends here instead."""
        work = self._embedding
        if work is None:
            tickets = self._embed_queue.take(1)
            if not tickets:
                return
            work = tickets[0].item
            if not work.future.set_running_or_notify_cancel():  # its caller gave up as it was taken
                self._embed_queue.release(tickets[0])
                return
            self._embedding = work
        total = len(work.batches)
        try:
            if work.cancelled:
                raise InferenceError(f"the embeddings request to model {self._name!r} was cancelled")
            if work.deadline is not None and time.monotonic() >= work.deadline:
                where = (
                    f"while embedding, after {len(work.vectors)} of {total} texts"
                    if work.vectors
                    else "while waiting for its turn"
                )
                raise DeadlineExceededError(
                    f"the embeddings request to model {self._name!r} passed its {work.timeout_s:g} s deadline {where}"
                )
            work.vectors.append(self._embed_one(work.batches[len(work.vectors)]))
            self.embedded_texts += 1
            if len(work.vectors) < total:
                return
            work.future.set_result(
                EmbeddingResult(vectors=work.vectors, prompt_tokens=sum(len(t) for t in work.batches))
            )
        except Exception as exc:  # AgentError, or a bug: this request fails, the model goes on serving
            work.future.set_exception(exc)
        self._embedding = None
        assert work.ticket is not None
        self._embed_queue.release(work.ticket)

    def _shutdown(self) -> None:
        try:
            closed = InferenceError(f"model {self._name!r} is closed")
            if self._embedding is not None:
                self._embedding.future.set_exception(closed)
                self._embedding = None
            for waiting in self._embed_queue.drain():
                if waiting.item.future.set_running_or_notify_cancel():
                    waiting.item.future.set_exception(closed)
            for request in list(self._active):
                self._end(request, "cancelled")
            for ticket in self._queue.drain():
                ticket.item.done = True
                ticket.item.inbox.put(Finished("cancelled", Usage(len(ticket.item.tokens), 0)))
                self._wakes.touch(ticket.item.inbox)  # type: ignore[arg-type]
            self._wakes.flush()
            while self._jobs:
                _, future = self._jobs.popleft()
                if future.set_running_or_notify_cancel():
                    future.set_exception(InferenceError(f"model {self._name!r} is closed"))
            with self._state_lock:  # no tokenizer call is running on another thread
                self._native.close()
            trim_heap()
        except BaseException as exc:
            self.closed.set_exception(exc)
            raise
        else:
            self.closed.set_result(None)

    def _step(self) -> None:
        active = self._active
        for request in active:
            if request.cancelled or request.inbox.orphaned:
                for gone in [r for r in active if r.cancelled or r.inbox.orphaned]:
                    self._end(gone, "cancelled")
                break
        free = len(self._slots) - len(active)
        if free and len(self._queue):
            tickets = self._queue.take(free)
            fills = len(tickets) == free  # every slot will be busy: no ubatch split to avoid
            for ticket in tickets:
                self._admit(ticket, min_reuse=1 if fills else _REUSE_MIN_TOKENS)
        if not active:
            return

        batch = self._native.batch
        token, pos, logits, seq = batch.token, batch.pos, batch.logits, batch.seq
        # Running tokens first, then prompt chunks in admission order, within n_batch...
        room = batch.capacity - self._decoding
        for request in self._prefilling:
            count = min(room, len(request.tokens) - request.fed)
            request.chunk = count
            room -= count
        # ...but written in slot order: llama.cpp's split KV cache cuts a batch into ubatches of consecutive
        # sequence ids in order of appearance, so this order decodes every running token in one ubatch.
        outputs = self._outputs
        n = 0
        for slot in self._slots:
            running = slot.request
            if running is None:
                continue
            if not running.prefilling:
                history = slot.history
                next_token = running.next_token
                token[n] = next_token
                pos[n] = len(history)
                seq[n] = running.seq_address
                logits[n] = 1
                history.append(next_token)
                running.out = n
                outputs.append(running)
                n += 1
                continue
            count = running.chunk
            if count <= 0:
                continue
            start = running.fed
            end = start + count
            chunk = running.tokens[start:end]
            batch.put_prompt(n, chunk, start, slot.seq)
            slot.history.extend(chunk)
            running.fed = end
            n += count
            if end == len(running.tokens):
                logits[n - 1] = 1
                running.out = n - 1
                outputs.append(running)
        if n == 0 or not self._decode(n, list(active)):
            outputs.clear()
            return
        sample = llama_cpp.llama_sampler_sample
        ctx = self._native.ctx
        for request in outputs:
            self._emit_token(request, int(sample(request.chain, ctx, request.out)))
        outputs.clear()

    def _decode(self, n: int, participants: list[_Request]) -> bool:
        """Run ``llama_decode`` on the first ``n`` batch entries; on failure end ``participants`` with an error."""
        native = self._native
        native.batch.raw.n_tokens = n
        status = llama_cpp.llama_decode(native.ctx, native.batch.raw)
        if status == 0:
            return True
        error = InferenceError(f"model {self._name!r}: llama_decode failed ({status}){_native_detail()}")
        self._fail(list(participants), error)
        return False

    def _emit_token(self, request: _Request, token: int) -> None:
        piece = self._pieces.get(token)
        if piece is None:
            piece = _EOG if llama_cpp.llama_vocab_is_eog(self._native.vocab, token) else self._native.piece(token)
            self._pieces[token] = piece
        if piece is _EOG:
            self._end(request, "stop")
            return
        request.generated += 1
        text = request.decoder.decode(piece)
        stopped = False
        if request.scanner is not None:
            text, stopped = request.scanner.feed(text)
        if text:
            request.inbox.put(TextDelta(text))
            self._wakes.touch(request.inbox)  # type: ignore[arg-type]
        if stopped:
            self._end(request, "stop", flush=False)
        elif request.generated >= request.budget:
            self._end(request, "length")
        else:
            request.next_token = token
            if request.prefilling:
                request.prefilling = False
                self._prefilling.remove(request)
                self._decoding += 1

    def _admit(self, ticket: Ticket[_Request], min_reuse: int = _REUSE_MIN_TOKENS) -> None:
        request = ticket.item
        if request.cancelled or request.inbox.orphaned:
            request.done = True
            self._queue.release(ticket)
            return
        try:
            request.chain = _make_sampler(request.params, request.tokens, self._native.n_vocab)
        except Exception as exc:  # a native refusal: this request fails, the others go on
            request.inbox.put(InferenceError(f"model {self._name!r}: cannot build the sampler: {exc}"))
            self._wakes.touch(request.inbox)  # type: ignore[arg-type]
            request.done = True
            self._queue.release(ticket)
            return
        tokens = request.tokens
        slot, shared = _choose_slot(self._slots, tokens, min_reuse)
        keep = min(shared, len(tokens) - 1)  # at least one prompt token is decoded: its logits start the reply
        if keep < len(slot.history):
            memory = self._native.memory
            if not llama_cpp.llama_memory_seq_rm(memory, slot.seq, keep, -1):
                llama_cpp.llama_memory_seq_rm(memory, slot.seq, -1, -1)
                keep = 0
            del slot.history[keep:]
        request.fed = keep
        self.reused_tokens += keep
        request.slot = slot
        request.seq_address = self._native.batch.seq_address[slot.seq]
        slot.request = request
        self._active.append(request)
        self._prefilling.append(request)
        if request.report_admission:
            request.inbox.put(_Admitted(ticket.waited))
            self._wakes.touch(request.inbox)  # type: ignore[arg-type]

    def _end(self, request: _Request, reason: FinishReason, *, flush: bool = True) -> None:
        """Finish ``request``: last text and Finished (or nothing more if cancelled), free its slot."""
        if reason != "cancelled" and flush:
            text = request.decoder.decode(b"", final=True)
            if request.scanner is not None:
                text, stopped = request.scanner.feed(text)
                if stopped:
                    reason = "stop"
                else:
                    text += request.scanner.flush()
            if text:
                request.inbox.put(TextDelta(text))
        request.inbox.put(Finished(reason, Usage(len(request.tokens), request.generated)))
        self._release(request)

    def _fail(self, requests: list[_Request], error: AgentError) -> None:
        """End ``requests`` with ``error`` and forget their slots' KV (its state is unknown after a failure)."""
        for request in requests:
            request.inbox.put(error)
            slot = request.slot
            if slot is not None:
                llama_cpp.llama_memory_seq_rm(self._native.memory, slot.seq, -1, -1)
                slot.history.clear()
            self._release(request)

    def _release(self, request: _Request) -> None:
        request.done = True
        self._wakes.touch(request.inbox)  # type: ignore[arg-type]
        if request.chain is not None:
            llama_cpp.llama_sampler_free(request.chain)
            request.chain = None
        slot = request.slot
        if slot is not None:
            slot.request = None
        self._active.remove(request)
        if request.prefilling:
            self._prefilling.remove(request)
        else:
            self._decoding -= 1
        if request.ticket is not None:
            self._queue.release(request.ticket)


# --- the model -----------------------------------------------------------------------------------------------


class LlamaModel(LoadedModel):
    """A GGUF model served with continuous batching on its own decode thread. Build with :meth:`load`."""

    def __init__(self, spec: ModelSpec) -> None:
        """Start the decode thread, which opens ``spec``'s file; use :meth:`load` instead of calling this directly.

        Raises:
            EngineLoadError: llama.cpp refused the file, or its chat template does not compile.
        """
        self._spec = spec
        self._state_lock = threading.Lock()  # guards _closed; held while tokenizing off the decode thread
        self._closed = False
        self._queue: AdmissionQueue[_Request] = AdmissionQueue(
            spec.name, spec.n_parallel, spec.max_queue, spec.max_queue_tokens
        )
        self._embed_queue: AdmissionQueue[_Embedding] = AdmissionQueue(
            spec.name, 1, spec.max_queue, spec.max_queue_tokens, unit="tokens to embed"
        )
        self._loop = _DecodeLoop(
            spec.name, lambda: self._open(spec), self._queue, self._state_lock, self._embed_queue, self._embed_one
        )
        self._native, self._memory_bytes = self._loop.ready.result()
        try:
            self._formatter = self._make_chat_formatter()
        except BaseException:
            self._closed = True
            self._loop.stop().result()
            raise

    # -- loading

    @classmethod
    def load(cls, spec: ModelSpec) -> LlamaModel:
        """Open ``spec``'s GGUF file on a new decode thread and return the loaded model. Blocking.

        Raises:
            EngineLoadError: missing file, wrong size, or llama.cpp refused the file.
        """
        if spec.format != "gguf":
            raise EngineLoadError(f"model {spec.name!r}: the llama engine opens GGUF files, not {spec.format}")
        check_model_file(spec)
        return cls(spec)

    @staticmethod
    def _open(spec: ModelSpec) -> tuple[_Native, int]:
        """Open the file, decode one token so the weights are paged in, and measure (decode thread)."""
        with native_load_lock:
            _init_native()
            _native_log.clear()
            trim_heap()
            before = resident_bytes()
            native = _Native(spec)
            try:
                native.warm_up()
            except EngineLoadError as exc:
                native.close()
                raise EngineLoadError(f"model {spec.name!r}: {exc}") from exc
            trim_heap()
            measured = resident_bytes() - before
        return native, max(measured, spec.size + native.kv_bytes)

    def _make_chat_formatter(self) -> _ChatTemplate | None:
        template = llama_cpp.llama_model_chat_template(self._native.model, None)
        if not template:
            return None
        native = self._native
        try:
            return _ChatTemplate(
                template.decode("utf-8", "replace"),
                eos_token=native.token_text(native.eos),
                bos_token=native.token_text(native.bos),
            )
        except Exception as exc:  # jinja2's TemplateSyntaxError and friends: a broken release
            raise EngineLoadError(f"model {self._spec.name!r}: its chat template does not compile: {exc}") from exc

    # -- LoadedModel

    @property
    def spec(self) -> ModelSpec:
        """The spec this model was loaded from."""
        return self._spec

    @property
    def memory_bytes(self) -> int:
        """Measured or estimated bytes (see :class:`LoadedModel`), including the embedding context once made."""
        return self._memory_bytes

    @property
    def capabilities(self) -> frozenset[str]:
        """``chat`` (when the GGUF carries a chat template), ``completion`` and ``embedding``."""
        caps = {"completion", "embedding"}
        if self._formatter is not None:
            caps.add("chat")
        return frozenset(caps)

    def load_stats(self) -> LoadStats:
        """The generation queue and slots now."""
        return self._queue.stats()

    def queue_stats(self) -> dict[QueueKind, LoadStats]:
        """The generation queue and the embeddings queue now."""
        return {"generation": self._queue.stats(), "embeddings": self._embed_queue.stats()}

    def stalled_s(self) -> float:
        """Seconds the decode thread has owed progress (see :meth:`LoadedModel.stalled_s`).

        A closed model's thread owes nothing only once it has ended: a close stuck behind a wedged native call
        is reported like the wedge itself (the watchdog stops), not hidden by ``_closed``.
        """
        return 0.0 if self._loop.closed.done() else self._loop.stalled_s()

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` without special tokens (read-only tokenizer call, any thread)."""
        return len(self._tokenize(text, add_special=False, special=False))

    def chat(
        self, messages: Sequence[ChatMessage], params: SamplingParams, admission: Admission | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Stream the assistant's next turn (see :meth:`LoadedModel.chat`)."""
        if self._formatter is None:
            raise self._unsupported("chat (the GGUF has no chat template)")
        if not messages:
            raise BadRequestError("messages must not be empty")
        turns = [{"role": m.role, "content": m.content} for m in messages]
        size = sum(len(m.content) for m in messages)
        return self._stream(lambda: self._prepare_chat(turns), size, params, admission or _DEFAULT_ADMISSION)

    def complete(
        self, prompt: str, params: SamplingParams, admission: Admission | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Stream a continuation of ``prompt`` (see :meth:`LoadedModel.complete`)."""
        return self._stream(
            lambda: self._prepare_completion(prompt), len(prompt), params, admission or _DEFAULT_ADMISSION
        )

    async def embed(self, texts: Sequence[str], admission: Admission | None = None) -> EmbeddingResult:
        """Embed each text (at most :data:`EMBEDDING_MAX_TOKENS` tokens) into a unit vector (see
        :meth:`LoadedModel.embed`); one text per decode step, so running generations go on meanwhile."""
        admission = admission or _DEFAULT_ADMISSION
        started = time.monotonic()
        if not texts:
            raise BadRequestError("input must contain at least one text")
        if any(not isinstance(t, str) or not t for t in texts):
            raise BadRequestError("each input text must be a non-empty string")
        size = sum(len(t) for t in texts)
        batches = (
            await asyncio.to_thread(self._tokenize_texts, texts)
            if size > _INLINE_PREPARE_CHARS
            else (self._tokenize_texts(texts))
        )
        timeout = admission.timeout_s
        if timeout is not None:
            timeout -= time.monotonic() - started  # tokenizing counts against the deadline
            if timeout <= 0:
                raise DeadlineExceededError(
                    f"the embeddings request to model {self._spec.name!r} passed its {admission.timeout_s:g} s "
                    f"deadline while its texts were tokenized"
                )
        work = _Embedding(batches, timeout)
        with self._state_lock:
            self._check_open()
            work.ticket = self._embed_queue.submit(work, sum(len(b) for b in batches), admission.priority)
        self._loop.wake()

        def deadline_error(ahead: int | None) -> DeadlineExceededError:
            where = (
                f"while waiting for its turn ({ahead} embeddings requests ahead of it)"
                if ahead is not None
                else f"while embedding, after {len(work.vectors)} of {len(batches)} texts"
            )
            return DeadlineExceededError(
                f"the embeddings request to model {self._spec.name!r} passed its {admission.timeout_s:g} s "
                f"deadline {where}"
            )

        def abandon() -> None:  # caller gone or deadline passed: the decode thread stops at the next text
            work.cancelled = True
            self._loop.wake()

        return await await_turn(
            self._embed_queue, work.ticket, work.future, timeout, abandon=abandon, deadline_error=deadline_error
        )

    def _tokenize_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Tokenize the texts of an embeddings request, refusing one too long (any thread)."""
        batches = [self._tokenize(t, add_special=True, special=False) for t in texts]
        for i, tokens in enumerate(batches):
            if len(tokens) > EMBEDDING_MAX_TOKENS:
                raise BadRequestError(
                    f"input {i} is {len(tokens)} tokens; at most {EMBEDDING_MAX_TOKENS} can be embedded"
                )
        return batches

    async def aclose(self) -> None:
        """Cancel waiting and running requests (they finish with ``cancelled``), then free the model."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        await asyncio.shield(asyncio.wrap_future(self._loop.stop()))

    # -- diagnostics for tests

    async def _slot_histories(self) -> list[tuple[int, int, bool]]:
        """For tests: per slot, the tokens it holds, its KV cache's positions, whether a request runs in it."""
        histories: list[tuple[int, int, bool]] = await asyncio.wrap_future(
            self._loop.submit_job(self._loop.slot_histories)
        )
        return histories

    # -- event-loop side

    def _check_open(self) -> None:
        if self._closed:
            raise InferenceError(f"model {self._spec.name!r} is closed")

    def _tokenize(self, text: str, *, add_special: bool, special: bool) -> list[int]:
        with self._state_lock:
            self._check_open()
            return self._native.tokenize(text, add_special, special)

    def _prepare_chat(self, turns: list[dict[str, str]]) -> tuple[list[int], list[str]]:
        assert self._formatter is not None
        try:
            prompt = self._formatter.render(turns)
        except Exception as exc:  # the template may raise anything (raise_exception, jinja2 errors)
            raise BadRequestError(f"the model's chat template rejected the messages: {exc}") from exc
        # the template writes the special tokens itself (bos_token...): none is added
        tokens = self._tokenize(prompt, add_special=False, special=True)
        return tokens, list(self._formatter.stop)

    def _prepare_completion(self, prompt: str) -> tuple[list[int], list[str]]:
        tokens = self._tokenize(prompt, add_special=True, special=True)
        if not tokens:
            if self._native.bos < 0:
                raise BadRequestError("prompt must not be empty")
            tokens = [self._native.bos]
        return tokens, []

    def _embed_one(self, tokens: list[int]) -> list[float]:
        """Embed one tokenized text (decode thread, between two steps); makes the embedding context on first use."""
        try:
            native = self._native
            if native.embedder is None:
                with native_load_lock:
                    trim_heap()
                    before = resident_bytes()
                    native.embedder = _EmbeddingContext(native.model, self._spec.threads)
                    trim_heap()
                    measured = resident_bytes() - before
                self._memory_bytes += max(measured, _kv_cache_bytes(native.model, EMBEDDING_MAX_TOKENS))
                self._loop.beat()
            return native.embedder.embed(tokens)
        except AgentError:
            raise
        except Exception as exc:
            raise InferenceError(f"model {self._spec.name!r}: {exc}{_native_detail()}") from exc

    async def _stream(
        self,
        prepare: Callable[[], tuple[list[int], list[str]]],
        size: int,
        params: SamplingParams,
        admission: Admission,
    ) -> AsyncGenerator[GenerationEvent, None]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        tokens, template_stops = await asyncio.to_thread(prepare) if size > _INLINE_PREPARE_CHARS else prepare()
        if not tokens:  # e.g. a chat template that renders empty content to nothing: there is nothing to continue
            raise BadRequestError("the prompt is empty once templated and tokenized")
        slot_ctx = self._native.slot_ctx
        if len(tokens) >= slot_ctx:
            raise BadRequestError(f"the prompt is {len(tokens)} tokens; the model's context holds {slot_ctx}")
        inbox: Inbox[_Event] = Inbox(loop)
        request = _Request(
            tokens,
            params,
            (*params.stop, *template_stops),
            min(params.max_tokens, slot_ctx - len(tokens)),
            inbox,
            report_admission=admission.on_admitted is not None,
        )
        with self._state_lock:
            self._check_open()
            request.ticket = self._queue.submit(request, len(tokens), admission.priority)
        self._loop.wake()
        timer = None
        if admission.timeout_s is not None:
            timer = loop.call_at(started + admission.timeout_s, self._expire, request, admission.timeout_s)
        try:
            while True:
                item = await inbox.get()
                if type(item) is TextDelta:
                    yield item
                elif type(item) is Finished:
                    yield item
                    return
                elif isinstance(item, _Admitted):
                    if admission.on_admitted is not None:
                        admission.on_admitted(item.waited)
                else:
                    assert isinstance(item, AgentError)
                    raise item
        finally:
            if timer is not None:
                timer.cancel()
            if not request.done:
                request.cancelled = True
                self._queue.withdraw(request.ticket)
                self._loop.wake()

    def _expire(self, request: _Request, timeout: float) -> None:
        """The request's deadline passed (event loop): end its stream with a clear error, free its place."""
        if request.done or request.cancelled:
            return
        ticket = request.ticket
        assert ticket is not None
        ahead = self._queue.position(ticket)
        if ahead is not None and self._queue.withdraw(ticket):
            where = f"while waiting for a slot ({ahead} requests ahead of it, all {self._native.n_slots} slots busy)"
        else:
            where = f"while generating, after {request.generated} tokens"
        request.cancelled = True
        self._loop.wake()
        request.inbox.put(
            DeadlineExceededError(f"the request to model {self._spec.name!r} passed its {timeout:g} s deadline {where}")
        )
        request.inbox.wake()
