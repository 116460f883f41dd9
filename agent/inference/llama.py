"""The llama engine: GGUF models through llama-cpp-python. The only module that imports ``llama_cpp``.

One :class:`LlamaModel` per loaded GGUF file. Invariants:

* **One worker thread per model.** Every native call (load, tokenize-for-a-request, decode, embeddings, free)
  runs on the model's single-thread executor, never on the event loop. The executor's queue is FIFO, so
  requests are served one at a time in arrival order and a request in flight is never interrupted.
  (:meth:`LlamaModel.count_tokens` is the one exception: a read-only tokenizer call, safe from any thread.)
* **Streaming hand-off.** The worker pushes each event into the requesting coroutine's own
  :class:`asyncio.Queue` with ``loop.call_soon_threadsafe``; the worker never blocks on a consumer.
* **Cancellation.** Each request carries a :class:`threading.Event`. When the consumer stops (the async
  iterator is closed or its task cancelled, e.g. the client disconnected) the event is set: a queued request
  is dropped, a running one stops at the next token, and the model is free for the next request.
* **Determinism.** The KV cache is cleared before every request (no prefix reuse in this engine), so a
  request's output never depends on earlier requests: temperature 0 is greedy and deterministic, and the same
  seed with the same parameters gives the same text.
* **Chat template** from the GGUF metadata (``tokenizer.chat_template``) rendered by llama-cpp-python's
  sandboxed Jinja2 formatter. A model without one has no ``chat`` capability.
* **Embeddings** by a second llama context on the same weights, created on first use with ``embeddings`` on
  and mean pooling (SmolLM2 and other causal LMs have no pooling of their own); vectors are L2-normalised.
  Its memory is added to :attr:`LlamaModel.memory_bytes` when it is created.
* **Quiet and wrapped.** llama.cpp's log goes to a bounded in-memory buffer instead of stderr (its error lines
  are quoted in our errors); models are opened with ``verbose=False``. Native failures become
  :class:`~agent.errors.EngineLoadError` (load) or :class:`~agent.errors.InferenceError` (requests).

Known limit: with ``verbose=False`` llama-cpp-python points file descriptors 1 and 2 at ``/dev/null`` while
``llama_model_load_from_file`` runs (a fraction of a second per load), so log lines other threads write in
that window are lost. Loads are serialised by :data:`~agent.inference.base.native_load_lock`, which keeps
the redirection from ever outliving a load.

Issue 4 replaces the internals of :class:`LlamaModel` (continuous batching over the low-level API); the
public surface (:meth:`LlamaModel.load` and the :class:`~agent.inference.base.LoadedModel` methods) stays.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import concurrent.futures
import contextlib
import ctypes
import math
import secrets
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import llama_cpp
import numpy as np
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from agent.errors import AgentError, BadRequestError, EngineLoadError, InferenceError
from agent.inference.base import (
    ChatMessage,
    EmbeddingResult,
    Finished,
    FinishReason,
    GenerationEvent,
    LoadedModel,
    ModelSpec,
    SamplingParams,
    TextDelta,
    Usage,
    check_model_file,
    native_load_lock,
    resident_bytes,
    trim_heap,
)

__all__ = ["EMBEDDING_MAX_TOKENS", "LlamaModel"]

EMBEDDING_MAX_TOKENS: Final = 512
"""Most tokens per text for embeddings (the embedding context's size; longer texts are refused)."""
_SEED_MODULUS: Final = 0xFFFFFFFF  # llama.cpp's seeds are uint32 and 0xFFFFFFFF means "random"
_F16_BYTES: Final = 2


# --- llama.cpp's log -----------------------------------------------------------------------------------------

_GGML_LOG_LEVEL_WARN: Final = 2
_GGML_LOG_LEVEL_ERROR: Final = 3
_native_log: collections.deque[str] = collections.deque(maxlen=32)
_log_callback_installed = False


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _on_native_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    """Keep llama.cpp's warnings and errors in a small buffer (quoted in our errors); drop the rest."""
    if level in (_GGML_LOG_LEVEL_WARN, _GGML_LOG_LEVEL_ERROR) and text:
        _native_log.append(text.decode("utf-8", "replace").strip())


def _install_log_callback() -> None:
    global _log_callback_installed
    if not _log_callback_installed:
        llama_cpp.llama_log_set(_on_native_log, ctypes.c_void_p(0))
        _log_callback_installed = True


def _native_detail() -> str:
    """The last few llama.cpp warnings/errors, for an error message."""
    lines = [line for line in list(_native_log)[-3:] if line]
    return f" (llama.cpp: {' | '.join(lines)})" if lines else ""


# --- streaming text: UTF-8 and stop strings ------------------------------------------------------------------


class _StopScanner:
    """Finds stop strings in streamed text and holds back any tail that could be the start of one.

    Pure: ``feed`` returns the text that is safe to emit and whether a stop string was found (the text before
    it is returned; the stop string and everything after it are dropped).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        pending = self._pending + text
        hits = [i for i in (pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return pending[: min(hits)], True
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(pending)), hold, -1):
                if pending.endswith(stop[:k]):
                    hold = k
                    break
        cut = len(pending) - hold
        self._pending = pending[cut:]
        return pending[:cut], False

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return rest


# --- requests ----------------------------------------------------------------------------------------------

_Item = GenerationEvent | AgentError
_PreparePrompt = Callable[[], tuple[list[int], list[str]]]


@dataclass(slots=True)
class _Generation:
    """One streaming request as the worker sees it."""

    prepare: _PreparePrompt
    params: SamplingParams
    cancel: threading.Event
    emit: Callable[[_Item], None]


class _EmbeddingContext:
    """A second llama context on the same weights with embeddings on and mean pooling (worker thread only)."""

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
        ctx = llama_cpp.llama_init_from_model(model, params)
        if not ctx:
            raise InferenceError(f"cannot create the embedding context{_native_detail()}")
        self._ctx = ctx
        self._batch = llama_cpp.llama_batch_init(EMBEDDING_MAX_TOKENS, 0, 1)
        self._n_embd = int(llama_cpp.llama_model_n_embd(model))

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
        vector = np.ctypeslib.as_array(pointer, shape=(self._n_embd,)).astype(np.float64)
        norm = float(np.linalg.norm(vector))
        if not math.isfinite(norm) or norm == 0.0:
            raise InferenceError("the embedding has no direction (zero or non-finite norm)")
        return [float(v) for v in vector / norm]

    def close(self) -> None:
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)


# --- the model ---------------------------------------------------------------------------------------------


class LlamaModel(LoadedModel):
    """A GGUF model served by llama-cpp-python on its own worker thread. Build with :meth:`load`."""

    def __init__(
        self,
        spec: ModelSpec,
        llm: llama_cpp.Llama,
        executor: concurrent.futures.ThreadPoolExecutor,
        memory_bytes: int,
    ) -> None:
        """Wrap an opened model; use :meth:`load` instead of calling this directly."""
        self._spec = spec
        self._llm = llm
        self._executor = executor
        self._memory_bytes = memory_bytes
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._formatter = self._make_chat_formatter()
        self._embedder: _EmbeddingContext | None = None
        self._state_lock = threading.Lock()  # guards _closed and _active; held while tokenizing off-worker
        self._closed = False
        self._active: set[threading.Event] = set()

    # -- loading

    @classmethod
    def load(cls, spec: ModelSpec) -> LlamaModel:
        """Open ``spec``'s GGUF file on a new worker thread and return the loaded model. Blocking.

        Raises:
            EngineLoadError: missing file, wrong size, or llama.cpp refused the file.
        """
        if spec.format != "gguf":
            raise EngineLoadError(f"model {spec.name!r}: the llama engine opens GGUF files, not {spec.format}")
        check_model_file(spec)
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{spec.name}")
        try:
            llm, memory = executor.submit(cls._open, spec).result()
        except BaseException:
            executor.shutdown(wait=False)
            raise
        try:
            return cls(spec, llm, executor, memory)
        except BaseException:
            executor.submit(llm.close).result()
            executor.shutdown(wait=False)
            raise

    @staticmethod
    def _open(spec: ModelSpec) -> tuple[llama_cpp.Llama, int]:
        """Open the file, decode one token so the weights are paged in, and measure (worker thread)."""
        threads = spec.threads
        with native_load_lock:
            _install_log_callback()
            _native_log.clear()
            trim_heap()
            before = resident_bytes()
            try:
                llm = llama_cpp.Llama(
                    model_path=str(spec.path),
                    n_ctx=spec.n_ctx,
                    n_batch=min(spec.n_batch, spec.n_ctx),
                    n_threads=threads,
                    n_threads_batch=threads,
                    use_mmap=True,
                    verbose=False,
                )
            except (ValueError, RuntimeError, OSError) as exc:
                detail = f"{exc}{_native_detail()}"
                raise EngineLoadError(f"model {spec.name!r}: llama.cpp cannot load it: {detail}") from exc
            try:
                bos = llm.token_bos()
                llm.eval([bos if bos >= 0 else 0])
                llm.reset()  # type: ignore[no-untyped-call]
            except (ValueError, RuntimeError) as exc:
                llm.close()
                detail = f"{exc}{_native_detail()}"
                raise EngineLoadError(f"model {spec.name!r}: warm-up decode failed: {detail}") from exc
            trim_heap()
            measured = resident_bytes() - before
        return llm, max(measured, spec.size + _kv_cache_bytes(llm, spec.n_ctx))

    def _make_chat_formatter(self) -> Jinja2ChatFormatter | None:
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None

        def text(token: int) -> str:
            if token < 0:
                return ""
            return bytes(llama_cpp.llama_vocab_get_text(self._vocab, token)).decode("utf-8", "replace")

        eos = self._llm.token_eos()
        try:
            return Jinja2ChatFormatter(
                template=template, eos_token=text(eos), bos_token=text(self._llm.token_bos()), stop_token_ids=[eos]
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

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` without special tokens (read-only tokenizer call, any thread)."""
        with self._state_lock:
            self._check_open()
            return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def chat(self, messages: Sequence[ChatMessage], params: SamplingParams) -> AsyncGenerator[GenerationEvent, None]:
        """Stream the assistant's next turn (see :meth:`LoadedModel.chat`)."""
        if self._formatter is None:
            raise self._unsupported("chat (the GGUF has no chat template)")
        if not messages:
            raise BadRequestError("messages must not be empty")
        turns = [{"role": m.role, "content": m.content} for m in messages]
        return self._stream(lambda: self._prepare_chat(turns), params)

    def complete(self, prompt: str, params: SamplingParams) -> AsyncGenerator[GenerationEvent, None]:
        """Stream a continuation of ``prompt`` (see :meth:`LoadedModel.complete`)."""
        return self._stream(lambda: self._prepare_completion(prompt), params)

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        """Embed each text (at most :data:`EMBEDDING_MAX_TOKENS` tokens) into a unit vector."""
        if not texts:
            raise BadRequestError("input must contain at least one text")
        if any(not isinstance(t, str) or not t for t in texts):
            raise BadRequestError("each input text must be a non-empty string")
        result: EmbeddingResult = await self._run(self._embed_sync, list(texts))
        return result

    async def aclose(self) -> None:
        """Cancel queued and running requests (they finish with ``cancelled``), then free the model."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            for cancel in self._active:
                cancel.set()
        # Runs after every job already queued (each ends at once, cancelled): FIFO.
        freed = self._executor.submit(self._free)
        try:
            await asyncio.shield(asyncio.wrap_future(freed))
        finally:
            self._executor.shutdown(wait=False)

    # -- worker side

    def _free(self) -> None:
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        self._llm.close()
        trim_heap()

    def _prepare_chat(self, turns: list[dict[str, str]]) -> tuple[list[int], list[str]]:
        assert self._formatter is not None
        try:
            result = self._formatter(messages=turns)  # type: ignore[arg-type]
        except Exception as exc:  # the template may raise anything (raise_exception, jinja2 errors)
            raise BadRequestError(f"the model's chat template rejected the messages: {exc}") from exc
        tokens = self._llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        stop = result.stop or []
        return tokens, [stop] if isinstance(stop, str) else list(stop)

    def _prepare_completion(self, prompt: str) -> tuple[list[int], list[str]]:
        tokens = self._llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        if not tokens:
            bos = self._llm.token_bos()
            if bos < 0:
                raise BadRequestError("prompt must not be empty")
            tokens = [bos]
        return tokens, []

    def _generate(self, job: _Generation) -> None:
        """Run one generation to its end, emitting events (worker thread)."""
        if job.cancel.is_set():
            job.emit(Finished("cancelled", Usage(0, 0)))
            return
        try:
            job.emit(self._generate_events(job))
        except AgentError as exc:
            job.emit(exc)
        except Exception as exc:  # a native failure: wrap it at the seam
            error = InferenceError(f"model {self._spec.name!r}: generation failed: {exc}{_native_detail()}")
            error.__cause__ = exc
            job.emit(error)

    def _generate_events(self, job: _Generation) -> Finished:
        """Emit the TextDelta events of ``job`` and return its Finished event."""
        params = job.params
        tokens, template_stops = job.prepare()
        n_ctx = self._llm.n_ctx()
        if len(tokens) >= n_ctx:
            raise BadRequestError(f"the prompt is {len(tokens)} tokens; the model's context holds {n_ctx}")
        budget = min(params.max_tokens, n_ctx - len(tokens))
        seed = params.seed % _SEED_MODULUS if params.seed is not None else secrets.randbelow(_SEED_MODULUS)
        self._llm.set_seed(seed)
        self._llm.reset()  # type: ignore[no-untyped-call]  # no prefix reuse: results never depend on earlier requests
        scanner = _StopScanner([*params.stop, *template_stops])
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        generated = 0
        finish: FinishReason = "length"
        stopped = False
        tokens_out = self._llm.generate(
            tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
        )
        with contextlib.closing(tokens_out):
            for token in tokens_out:
                if job.cancel.is_set():
                    finish = "cancelled"
                    break
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    finish = "stop"
                    break
                generated += 1
                text, stopped = scanner.feed(decoder.decode(self._llm.detokenize([token])))
                if text:
                    job.emit(TextDelta(text))
                if stopped:
                    finish = "stop"
                    break
                if generated >= budget:
                    break
        if not stopped and finish != "cancelled":
            text, stopped = scanner.feed(decoder.decode(b"", final=True))
            text += "" if stopped else scanner.flush()
            if text:
                job.emit(TextDelta(text))
            if stopped:
                finish = "stop"
        return Finished(finish, Usage(prompt_tokens=len(tokens), completion_tokens=generated))

    def _embed_sync(self, texts: list[str]) -> EmbeddingResult:
        batches = [self._llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) for t in texts]
        for i, tokens in enumerate(batches):
            if len(tokens) > EMBEDDING_MAX_TOKENS:
                raise BadRequestError(
                    f"input {i} is {len(tokens)} tokens; at most {EMBEDDING_MAX_TOKENS} can be embedded"
                )
        if self._embedder is None:
            with native_load_lock:
                trim_heap()
                before = resident_bytes()
                self._embedder = _EmbeddingContext(self._llm.model, self._spec.threads)
                trim_heap()
                measured = resident_bytes() - before
            self._memory_bytes += max(measured, _kv_cache_bytes(self._llm, EMBEDDING_MAX_TOKENS))
        vectors = [self._embedder.embed(tokens) for tokens in batches]
        return EmbeddingResult(vectors=vectors, prompt_tokens=sum(len(t) for t in batches))

    # -- event-loop side

    def _check_open(self) -> None:
        if self._closed:
            raise InferenceError(f"model {self._spec.name!r} is closed")

    def _submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        with self._state_lock:
            self._check_open()
            return self._executor.submit(fn, *args)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the worker thread (queued FIFO behind earlier requests) and return its result."""
        future = self._submit(self._wrap_errors, fn, *args)
        return await asyncio.wrap_future(future)

    def _wrap_errors(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except AgentError:
            raise
        except Exception as exc:
            raise InferenceError(f"model {self._spec.name!r}: {exc}{_native_detail()}") from exc

    async def _stream(self, prepare: _PreparePrompt, params: SamplingParams) -> AsyncGenerator[GenerationEvent, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: _Item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
                cancel.set()

        with self._state_lock:
            self._check_open()
            future = self._executor.submit(self._generate, _Generation(prepare, params, cancel, emit))
            self._active.add(cancel)
        future.add_done_callback(lambda _: self._forget(cancel))
        try:
            while True:
                item = await queue.get()
                if isinstance(item, AgentError):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            cancel.set()
            future.cancel()

    def _forget(self, cancel: threading.Event) -> None:
        with self._state_lock:
            self._active.discard(cancel)


def _kv_cache_bytes(llm: llama_cpp.Llama, n_ctx: int) -> int:
    """Bytes of an f16 KV cache holding ``n_ctx`` tokens (an estimate: assumes K and V heads of equal size)."""
    model = llm.model
    n_layer = int(llama_cpp.llama_model_n_layer(model))
    n_head = max(1, int(llama_cpp.llama_model_n_head(model)))
    n_head_kv = int(llama_cpp.llama_model_n_head_kv(model))
    head_dim = int(llama_cpp.llama_model_n_embd(model)) // n_head
    return 2 * n_ctx * n_layer * n_head_kv * head_dim * _F16_BYTES
