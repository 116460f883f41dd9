"""Compare GGUF variants side by side: size, estimated and measured memory, speed, perplexity; table and chart.

:func:`compare_models` describes each file from its header (:mod:`controller.inspection`, which includes the
:mod:`protocols.memory` estimate for this machine's CPU) and measures it in its own child process
(:func:`controller.evaluate.measure_in_subprocess`), one file after the other so measurements never compete
for the CPU. :func:`write_chart` draws a PNG with matplotlib's Agg backend (no display needed); matplotlib is
imported only there, so the rest works without it.

Invariant: a file that is not a valid GGUF fails before anything is measured (:class:`ModelFileError`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from controller.errors import ModelFileError, ModelToolError
from controller.evaluate import Measurement, measure_in_subprocess
from controller.inspection import GgufDescription, describe_gguf, detect_format

__all__ = ["ComparisonRow", "compare_models", "write_chart"]

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class ComparisonRow:
    """One variant's figures (bytes, tokens per second)."""

    path: str
    quant: str
    file_size: int
    estimated_memory: int
    measured_memory: int
    pp_tokens_per_s: float
    tg_tokens_per_s: float
    perplexity: float | None
    n_ctx: int
    threads: int

    @property
    def estimate_error(self) -> float:
        """(estimated - measured) / measured."""
        return (self.estimated_memory - self.measured_memory) / self.measured_memory if self.measured_memory else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field, plus the estimate's relative error."""
        return {**asdict(self), "estimate_error": round(self.estimate_error, 4)}


def compare_models(
    paths: Sequence[Path],
    *,
    n_ctx: int = 1024,
    threads: int = 0,
    on_measured: Callable[[Path, int], None] | None = None,
) -> list[ComparisonRow]:
    """Describe and measure every file (GGUF only), in order.

    Args:
        paths: the variants.
        n_ctx: context per slot for the estimate and the measurement (one slot).
        threads: inference threads for the measurement; 0 = every CPU.
        on_measured: called with (path, index) after each measurement (progress display).

    Raises:
        ModelFileError: a file is not a valid GGUF (checked for every file before measuring any).
        ModelToolError: a measurement failed.
    """
    descriptions: list[GgufDescription] = []
    for path in paths:
        if detect_format(path) != "gguf":
            raise ModelFileError(f"{path}: model compare measures GGUF variants; use model inspect for ONNX")
        description = describe_gguf(path, n_ctx=n_ctx, n_slots=1)
        if description.memory is None:
            raise ModelToolError(f"{path}: {description.memory_error}")
        descriptions.append(description)
    rows = []
    for index, (path, description) in enumerate(zip(paths, descriptions, strict=True)):
        measured: Measurement = measure_in_subprocess(path, n_ctx=n_ctx, threads=threads)
        assert description.memory is not None
        rows.append(
            ComparisonRow(
                path=str(path),
                quant=description.quant,
                file_size=description.file_size,
                estimated_memory=description.memory.total_bytes,
                measured_memory=measured.model_rss,
                pp_tokens_per_s=measured.pp_tokens_per_s,
                tg_tokens_per_s=measured.tg_tokens_per_s,
                perplexity=measured.perplexity,
                n_ctx=n_ctx,
                threads=measured.threads,
            )
        )
        if on_measured is not None:
            on_measured(path, index)
    return rows


def write_chart(rows: Sequence[ComparisonRow], out: Path, title: str = "edgefleet model compare") -> Path:
    """Draw a 2×2 PNG: size, estimated vs measured memory, tokens/s (prompt and generation), perplexity.

    Raises:
        ModelToolError: matplotlib is not installed.
    """
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise ModelToolError("the chart needs matplotlib (pip install matplotlib); the table and JSON do not") from exc
    labels = [row.quant for row in rows]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax_size, ax_mem, ax_speed, ax_ppl = axes[0][0], axes[0][1], axes[1][0], axes[1][1]

    ax_size.bar(x, [row.file_size / MiB for row in rows], color="#4C72B0")
    ax_size.set_title("file size (MiB)")

    width = 0.38
    ax_mem.bar([i - width / 2 for i in x], [row.estimated_memory / MiB for row in rows], width, label="estimated")
    ax_mem.bar([i + width / 2 for i in x], [row.measured_memory / MiB for row in rows], width, label="measured")
    ax_mem.set_title(f"memory at n_ctx {rows[0].n_ctx if rows else 0} (MiB)")
    ax_mem.legend()

    ax_speed.bar([i - width / 2 for i in x], [row.pp_tokens_per_s for row in rows], width, label="prompt")
    ax_speed.bar([i + width / 2 for i in x], [row.tg_tokens_per_s for row in rows], width, label="generation")
    ax_speed.set_title(f"tokens/s ({rows[0].threads if rows else 0} threads)")
    ax_speed.legend()

    ax_ppl.bar(x, [row.perplexity or 0.0 for row in rows], color="#C44E52")
    ax_ppl.set_title("perplexity on controller/data/perplexity.txt (lower is better)")

    for ax in (ax_size, ax_mem, ax_speed, ax_ppl):
        ax.set_xticks(x)
        ax.set_xticklabels(labels)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
