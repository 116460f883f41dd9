"""Measure a GGUF variant on this machine: speed, peak resident memory and perplexity, in a child process.

Native libraries: this module and :mod:`controller.quantize` are the only controller modules that import
``llama_cpp`` (lazily: only :func:`measure` does, and it runs in the child).

:func:`measure_in_subprocess` runs ``python -m controller.evaluate FILE ...`` and parses the one JSON object
it prints. Each variant gets a fresh process, so its peak resident set (``VmHWM`` on Linux, see
:func:`_peak_rss`) belongs to that variant alone. The child, using llama.cpp's low-level API the way a server
does (one context, ``n_slots`` sequences, flash attention as llama.cpp chooses, ``n_ubatch`` 512):

1. records its resident set after importing llama.cpp (``baseline_rss``);
2. loads the model (``load_seconds``) and creates a context of ``n_ctx × n_slots`` cells;
3. decodes ``pp_tokens`` prompt tokens in one batch (prompt processing, tokens/s) and then ``tg_tokens``
   tokens one at a time, greedily (generation, tokens/s); each timing is the best of ``repeat`` runs;
4. fills every slot's whole context, decodes one more token per slot, and reads the peak resident set:
   ``model_rss = peak_rss - baseline_rss`` is what the model costs (what :mod:`protocols.memory` estimates);
5. only then computes perplexity on ``controller/data/perplexity.txt`` (a short text shipped with
   edgefleet), because scoring every position makes llama.cpp write logits it never writes while serving:
   the text is cut into chunks of ``PERPLEXITY_CTX - 1`` tokens, each decoded after a BOS token, and every
   token after the first of a chunk is scored; ``perplexity = exp(mean negative log-likelihood)``.

Invariants: the child prints exactly one JSON object on stdout (llama.cpp's log is captured, not printed); a
child that fails, times out or prints something else becomes a :class:`~controller.errors.ModelToolError`
quoting its stderr. A peak (high-water mark) only grows, which is why memory is read before perplexity.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

from controller.errors import ModelToolError

__all__ = [
    "PERPLEXITY_CTX",
    "Measurement",
    "measure",
    "measure_in_subprocess",
    "perplexity_text",
]

PERPLEXITY_CTX: Final = 512
_UBATCH: Final = 512
_SUBPROCESS_TIMEOUT_S: Final = 900.0


@dataclass(frozen=True, slots=True)
class Measurement:
    """What the child measured for one model file (bytes, seconds, tokens per second)."""

    path: str
    n_ctx: int
    n_slots: int
    threads: int
    load_seconds: float
    pp_tokens: int
    pp_tokens_per_s: float
    tg_tokens: int
    tg_tokens_per_s: float
    baseline_rss: int
    peak_rss: int
    model_rss: int
    perplexity: float | None
    perplexity_tokens: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field."""
        return asdict(self)


def perplexity_text() -> str:
    """The short English text perplexity is measured on (``controller/data/perplexity.txt``)."""
    return resources.files("controller").joinpath("data/perplexity.txt").read_text(encoding="utf-8")


def measure_in_subprocess(
    path: Path,
    *,
    n_ctx: int,
    n_slots: int = 1,
    threads: int = 0,
    pp_tokens: int = 128,
    tg_tokens: int = 32,
    repeat: int = 2,
    perplexity: bool = True,
    timeout: float = _SUBPROCESS_TIMEOUT_S,
) -> Measurement:
    """Measure ``path`` in a fresh Python process (see the module docstring).

    Raises:
        ModelToolError: the child failed, timed out, or did not print one JSON measurement.
    """
    argv = [
        sys.executable,
        "-m",
        "controller.evaluate",
        str(path),
        f"--ctx={n_ctx}",
        f"--slots={n_slots}",
        f"--threads={threads}",
        f"--pp-tokens={pp_tokens}",
        f"--tg-tokens={tg_tokens}",
        f"--repeat={repeat}",
    ]
    if not perplexity:
        argv.append("--no-perplexity")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ModelToolError(f"measuring {path} took longer than {timeout:.0f} s") from exc
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:]) or f"exit status {done.returncode}"
        raise ModelToolError(f"measuring {path} failed: {tail}")
    try:
        data = json.loads(done.stdout)
        return Measurement(**data)
    except (ValueError, TypeError) as exc:
        raise ModelToolError(f"measuring {path}: unexpected output {done.stdout[:200]!r}") from exc


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


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


class _Runner:
    """One model and one context, driven through llama.cpp's low-level API (child process only)."""

    def __init__(self, path: Path, n_ctx: int, n_slots: int, threads: int) -> None:
        import llama_cpp

        self.ll = llama_cpp
        params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise ModelToolError(f"llama.cpp cannot load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.ctx = self._context(n_ctx * n_slots, n_slots, threads)
        self.batch = llama_cpp.llama_batch_init(_UBATCH, 0, 1)

    def _context(self, n_ctx: int, n_seq: int, threads: int) -> Any:
        cparams = self.ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = _UBATCH
        cparams.n_ubatch = _UBATCH
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        ctx = self.ll.llama_init_from_model(self.model, cparams)
        if not ctx:
            raise ModelToolError("llama.cpp cannot create a context")
        return ctx

    def clear(self, ctx: Any | None = None) -> None:
        memory = self.ll.llama_get_memory(ctx or self.ctx)
        if memory:
            self.ll.llama_memory_clear(memory, True)

    def decode(self, tokens: Sequence[int], start: int, seq: int, *, all_logits: bool = False, ctx: Any = None) -> None:
        """Decode ``tokens`` at positions ``start…`` of sequence ``seq`` in ubatch-sized pieces."""
        batch = self.batch
        for offset in range(0, len(tokens), _UBATCH):
            piece = tokens[offset : offset + _UBATCH]
            for i, token in enumerate(piece):
                batch.token[i] = token
                batch.pos[i] = start + offset + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = all_logits or (offset + i == len(tokens) - 1)
            batch.n_tokens = len(piece)
            status = self.ll.llama_decode(ctx or self.ctx, batch)
            if status != 0:
                raise ModelToolError(f"llama_decode failed with status {status}")

    def argmax_last(self) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self.ll.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        buffer = (self.ll.llama_token * (len(data) + 8))()
        n = self.ll.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), False, False)
        if n < 0:
            raise ModelToolError("the perplexity text does not tokenize")
        return list(buffer[:n])

    def perplexity(self, tokens: Sequence[int], threads: int) -> tuple[float, int]:
        """exp(mean NLL) of ``tokens`` scored in chunks of PERPLEXITY_CTX - 1 after a BOS token."""
        import numpy as np

        ctx = self._context(PERPLEXITY_CTX, 1, threads)
        bos = int(self.ll.llama_vocab_bos(self.vocab))
        chunk = PERPLEXITY_CTX - 1
        nll, scored = 0.0, 0
        try:
            for start in range(0, len(tokens), chunk):
                piece = [bos if bos >= 0 else 0, *tokens[start : start + chunk]]
                if len(piece) < 3:  # nothing to score after the first token
                    continue
                memory = self.ll.llama_get_memory(ctx)
                if memory:
                    self.ll.llama_memory_clear(memory, True)
                self.decode(piece, 0, 0, all_logits=True, ctx=ctx)
                logits = np.ctypeslib.as_array(self.ll.llama_get_logits(ctx), shape=(len(piece), self.n_vocab))
                # position i predicts token i + 1; the BOS→first-token prediction is not scored
                rows = logits[1:-1].astype(np.float64)
                targets = np.asarray(piece[2:], dtype=np.int64)
                peak = rows.max(axis=1, keepdims=True)
                log_norm = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
                nll += float((log_norm - rows[np.arange(len(targets)), targets]).sum())
                scored += len(targets)
        finally:
            self.ll.llama_free(ctx)
        return (math.exp(nll / scored) if scored else math.nan), scored

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


@contextlib.contextmanager
def _quiet_llama() -> Iterator[None]:
    from controller.quantize import captured_llama_log

    with captured_llama_log(lambda level, text: None):
        yield


def measure(
    path: Path,
    *,
    n_ctx: int,
    n_slots: int = 1,
    threads: int = 0,
    pp_tokens: int = 128,
    tg_tokens: int = 32,
    repeat: int = 2,
    perplexity: bool = True,
) -> Measurement:
    """Measure ``path`` in *this* process (the child's side of :func:`measure_in_subprocess`).

    Raises:
        ModelToolError: llama.cpp cannot load the file, or a decode failed.
        ValueError: the prompt and generation do not fit ``n_ctx``.
    """
    import numpy as np

    if pp_tokens + tg_tokens + 1 > n_ctx:
        raise ValueError(f"pp_tokens + tg_tokens ({pp_tokens} + {tg_tokens}) must fit n_ctx ({n_ctx})")
    threads = threads or max(1, os.cpu_count() or 1)
    with _quiet_llama():
        import llama_cpp

        llama_cpp.llama_backend_init()
        baseline = _rss()
        started = time.perf_counter()
        runner = _Runner(path, n_ctx, n_slots, threads)
        load_seconds = time.perf_counter() - started
        try:
            rng = np.random.default_rng(0)
            prompt = [int(t) for t in rng.integers(100, runner.n_vocab, size=n_ctx)]
            runner.decode(prompt[:8], 0, 0)  # warm-up, like llama-bench
            runner.clear()
            pp_best = tg_best = math.inf
            for _ in range(max(1, repeat)):
                t0 = time.perf_counter()
                runner.decode(prompt[:pp_tokens], 0, 0)
                pp_best = min(pp_best, time.perf_counter() - t0)
                runner.clear()
                token = prompt[0]
                t0 = time.perf_counter()
                for pos in range(tg_tokens):
                    runner.decode([token], pos, 0)
                    token = runner.argmax_last()
                tg_best = min(tg_best, time.perf_counter() - t0)
                runner.clear()
            for seq in range(n_slots):  # fill every slot's context: the serving peak
                runner.decode(prompt[: n_ctx - 1], 0, seq)
                runner.decode([runner.argmax_last()], n_ctx - 1, seq)
            peak = _peak_rss()
            ppl, scored = (math.nan, 0)
            if perplexity:
                ppl, scored = runner.perplexity(runner.tokenize(perplexity_text()), threads)
        finally:
            runner.close()
    return Measurement(
        path=str(path),
        n_ctx=n_ctx,
        n_slots=n_slots,
        threads=threads,
        load_seconds=load_seconds,
        pp_tokens=pp_tokens,
        pp_tokens_per_s=pp_tokens / pp_best,
        tg_tokens=tg_tokens,
        tg_tokens_per_s=tg_tokens / tg_best,
        baseline_rss=baseline,
        peak_rss=peak,
        model_rss=peak - baseline,
        perplexity=ppl if perplexity and math.isfinite(ppl) else None,
        perplexity_tokens=scored,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m controller.evaluate FILE``: measure one GGUF file and print one JSON object."""
    parser = argparse.ArgumentParser(prog="python -m controller.evaluate", description=main.__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--pp-tokens", type=int, default=128)
    parser.add_argument("--tg-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-perplexity", action="store_true")
    args = parser.parse_args(argv)
    try:
        result = measure(
            args.path,
            n_ctx=args.ctx,
            n_slots=args.slots,
            threads=args.threads,
            pp_tokens=args.pp_tokens,
            tg_tokens=args.tg_tokens,
            repeat=args.repeat,
            perplexity=not args.no_perplexity,
        )
    except (ModelToolError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
