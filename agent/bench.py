"""Benchmark a GGUF model through the agent's own engine, the way ``llama-bench`` reports it.

:func:`run_bench` loads the model with :func:`agent.inference.load_model` (the engine the daemon serves with,
so the figures include everything a request pays: sampling, detokenisation, the hand-off to the event loop)
and measures, per run:

* **prompt processing** (pp): a prompt of exactly ``prompt_tokens`` tokens (BOS included when the engine adds
  one) is completed at temperature 0; every run has its own prompt (different first word), so the engine's
  prompt-prefix reuse cannot skip any of it; the time to the first streamed token is the prompt's decode plus
  one sampling step; ``pp tokens/s = prompt tokens / time to first token``;
* **generation** (tg): ``gen_tokens`` tokens; ``tg tokens/s = (generated - 1) / (last token - first token)``
  (the first token belongs to the prompt's time);
* **time to first token**, and once per bench the **load time** and the process's **peak resident set**
  (its high-water mark: the whole process, Python included, as a device sees it).

A warm-up completion runs first (llama-bench does the same). Means and sample standard deviations are over
``repeat`` runs. A run whose model stops (end-of-generation token) before two tokens has no tg figure.

Results are stored in ``state_dir/bench.json`` (not the registry database: the registry belongs to the
daemon's single writer and its process lock, while a bench runs from the command line next to a running
daemon). The file is replaced atomically under an ``fcntl`` lock (``bench.json.lock``), holds the latest
result per ``name/variant`` (at most :data:`MAX_STORED_RESULTS`, oldest dropped), and
:func:`latest_bench_results` returns the compact form the device state carries (``DeviceState.bench``), so the
controller's variant choice can use measured speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from agent.errors import AgentError, BadRequestError
from agent.inference import Finished, LoadedModel, ModelSpec, SamplingParams, TextDelta, load_model
from agent.registry.store import atomic_write_bytes

__all__ = [
    "BENCH_FILE",
    "MAX_STORED_RESULTS",
    "BenchResult",
    "BenchRun",
    "bench_context",
    "exact_prompt",
    "latest_bench_results",
    "load_bench_file",
    "result_from_mapping",
    "run_bench",
    "store_bench_result",
]

BENCH_FILE: Final = "bench.json"
MAX_STORED_RESULTS: Final = 32
_FILE_VERSION: Final = 1
_WORDS: Final = (  # noqa: SIM905 (a word list reads best as text)
    "river stone light market garden winter morning harbour letter window music bridge quiet yellow paper "
    "mountain evening station silver forest candle orchard village summer ladder thunder copper meadow "
    "lantern island valley shadow feather journey kitchen blanket pocket marble engine basket compass tunnel "
    "granite"
).split()


@dataclass(frozen=True, slots=True)
class BenchRun:
    """One measured completion."""

    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    pp_tokens_per_s: float
    tg_tokens_per_s: float | None


@dataclass(frozen=True, slots=True)
class BenchResult:
    """A whole bench of one model (means over the runs; tokens per second, seconds, bytes)."""

    name: str
    variant: str
    sha256: str
    size: int
    threads: int
    n_ctx: int
    prompt_tokens: int
    gen_tokens: int
    repeat: int
    load_s: float
    pp_tokens_per_s: float
    pp_stddev: float
    tg_tokens_per_s: float | None
    tg_stddev: float | None
    ttft_s: float
    peak_rss_bytes: int
    model_memory_bytes: int
    timestamp: float
    machine: str
    runs: tuple[BenchRun, ...]

    @property
    def key(self) -> str:
        """``name/variant``: how results are stored and reported."""
        return f"{self.name}/{self.variant}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field (runs as a list of dicts)."""
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """The compact form the device state carries."""
        return {
            "sha256": self.sha256,
            "threads": self.threads,
            "prompt_tokens": self.prompt_tokens,
            "gen_tokens": self.gen_tokens,
            "pp_tokens_per_s": round(self.pp_tokens_per_s, 2),
            "tg_tokens_per_s": None if self.tg_tokens_per_s is None else round(self.tg_tokens_per_s, 2),
            "ttft_ms": round(self.ttft_s * 1000, 1),
            "load_ms": round(self.load_s * 1000, 1),
            "peak_rss_bytes": self.peak_rss_bytes,
            "timestamp": round(self.timestamp, 3),
        }


def _peak_rss() -> int:
    """This process's peak resident set in bytes since it was exec'd.

    Linux: ``VmHWM`` of ``/proc/self/status`` (the high-water mark of this address space). Not ``ru_maxrss``:
    Linux carries it across ``execve``, so a child spawned by a large parent (a test runner holding models)
    would report the parent's peak. Elsewhere: ``ru_maxrss`` (bytes on macOS, KiB on the BSDs).
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def exact_prompt(model: LoadedModel, tokens: int, offset: int = 0) -> str:
    """A text of exactly ``tokens`` tokens (as :meth:`LoadedModel.count_tokens` counts), made of plain words.

    Different ``offset`` values start with different words, so two prompts share no prefix the engine could
    reuse from its KV cache.

    Raises:
        BadRequestError: ``tokens`` < 1, or no text of exactly that length could be built.
    """
    if tokens < 1:
        raise BadRequestError("a bench prompt needs at least one token")
    text = ""
    count = 0
    index = offset
    misses = 0
    while count < tokens:
        word = _WORDS[index % len(_WORDS)]
        index += 1
        candidate = f"{text} {word}" if text else word.capitalize()
        n = model.count_tokens(candidate)
        if n <= tokens:
            text, count, misses = candidate, n, 0
            continue
        misses += 1
        if misses > len(_WORDS):
            break
    if count != tokens:
        raise BadRequestError(f"cannot build a prompt of exactly {tokens} tokens with this tokenizer")
    return text


async def _one_run(model: LoadedModel, prompt: str, gen_tokens: int, seed: int) -> BenchRun:
    params = SamplingParams(max_tokens=gen_tokens, temperature=0.0, seed=seed)
    started = time.perf_counter()
    first: float | None = None
    last = started
    finished: Finished | None = None
    stream = model.complete(prompt, params)
    async with contextlib.aclosing(stream):
        async for event in stream:
            now = time.perf_counter()
            if isinstance(event, TextDelta):
                if first is None:
                    first = now
                last = now
            elif isinstance(event, Finished):
                finished = event
    if finished is None or first is None:
        raise AgentError("the model produced no token; cannot measure it")
    generated = finished.usage.completion_tokens
    ttft = first - started
    tg = (generated - 1) / (last - first) if generated >= 2 and last > first else None
    return BenchRun(
        prompt_tokens=finished.usage.prompt_tokens,
        generated_tokens=generated,
        ttft_s=ttft,
        pp_tokens_per_s=finished.usage.prompt_tokens / ttft,
        tg_tokens_per_s=tg,
    )


async def run_bench(
    spec: ModelSpec,
    *,
    prompt_tokens: int = 128,
    gen_tokens: int = 64,
    repeat: int = 3,
) -> BenchResult:
    """Load ``spec`` with the agent's engine and benchmark it (see the module docstring).

    ``spec.n_ctx`` must hold ``prompt_tokens + gen_tokens``; :func:`bench_context` gives a suitable size.

    Raises:
        BadRequestError: non-GGUF model, or sizes that do not fit.
        EngineLoadError: the engine cannot load the model.
        AgentError: the model produced nothing.
    """
    if spec.format != "gguf":
        raise BadRequestError("bench measures GGUF language models (ONNX models have no tokens to time)")
    if prompt_tokens < 2 or gen_tokens < 2 or repeat < 1:
        raise BadRequestError("bench needs --prompt-tokens >= 2, --gen-tokens >= 2 and --repeat >= 1")
    if prompt_tokens + gen_tokens > spec.n_ctx:
        raise BadRequestError(f"prompt + generation ({prompt_tokens + gen_tokens}) exceed n_ctx {spec.n_ctx}")
    started = time.perf_counter()
    model = await asyncio.to_thread(load_model, spec)
    load_s = time.perf_counter() - started
    try:
        # The engine may add BOS: measure how many tokens it adds to a text, then build prompts that total
        # exactly ``prompt_tokens``. Each run gets its own prompt, so no KV prefix is reused between runs.
        probe = await asyncio.to_thread(exact_prompt, model, 8, len(_WORDS) // 2)
        added = (await _one_run(model, probe, 2, seed=0)).prompt_tokens - model.count_tokens(probe)
        text_tokens = prompt_tokens - added
        prompts = [await asyncio.to_thread(exact_prompt, model, text_tokens, i) for i in range(repeat + 1)]
        await _one_run(model, prompts[-1], min(gen_tokens, 8), seed=0)  # warm-up, like llama-bench
        runs = [await _one_run(model, prompts[i], gen_tokens, seed=i) for i in range(repeat)]
        memory = model.memory_bytes
    finally:
        await model.aclose()
    pp = [r.pp_tokens_per_s for r in runs]
    tg = [r.tg_tokens_per_s for r in runs if r.tg_tokens_per_s is not None]
    return BenchResult(
        name=spec.name,
        variant=spec.variant,
        sha256=spec.sha256,
        size=spec.size,
        threads=spec.threads,
        n_ctx=spec.n_ctx,
        prompt_tokens=runs[0].prompt_tokens,
        gen_tokens=gen_tokens,
        repeat=repeat,
        load_s=load_s,
        pp_tokens_per_s=statistics.fmean(pp),
        pp_stddev=statistics.stdev(pp) if len(pp) > 1 else 0.0,
        tg_tokens_per_s=statistics.fmean(tg) if tg else None,
        tg_stddev=(statistics.stdev(tg) if len(tg) > 1 else 0.0) if tg else None,
        ttft_s=statistics.fmean(r.ttft_s for r in runs),
        peak_rss_bytes=_peak_rss(),
        model_memory_bytes=memory,
        timestamp=time.time(),
        machine=f"{platform.machine()} {os.cpu_count()} CPUs",
        runs=tuple(runs),
    )


def bench_context(prompt_tokens: int, gen_tokens: int) -> int:
    """The context a bench needs: prompt + generation + margin, rounded up to a multiple of 256."""
    need = prompt_tokens + gen_tokens + 16
    return max(512, math.ceil(need / 256) * 256)


# --- storage ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / f"{BENCH_FILE}.lock", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_bench_file(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Every stored result by ``name/variant`` (full form); an absent or unreadable file is empty."""
    try:
        data = json.loads((state_dir / BENCH_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    results = data.get("results") if isinstance(data, dict) and data.get("version") == _FILE_VERSION else None
    if not isinstance(results, dict):
        return {}
    return {k: v for k, v in results.items() if isinstance(k, str) and isinstance(v, dict)}


def store_bench_result(state_dir: Path, result: BenchResult) -> Path:
    """Record ``result`` as the latest for its ``name/variant`` (atomic, locked, bounded). Returns the file."""
    path = state_dir / BENCH_FILE
    with _locked(state_dir):
        results = load_bench_file(state_dir)
        results.pop(result.key, None)
        results[result.key] = result.to_dict()
        while len(results) > MAX_STORED_RESULTS:
            oldest = min(results, key=lambda k: float(results[k].get("timestamp", 0.0)))
            del results[oldest]
        body = json.dumps({"version": _FILE_VERSION, "results": results}, indent=1, sort_keys=True)
        atomic_write_bytes(path, body.encode("utf-8"), mode=0o640)
    return path


def latest_bench_results(state_dir: Path) -> dict[str, dict[str, Any]]:
    """The latest bench per ``name/variant`` in the compact form of :meth:`BenchResult.summary`.

    This is what ``DeviceState.bench`` carries. Entries that do not have the expected fields are skipped.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, stored in load_bench_file(state_dir).items():
        try:
            result = result_from_mapping(stored)
        except (TypeError, AttributeError):
            continue
        out[key] = result.summary()
    return out


def result_from_mapping(data: Mapping[str, Any]) -> BenchResult:
    """Rebuild a :class:`BenchResult` from :meth:`BenchResult.to_dict` output.

    Raises:
        TypeError: missing or unexpected fields.
    """
    runs = tuple(BenchRun(**r) for r in data.get("runs", ()))
    return BenchResult(**{**data, "runs": runs})
