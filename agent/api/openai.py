"""OpenAI-compatible inference routes, and named-tensor inference for ONNX models.

Routes: ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/chat/completions``, ``POST /v1/completions``,
``POST /v1/embeddings``, ``POST /v1/infer/{model}``.

A client names a model by its *name* (served by the name's active variant) or ``name:variant`` (that variant's
active or previous record). Order of checks for every inference request: body read and parsed (413/400), fields
validated (400), the caller's right to the *named* model (403, before anything reveals whether it exists),
the model resolved in the registry (404), then the engine (429/503 and the engine's own 400s).

Streaming (``"stream": true``) answers ``text/event-stream`` with one ``data: {chunk}`` line per piece of text in
OpenAI's chunk shape and a final ``data: [DONE]``. The first generation event is awaited *before* the response
is committed, so errors the engine raises at admission (queue full, model cannot load, prompt too long) still
get their proper status; an error after that is sent as one ``data: {"error": ...}`` event and ends the stream
without ``[DONE]``.

Admission (every inference route: generations, embeddings, tensor inference; each kind has its own bounded
queue per model): a request's priority class is the body field ``priority`` or the ``X-Priority`` header
(``interactive``, the default, or ``batch``: interactive requests leave the model's queue first); its deadline is
the body field ``timeout`` (seconds) or the ``X-Request-Deadline-Ms`` header, capped at
``inference.request_timeout_s`` (the default), counted from the request's arrival. A full queue answers 429 with
``Retry-After``; a passed deadline answers 504 (or ends a stream with an error event).

Every streamed write waits for the client to read for at most ``ApiState.stream_write_timeout_s`` (and at most
until the request's deadline, but at least ``_LAST_WRITE_S`` for the last writes): a client that stops reading
without disconnecting is then disconnected, so its handler ends and releases the model (which could otherwise
never be unloaded, replaced or drained).

Invariants: every generation is closed (``aclose``) when its handler ends, so a client that disconnects (the
handler is cancelled), a failed write or a stalled reader stops the engine's work at the next token; prompt and
completion text are logged only when ``log.log_prompts`` is set.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import structlog
from aiohttp import web

from agent.api.app import IDENTITY, REQUEST_ID, STATE, ApiState
from agent.api.errors import GenerationCancelledError, error_body
from agent.api.validation import (
    ModelRef,
    bad_request,
    get_bool,
    get_int,
    get_number,
    parse_model_ref,
    read_json,
)
from agent.errors import (
    AgentError,
    BadRequestError,
    DeadlineExceededError,
    InvalidModelError,
    ModelNotFoundError,
    QuarantinedError,
)
from agent.inference import (
    PRIORITIES,
    Admission,
    ChatMessage,
    Finished,
    GenerationEvent,
    LoadedModel,
    ModelFormat,
    ModelSpec,
    Priority,
    SamplingParams,
    TextDelta,
    resolve_threads,
)
from agent.registry import ModelRecord

if TYPE_CHECKING:  # imported where used: only tensor (ONNX) models bring numpy (~20 MiB) into the daemon
    import numpy as np

__all__ = ["add_routes", "model_spec", "resolve_model"]

log = structlog.get_logger(__name__)

DEFAULT_MAX_TOKENS = 256
MAX_EMBEDDING_INPUTS = 256
MAX_EMBEDDING_INPUT_CHARS = 16384  # 32 characters a token for the engine's 512-token limit: longer never fits
MAX_TENSORS = 64
MAX_TENSOR_RANK = 8
SERVABLE_STATES = frozenset({"active", "previous"})
TENSOR_DTYPES = frozenset({"float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"})
_ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_UNSUPPORTED_IF_TRUE = ("logprobs", "echo")
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "suffix", "logit_bias", "best_of")
PRIORITY_HEADER = "X-Priority"
DEADLINE_HEADER = "X-Request-Deadline-Ms"
_MAX_TIMEOUT_S = 86400.0
_DEADLINE_MS_RE = re.compile(r"[0-9]{1,12}")  # ASCII only, and short: str.isdigit() takes '²', int() refuses it
_LAST_WRITE_S = 1.0  # a stream's last writes (its error event) may wait this long even past the deadline


# --------------------------------------------------------------------------------------------- model resolution


async def resolve_model(state: ApiState, ref: ModelRef) -> ModelRecord:
    """The registry record that serves ``ref``.

    Raises:
        ModelNotFoundError: no such name or variant, or nothing servable (active or previous) for it.
    """
    if ref.variant is None:
        record = await state.in_thread(state.registry.active, ref.name)
        if record is None:
            await _raise_if_quarantined(state, ref)
            raise ModelNotFoundError(f"model {ref.name!r} does not exist or has no active variant")
        return record
    active = await state.in_thread(state.registry.active, ref.name)
    if active is not None and active.variant == ref.variant:
        return active
    candidates = [
        record
        for record in await state.in_thread(state.registry.list_models, ref.name)
        if record.variant == ref.variant and record.state in SERVABLE_STATES
    ]
    if not candidates:
        await _raise_if_quarantined(state, ref)
        raise ModelNotFoundError(f"model {str(ref)!r} does not exist or is not active")
    return max(candidates, key=lambda r: r.version)


async def _raise_if_quarantined(state: ApiState, ref: ModelRef) -> None:
    """Nothing servable because the newest version is quarantined (e.g. its load crash-looped): say so."""
    reason = await state.in_thread(state.registry.quarantine_reason, ref.name, ref.variant)
    if reason is not None:
        raise QuarantinedError(f"model {str(ref)!r} cannot be served: {reason}")


def model_spec(state: ApiState, record: ModelRecord) -> ModelSpec:
    """The engine spec for ``record`` under the agent's inference configuration and per-model overrides."""
    inference = state.config.inference
    overrides = inference.models.get(record.name)
    n_ctx = (overrides.n_ctx if overrides and overrides.n_ctx else None) or inference.n_ctx
    if record.context_length:
        n_ctx = min(n_ctx, record.context_length)
    n_threads = (overrides.n_threads if overrides and overrides.n_threads else None) or inference.n_threads
    n_parallel = (overrides.n_parallel if overrides and overrides.n_parallel else None) or inference.n_parallel
    model_format: ModelFormat
    if record.format == "gguf":
        model_format = "gguf"
    elif record.format == "onnx":
        model_format = "onnx"
    else:  # pragma: no cover - the registry's schema allows only these two
        raise InvalidModelError(f"model {record.ref} has unknown format {record.format!r}")
    return ModelSpec(
        name=record.name,
        variant=record.variant,
        path=state.registry.blob_path(record),
        format=model_format,
        sha256=record.sha256,
        size=record.size,
        n_ctx=max(1, n_ctx),
        n_threads=resolve_threads(n_threads),
        n_parallel=max(1, n_parallel),
        pinned=bool(overrides and overrides.pinned),
        n_batch=inference.n_batch,
        max_queue=inference.max_queue,
        max_queue_tokens=inference.max_queue_tokens,
        max_queue_bytes=inference.max_queue_bytes,
    )


def _model_json(record: ModelRecord, model_id: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": int(record.created_ts),
        "owned_by": "edge-agent",
        "variant": record.variant,
        "version": record.version,
        "format": record.format,
        "context_length": record.context_length,
    }


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the active model of every name the caller may use."""
    state = request.app[STATE]
    identity = request[IDENTITY]
    records = await state.in_thread(state.registry.active_models)
    data = [
        _model_json(record, record.name)
        for record in sorted(records, key=lambda r: r.name)
        if state.policy.may_infer(identity, record.name)
    ]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``."""
    state = request.app[STATE]
    ref = parse_model_ref(request.match_info["model"])
    state.policy.require_infer(request[IDENTITY], ref.name)
    record = await resolve_model(state, ref)
    return web.json_response(_model_json(record, str(ref)))


# ------------------------------------------------------------------------------------------------ generation


@dataclass(frozen=True, slots=True)
class _GenerationRequest:
    kind: Literal["chat", "text"]
    ref: ModelRef
    params: SamplingParams
    stream: bool
    include_usage: bool
    messages: tuple[ChatMessage, ...] = ()
    prompt: str = ""


@dataclass(frozen=True, slots=True)
class _AdmissionRequest:
    """Priority and deadline as the client asked (validated; the deadline counts from ``arrived``)."""

    priority: Priority
    timeout_s: float
    arrived: float

    def admission(self, on_admitted: Callable[[float], None] | None = None) -> Admission:
        """The engine's :class:`Admission` with the time left now.

        Raises:
            DeadlineExceededError: the deadline passed before the request reached its model.
        """
        left = self.timeout_s - (time.perf_counter() - self.arrived)
        if left <= 0:
            raise DeadlineExceededError(
                f"the request passed its {self.timeout_s:g} s deadline before it reached the model"
            )
        return Admission(priority=self.priority, timeout_s=left, on_admitted=on_admitted)


def _admission(request: web.Request, body: dict[str, Any], state: ApiState, arrived: float) -> _AdmissionRequest:
    priority: object = body.get("priority")
    if priority is None:
        priority = request.headers.get(PRIORITY_HEADER, "interactive").strip().lower()
    if priority not in PRIORITIES:
        raise bad_request(f"'priority' must be one of {', '.join(PRIORITIES)}", "priority")
    limit = state.config.inference.request_timeout_s
    timeout = limit
    header = request.headers.get(DEADLINE_HEADER)
    if body.get("timeout") is not None:
        timeout = min(limit, get_number(body, "timeout", default=limit, low=0.001, high=_MAX_TIMEOUT_S))
    elif header is not None:
        value = header.strip()
        if not _DEADLINE_MS_RE.fullmatch(value) or int(value) < 1:
            raise bad_request(f"the {DEADLINE_HEADER} header must be a positive integer (milliseconds)", "timeout")
        timeout = min(limit, int(value) / 1000)
    return _AdmissionRequest(priority=priority, timeout_s=timeout, arrived=arrived)


def _sampling(body: dict[str, Any], max_tokens_limit: int) -> SamplingParams:
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, [], {}):
            raise bad_request(f"'{key}' is not supported by this server", key)
    for key in _UNSUPPORTED_IF_TRUE:
        if body.get(key) not in (None, False, 0):
            raise bad_request(f"'{key}' is not supported by this server", key)
    get_int(body, "n", default=1, low=1, high=1)  # one choice per request
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = get_int(body, key, default=min(DEFAULT_MAX_TOKENS, max_tokens_limit), low=1, high=max_tokens_limit)
    kwargs: dict[str, Any] = {"max_tokens": max_tokens}
    for name, low, high in (
        ("temperature", 0.0, 2.0),
        ("top_p", 0.0, 1.0),
        ("min_p", 0.0, 1.0),
        ("repeat_penalty", 0.0, 10.0),
        ("presence_penalty", -2.0, 2.0),
        ("frequency_penalty", -2.0, 2.0),
    ):
        if body.get(name) is not None:
            kwargs[name] = get_number(body, name, default=0.0, low=low, high=high)
    if body.get("top_k") is not None:
        kwargs["top_k"] = get_int(body, "top_k", default=0, low=0, high=1_000_000)
    if body.get("seed") is not None:
        kwargs["seed"] = get_int(body, "seed", default=None, low=-(2**63), high=2**63 - 1)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad_request("'stop' must be a string or a list of strings", "stop")
        kwargs["stop"] = tuple(stop)
    try:
        return SamplingParams(**kwargs)
    except BadRequestError as exc:
        raise bad_request(str(exc)) from exc


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = get_bool(body, "stream", default=False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object", "stream_options")
        include_usage = get_bool(options, "include_usage", default=False)
    return stream, include_usage


def _message_content(content: object, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{index}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"messages[{index}].content must be a string or a list of text parts", "messages")


def _parse_chat(body: dict[str, Any], state: ApiState) -> _GenerationRequest:
    ref = parse_model_ref(body.get("model"))
    raw = body.get("messages")
    limit = state.config.api.max_messages
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty list", "messages")
    if len(raw) > limit:
        raise bad_request(f"'messages' has {len(raw)} entries; at most {limit} are allowed", "messages")
    messages = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise bad_request(f"messages[{index}] must be an object", "messages")
        role = item.get("role")
        if not isinstance(role, str) or role not in _ROLE_ALIASES:
            raise bad_request(f"messages[{index}].role must be one of system, developer, user, assistant", "messages")
        messages.append(ChatMessage(role=_ROLE_ALIASES[role], content=_message_content(item.get("content"), index)))
    stream, include_usage = _stream_flags(body)
    return _GenerationRequest(
        kind="chat",
        ref=ref,
        params=_sampling(body, state.config.api.max_tokens_limit),
        stream=stream,
        include_usage=include_usage,
        messages=tuple(messages),
    )


def _parse_completion(body: dict[str, Any], state: ApiState) -> _GenerationRequest:
    ref = parse_model_ref(body.get("model"))
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise bad_request("'prompt' must be a string (or a list of exactly one string)", "prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string", "prompt")
    stream, include_usage = _stream_flags(body)
    return _GenerationRequest(
        kind="text",
        ref=ref,
        params=_sampling(body, state.config.api.max_tokens_limit),
        stream=stream,
        include_usage=include_usage,
        prompt=prompt,
    )


def _usage_json(event: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": event.usage.prompt_tokens,
        "completion_tokens": event.usage.completion_tokens,
        "total_tokens": event.usage.total_tokens,
    }


def _finish_reason(event: Finished) -> str:
    if event.finish_reason == "cancelled":
        raise GenerationCancelledError("the generation was cancelled (the model was unloaded or the agent stops)")
    return event.finish_reason


class _Chunks:
    """Builds response objects in OpenAI's shapes for one generation."""

    def __init__(self, req: _GenerationRequest, model_id: str) -> None:
        self.kind = req.kind
        self.model_id = model_id
        self.id = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]], usage: dict[str, int] | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model_id,
            "system_fingerprint": None,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage
        return out

    def chunk(self, text: str | None, finish_reason: str | None, *, role: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice], None)
        choice_t = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice_t], None)

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._envelope(obj, [], usage)

    def whole(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            return self._envelope("chat.completion", [choice], usage)
        choice_t = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice_t], usage)


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _Observer:
    """Metrics and the one log event of a generation."""

    def __init__(self, state: ApiState, req: _GenerationRequest, record: ModelRecord) -> None:
        self.state = state
        self.req = req
        self.record = record
        self.started = time.perf_counter()
        self.first_token_s: float | None = None
        self.pieces: list[str] = []

    def text(self, text: str) -> None:
        if self.first_token_s is None and text:
            self.first_token_s = time.perf_counter() - self.started
            self.state.metrics.time_to_first_token.labels(model=self.record.name).observe(self.first_token_s)
        self.pieces.append(text)

    def finished(self, event: Finished) -> None:
        metrics = self.state.metrics
        metrics.tokens_generated.labels(model=self.record.name).inc(event.usage.completion_tokens)
        metrics.prompt_tokens.labels(model=self.record.name).inc(event.usage.prompt_tokens)
        fields: dict[str, Any] = {
            "model": self.record.name,
            "variant": self.record.variant,
            "kind": self.req.kind,
            "stream": self.req.stream,
            "finish_reason": event.finish_reason,
            "prompt_tokens": event.usage.prompt_tokens,
            "completion_tokens": event.usage.completion_tokens,
            "ttft_ms": None if self.first_token_s is None else round(self.first_token_s * 1000, 1),
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 1),
        }
        if self.state.config.log.log_prompts:
            fields["prompt"] = (
                [{"role": m.role, "content": m.content} for m in self.req.messages]
                if self.req.kind == "chat"
                else self.req.prompt
            )
            fields["completion"] = "".join(self.pieces)
        log.info("api.generation", **fields)


async def _generate(
    request: web.Request, parse: Callable[[dict[str, Any], ApiState], _GenerationRequest]
) -> web.StreamResponse:
    arrived = time.perf_counter()
    state = request.app[STATE]
    body = await read_json(request, state.config.api.max_body_bytes)
    req = parse(body, state)
    wanted = _admission(request, body, state, arrived)
    state.policy.require_infer(request[IDENTITY], req.ref.name)
    record = await resolve_model(state, req.ref)
    if record.format != "gguf":
        raise bad_request(f"model {str(req.ref)!r} is an ONNX model: use POST /v1/infer/{req.ref}", "model")
    spec = model_spec(state, record)
    observer = _Observer(state, req, record)
    chunks = _Chunks(req, str(req.ref))
    gauge = state.metrics.inference_in_flight.labels(model=record.name)
    gauge.inc()
    try:
        with structlog.contextvars.bound_contextvars(model=record.name):
            async with state.pool.use(spec) as model:
                capability = "chat" if req.kind == "chat" else "completion"
                if capability not in model.capabilities:
                    raise bad_request(f"model {str(req.ref)!r} does not support {capability}", "model")
                admission = wanted.admission(state.metrics.queue_wait.labels(model=record.name).observe)
                events = _events(model, req, admission)
                async with _closing(events):
                    if req.stream:
                        return await _stream(request, events, chunks, observer, req, wanted)
                    return await _collect(events, chunks, observer)
    finally:
        gauge.dec()


@contextlib.asynccontextmanager
async def _closing(events: AsyncIterator[GenerationEvent]) -> AsyncIterator[None]:
    """Close the generation however the block ends (the engine then stops at the next token)."""
    try:
        yield
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


def _events(model: LoadedModel, req: _GenerationRequest, admission: Admission) -> AsyncIterator[GenerationEvent]:
    if req.kind == "chat":
        return model.chat(req.messages, req.params, admission)
    return model.complete(req.prompt, req.params, admission)


async def _collect(events: AsyncIterator[GenerationEvent], chunks: _Chunks, observer: _Observer) -> web.Response:
    async for event in events:
        if isinstance(event, TextDelta):
            observer.text(event.text)
        else:
            observer.finished(event)
            reason = _finish_reason(event)
            return web.json_response(chunks.whole("".join(observer.pieces), reason, _usage_json(event)))
    raise AgentError("the generation ended without a finish event")


class _StalledClientError(Exception):
    """A streaming client read nothing for the write timeout (internal: never leaves :func:`_stream`)."""


async def _stream(
    request: web.Request,
    events: AsyncIterator[GenerationEvent],
    chunks: _Chunks,
    observer: _Observer,
    req: _GenerationRequest,
    wanted: _AdmissionRequest,
) -> web.StreamResponse:
    # Await the first event before committing to 200, so admission errors keep their status.
    first = await anext(events, None)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            "X-Request-Id": request[REQUEST_ID],
        }
    )
    await response.prepare(request)
    write_timeout = request.app[STATE].stream_write_timeout_s
    deadline = wanted.arrived + wanted.timeout_s

    async def send(data: bytes | None) -> None:
        """Write ``data`` (``None``: end the stream), waiting for the client to read for a bounded time only."""
        left = max(deadline - time.perf_counter(), _LAST_WRITE_S)
        try:
            async with asyncio.timeout(min(write_timeout, left)):
                await (response.write_eof() if data is None else response.write(data))
        except TimeoutError:
            raise _StalledClientError(f"the client read nothing for {min(write_timeout, left):.1f} s") from None

    try:
        if req.kind == "chat":
            await send(_sse(chunks.chunk("", None, role=True)))
        event = first
        while event is not None:
            if isinstance(event, TextDelta):
                observer.text(event.text)
                if event.text:
                    await send(_sse(chunks.chunk(event.text, None)))
            else:
                observer.finished(event)
                reason = _finish_reason(event)
                await send(_sse(chunks.chunk(None if req.kind == "chat" else "", reason)))
                if req.include_usage:
                    await send(_sse(chunks.usage_chunk(_usage_json(event))))
                await send(b"data: [DONE]\n\n")
                await send(None)
                return response
            event = await anext(events, None)
        raise AgentError("the generation ended without a finish event")
    except ConnectionResetError:
        log.info("api.client_disconnected")
        return response
    except _StalledClientError as exc:
        # The client stopped reading: drop the connection, so this handler ends and releases its model.
        log.info("api.client_stalled", error=str(exc))
        if request.transport is not None:
            request.transport.abort()
        return response
    except Exception as exc:
        # Too late for a status code: tell the client in the stream, then end it without [DONE].
        if isinstance(exc, AgentError):
            body = error_body(str(exc), exc.error_type, exc.error_code)
            log.info("api.stream_error", error=str(exc)[:200])
        else:
            body = error_body(f"internal error (request id {request[REQUEST_ID]})", "server_error", "internal_error")
            log.exception("api.stream_unexpected_error")
        try:
            await send(_sse(body))
            await send(None)
        except ConnectionResetError:
            pass
        except _StalledClientError as stalled:
            log.info("api.client_stalled", error=str(stalled))
            if request.transport is not None:
                request.transport.abort()
        return response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    return await _generate(request, _parse_chat)


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    return await _generate(request, _parse_completion)


# ------------------------------------------------------------------------------------------------ embeddings


async def embeddings(request: web.Request) -> web.Response:
    """``POST /v1/embeddings``."""
    arrived = time.perf_counter()
    state = request.app[STATE]
    body = await read_json(request, state.config.api.max_body_bytes)
    ref = parse_model_ref(body.get("model"))
    raw = body.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad_request(
            "'input' must be a string or a non-empty list of strings (token arrays are not supported)", "input"
        )
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise bad_request(f"'input' has more than {MAX_EMBEDDING_INPUTS} entries", "input")
    if any(not t for t in texts):
        raise bad_request("'input' must not contain empty strings", "input")
    if any(len(t) > MAX_EMBEDDING_INPUT_CHARS for t in texts):
        # Refused before the engine tokenizes it on the event loop (a 1 MB text stalled it ~270 ms).
        raise bad_request(f"each 'input' text must be at most {MAX_EMBEDDING_INPUT_CHARS} characters", "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    if body.get("dimensions") is not None:
        raise bad_request("'dimensions' is not supported by this server", "dimensions")
    wanted = _admission(request, body, state, arrived)
    state.policy.require_infer(request[IDENTITY], ref.name)
    record = await resolve_model(state, ref)
    spec = model_spec(state, record)
    gauge = state.metrics.inference_in_flight.labels(model=record.name)
    gauge.inc()
    try:
        with structlog.contextvars.bound_contextvars(model=record.name):
            async with state.pool.use(spec) as model:
                if "embedding" not in model.capabilities:
                    raise bad_request(f"model {str(ref)!r} does not support embeddings", "model")
                result = await model.embed(texts, wanted.admission())
    finally:
        gauge.dec()
    state.metrics.prompt_tokens.labels(model=record.name).inc(result.prompt_tokens)
    data = []
    for index, vector in enumerate(result.vectors):
        embedding: list[float] | str
        if encoding == "base64":  # little-endian float32, as OpenAI's API sends them
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        else:
            embedding = [float(v) for v in vector]
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    log.info("api.embeddings", model=record.name, inputs=len(texts), prompt_tokens=result.prompt_tokens)
    return web.json_response(
        {
            "object": "list",
            "data": data,
            "model": str(ref),
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }
    )


# ------------------------------------------------------------------------------------------- tensor inference


def _tensor(name: str, value: object, default_dtype: str) -> np.ndarray:
    import numpy as np

    where = f"inputs[{name!r}]"
    if not isinstance(value, dict) or "data" not in value:
        raise bad_request(f"{where} must be an object with 'data' (and optional 'shape', 'dtype')", "inputs")
    dtype = value.get("dtype", default_dtype)
    if not isinstance(dtype, str) or dtype not in TENSOR_DTYPES:
        raise bad_request(f"{where}.dtype must be one of {sorted(TENSOR_DTYPES)}", "inputs")
    try:
        array = np.asarray(value["data"], dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise bad_request(f"{where}.data is not a regular array of {dtype} numbers", "inputs") from exc
    shape = value.get("shape")
    if array.size == 0:
        raise bad_request(f"{where} is empty: a tensor needs at least one element", "inputs")
    if shape is None:
        return array
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_TENSOR_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d < 2**31 for d in shape)
    ):
        raise bad_request(f"{where}.shape must be a list of at most {MAX_TENSOR_RANK} positive integers", "inputs")
    # With no zero dimension, a shape whose product is absurd cannot match data that fitted in the body.
    if math.prod(shape) != array.size:
        raise bad_request(f"{where}: shape {shape} does not match {array.size} data elements", "inputs")
    return array.reshape(shape)


def _default_dtype(declared: str | None) -> str:
    return declared if declared in TENSOR_DTYPES else "float32"


def _output(array: np.ndarray) -> dict[str, Any]:
    import numpy as np

    data: object
    if array.dtype.kind == "f" and not bool(np.isfinite(array).all()):
        as_object = array.astype(object)
        as_object[~np.isfinite(array)] = None
        data = as_object.tolist()
    else:
        data = array.tolist()
    return {"data": data, "shape": list(array.shape), "dtype": str(array.dtype)}


async def infer(request: web.Request) -> web.Response:
    """``POST /v1/infer/{model}``: named tensors in, named tensors out (ONNX models)."""
    arrived = time.perf_counter()
    state = request.app[STATE]
    ref = parse_model_ref(request.match_info["model"])
    body = await read_json(request, state.config.api.max_body_bytes)
    raw = body.get("inputs")
    if not isinstance(raw, dict) or not raw:
        raise bad_request("'inputs' must be a non-empty object of named tensors", "inputs")
    if len(raw) > MAX_TENSORS:
        raise bad_request(f"'inputs' has more than {MAX_TENSORS} tensors", "inputs")
    for name in raw:
        if not name or len(name) > 256 or not name.isprintable():
            raise bad_request("tensor names must be 1 to 256 printable characters", "inputs")
    wanted = _admission(request, body, state, arrived)
    state.policy.require_infer(request[IDENTITY], ref.name)
    record = await resolve_model(state, ref)
    if record.format != "onnx":
        raise bad_request(f"model {str(ref)!r} is not an ONNX model: use /v1/chat/completions", "model")
    spec = model_spec(state, record)
    gauge = state.metrics.inference_in_flight.labels(model=record.name)
    gauge.inc()
    started = time.perf_counter()
    try:
        with structlog.contextvars.bound_contextvars(model=record.name):
            async with state.pool.use(spec) as model:
                if "tensor" not in model.capabilities:
                    raise bad_request(f"model {str(ref)!r} does not take named tensors", "model")
                declared = {spec_.name: spec_.dtype for spec_ in model.input_specs()}
                inputs = {name: _tensor(name, value, _default_dtype(declared.get(name))) for name, value in raw.items()}
                outputs = await model.infer(inputs, wanted.admission())
    finally:
        gauge.dec()
    log.info("api.infer", model=record.name, duration_ms=round((time.perf_counter() - started) * 1000, 1))
    import numpy as np  # loaded with the ONNX engine already

    return web.json_response(
        {"model": str(ref), "outputs": {name: _output(np.asarray(value)) for name, value in outputs.items()}}
    )


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the OpenAI-compatible and tensor inference routes."""
    router.add_get("/v1/models", list_models, name="models_list", allow_head=False)
    router.add_get("/v1/models/{model}", get_model, name="models_get", allow_head=False)
    router.add_post("/v1/chat/completions", chat_completions, name="chat_completions")
    router.add_post("/v1/completions", completions, name="completions")
    router.add_post("/v1/embeddings", embeddings, name="embeddings")
    router.add_post("/v1/infer/{model}", infer, name="infer")
