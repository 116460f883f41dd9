"""The onnx engine: small graphs built with onnx.helper, and the real silero-vad v6 model."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.errors import BadRequestError, DeadlineExceededError, EngineLoadError, OverloadedError
from agent.inference import Admission, LoadedModel, ModelSpec, TensorSpec, load_model

pytestmark = pytest.mark.component

SAMPLE_RATE = 16000
FRAME = 512
CONTEXT = 64  # silero-vad v5/v6 expect the previous frame's last 64 samples before each 512-sample frame


def onnx_spec(path: Path, name: str = "graph", n_threads: int = 1, max_queue: int = 64) -> ModelSpec:
    """A spec for an ONNX file on disk (hash and size computed from the file)."""
    data = path.read_bytes()
    return ModelSpec(
        name=name,
        variant="onnx-fp32",
        path=path,
        format="onnx",
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        n_ctx=1,
        n_threads=n_threads,
        n_parallel=1,
        max_queue=max_queue,
    )


def save_graph(path: Path, graph: onnx.GraphProto) -> Path:
    """Save ``graph`` as a model onnxruntime accepts (opset 17, IR version 9)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def affine_graph(path: Path) -> Path:
    """``y = x @ W + b`` with x float32 [batch, 4], W [4, 3], b [3]; and ``s = x + x2`` with x2 [batch, 4]."""
    weights = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    bias = np.array([1.0, -1.0, 0.5], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["y"]),
            helper.make_node("Add", ["x", "x2"], ["s"]),
        ],
        "affine",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["batch", 4]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch", 4]),
        ],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    return save_graph(path, graph)


@pytest.fixture
async def affine(tmp_path: Path) -> AsyncIterator[LoadedModel]:
    model = await asyncio.to_thread(load_model, onnx_spec(affine_graph(tmp_path / "affine.onnx")))
    yield model
    await model.aclose()


@pytest.fixture
async def silero(silero_vad_path: Path) -> AsyncIterator[LoadedModel]:
    model = await asyncio.to_thread(load_model, onnx_spec(silero_vad_path, name="silero-vad"))
    yield model
    await model.aclose()


async def test_small_graph_runs_and_matches_numpy(affine: LoadedModel) -> None:
    """A MatMul/Add graph returns its named outputs, equal to the same computation in numpy."""
    x = np.array([[1, 2, 3, 4], [0, 0, 0, 1]], dtype=np.float32)
    out = await affine.infer({"x": x, "x2": np.ones_like(x)})
    weights = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    np.testing.assert_allclose(out["y"], x @ weights + np.array([1.0, -1.0, 0.5]), rtol=1e-6)
    np.testing.assert_array_equal(out["s"], x + 1)
    assert set(out) == {"y", "s"}
    assert affine.capabilities == {"tensor"}


def test_declared_inputs_and_outputs_are_reported(affine: LoadedModel) -> None:
    """input_specs/output_specs give names, numpy dtypes and shapes with symbolic dimensions."""
    assert affine.input_specs() == (
        TensorSpec("x", "float32", ("batch", 4)),
        TensorSpec("x2", "float32", ("batch", 4)),
    )
    assert affine.output_specs() == (TensorSpec("y", "float32", ("batch", 3)), TensorSpec("s", "float32", ("batch", 4)))


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"x": np.zeros((1, 4), np.float32), "x2": np.zeros((1, 4), np.float32), "z": np.zeros(1)}, "no input 'z'"),
        ({"x": np.zeros((1, 4), np.float32)}, "needs input 'x2'"),
        ({"x": np.zeros((1, 4), np.float64), "x2": np.zeros((1, 4), np.float32)}, "'x' must be float32"),
        ({"x": np.zeros((4,), np.float32), "x2": np.zeros((1, 4), np.float32)}, "'x' must have 2 dimensions"),
        ({"x": np.zeros((1, 5), np.float32), "x2": np.zeros((1, 4), np.float32)}, r"'x' must have shape \[batch, 4\]"),
        ({"x": np.zeros((1, 4), np.float32), "x2": np.zeros((2, 4), np.float32)}, "dimension 'batch' is 1"),
        ({"x": [[0.0] * 4], "x2": np.zeros((1, 4), np.float32)}, "'x' must be an array"),
    ],
    ids=["unknown-name", "missing", "dtype", "rank", "fixed-dim", "symbolic-dim-mismatch", "not-an-array"],
)
async def test_wrong_inputs_are_refused_with_a_clear_message(
    affine: LoadedModel, inputs: dict[str, np.ndarray], message: str
) -> None:
    """A wrong name, missing input, dtype, rank or dimension raises BadRequestError naming the problem."""
    with pytest.raises(BadRequestError, match=message):
        await affine.infer(inputs)


async def test_tensor_models_refuse_text_capabilities(affine: LoadedModel) -> None:
    """Asking a tensor model for chat, embeddings or token counts is a BadRequestError."""
    with pytest.raises(BadRequestError, match="does not support chat"):
        affine.chat([], None)  # type: ignore[arg-type]
    with pytest.raises(BadRequestError, match="does not support embeddings"):
        await affine.embed(["x"])
    with pytest.raises(BadRequestError):
        affine.count_tokens("x")


def test_a_file_onnxruntime_refuses_is_an_engine_load_error(tmp_path: Path) -> None:
    """A file that is not an ONNX graph fails with EngineLoadError."""
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07not a protobuf model" * 10)
    with pytest.raises(EngineLoadError, match="onnxruntime cannot load it"):
        load_model(onnx_spec(junk))


# --- silero-vad ---------------------------------------------------------------------------------------------


def _voiced(seconds: float) -> np.ndarray:
    """A synthetic voiced-speech-like signal: a 120 Hz glottal pulse train with vibrato through three formant
    resonators (four vowels in turn), syllable-rate amplitude envelope, lip-radiation high-pass."""
    n = int(SAMPLE_RATE * seconds)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 120 * (1 + 0.1 * np.sin(2 * np.pi * 2 * t))
    phase = np.cumsum(f0) / SAMPLE_RATE
    source = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
    source += 0.02 * np.random.default_rng(1).standard_normal(n)
    vowels = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480)]
    out = np.zeros(n)
    seg = n // len(vowels)
    for k, formants in enumerate(vowels):
        y = source[k * seg : (k + 1) * seg]
        for freq, bandwidth in zip(formants, (80, 100, 150), strict=True):
            y = _resonator(y, freq, bandwidth)
        out[k * seg : (k + 1) * seg] = y
    out *= np.clip(np.sin(np.pi * (t * 4 % 1)), 0, 1) ** 0.5
    out = np.diff(out, prepend=0)
    scaled: np.ndarray = (0.3 * out / np.abs(out).max()).astype(np.float32)
    return scaled


def _resonator(x: np.ndarray, freq: float, bandwidth: float) -> np.ndarray:
    r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    a1, a2 = -2 * r * np.cos(2 * np.pi * freq / SAMPLE_RATE), r * r
    y = np.zeros_like(x)
    for i in range(len(x)):
        y[i] = x[i] - a1 * (y[i - 1] if i > 0 else 0.0) - a2 * (y[i - 2] if i > 1 else 0.0)
    return y


async def _speech_probabilities(model: LoadedModel, signal: np.ndarray, context: int) -> list[float]:
    """Run the VAD frame by frame (with ``context`` samples of the previous frame prepended), carrying state."""
    state = np.zeros((2, 1, 128), np.float32)
    previous = np.zeros(context, np.float32)
    probabilities = []
    for start in range(0, len(signal) - FRAME + 1, FRAME):
        frame = signal[start : start + FRAME]
        window = np.concatenate([previous, frame])[None, :] if context else frame[None, :]
        out = await model.infer({"input": window, "state": state, "sr": np.array(SAMPLE_RATE, dtype=np.int64)})
        assert out["output"].shape == (1, 1)
        assert out["stateN"].shape == (2, 1, 128)
        state = out["stateN"]
        previous = frame[len(frame) - context :] if context else previous
        probabilities.append(float(out["output"][0, 0]))
    return probabilities


def test_silero_declares_its_inputs(silero: LoadedModel) -> None:
    """silero-vad v6 declares input float32 [?, ?], state float32 [2, ?, 128] and sr int64 scalar."""
    specs = {s.name: s for s in silero.input_specs()}
    assert set(specs) == {"input", "state", "sr"}
    assert specs["input"].dtype == "float32"
    assert len(specs["input"].shape) == 2
    assert specs["state"].dtype == "float32"
    assert specs["state"].shape[0] == 2
    assert specs["state"].shape[2] == 128
    assert specs["sr"] == TensorSpec("sr", "int64", ())
    assert [s.name for s in silero.output_specs()] == ["output", "stateN"]


@pytest.mark.parametrize("context", [0, CONTEXT], ids=["bare-512", "with-64-context"])
async def test_silero_silence_scores_low(silero: LoadedModel, context: int) -> None:
    """Silence gets a speech probability below 0.1, whether or not context samples are prepended."""
    probabilities = await _speech_probabilities(silero, np.zeros(FRAME * 8, np.float32), context)
    assert all(0.0 <= p < 0.1 for p in probabilities)


@pytest.mark.parametrize("context", [0, CONTEXT], ids=["bare-512", "with-64-context"])
async def test_silero_voiced_signal_gives_probabilities_and_state(silero: LoadedModel, context: int) -> None:
    """A voiced-like synthetic signal yields probabilities in [0, 1] and a (2, 1, 128) state for every frame."""
    probabilities = await _speech_probabilities(silero, _voiced(1.0), context)
    assert len(probabilities) == SAMPLE_RATE // FRAME
    assert all(0.0 <= p <= 1.0 for p in probabilities)


async def test_silero_scores_voiced_signal_above_silence_with_context(silero: LoadedModel) -> None:
    """With v6's 64 context samples, the voiced-like signal peaks well above anything silence reaches."""
    voiced = await _speech_probabilities(silero, _voiced(1.0), CONTEXT)
    silence = await _speech_probabilities(silero, np.zeros(FRAME * 8, np.float32), CONTEXT)
    assert max(voiced) > 5 * max(silence)


async def test_silero_rejects_a_frame_of_the_wrong_dtype(silero: LoadedModel) -> None:
    """Audio as float64 or a state of the wrong shape is refused before it reaches the graph."""
    sr = np.array(SAMPLE_RATE, dtype=np.int64)
    state = np.zeros((2, 1, 128), np.float32)
    with pytest.raises(BadRequestError, match="'input' must be float32"):
        await silero.infer({"input": np.zeros((1, FRAME)), "state": state, "sr": sr})
    with pytest.raises(BadRequestError, match="'state' must have shape"):
        await silero.infer(
            {"input": np.zeros((1, FRAME), np.float32), "state": np.zeros((2, 1, 64), np.float32), "sr": sr}
        )
    with pytest.raises(BadRequestError, match="'sr' must have 0 dimensions"):
        await silero.infer({"input": np.zeros((1, FRAME), np.float32), "state": state, "sr": sr.reshape(1)})


@pytest.mark.parametrize(
    ("input_shape", "state_shape"),
    [((1, 0), (2, 1, 128)), ((0, 576), (2, 0, 128)), ((0, 2**31 - 1), (2, 0, 128))],
    ids=["no-samples", "no-batch", "empty-huge"],
)
async def test_silero_refuses_empty_tensors(
    silero: LoadedModel, input_shape: tuple[int, ...], state_shape: tuple[int, ...]
) -> None:
    """An empty tensor (a zero dimension) is a BadRequestError before the graph runs (onnxruntime would FAIL)."""
    feeds = {
        "input": np.zeros(input_shape, np.float32),
        "state": np.zeros(state_shape, np.float32),
        "sr": np.array(SAMPLE_RATE, dtype=np.int64),
    }
    with pytest.raises(BadRequestError, match="is empty"):
        await silero.infer(feeds)


# --- admission: a bounded queue per model, deadlines, cancellation ----------------------------------------------


def _frame() -> dict[str, np.ndarray]:
    return {
        "input": np.zeros((1, FRAME + CONTEXT), np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(SAMPLE_RATE, dtype=np.int64),
    }


@contextlib.contextmanager
def _worker_held(model: LoadedModel) -> Iterator[threading.Event]:
    """Keep the model's worker thread busy until the block ends (the one seam: a task put on its executor)."""
    gate = threading.Event()
    model._executor.submit(gate.wait)  # type: ignore[attr-defined]
    try:
        yield gate
    finally:
        gate.set()


@pytest.fixture
async def small_queue_silero(silero_vad_path: Path) -> AsyncIterator[LoadedModel]:
    """silero-vad with at most two requests waiting."""
    model = await asyncio.to_thread(load_model, onnx_spec(silero_vad_path, name="silero-vad", max_queue=2))
    yield model
    await model.aclose()


async def test_a_full_tensor_queue_refuses_with_retry_after(small_queue_silero: LoadedModel) -> None:
    """With the worker busy and two runs waiting, a third is refused with OverloadedError carrying retry_after;
    the waiting ones run once the worker is free."""
    model = small_queue_silero
    with _worker_held(model):
        waiting = [asyncio.create_task(model.infer(_frame())) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(OverloadedError) as refused:
            await asyncio.wait_for(model.infer(_frame()), timeout=5)
        assert refused.value.retry_after >= 1
        stats = model.queue_stats()["tensor"]
        assert (stats.waiting, stats.rejected_total) == (2, 1)
    results = await asyncio.wait_for(asyncio.gather(*waiting), timeout=30)
    assert all(out["output"].shape == (1, 1) for out in results)


async def test_a_tensor_run_past_its_deadline_or_abandoned_while_waiting_is_never_run(
    small_queue_silero: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose deadline passes while it waits ends with DeadlineExceededError, and one whose caller leaves is
    withdrawn: neither is ever run, and neither counts against the queue afterwards."""
    model = small_queue_silero
    runs: list[int] = []
    real_run = model._run  # type: ignore[attr-defined]

    def counted(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        runs.append(1)
        return real_run(feeds)  # type: ignore[no-any-return]

    monkeypatch.setattr(model, "_run", counted)
    with _worker_held(model):
        with pytest.raises(DeadlineExceededError, match="while waiting"):
            await asyncio.wait_for(model.infer(_frame(), Admission(timeout_s=0.2)), timeout=5)
        abandoned = asyncio.create_task(model.infer(_frame()))
        await asyncio.sleep(0.05)
        abandoned.cancel()
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        assert model.queue_stats()["tensor"].waiting == 0
    await model.infer(_frame())
    assert len(runs) == 1


async def test_a_tensor_run_whose_deadline_passed_before_the_worker_took_it_is_not_run(
    small_queue_silero: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker checks the deadline again before a run: a run it takes late (the event loop was too busy to
    withdraw it in time) is not run and ends with DeadlineExceededError."""
    model = small_queue_silero
    runs: list[int] = []
    real_run = model._run  # type: ignore[attr-defined]

    def counted(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        runs.append(1)
        return real_run(feeds)  # type: ignore[no-any-return]

    monkeypatch.setattr(model, "_run", counted)
    with _worker_held(model) as gate:
        late = asyncio.create_task(model.infer(_frame(), Admission(timeout_s=0.1)))
        await asyncio.sleep(0)  # submitted
        time.sleep(0.3)  # noqa: ASYNC251 - on purpose: the event loop is blocked past the deadline...
        gate.set()  # ...while the worker takes the run
        time.sleep(0.2)  # noqa: ASYNC251 - on purpose, as above
    with pytest.raises(DeadlineExceededError):
        await late
    assert runs == []
