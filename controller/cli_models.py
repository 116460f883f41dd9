"""``edge-fleet model``: quantize, inspect and compare model files.

The ``model`` group (:data:`model_group`) is registered by ``controller/cli.py``. Other modules add their
commands to the same group (the releases work adds ``model add``, ``model publish`` and ``model list``)::

    from controller.cli_models import model_group

    @model_group.command("publish")
    def publish(...): ...

and ``controller/cli.py`` imports that module before the group is used.

Errors the controller raises on purpose (invalid or truncated files, refused quantizations) are printed as
their diagnostics and exit with status 1, never as a traceback. Heavy modules (llama_cpp, onnx, matplotlib)
are imported only by the command that needs them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from controller.cli_common import reports_errors
from controller.errors import QuantizeError

if TYPE_CHECKING:
    from controller.inspection import GgufDescription, OnnxDescription
    from controller.quantize import QuantizeResult

__all__ = ["model_group"]

T = TypeVar("T")
MiB = 1 << 20


def _mib(n: int) -> str:
    return f"{n / MiB:,.1f} MiB"


@click.group("model")
def model_group() -> None:
    """Model files: quantize, inspect and compare variants."""


# --- quantize -----------------------------------------------------------------------------------------------


def _targets(value: str) -> list[str]:
    targets = [t.strip().lower() for t in value.split(",") if t.strip()]
    if not targets:
        raise click.BadParameter("give at least one target, e.g. q4_0,q5_1,q8_0")
    return list(dict.fromkeys(targets))


@model_group.command("quantize")
@click.argument("src", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--to",
    "targets",
    required=True,
    help="Comma-separated targets: GGUF q4_0,q5_1,q8_0,q4_k_m,… (see --help-targets); ONNX int8.",
)
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Directory for the outputs [default: next to SRC]; files are named STEM.TARGET.EXT.",
)
@click.option("--allow-requantize", is_flag=True, help="Quantize an already-quantized GGUF (loses quality).")
@click.option("--threads", type=click.IntRange(0, 1024), default=0, show_default=True, help="0 = every CPU.")
@click.option("--force", is_flag=True, help="Replace outputs that already exist.")
@click.option(
    "--onnx-ops",
    default=None,
    help="ONNX operator types to quantize [default: MatMul,Gemm,LSTM,GRU,Attention; add Conv at your risk].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@reports_errors
def quantize_command(
    src: Path,
    targets: str,
    out_dir: Path | None,
    allow_requantize: bool,
    threads: int,
    force: bool,
    onnx_ops: str | None,
    as_json: bool,
) -> None:
    """Quantize SRC (GGUF through llama.cpp, ONNX through onnxruntime) into one file per target.

    GGUF targets: f32 f16 bf16 q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m
    q6_k iq4_nl iq4_xs. ONNX target: int8 (dynamic quantization of the weights).
    """
    from controller import quantize as q
    from controller.inspection import detect_format

    wanted = _targets(targets)
    kind = detect_format(src)
    allowed = q.ONNX_TARGETS if kind == "onnx" else tuple(q.GGUF_TARGETS)
    unknown = [t for t in wanted if t not in allowed]
    if unknown:
        raise QuantizeError(f"unknown {kind.upper()} target(s) {', '.join(unknown)}; choose from {', '.join(allowed)}")
    console = Console(stderr=True)
    results: list[QuantizeResult] = []
    if kind == "onnx":
        ops = tuple(o.strip() for o in onnx_ops.split(",") if o.strip()) if onnx_ops else q.ONNX_DYNAMIC_OPS
        output = q.output_path(src, "int8", out_dir)
        with console.status(f"quantizing {src.name} to int8"):
            results.append(q.quantize_onnx(src, "int8", output, op_types=ops, overwrite=force))
    else:
        info = q.read_gguf(src)
        if q.is_quantized(info) and not allow_requantize:  # refuse before showing any progress
            raise QuantizeError(
                f"{src} is already quantized ({info.quant}): requantizing loses quality compared with "
                "quantizing the F16/F32 original; pass --allow-requantize to do it anyway"
            )
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tensors"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            for target in wanted:
                task = progress.add_task(f"{src.name} → {target}", total=info.tensor_count)
                output = q.output_path(src, target, out_dir)

                def on_progress(done: int, total: int, task: Any = task) -> None:
                    progress.update(task, completed=done, total=total)

                def run(target: str = target, output: Path = output, on_progress: Any = on_progress) -> Any:
                    return q.quantize_gguf(
                        src,
                        target,
                        output,
                        allow_requantize=allow_requantize,
                        threads=threads,
                        overwrite=force,
                        progress=on_progress,
                    )

                results.append(_in_thread(run, cleanup=output.with_name(f".{output.name}.partial")))
                progress.update(task, completed=info.tensor_count)
    if as_json:
        click.echo(json.dumps([_result_dict(r) for r in results], indent=2))
        return
    table = Table("output", "target", "size", "vs source", "seconds")
    for r in results:
        table.add_row(
            escape(str(r.output)),
            r.target,
            _mib(r.output_bytes),
            f"{r.output_bytes / r.source_bytes:.2f}×",
            f"{r.seconds:.1f}",
        )
    Console().print(table)


def _in_thread(fn: Callable[[], T], cleanup: Path) -> T:
    """Run ``fn`` (one long native call) on a daemon thread, so Ctrl-C is handled at once on this one.

    On Ctrl-C the partial output is removed and the process exits with status 130; the native call cannot be
    interrupted, and dies with the (daemon) thread when the process exits.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="quantize", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.1)
    except KeyboardInterrupt:
        cleanup.unlink(missing_ok=True)
        click.echo("\ninterrupted: partial output removed", err=True)
        os._exit(130)  # the native call cannot be stopped; leave without waiting for it
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result


def _result_dict(r: QuantizeResult) -> dict[str, Any]:
    return {
        "source": str(r.source),
        "output": str(r.output),
        "target": r.target,
        "source_bytes": r.source_bytes,
        "output_bytes": r.output_bytes,
        "seconds": round(r.seconds, 3),
    }


# --- inspect ------------------------------------------------------------------------------------------------


@model_group.command("inspect")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--ctx", "n_ctx", type=click.IntRange(1, 1 << 22), default=2048, show_default=True)
@click.option("--slots", "n_slots", type=click.IntRange(1, 1024), default=1, show_default=True)
@click.option(
    "--flash-attn/--no-flash-attn",
    default=True,
    show_default=True,
    help="Estimate for llama.cpp with flash attention on (its CPU default) or off.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@reports_errors
def inspect_command(file: Path, n_ctx: int, n_slots: int, flash_attn: bool, as_json: bool) -> None:
    """Describe FILE (GGUF or ONNX) and, for GGUF, estimate the memory to run it at --ctx and --slots."""
    from controller.inspection import GgufDescription, describe

    description = describe(file, n_ctx=n_ctx, n_slots=n_slots, flash_attn=flash_attn)
    if as_json:
        click.echo(json.dumps(description.to_dict(), indent=2))
    elif isinstance(description, GgufDescription):
        _print_gguf(description)
    else:
        _print_onnx(description)


def _print_gguf(d: GgufDescription) -> None:
    from controller.inspection import bits_per_weight

    console = Console()
    facts = Table.grid(padding=(0, 2))
    facts.add_row("file", escape(d.path))
    facts.add_row("format", f"GGUF v{d.gguf_version}")
    facts.add_row("architecture", escape(d.architecture + (f"  ({d.name})" if d.name else "")))
    facts.add_row("parameters", f"{d.parameters:,} ({d.parameters / 1e6:,.0f} M)")
    facts.add_row("quantization", f"{d.quant}  ({bits_per_weight(d):.2f} bits per weight)")
    facts.add_row("context length", str(d.context_length) if d.context_length else "unknown")
    facts.add_row("chat template", "yes" if d.chat_template else "no")
    facts.add_row("vocabulary", f"{d.vocab_size:,}" if d.vocab_size else "unknown")
    facts.add_row("file size", f"{_mib(d.file_size)} ({d.file_size:,} bytes)")
    console.print(facts)
    types = Table("tensor type", "tensors", "bytes", "share", title="tensor types")
    total = sum(entry["bytes"] for entry in d.tensor_types.values()) or 1
    for name, entry in sorted(d.tensor_types.items(), key=lambda kv: -kv[1]["bytes"]):
        types.add_row(name, str(entry["tensors"]), _mib(entry["bytes"]), f"{entry['bytes'] / total:.0%}")
    console.print(types)
    if d.memory is None:
        console.print(f"memory estimate: unavailable ({d.memory_error})")
        return
    m = d.memory
    memory = Table("term", "bytes", title=f"estimated memory at n_ctx {m.n_ctx} × {m.n_slots} slot(s)")
    memory.add_row("weights (mmap)", _mib(m.weights_bytes))
    if m.repack_bytes:
        memory.add_row("repacked weights (this CPU)", _mib(m.repack_bytes))
    memory.add_row("runtime (vocabulary, context)", _mib(m.runtime_bytes))
    memory.add_row("KV cache (f16)", _mib(m.kv_cache_bytes))
    memory.add_row(f"compute (n_ubatch {m.n_ubatch})", _mib(m.compute_bytes))
    memory.add_row("[bold]total[/]", f"[bold]{_mib(m.total_bytes)}[/]")
    console.print(memory)


def _print_onnx(d: OnnxDescription) -> None:
    console = Console()
    facts = Table.grid(padding=(0, 2))
    facts.add_row("file", escape(d.path))
    facts.add_row("format", f"ONNX (IR {d.ir_version})" if d.ir_version else "ONNX")
    if d.opsets:
        facts.add_row("opsets", ", ".join(f"{k} {v}" for k, v in sorted(d.opsets.items())))
    facts.add_row("producer", escape(d.producer or "unknown"))
    facts.add_row("quantization", d.quant or "unknown")
    facts.add_row("file size", f"{_mib(d.file_size)} ({d.file_size:,} bytes)")
    if d.initializer_bytes is not None:
        weights = ", ".join(f"{k.lower()} {_mib(v)}" for k, v in d.initializer_bytes.items())
        facts.add_row("weights", f"{d.initializers} tensors: {weights}")
    console.print(facts)
    io = Table("", "name", "dtype", "shape", title="inputs and outputs")
    for kind, values in (("input", d.inputs), ("output", d.outputs)):
        for v in values:
            shape = "[" + ", ".join("?" if s is None else str(s) for s in v["shape"]) + "]"
            io.add_row(kind, escape(v["name"]), str(v["dtype"]), escape(shape))
    console.print(io)
    if d.op_histogram:
        ops = Table("operator", "count", title="operators (subgraphs included)")
        for op, count in d.op_histogram.items():
            ops.add_row(escape(op), str(count))
        console.print(ops)
    for note in d.notes:
        console.print(f"note: {note}")


# --- compare ------------------------------------------------------------------------------------------------


@model_group.command("compare")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None, help="Write a PNG chart.")
@click.option("--ctx", "n_ctx", type=click.IntRange(256, 1 << 20), default=1024, show_default=True)
@click.option("--threads", type=click.IntRange(0, 1024), default=0, show_default=True, help="0 = every CPU.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@reports_errors
def compare_command(files: tuple[Path, ...], out: Path | None, n_ctx: int, threads: int, as_json: bool) -> None:
    """Measure GGUF FILES one after the other: size, estimated and measured memory, tokens/s, perplexity."""
    from controller.compare import compare_models, write_chart

    console = Console(stderr=True)
    started = time.monotonic()
    with console.status(f"measuring {len(files)} file(s), each in its own process") as status:

        def on_measured(path: Path, index: int) -> None:
            status.update(f"measured {index + 1}/{len(files)} ({time.monotonic() - started:.0f} s)")

        rows = compare_models(list(files), n_ctx=n_ctx, threads=threads, on_measured=on_measured)
    if out is not None:
        write_chart(rows, out)
    if as_json:
        click.echo(json.dumps({"rows": [r.to_dict() for r in rows], "chart": str(out) if out else None}, indent=2))
        return
    table = Table(
        "variant",
        "size MiB",
        "est. MiB",
        "meas. MiB",
        "error",
        "pp t/s",
        "tg t/s",
        "perplexity",
        title=f"n_ctx {n_ctx}, {rows[0].threads if rows else threads} threads",
    )
    for r in rows:
        table.add_row(
            r.quant,
            f"{r.file_size / MiB:,.1f}",
            f"{r.estimated_memory / MiB:,.1f}",
            f"{r.measured_memory / MiB:,.1f}",
            f"{r.estimate_error:+.0%}",
            f"{r.pp_tokens_per_s:,.0f}",
            f"{r.tg_tokens_per_s:,.1f}",
            f"{r.perplexity:.2f}" if r.perplexity is not None else "n/a",
        )
    Console().print(table)
    for r in rows:
        console.print(f"{r.quant}: {escape(r.path)}")
    if out is not None:
        console.print(f"chart: {escape(str(out))}")
