"""The llama engine against the real SmolLM2-135M-Instruct GGUF (loaded once for the module)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.errors import BadRequestError, DeadlineExceededError, EngineLoadError, InferenceError
from agent.inference import (
    Admission,
    ChatMessage,
    Finished,
    GenerationEvent,
    LoadedModel,
    ModelSpec,
    Priority,
    SamplingParams,
    TextDelta,
    load_model,
)

pytestmark = pytest.mark.component

GREEDY = SamplingParams(temperature=0.0, max_tokens=32)
CAPITAL = [
    ChatMessage("system", "You are a helpful assistant."),
    ChatMessage("user", "What is the capital of France?"),
]
# Raw text that a small model continues (counting) for far longer than any test waits.
ENDLESS = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


@functools.cache
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _spec(model_path: Path, **overrides: object) -> ModelSpec:
    fields: dict[str, object] = {
        "name": "smollm2-135m-instruct",
        "variant": "q4_1",
        "path": model_path,
        "format": "gguf",
        "sha256": _sha256(model_path),
        "size": model_path.stat().st_size,
        "n_ctx": 2048,
        "n_threads": 2,
        "n_parallel": 1,
    }
    fields.update(overrides)
    return ModelSpec(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Iterator[LoadedModel]:
    model = load_model(_spec(smollm2_path))
    yield model
    asyncio.run(model.aclose())


async def _collect(stream: AsyncGenerator[GenerationEvent, None]) -> tuple[list[str], Finished]:
    deltas: list[str] = []
    async with contextlib.aclosing(stream):
        async for event in stream:
            if isinstance(event, TextDelta):
                deltas.append(event.text)
            else:
                return deltas, event
    raise AssertionError("the stream ended without a Finished event")


async def test_chat_at_temperature_zero_answers_sensibly(smollm2: LoadedModel) -> None:
    """A greedy chat completion returns non-empty English text that answers the question."""
    deltas, finished = await _collect(smollm2.chat(CAPITAL, GREEDY))
    text = "".join(deltas)
    assert "Paris" in text
    assert finished.finish_reason == "stop"


async def test_stream_yields_several_deltas_then_finished_with_usage(smollm2: LoadedModel) -> None:
    """Streaming yields several text deltas, then exactly one Finished carrying the token usage, then ends."""
    events = [event async for event in smollm2.chat(CAPITAL, GREEDY)]
    assert len(events) >= 4
    assert all(isinstance(e, TextDelta) and e.text for e in events[:-1])
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.usage.prompt_tokens > 10
    assert len(events) - 1 <= finished.usage.completion_tokens <= GREEDY.max_tokens
    assert smollm2.capabilities == {"chat", "completion", "embedding"}


async def test_max_tokens_ends_with_length(smollm2: LoadedModel) -> None:
    """A generation stops after max_tokens tokens with finish_reason "length"."""
    deltas, finished = await _collect(smollm2.complete(ENDLESS, SamplingParams(temperature=0.0, max_tokens=5)))
    assert finished.finish_reason == "length"
    assert finished.usage.completion_tokens == 5
    assert deltas


async def test_stop_string_ends_output_before_it(smollm2: LoadedModel) -> None:
    """A stop string ends the completion with "stop"; neither it nor anything after it is emitted."""
    params = SamplingParams(temperature=0.0, max_tokens=32, stop=(" 13,",))
    deltas, finished = await _collect(smollm2.complete(ENDLESS, params))
    text = "".join(deltas)
    assert finished.finish_reason == "stop"
    assert "11, 12," in text
    assert "13" not in text


async def test_same_seed_and_temperature_give_same_text(smollm2: LoadedModel) -> None:
    """Sampling at temperature > 0 with the same seed twice produces the same text."""
    messages = [ChatMessage("user", "Write a poem about the sea.")]
    params = SamplingParams(temperature=0.9, max_tokens=24, seed=42)
    first, _ = await _collect(smollm2.chat(messages, params))
    second, _ = await _collect(smollm2.chat(messages, params))
    assert "".join(first) == "".join(second)
    assert "".join(first).strip()


async def _timed(stream: AsyncGenerator[GenerationEvent, None]) -> tuple[float, list[str], Finished]:
    started = time.monotonic()
    deltas, finished = await _collect(stream)
    return time.monotonic() - started, deltas, finished


# A cancelled ENDLESS request left running would generate LONG tokens ahead of the next request: more than
# SLOWER times the time a short request takes alone (measured first, so CPU contention affects both alike).
LONG = 1500
SHORT = SamplingParams(temperature=0.0, max_tokens=4)
SLOWER = 20


async def test_cancelling_the_consumer_stops_generation_and_frees_the_model(smollm2: LoadedModel) -> None:
    """Cancelling the consuming task (a client disconnect) stops the worker at the next token; the next request runs."""
    alone, _, _ = await _timed(smollm2.complete(ENDLESS, SHORT))
    seen = asyncio.Event()
    received: list[str] = []

    async def consume() -> None:
        async for event in smollm2.complete(ENDLESS, SamplingParams(temperature=0.0, max_tokens=LONG)):
            assert isinstance(event, TextDelta)
            received.append(event.text)
            if len(received) == 3:
                seen.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(seen.wait(), timeout=60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    after, deltas, finished = await _timed(smollm2.complete(ENDLESS, SHORT))
    assert finished.usage.completion_tokens == SHORT.max_tokens
    assert deltas
    assert after < SLOWER * alone + 1.0, f"{after:.2f}s after cancelling vs {alone:.2f}s alone"


async def test_closing_the_stream_early_frees_the_model(smollm2: LoadedModel) -> None:
    """Closing the async iterator after a few deltas stops the generation; the next request completes promptly."""
    alone, _, _ = await _timed(smollm2.complete(ENDLESS, SHORT))
    stream = smollm2.complete(ENDLESS, SamplingParams(temperature=0.0, max_tokens=LONG))
    async with contextlib.aclosing(stream):
        async for _ in stream:
            break
    after, deltas, finished = await _timed(smollm2.complete(ENDLESS, SHORT))
    assert finished.usage.completion_tokens == SHORT.max_tokens
    assert deltas
    assert after < SLOWER * alone + 1.0, f"{after:.2f}s after closing vs {alone:.2f}s alone"


async def test_closing_the_model_cancels_requests_in_flight_and_queued(smollm2_path: Path) -> None:
    """aclose() ends a running and a queued generation with finish_reason "cancelled"; later calls are refused."""
    model = await asyncio.to_thread(load_model, _spec(smollm2_path))
    params = SamplingParams(temperature=0.0, max_tokens=1500)
    running = model.complete(ENDLESS, params)
    first = await anext(running)
    assert isinstance(first, TextDelta)
    queued = asyncio.create_task(_collect(model.complete(ENDLESS, params)))
    await asyncio.sleep(0.05)  # let the queued request reach the worker's queue
    await asyncio.wait_for(model.aclose(), timeout=10)
    rest = [event async for event in running]
    assert isinstance(rest[-1], Finished)
    assert rest[-1].finish_reason == "cancelled"
    assert rest[-1].usage.completion_tokens < 1500
    queued_deltas, queued_finished = await queued
    assert (queued_deltas, queued_finished.finish_reason) == ([], "cancelled")
    with pytest.raises(InferenceError, match="closed"):
        await _collect(model.chat(CAPITAL, GREEDY))
    with pytest.raises(InferenceError, match="closed"):
        model.count_tokens("x")


async def test_concurrent_requests_are_queued_not_interrupted(smollm2: LoadedModel) -> None:
    """Two concurrent requests both complete, one after the other, each with exactly its standalone output."""
    other = [ChatMessage("user", "Count from 1 to 10.")]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    alone_a, _ = await _collect(smollm2.chat(CAPITAL, params))
    alone_b, _ = await _collect(smollm2.chat(other, params))
    order: list[str] = []

    async def run(tag: str, messages: list[ChatMessage]) -> tuple[list[str], Finished]:
        deltas: list[str] = []
        async for event in smollm2.chat(messages, params):
            order.append(tag)
            if isinstance(event, TextDelta):
                deltas.append(event.text)
            else:
                return deltas, event
        raise AssertionError("no Finished event")

    (deltas_a, fin_a), (deltas_b, fin_b) = await asyncio.gather(run("a", CAPITAL), run("b", other))
    assert deltas_a == alone_a
    assert deltas_b == alone_b
    assert fin_a.finish_reason in {"stop", "length"}
    assert fin_b.finish_reason in {"stop", "length"}
    assert order == sorted(order), f"the requests interleaved: {order}"


async def test_prompt_longer_than_context_is_refused_before_any_event(smollm2: LoadedModel) -> None:
    """A prompt that does not fit the context raises BadRequestError before the first event."""
    stream = smollm2.complete("word " * 3000, GREEDY)
    async with contextlib.aclosing(stream):
        with pytest.raises(BadRequestError, match="context"):
            await anext(stream)


async def test_embeddings_are_normalised_and_similar_texts_are_closer(smollm2: LoadedModel) -> None:
    """Embeddings are unit vectors of one dimension, and paraphrases are closer than unrelated texts."""
    texts = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock markets fell sharply today."]
    result = await smollm2.embed(texts)
    vectors = np.array(result.vectors)
    assert vectors.shape == (3, result.dimensions)
    assert result.dimensions > 0
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2]
    assert similarity[0, 1] > similarity[1, 2]
    # SmolLM2's GGUF adds no BOS token, so the usage is exactly the texts' own tokens.
    assert result.prompt_tokens == sum(smollm2.count_tokens(t) for t in texts)


async def test_empty_embedding_input_is_refused(smollm2: LoadedModel) -> None:
    """An empty list or an empty string cannot be embedded."""
    with pytest.raises(BadRequestError):
        await smollm2.embed([])
    with pytest.raises(BadRequestError):
        await smollm2.embed(["fine", ""])


def test_count_tokens_counts_without_special_tokens(smollm2: LoadedModel) -> None:
    """count_tokens counts the text's own tokens, more for longer text."""
    assert smollm2.count_tokens("") == 0
    assert 1 <= smollm2.count_tokens("Hello") < smollm2.count_tokens("Hello there, how are you today?")


def test_wrong_size_or_missing_file_is_refused_before_load(smollm2_path: Path, tmp_path: Path) -> None:
    """A file whose size differs from the spec, or a missing file, fails with EngineLoadError."""
    with pytest.raises(EngineLoadError, match="bytes, expected"):
        load_model(_spec(smollm2_path, size=smollm2_path.stat().st_size - 1))
    with pytest.raises(EngineLoadError, match="cannot open"):
        load_model(_spec(smollm2_path, path=tmp_path / "absent.gguf"))


def test_a_file_llama_cpp_refuses_is_an_engine_load_error(tmp_path: Path) -> None:
    """A file that is not a GGUF model fails with EngineLoadError, not a native crash."""
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(EngineLoadError, match=r"llama\.cpp cannot load it"):
        load_model(_spec(junk, size=junk.stat().st_size, sha256=_sha256(junk)))


def test_a_load_failure_quotes_llama_cpp_s_error(smollm2_path: Path, tmp_path: Path) -> None:
    """llama.cpp's own error line reaches the message, also after llama-cpp-python's package (which installs its own
    log callback at import) was imported in the same process."""
    import llama_cpp  # noqa: F401 - the side effect under test: the package's log callback

    truncated = tmp_path / "truncated.gguf"
    with smollm2_path.open("rb") as f:
        truncated.write_bytes(f.read(4 << 20))  # the header and metadata, not the tensors
    with pytest.raises(EngineLoadError, match=r"llama\.cpp: .*not within the file bounds"):
        load_model(_spec(truncated, size=truncated.stat().st_size, sha256=_sha256(truncated)))


async def test_a_failed_step_fails_its_requests_and_the_model_goes_on_serving(
    smollm2: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception inside a decode step ends the requests it was serving with an error; the next request is served
    (the requests the failed step meant to sample are not sampled again with freed samplers)."""
    from agent.inference import llama

    original = llama._DecodeLoop._emit_token
    armed = [True]

    def emit_once_failing(self: llama._DecodeLoop, request: object, token: int) -> None:
        if armed[0]:
            armed[0] = False
            raise RuntimeError("injected failure")
        original(self, request, token)  # type: ignore[arg-type]

    monkeypatch.setattr(llama._DecodeLoop, "_emit_token", emit_once_failing)
    with pytest.raises(InferenceError, match="injected failure"):
        await _collect(smollm2.chat(CAPITAL, GREEDY))
    deltas, finished = await _collect(smollm2.chat(CAPITAL, GREEDY))
    assert "Paris" in "".join(deltas)
    assert finished.finish_reason == "stop"


async def test_a_chat_prompt_of_no_tokens_is_refused_and_spares_the_others(smollm2_path: Path) -> None:
    """A template that renders an empty message to nothing gives no prompt: 400, and a request decoding next to it
    finishes as it would alone."""
    from agent.inference.llama import _ChatTemplate

    model = load_model(_spec(smollm2_path, n_parallel=2, n_ctx=512))
    try:
        alone, _ = await _collect(model.complete(ENDLESS, SamplingParams(temperature=0.0, max_tokens=24)))
        # as in base models' GGUFs: the messages' text and nothing else
        model._formatter = _ChatTemplate(  # type: ignore[attr-defined]
            "{% for m in messages %}{{ m.content }}{% endfor %}", bos_token="", eos_token=""
        )
        bystander = asyncio.create_task(
            _collect(model.complete(ENDLESS, SamplingParams(temperature=0.0, max_tokens=24)))
        )
        await asyncio.sleep(0.1)
        with pytest.raises(BadRequestError, match="empty"):
            await _collect(model.chat([ChatMessage("user", "")], GREEDY))
        deltas, finished = await bystander
        assert deltas == alone
        assert finished.finish_reason == "length"
    finally:
        await model.aclose()


async def test_closing_a_model_frees_its_embedding_context(smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedding context made on first use is freed with the model (not left behind by every unload)."""
    from agent.inference import llama

    closed: list[object] = []
    original = llama._EmbeddingContext.close

    def close(self: llama._EmbeddingContext) -> None:
        closed.append(self)
        original(self)

    monkeypatch.setattr(llama._EmbeddingContext, "close", close)
    model = load_model(_spec(smollm2_path, n_ctx=256))
    result = await model.embed(["a cat sat on the mat"])
    assert len(result.vectors[0]) == result.dimensions > 0
    await model.aclose()
    assert len(closed) == 1


def test_text_with_a_lone_surrogate_is_a_bad_request(smollm2: LoadedModel) -> None:
    """A lone UTF-16 surrogate cannot be encoded to UTF-8, so it cannot be tokenized: a 400, not an internal error."""
    with pytest.raises(BadRequestError, match="surrogate"):
        smollm2.count_tokens("abc \ud800")


# --- embeddings next to generation: admitted, one text per decode step ------------------------------------------

LONG_TEXT = "The quick brown fox jumps over the lazy dog near the river bank. " * 9  # ~130 tokens


async def _embedding_unit_s(model: LoadedModel) -> float:
    """Seconds one long text takes to embed on its own, measured now (the larger of two, after a warm-up)."""
    await model.embed([LONG_TEXT])  # the embedding context is made on first use
    times = []
    for _ in range(2):
        started = time.perf_counter()
        await model.embed([LONG_TEXT])
        times.append(time.perf_counter() - started)
    return max(times)


async def test_a_long_embeddings_request_does_not_stall_a_streaming_generation(smollm2: LoadedModel) -> None:
    """While 12 texts are embedded, a streaming generation on the same model keeps producing tokens: its largest
    gap between two tokens stays within a few single-text embedding times (not the whole request's)."""
    assert 100 < smollm2.count_tokens(LONG_TEXT) < 512
    unit = await _embedding_unit_s(smollm2)
    stamps: list[float] = []
    running = asyncio.Event()
    done = asyncio.Event()

    async def generate() -> None:
        stream = smollm2.complete(ENDLESS, SamplingParams(temperature=0.0, max_tokens=1900))
        async with contextlib.aclosing(stream):
            async for event in stream:
                assert isinstance(event, TextDelta), event
                stamps.append(time.perf_counter())
                if len(stamps) == 3:
                    running.set()
                if done.is_set():
                    return

    task = asyncio.create_task(generate())
    await asyncio.wait_for(running.wait(), timeout=30)
    started = time.perf_counter()
    result = await smollm2.embed([LONG_TEXT] * 12)
    ended = time.perf_counter()
    done.set()
    await asyncio.wait_for(task, timeout=30)
    assert len(result.vectors) == 12
    window = [s for s in stamps if s <= ended]
    window = window[max(0, len([s for s in window if s < started]) - 1) :]  # the last token before it, and on
    gaps = [b - a for a, b in itertools.pairwise(window)]
    assert len(window) >= 6, f"only {len(window)} tokens in {ended - started:.2f} s of embedding"
    # a few units at most (a loaded box adds jitter); the whole request in one job made a gap of all 12 units
    assert max(gaps) < 6 * unit, f"largest gap {max(gaps):.3f} s; one text takes {unit:.3f} s"


async def test_an_abandoned_embeddings_request_stops_at_its_next_text(smollm2: LoadedModel) -> None:
    """Cancelling the caller of a long embeddings request (a client disconnect) stops it at its next text: the
    next request is served at once, and the remaining texts are never embedded."""
    unit = await _embedding_unit_s(smollm2)
    before = smollm2._loop.embedded_texts  # type: ignore[attr-defined]
    task = asyncio.create_task(smollm2.embed([LONG_TEXT] * 48))
    await asyncio.sleep(2 * unit)
    task.cancel()
    at_cancel = smollm2._loop.embedded_texts  # type: ignore[attr-defined]
    with pytest.raises(asyncio.CancelledError):
        await task
    started = time.perf_counter()
    await smollm2.embed(["next"])
    waited = time.perf_counter() - started
    # not the 46-odd texts left (a loaded box adds jitter to the unit measured before)
    assert waited < 12 * unit, f"the next request waited {waited:.2f} s; one text takes {unit:.3f} s"
    after = smollm2._loop.embedded_texts  # type: ignore[attr-defined]
    assert at_cancel > before  # it had started...
    assert after - at_cancel <= 2  # ...and stopped: at most the text in progress, then "next"


async def test_an_embeddings_deadline_is_checked_between_texts(smollm2: LoadedModel) -> None:
    """An embeddings request whose deadline passes while it is embedding ends with DeadlineExceededError at its next
    text (saying how far it got), not after all of them."""
    unit = await _embedding_unit_s(smollm2)
    before = smollm2._loop.embedded_texts  # type: ignore[attr-defined]
    started = time.perf_counter()
    with pytest.raises(DeadlineExceededError, match=r"while embedding, after \d+ of 64 texts"):
        await smollm2.embed([LONG_TEXT] * 64, Admission(timeout_s=3 * unit))
    assert time.perf_counter() - started < 32 * unit  # not all 64 texts' time
    at_error = smollm2._loop.embedded_texts  # type: ignore[attr-defined]
    assert at_error - before < 64
    await asyncio.sleep(2 * unit)  # the decode thread has seen the cancellation
    assert smollm2._loop.embedded_texts - at_error <= 1  # type: ignore[attr-defined]  # the text in progress


async def test_an_embeddings_deadline_passed_while_waiting_is_a_deadline_error(smollm2: LoadedModel) -> None:
    """An embeddings request waiting behind a long one ends with DeadlineExceededError when its deadline passes,
    and leaves the queue at once; a batch request waits behind an interactive one that came later."""
    unit = await _embedding_unit_s(smollm2)
    hog = asyncio.create_task(smollm2.embed([LONG_TEXT] * 64))
    try:
        await asyncio.sleep(unit)
        with pytest.raises(DeadlineExceededError, match="while waiting for its turn"):
            await smollm2.embed(["short"], Admission(timeout_s=2 * unit))
        assert smollm2.queue_stats()["embeddings"].waiting == 0
        order: list[str] = []

        async def embed(tag: str, priority: Priority) -> None:
            await smollm2.embed([tag], Admission(priority=priority))
            order.append(tag)

        batch = asyncio.create_task(embed("batch", "batch"))
        await asyncio.sleep(0)
        interactive = asyncio.create_task(embed("interactive", "interactive"))
        await asyncio.sleep(0)
        assert smollm2.queue_stats()["embeddings"].waiting == 2
    finally:
        hog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hog
    await asyncio.wait_for(asyncio.gather(batch, interactive), timeout=30)
    assert order == ["interactive", "batch"]
