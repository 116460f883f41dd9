"""Unit tests for what the model tooling parses and names: output file names, targets, llama.cpp progress lines,
and which controller modules may import the native libraries."""

from __future__ import annotations

import ast
from pathlib import Path

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.cli_models import _targets
from controller.quantize import _PROGRESS_RE, GGUF_TARGETS, output_path

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("source", "target", "expected"),
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "q4_0", "SmolLM2-135M-Instruct.Q4_0.gguf"),
        ("model-f16.gguf", "q8_0", "model.Q8_0.gguf"),
        ("llama-3.2-1b.q4_k_m.gguf", "q5_k_m", "llama-3.2-1b.Q5_K_M.gguf"),
        ("plain.gguf", "q5_1", "plain.Q5_1.gguf"),
        ("silero_vad.onnx", "int8", "silero_vad.int8.onnx"),
        ("encoder_fp32.onnx", "int8", "encoder.int8.onnx"),
    ],
)
def test_output_names_replace_the_quantization_suffix(source: str, target: str, expected: str) -> None:
    """STEM.TARGET.EXT, with any existing quantization suffix dropped from the stem."""
    assert output_path(Path("/m") / source, target) == Path("/m") / expected
    assert output_path(Path(source), target, Path("/out")) == Path("/out") / expected


@given(
    stem=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,40}", fullmatch=True), target=st.sampled_from(list(GGUF_TARGETS))
)
def test_output_name_is_never_the_source_and_keeps_the_directory(stem: str, target: str) -> None:
    """Whatever the source name, the output sits in the same directory and ends in .TARGET.gguf."""
    source = Path("/models") / f"{stem}.gguf"
    out = output_path(source, target)
    assert out.parent == source.parent
    assert out.name.endswith(f".{target.upper()}.gguf")
    assert out.name != ""
    assert out.stem


def test_targets_are_split_lowered_and_deduplicated() -> None:
    """--to 'Q4_0, q5_1,,q4_0' gives ['q4_0', 'q5_1']; an empty list is refused."""
    assert _targets("Q4_0, q5_1,,q4_0") == ["q4_0", "q5_1"]
    with pytest.raises(click.BadParameter):
        _targets(" , ")


@pytest.mark.parametrize(
    ("line", "expected"),
    [("[   1/ 272]                    token_embd.weight - ", (1, 272)), ("[ 272/ 272] output_norm", (272, 272))],
)
def test_progress_lines_of_llama_cpp_are_recognised(line: str, expected: tuple[int, int]) -> None:
    """llama.cpp's '[ i/ N] tensor' log lines give (i, N)."""
    match = _PROGRESS_RE.search(line)
    assert match is not None
    assert (int(match.group(1)), int(match.group(2))) == expected


@given(text=st.text(alphabet=st.characters(blacklist_characters="["), max_size=80))
def test_text_without_a_bracket_is_never_progress(text: str) -> None:
    """Log text without '[' never counts as progress."""
    assert _PROGRESS_RE.search(text) is None


def _importers(module: str) -> set[str]:
    found = set()
    for path in sorted((ROOT / "controller").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == module or n.startswith(module + ".") for n in names):
                found.add(str(path.relative_to(ROOT)))
    return found


def test_only_the_documented_controller_modules_import_native_libraries() -> None:
    """Only the controller modules whose docstrings say so import llama_cpp and onnxruntime."""
    assert _importers("llama_cpp") <= {"controller/quantize.py", "controller/evaluate.py"}
    assert _importers("onnxruntime") <= {"controller/quantize.py", "controller/inspection.py"}
