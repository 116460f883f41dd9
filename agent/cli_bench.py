"""``edge-agent bench MODEL``: prompt and generation tokens/s, time to first token, load time, peak memory.

MODEL is a registry model name (its *active* variant is measured; the registry is read through the running
daemon's admin API, or directly when no daemon runs) or the path of a GGUF file. A file is validated
(:func:`agent.registry.gguf.validate_gguf`) before the engine opens it, like every GGUF the agent loads.

The bench loads its own copy of the model in this process (a running daemon keeps serving meanwhile, and
competes for the CPU: bench an idle device). The result is printed the way ``llama-bench`` prints its table
and stored in ``state_dir/bench.json`` (see :mod:`agent.bench`), from where the device state reports it.
Errors the agent raises on purpose are one line and exit status 1.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from agent.errors import AgentError, ModelNotFoundError

if TYPE_CHECKING:
    from agent.bench import BenchResult
    from agent.cli import AgentContext
    from agent.inference import ModelSpec

__all__ = ["bench"]

MiB = 1 << 20


@click.command("bench")
@click.argument("model")
@click.option("--prompt-tokens", type=click.IntRange(2, 32768), default=128, show_default=True)
@click.option("--gen-tokens", type=click.IntRange(2, 32768), default=64, show_default=True)
@click.option("--repeat", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--threads", type=click.IntRange(0, 1024), default=None, help="[default: the configured n_threads]")
@click.option("--no-save", is_flag=True, help="Do not store the result in the state directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def bench(
    ctx: AgentContext,
    model: str,
    prompt_tokens: int,
    gen_tokens: int,
    repeat: int,
    threads: int | None,
    no_save: bool,
    as_json: bool,
) -> None:
    """Benchmark MODEL (registry name or GGUF path) through the agent's engine, like llama-bench."""
    from agent.bench import bench_context, run_bench, store_bench_result

    try:
        config = ctx.config
        n_threads = config.inference.n_threads if threads is None else threads
        spec = _resolve(ctx, model, n_ctx=bench_context(prompt_tokens, gen_tokens), n_threads=n_threads)
        if not as_json:
            click.echo(f"benchmarking {spec.name}/{spec.variant} ({spec.size / MiB:.1f} MiB) …", err=True)
        result = asyncio.run(run_bench(spec, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, repeat=repeat))
        stored = None if no_save else store_bench_result(config.state_dir, result)
    except AgentError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps({**result.to_dict(), "stored": str(stored) if stored else None}, indent=2))
        return
    _print(result)
    if stored is not None:
        click.echo(f"stored in {stored}", err=True)


def _resolve(ctx: AgentContext, model: str, *, n_ctx: int, n_threads: int) -> ModelSpec:
    """A ModelSpec for a GGUF path or a registry model name (its active variant).

    Raises:
        ModelNotFoundError: neither an existing file nor a model with an active variant.
        InvalidModelError: the file is not a valid GGUF.
    """
    from agent.inference import ModelSpec
    from agent.registry.gguf import validate_gguf
    from agent.registry.store import sha256_file

    path = Path(model)
    if path.is_file():
        info = validate_gguf(path)
        sha256, size = sha256_file(path)
        return ModelSpec(
            name=path.stem,
            variant=info.quant.lower(),
            path=path,
            format="gguf",
            sha256=sha256,
            size=size,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_parallel=1,
        )
    if "/" in model or model.endswith((".gguf", ".onnx")):
        raise ModelNotFoundError(f"no such file: {model}")
    from agent.cli_models import open_models_admin

    with open_models_admin(ctx) as admin:
        active = [r for r in admin.list_models(model) if r.state == "active"]
        if not active:
            raise ModelNotFoundError(f"no active model named {model!r} (and no such file)")
        record = active[0]
        blob = admin.blob_path(record)
    if record.format != "gguf":
        raise ModelNotFoundError(f"{record.ref} is {record.format}; bench measures GGUF language models")
    validate_gguf(blob)
    return ModelSpec(
        name=record.name,
        variant=record.variant,
        path=blob,
        format="gguf",
        sha256=record.sha256,
        size=record.size,
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_parallel=1,
    )


def _print(result: BenchResult) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table("model", "size", "threads", "test", "t/s", title="edge-agent bench")
    model = escape(result.key)
    size = f"{result.size / MiB:.1f} MiB"
    table.add_row(
        model, size, str(result.threads), f"pp{result.prompt_tokens}", _pm(result.pp_tokens_per_s, result.pp_stddev)
    )
    tg = "n/a (stopped early)" if result.tg_tokens_per_s is None else _pm(result.tg_tokens_per_s, result.tg_stddev)
    table.add_row(model, size, str(result.threads), f"tg{result.gen_tokens}", tg)
    console = Console()
    console.print(table)
    extra: dict[str, Any] = {
        "time to first token": f"{result.ttft_s * 1000:.1f} ms",
        "load time": f"{result.load_s * 1000:.0f} ms",
        "peak resident memory": f"{result.peak_rss_bytes / MiB:.1f} MiB (whole process)",
        "model memory (engine)": f"{result.model_memory_bytes / MiB:.1f} MiB",
    }
    for key, value in extra.items():
        console.print(f"{key:>22}: {value}")


def _pm(mean: float, stddev: float | None) -> str:
    return f"{mean:,.2f} ± {stddev or 0.0:,.2f}"
