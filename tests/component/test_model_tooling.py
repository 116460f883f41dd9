"""Model tooling on the real models: quantize (GGUF and ONNX), inspect, measure, compare, and edge-agent bench.

Inputs are the real SmolLM2-135M-Instruct Q4_1 and silero-vad v6 files; the q4_0/q5_1/q8_0 variants come
from the session fixture ``smollm2_variants`` (edgefleet's quantizer, cached in ``.cache/models/variants``).
Measurements run in child processes (``python -m controller.evaluate``), one variant at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.bench import BENCH_FILE, MAX_STORED_RESULTS, latest_bench_results, load_bench_file
from agent.cli import main as agent_main
from agent.config import RegistryConfig
from agent.inference import ChatMessage, Finished, LoadedModel, ModelSpec, SamplingParams, TextDelta, load_model
from agent.registry import Registry
from controller.cli import main as fleet_main
from controller.errors import QuantizeError
from controller.evaluate import Measurement, measure_in_subprocess
from controller.quantize import quantize_gguf, quantize_onnx
from protocols.gguf import FILE_TYPE_NAMES, parse_gguf

pytestmark = pytest.mark.component

VARIANTS = ("q4_0", "q5_1", "q8_0")
MEMORY_TOLERANCE = 0.25
VAD_TOLERANCE = 0.1
"""Largest |p_int8 - p_fp32| allowed per frame (measured: 0.04 on these frames)."""
SAMPLE_RATE = 16000
FRAME = 512
CONTEXT = 64


def _spec(path: Path, variant: str, fmt: str = "gguf") -> ModelSpec:
    data = path.read_bytes()
    return ModelSpec(
        name=f"test-{variant}",
        variant=variant,
        path=path,
        format=fmt,  # type: ignore[arg-type]
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        n_ctx=512,
        n_threads=2,
        n_parallel=1,
    )


def _no_traceback(output: str) -> None:
    assert "Traceback" not in output


# --- variants ---------------------------------------------------------------------------------------------


def test_variants_are_made_with_the_requested_types(smollm2_variants: dict[str, Path]) -> None:
    """Each variant's header is valid and declares its own file type (Q4_0, Q5_1, Q8_0)."""
    for variant, path in smollm2_variants.items():
        with path.open("rb") as f:
            info = parse_gguf(f)
        assert FILE_TYPE_NAMES[info.file_type or -1] == variant.upper()
        assert info.tensor_types.get(variant.upper(), 0) > 100


def test_variant_sizes_are_ordered(smollm2_variants: dict[str, Path]) -> None:
    """File sizes grow with bits per weight: q4_0 < q5_1 < q8_0."""
    sizes = [smollm2_variants[v].stat().st_size for v in VARIANTS]
    assert sizes == sorted(sizes)
    assert len(set(sizes)) == 3


@pytest.mark.parametrize("variant", VARIANTS)
async def test_each_variant_loads_and_answers(smollm2_variants: dict[str, Path], variant: str) -> None:
    """Each variant loads in the agent's engine and answers a short chat prompt with some text."""
    model: LoadedModel = await asyncio.to_thread(load_model, _spec(smollm2_variants[variant], variant))
    try:
        text, finished = [], None
        async for event in model.chat(
            [ChatMessage("user", "What is the capital of France?")], SamplingParams(max_tokens=16, temperature=0.0)
        ):
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, Finished):
                finished = event
    finally:
        await model.aclose()
    assert finished is not None
    assert finished.usage.completion_tokens > 0
    assert "".join(text).strip()


@pytest.fixture(scope="module")
def measurements(smollm2_variants: dict[str, Path]) -> dict[str, Measurement]:
    """Each variant measured in its own child process at n_ctx 1024 (memory, speed, perplexity)."""
    return {v: measure_in_subprocess(smollm2_variants[v], n_ctx=1024, threads=2, repeat=1) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_perplexity_is_finite(measurements: dict[str, Measurement], variant: str) -> None:
    """Perplexity on the shipped text is finite and plausible for a small chat model (1 < ppl < 1000)."""
    m = measurements[variant]
    assert m.perplexity is not None
    assert math.isfinite(m.perplexity)
    assert 1.0 < m.perplexity < 1000.0
    assert m.perplexity_tokens > 300


@pytest.mark.parametrize("variant", VARIANTS)
def test_memory_estimate_is_within_25_percent_of_measured(
    smollm2_variants: dict[str, Path], measurements: dict[str, Measurement], variant: str
) -> None:
    """The protocols/memory.py estimate (this CPU) is within 25 % of the child's peak resident growth."""
    from controller.inspection import describe_gguf

    estimate = describe_gguf(smollm2_variants[variant], n_ctx=1024).memory
    assert estimate is not None
    measured = measurements[variant].model_rss
    assert abs(estimate.total_bytes - measured) / measured <= MEMORY_TOLERANCE, (estimate.to_dict(), measured)


# --- quantize CLI -------------------------------------------------------------------------------------------


def test_quantize_refuses_an_already_quantized_source(smollm2_path: Path, tmp_path: Path) -> None:
    """Without --allow-requantize a Q4_1 source is refused, saying it loses quality; nothing is written."""
    result = CliRunner().invoke(
        fleet_main, ["model", "quantize", str(smollm2_path), "--to", "q4_0", "--out-dir", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "already quantized" in result.output
    assert "loses quality" in result.output
    assert isinstance(result.exception, SystemExit)
    assert list(tmp_path.iterdir()) == []


def test_quantize_cli_writes_valid_outputs(smollm2_path: Path, tmp_path: Path) -> None:
    """--allow-requantize --to q4_0,q8_0 writes both files, valid, named STEM.TYPE.gguf, and reports them."""
    result = CliRunner().invoke(
        fleet_main,
        [
            "model",
            "quantize",
            str(smollm2_path),
            "--to",
            "q4_0,q8_0",
            "--allow-requantize",
            "--out-dir",
            str(tmp_path),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["target"] for r in report] == ["q4_0", "q8_0"]
    for entry, kind in zip(report, ("Q4_0", "Q8_0"), strict=True):
        out = Path(entry["output"])
        assert out == tmp_path / f"SmolLM2-135M-Instruct.{kind}.gguf"
        with out.open("rb") as f:
            assert FILE_TYPE_NAMES[parse_gguf(f).file_type or -1] == kind
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "SmolLM2-135M-Instruct.Q4_0.gguf",
        "SmolLM2-135M-Instruct.Q8_0.gguf",
    ]


def test_quantize_reports_progress_per_tensor(smollm2_path: Path, tmp_path: Path) -> None:
    """The progress callback sees every tensor, ending at (272, 272) for SmolLM2."""
    seen: list[tuple[int, int]] = []
    quantize_gguf(
        smollm2_path, "q5_1", tmp_path / "out.gguf", allow_requantize=True, progress=lambda i, n: seen.append((i, n))
    )
    assert seen[-1] == (272, 272)
    assert [i for i, _ in seen] == sorted(i for i, _ in seen)


def test_quantize_refuses_to_overwrite_without_force(smollm2_path: Path, tmp_path: Path) -> None:
    """An existing output is kept (QuantizeError) unless overwrite is asked for."""
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(QuantizeError, match="exists"):
        quantize_gguf(smollm2_path, "q4_0", out, allow_requantize=True)
    assert out.read_bytes() == b"keep me"


def _corrupt_inputs(smollm2_path: Path, silero_vad_path: Path, tmp_path: Path) -> dict[str, Path]:
    gguf = smollm2_path.read_bytes()
    onnx_bytes = silero_vad_path.read_bytes()
    flipped = bytearray(gguf[:4096])
    flipped[0] ^= 0xFF
    files = {
        "gguf-truncated-header": gguf[:3000],
        "gguf-truncated-data": gguf[: len(gguf) // 2],
        "gguf-bad-magic": bytes(flipped),
        "gguf-empty": b"",
        "onnx-truncated": onnx_bytes[: len(onnx_bytes) // 3],
        "onnx-garbage": b"\x08\x07" + bytes(range(256)) * 8,
    }
    out = {}
    for name, data in files.items():
        path = tmp_path / f"{name}.{name.split('-')[0]}"
        path.write_bytes(data)
        out[name] = path
    return out


@pytest.mark.parametrize(
    "case",
    ["gguf-truncated-header", "gguf-truncated-data", "gguf-bad-magic", "gguf-empty", "onnx-truncated", "onnx-garbage"],
)
@pytest.mark.parametrize("command", ["inspect", "quantize"])
def test_corrupt_inputs_give_a_clear_error(
    smollm2_path: Path, silero_vad_path: Path, tmp_path: Path, case: str, command: str
) -> None:
    """Truncated or corrupt GGUF/ONNX files: exit status 1, one clear 'Error:' message, no traceback, no output."""
    src = _corrupt_inputs(smollm2_path, silero_vad_path, tmp_path)[case]
    args = ["model", command, str(src)]
    if command == "quantize":
        args += [
            "--to",
            "int8" if case.startswith("onnx") else "q4_0",
            "--allow-requantize",
            "--out-dir",
            str(tmp_path / "out"),
        ]
    result = CliRunner().invoke(fleet_main, args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Error:" in result.output
    assert any(word in result.output for word in ("invalid", "not a valid", "empty", "truncated"))
    _no_traceback(result.output)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_corrupt_input_in_a_real_process(smollm2_path: Path, tmp_path: Path) -> None:
    """`python -m controller model inspect` on a truncated GGUF exits 1 with one error and no traceback."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(smollm2_path.read_bytes()[:100_000])
    for args in (["inspect", str(bad)], ["quantize", str(bad), "--to", "q4_0"]):
        done = subprocess.run(
            [sys.executable, "-m", "controller", "model", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 1
        assert "invalid GGUF" in done.stderr
        _no_traceback(done.stderr + done.stdout)


# --- inspect ------------------------------------------------------------------------------------------------


def test_inspect_gguf_reports_the_header_facts(smollm2_path: Path) -> None:
    """inspect --json on SmolLM2 reports its header facts and a memory estimate at the asked ctx and slots."""
    result = CliRunner().invoke(
        fleet_main, ["model", "inspect", str(smollm2_path), "--ctx", "4096", "--slots", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert (d["format"], d["architecture"], d["quant"]) == ("gguf", "llama", "Q4_1")
    assert d["parameters"] == 134_515_008
    assert d["tensor_types"]["Q4_1"]["tensors"] == 210
    assert d["tensor_types"]["F32"]["tensors"] == 61
    assert d["chat_template"] is True
    assert d["vocab_size"] == 49152
    assert d["context_length"] == 8192
    assert d["file_size"] == smollm2_path.stat().st_size
    memory = d["memory"]
    assert (memory["n_ctx"], memory["n_slots"]) == (4096, 2)
    assert memory["kv_cache_bytes"] == 30 * 4096 * 2 * 3 * 128 * 2
    assert memory["total_bytes"] > d["file_size"]


def test_inspect_table_output(smollm2_path: Path) -> None:
    """The human output names the quantization, the tensor types and the estimated total."""
    result = CliRunner().invoke(fleet_main, ["model", "inspect", str(smollm2_path)])
    assert result.exit_code == 0, result.output
    for text in ("Q4_1", "tensor types", "KV cache", "total", "49,152"):
        assert text in result.output


def test_inspect_onnx_reports_graph_facts(silero_vad_path: Path) -> None:
    """inspect --json on silero-vad: inputs input/state/sr, outputs, opset 16, weights and an op histogram."""
    result = CliRunner().invoke(fleet_main, ["model", "inspect", str(silero_vad_path), "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert [i["name"] for i in d["inputs"]] == ["input", "state", "sr"]
    assert [o["name"] for o in d["outputs"]] == ["output", "stateN"]
    assert d["opsets"]["ai.onnx"] == 16
    assert d["quant"] == "fp32"
    assert d["op_histogram"]["If"] >= 1
    assert d["op_histogram"]["LSTM"] >= 1
    assert d["initializer_bytes"]["FLOAT"] > 2_000_000


def test_inspect_onnx_without_the_onnx_package(silero_vad_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the onnx package, inspect falls back to onnxruntime's inputs/outputs and says what is missing."""
    from controller.inspection import describe_onnx

    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    d = describe_onnx(silero_vad_path)
    assert [i["name"] for i in d.inputs] == ["input", "state", "sr"]
    assert d.op_histogram is None
    assert "onnx" in d.notes[0]


# --- ONNX int8 ----------------------------------------------------------------------------------------------


def _voiced(seconds: float) -> np.ndarray:
    """A voiced-speech-like signal: a 120 Hz pulse train with vibrato through vowel formants, syllable envelope."""
    n = int(SAMPLE_RATE * seconds)
    t = np.arange(n) / SAMPLE_RATE
    phase = np.cumsum(120 * (1 + 0.1 * np.sin(2 * np.pi * 2 * t))) / SAMPLE_RATE
    source = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
    source += 0.02 * np.random.default_rng(1).standard_normal(n)
    vowels = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480)]
    out = np.zeros(n)
    seg = n // len(vowels)
    for k, formants in enumerate(vowels):
        y = source[k * seg : (k + 1) * seg]
        for freq, bandwidth in zip(formants, (80, 100, 150), strict=True):
            r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
            a1, a2 = -2 * r * np.cos(2 * np.pi * freq / SAMPLE_RATE), r * r
            filtered = np.zeros_like(y)
            y1 = y2 = 0.0
            for i, x in enumerate(y):
                filtered[i] = x - a1 * y1 - a2 * y2
                y1, y2 = filtered[i], y1
            y = filtered
        out[k * seg : (k + 1) * seg] = y
    out *= np.clip(np.sin(np.pi * (t * 4 % 1)), 0, 1) ** 0.5
    out = np.diff(out, prepend=0)
    signal: np.ndarray = (0.3 * out / np.abs(out).max()).astype(np.float32)
    return signal


async def _vad(model: LoadedModel, signal: np.ndarray) -> np.ndarray:
    state = np.zeros((2, 1, 128), np.float32)
    previous = np.zeros(CONTEXT, np.float32)
    probabilities = []
    for start in range(0, len(signal) - FRAME + 1, FRAME):
        frame = signal[start : start + FRAME]
        window = np.concatenate([previous, frame])[None, :]
        out = await model.infer({"input": window, "state": state, "sr": np.array(SAMPLE_RATE, dtype=np.int64)})
        state, previous = out["stateN"], frame[-CONTEXT:]
        probabilities.append(float(out["output"][0, 0]))
    return np.array(probabilities)


async def test_silero_int8_tracks_fp32(silero_vad_path: Path, tmp_path: Path) -> None:
    """silero-vad int8 is smaller, loads, and gives each generated frame a probability within 0.1 of fp32."""
    quantized = quantize_onnx(silero_vad_path, "int8", tmp_path / "silero_vad.int8.onnx")
    assert quantized.output_bytes < 0.85 * quantized.source_bytes
    int8 = quantized.output
    signal = np.concatenate([_voiced(2.0), np.zeros(FRAME * 8, np.float32)])
    results = []
    for path, variant in ((silero_vad_path, "onnx-fp32"), (int8, "onnx-int8")):
        model = await asyncio.to_thread(load_model, _spec(path, variant, "onnx"))
        try:
            results.append(await _vad(model, signal))
        finally:
            await model.aclose()
    fp32, q8 = results
    assert fp32.max() > 0.5, "the generated frames must contain speech-like frames for the comparison to mean much"
    assert np.abs(fp32 - q8).max() <= VAD_TOLERANCE, np.abs(fp32 - q8).max()


# --- compare ------------------------------------------------------------------------------------------------


def test_compare_json_reports_each_variant(smollm2_variants: dict[str, Path]) -> None:
    """compare --json gives, per file, size, estimated and measured memory, tokens/s and perplexity."""
    result = CliRunner().invoke(
        fleet_main, ["model", "compare", str(smollm2_variants["q4_0"]), "--ctx", "512", "--threads", "2", "--json"]
    )
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["rows"]
    assert row["quant"] == "Q4_0"
    assert row["file_size"] == smollm2_variants["q4_0"].stat().st_size
    assert row["measured_memory"] > 0
    assert row["estimated_memory"] > 0
    assert row["pp_tokens_per_s"] > 0
    assert row["tg_tokens_per_s"] > 0
    assert math.isfinite(row["perplexity"])


def test_compare_chart_is_a_png(tmp_path: Path) -> None:
    """write_chart draws a PNG from comparison rows (needs matplotlib, the dev extra)."""
    pytest.importorskip("matplotlib")
    from controller.compare import ComparisonRow, write_chart

    rows = [
        ComparisonRow(f"/m/{q}.gguf", q, size, size + 50, size + 48, 300.0, 100.0, ppl, 1024, 2)
        for q, size, ppl in (("Q4_0", 90, 31.4), ("Q8_0", 140, 25.9))
    ]
    out = write_chart(rows, tmp_path / "chart.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_onnx(silero_vad_path: Path) -> None:
    """compare measures GGUF variants; an ONNX file is refused with a pointer to inspect."""
    result = CliRunner().invoke(fleet_main, ["model", "compare", str(silero_vad_path)])
    assert result.exit_code == 1
    assert "use model inspect" in result.output


# --- edge-agent bench ---------------------------------------------------------------------------------------


def test_bench_a_file_reports_and_stores(smollm2_variants: dict[str, Path], tmp_path: Path) -> None:
    """bench FILE reports pp/tg tokens/s, TTFT, load time and peak memory, stored for latest_bench_results."""
    path = smollm2_variants["q4_0"]
    result = CliRunner().invoke(
        agent_main,
        ["--state-dir", str(tmp_path), "bench", str(path), "--prompt-tokens", "32", "--gen-tokens", "8",
         "--repeat", "2", "--threads", "2", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["prompt_tokens"] == 32
    assert len(report["runs"]) == 2
    assert report["pp_tokens_per_s"] > 0
    assert report["ttft_s"] > 0
    assert report["load_s"] > 0
    assert report["peak_rss_bytes"] > path.stat().st_size
    latest = latest_bench_results(tmp_path)
    (key,) = latest
    assert key == f"{path.stem}/q4_0"
    assert latest[key]["pp_tokens_per_s"] == round(report["pp_tokens_per_s"], 2)


def test_bench_by_registry_name_measures_the_active_variant(smollm2_variants: dict[str, Path], tmp_path: Path) -> None:
    """bench NAME resolves the registry's active variant (q8_0 here, imported after q4_0)."""
    with Registry.open(tmp_path, RegistryConfig()) as registry:
        registry.import_file(smollm2_variants["q4_0"], name="smollm2", variant="q4_0")
        registry.import_file(smollm2_variants["q8_0"], name="smollm2", variant="q8_0")
    result = CliRunner().invoke(
        agent_main,
        ["--state-dir", str(tmp_path), "--socket", str(tmp_path / "none.sock"), "bench", "smollm2",
         "--prompt-tokens", "16", "--gen-tokens", "4", "--repeat", "1", "--threads", "2", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["variant"] == "q8_0"
    assert set(latest_bench_results(tmp_path)) == {"smollm2/q8_0"}


def test_bench_of_an_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    """An unknown name or a missing file exits 1 with one line, no traceback."""
    for model in ("nosuch", "missing/file.gguf"):
        result = CliRunner().invoke(
            agent_main, ["--state-dir", str(tmp_path), "--socket", str(tmp_path / "none.sock"), "bench", model]
        )
        assert result.exit_code == 1
        assert "no active model" in result.output or "no such file" in result.output
        _no_traceback(result.output)


def test_bench_file_is_bounded_and_tolerates_corruption(tmp_path: Path) -> None:
    """Corrupt bench.json reads as empty; storing keeps at most MAX_STORED_RESULTS entries, newest kept."""
    from agent.bench import BenchResult, BenchRun, store_bench_result

    (tmp_path / BENCH_FILE).write_text("{not json")
    assert latest_bench_results(tmp_path) == {}
    run = BenchRun(prompt_tokens=8, generated_tokens=4, ttft_s=0.01, pp_tokens_per_s=800.0, tg_tokens_per_s=100.0)
    for i in range(MAX_STORED_RESULTS + 5):
        result = BenchResult(
            f"m{i}",
            "q4_0",
            "0" * 64,
            1,
            2,
            512,
            8,
            4,
            1,
            0.1,
            800.0,
            0.0,
            100.0,
            0.0,
            0.01,
            1,
            1,
            float(i),
            "x",
            (run,),
        )
        store_bench_result(tmp_path, result)
    stored = load_bench_file(tmp_path)
    assert len(stored) == MAX_STORED_RESULTS
    assert "m0/q4_0" not in stored
    assert f"m{MAX_STORED_RESULTS + 4}/q4_0" in stored


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(document=st.one_of(_JSON, st.fixed_dictionaries({"version": st.just(1), "results": _JSON})))
def test_any_bench_file_reads_as_a_dict(document: object) -> None:
    """Whatever JSON bench.json holds (hand-edited, older, hostile), reading it never raises."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / BENCH_FILE).write_text(json.dumps(document))
        assert isinstance(load_bench_file(Path(tmp)), dict)
        assert isinstance(latest_bench_results(Path(tmp)), dict)
