"""Inference benchmark (``make bench``): edgefleet's agent against ``llama-server`` and ``llama_cpp.server``.

On one machine, in one run, with the same GGUF model and the same thread count:

(a) **edge-agent** — ``edge-agent models import`` into a throw-away state directory, then ``edge-agent run``
    with ``n_parallel = --slots`` and ``n_ctx = --ctx`` per slot; driven over its unix socket;
(b) **llama_cpp.server** — llama-cpp-python's own server (``python -m llama_cpp.server``), one sequence at a time,
    from a separate venv ``.cache/bench-venv`` (``llama-cpp-python[server]`` of the *installed* version; pip
    reuses the wheel it built for ``.venv``); ``--interrupt_requests False`` so that every request completes
    (its default lets a new request cut the one in flight short); driven over TCP;
(c) **llama-server** — llama.cpp's C++ server, ``-np --slots -c slots×ctx``, otherwise its defaults, built by
    ``bench/build-llama-tools.sh`` into ``.cache/llama-tools/bin`` from the llama.cpp vendored in the installed
    llama-cpp-python (built here when missing); driven over TCP.

Each is driven with the same request mix — distinct ~40-token text prompts, 32 generated tokens, temperature 0,
streamed (``/v1/completions``) — at each concurrency level (1, 4, 8 by default). Blocks of requests alternate
between the servers ``--rounds`` times (rotating the order), so load from elsewhere on the box hits all of them
alike; for each server and level the round with the best throughput is reported (its tokens/s, time to first
token p50/p95 and end-to-end latency p50/p95), every round is in the JSON. The 1-minute load average is
recorded before each block.

Also measured: the agent's resident memory with the model loaded (peak over the run) against the model file
plus the KV cache of the configured slots: the one the agent allocates (K f16, V q8_0: see
``agent/inference/llama.py``), and the f16 cache llama.cpp allocates by default (llama-server's here).

Output: a table with the ratios issue 4 asks for, ``.cache/bench/inference.json`` and
``.cache/bench/inference.png``. Exit status 0 even when a target is missed (this is a benchmark, not a test).

Usage: ``python bench/inference.py [--slots 4] [--ctx 2048] [--threads 2] [--levels 1,4,8] [--rounds 5]
[--requests-per-slot 4] [--quiet-load 1.0] [--out inference]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fetch_models import MODELS, ensure_model  # noqa: E402

from protocols.gguf import parse_gguf  # noqa: E402
from protocols.memory import ModelShape, kv_cache_bytes  # noqa: E402

OUT = ROOT / ".cache" / "bench"
TOOLS = ROOT / ".cache" / "llama-tools" / "bin"
BENCH_VENV = ROOT / ".cache" / "bench-venv"
MODEL_NAME = "smollm2-135m-instruct"
MAX_TOKENS = 32
Q8_0_BLOCK_BYTES, Q8_0_BLOCK_VALUES = 34, 32  # 32 int8 values and one f16 scale
TOPICS = (
    "the sea", "mountains", "a robot", "coffee", "the moon", "a lost key", "winter", "trains",
    "bees", "a lighthouse", "chess", "rain", "Paris", "a violin", "deserts", "owls",
)  # fmt: skip
AGENT, PYSERVER, LLAMASERVER = "edge-agent", "llama_cpp.server", "llama-server"


def prompt(i: int) -> str:
    """The i-th prompt: about 40 tokens, distinct from every other from its first words (no shared prefix)."""
    return (
        f"Story {i} is about {TOPICS[i % len(TOPICS)]}. Please write a detailed, vivid and long story with "
        "several characters, a journey, some dialogue and a surprising ending. Story:"
    )


# --- servers -------------------------------------------------------------------------------------------------


@dataclass
class Server:
    """A server under test: how to reach it and its process."""

    name: str
    process: subprocess.Popen[bytes]
    base_url: str
    unix_socket: str | None = None
    model: str = MODEL_NAME
    usage_option: bool = True  # accepts stream_options.include_usage

    def connector(self, limit: int) -> aiohttp.BaseConnector:
        # A fresh connection per request for every server alike: llama-server's HTTP library closes idle
        # keep-alive connections in a way aiohttp only notices when it writes the next request.
        if self.unix_socket is not None:
            return aiohttp.UnixConnector(path=self.unix_socket, limit=limit, force_close=True)
        return aiohttp.TCPConnector(limit=limit, force_close=True)

    def rss(self) -> int:
        try:
            return int(psutil.Process(self.process.pid).memory_info().rss)
        except psutil.NoSuchProcess:
            return 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_ready(server: Server, path: str, limit_s: float = 180.0) -> None:
    """Poll ``path`` until it answers 200 (or the process dies, or ``limit_s`` passes)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with status {server.process.returncode} during start-up")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with (
                aiohttp.ClientSession(connector=server.connector(1)) as session,
                session.get(server.base_url + path, timeout=aiohttp.ClientTimeout(total=5)) as reply,
            ):
                if reply.status == 200:
                    return
        await asyncio.sleep(0.25)
    raise RuntimeError(f"{server.name} was not ready after {limit_s:.0f} s")


def start_agent(model: Path, work: Path, args: argparse.Namespace, log: Path) -> Server:
    state, sock, config = work / "state", work / "api.sock", work / "agent.toml"
    config.write_text(
        "[inference]\n"
        f"n_threads = {args.threads}\nn_parallel = {args.slots}\nn_ctx = {args.ctx}\n"
        "max_queue = 256\nmemory_budget_bytes = 4294967296\n"
        '[log]\nlevel = "warning"\n'
    )
    agent = [str(ROOT / ".venv" / "bin" / "edge-agent"), "--config", str(config), "--state-dir", str(state)]
    subprocess.run(
        [*agent, "--socket", str(sock), "models", "import", str(model), "--name", MODEL_NAME, "--variant", "q4_1"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    with log.open("wb") as out:
        process = subprocess.Popen([*agent, "--socket", str(sock), "run"], stdout=out, stderr=subprocess.STDOUT)
    return Server(AGENT, process, "http://agent", unix_socket=str(sock))


def ensure_bench_venv(version: str) -> Path | None:
    """``.cache/bench-venv`` with ``llama-cpp-python[server]=={version}``; its python, or None if it cannot be made."""
    python = BENCH_VENV / "bin" / "python"
    stamp = BENCH_VENV / ".llama-cpp-python-version"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == version:
        return python
    print(f"setting up {BENCH_VENV} with llama-cpp-python[server]=={version} (pip reuses its cached wheel)")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(BENCH_VENV)], check=True)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--progress-bar", "off", f"llama-cpp-python[server]=={version}"],
        capture_output=True,
        text=True,
    )
    if install.returncode != 0:
        print(f"cannot install llama-cpp-python[server] into {BENCH_VENV}:\n{install.stderr[-2000:]}")
        return None
    if "Building wheel for llama-cpp-python" in install.stdout:
        print("note: pip compiled llama-cpp-python for the bench venv (no cached wheel matched)")
    stamp.write_text(version + "\n")
    return python


def start_pyserver(python: Path, model: Path, args: argparse.Namespace, log: Path) -> Server:
    port = free_port()
    command = [
        str(python), "-m", "llama_cpp.server", "--model", str(model), "--model_alias", MODEL_NAME,
        "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", str(args.ctx),
        "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    return Server(PYSERVER, process, f"http://127.0.0.1:{port}", usage_option=False)


def ensure_llama_server() -> Path | None:
    binary = TOOLS / "llama-server"
    if not binary.exists():
        print("llama-server is missing: building it with bench/build-llama-tools.sh (several minutes)")
        built = subprocess.run(["bash", str(ROOT / "bench" / "build-llama-tools.sh")], check=False)
        if built.returncode != 0 or not binary.exists():
            print("could not build llama-server; it is left out of this run")
            return None
    return binary


def start_llama_server(binary: Path, model: Path, args: argparse.Namespace, log: Path) -> Server:
    port = free_port()
    command = [
        str(binary), "-m", str(model), "-t", str(args.threads), "-tb", str(args.threads),
        "-np", str(args.slots), "-c", str(args.slots * args.ctx), "--host", "127.0.0.1", "--port", str(port),
        "--no-webui",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    return Server(LLAMASERVER, process, f"http://127.0.0.1:{port}")


# --- driving them --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    ttft_s: float
    e2e_s: float
    tokens: int


@dataclass
class Block:
    """One block of requests at one concurrency level against one server."""

    server: str
    concurrency: int
    round: int
    load_1m: float
    wall_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s if self.wall_s else 0.0


async def one_request(session: aiohttp.ClientSession, server: Server, i: int) -> Sample:
    body: dict[str, Any] = {
        "model": server.model,
        "prompt": prompt(i),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    if server.usage_option:
        body["stream_options"] = {"include_usage": True}
    started = time.perf_counter()
    ttft: float | None = None
    chunks = 0
    usage: int | None = None
    finish: str | None = None
    async with session.post(server.base_url + "/v1/completions", json=body) as reply:
        if reply.status != 200:
            raise RuntimeError(f"{server.name}: HTTP {reply.status}: {(await reply.text())[:200]}")
        async for line in reply.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"{server.name}: {event['error']}")
            if event.get("usage"):
                usage = int(event["usage"]["completion_tokens"])
            for choice in event.get("choices") or ():
                if choice.get("text"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
                finish = choice.get("finish_reason") or finish
    e2e = time.perf_counter() - started
    tokens = usage if usage is not None else (MAX_TOKENS if finish == "length" else chunks)
    return Sample(ttft_s=ttft if ttft is not None else e2e, e2e_s=e2e, tokens=tokens)


async def run_block(server: Server, concurrency: int, count: int, first: int, block: Block) -> None:
    pending = iter(range(first, first + count))

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in pending:
            try:
                block.samples.append(await one_request(session, server, i))
            except (aiohttp.ClientError, RuntimeError) as exc:
                block.errors += 1
                print(f"  {server.name}: request {i} failed: {exc}")

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=server.connector(concurrency), timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        block.wall_s = time.perf_counter() - started


async def wait_quiet(threshold: float, limit_s: float) -> float:
    """Wait (at most ``limit_s``) for the 1-minute load average to drop below ``threshold``; return it."""
    deadline = time.monotonic() + limit_s
    load = os.getloadavg()[0]
    announced = False
    while load >= threshold and time.monotonic() < deadline:
        if not announced:
            print(f"waiting for the box to quieten (1-min load {load:.2f} >= {threshold})...")
            announced = True
        await asyncio.sleep(5)
        load = os.getloadavg()[0]
    return load


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarise(blocks: list[Block]) -> dict[str, Any]:
    """Best round (by tokens/s) with its latency percentiles, plus the median tokens/s over rounds."""
    best = max(blocks, key=lambda b: b.tokens_per_s)
    ttft = [s.ttft_s * 1000 for s in best.samples]
    e2e = [s.e2e_s * 1000 for s in best.samples]
    return {
        "tokens_per_s": round(best.tokens_per_s, 2),
        "tokens_per_s_median": round(statistics.median(b.tokens_per_s for b in blocks), 2),
        "ttft_ms_p50": round(percentile(ttft, 50), 1),
        "ttft_ms_p95": round(percentile(ttft, 95), 1),
        "e2e_ms_p50": round(percentile(e2e, 50), 1),
        "e2e_ms_p95": round(percentile(e2e, 95), 1),
        "requests": len(best.samples),
        "errors": sum(b.errors for b in blocks),
        "best_round": best.round,
        "load_1m_at_best_round": best.load_1m,
    }


# --- report --------------------------------------------------------------------------------------------------


def targets(results: dict[str, dict[int, dict[str, Any]]], levels: list[int]) -> list[dict[str, Any]]:
    """Issue 4's targets, each with the measured value and whether it is met (None: a peer is missing)."""
    checks: list[dict[str, Any]] = []
    agent, llama, py = results.get(AGENT, {}), results.get(LLAMASERVER, {}), results.get(PYSERVER, {})

    def ratio(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], level: int) -> float | None:
        if level not in a or level not in b or not b[level]["tokens_per_s"]:
            return None
        return round(float(a[level]["tokens_per_s"]) / float(b[level]["tokens_per_s"]), 3)

    for level in levels:
        if level == 1:
            value = ratio(agent, llama, 1)
            checks.append(
                {
                    "target": "c=1 agent/llama-server tokens/s >= 0.95",
                    "value": value,
                    "met": None if value is None else value >= 0.95,
                }
            )
            if 1 in agent and 1 in llama:
                delta = round(agent[1]["ttft_ms_p50"] - llama[1]["ttft_ms_p50"], 1)
                checks.append(
                    {
                        "target": "c=1 agent TTFT p50 - llama-server TTFT p50 <= 10 ms",
                        "value": delta,
                        "met": delta <= 10,
                    }
                )
            continue
        value = ratio(agent, llama, level)
        checks.append(
            {
                "target": f"c={level} agent/llama-server tokens/s >= 1.0",
                "value": value,
                "met": None if value is None else value >= 1.0,
            }
        )
        value = ratio(agent, py, level)
        checks.append(
            {
                "target": f"c={level} agent/llama_cpp.server tokens/s >= 2.0",
                "value": value,
                "met": None if value is None else value >= 2.0,
            }
        )
    return checks


def plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (the JSON has every number)")
        return False
    levels = report["config"]["levels"]
    servers = [s for s in (AGENT, LLAMASERVER, PYSERVER) if s in report["results"]]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / max(1, len(servers))
    for k, server in enumerate(servers):
        rows = report["results"][server]
        xs = [i + (k - (len(servers) - 1) / 2) * width for i in range(len(levels))]
        for axis, key, err in (
            (axes[0], "tokens_per_s", None),
            (axes[1], "ttft_ms_p50", "ttft_ms_p95"),
            (axes[2], "e2e_ms_p50", "e2e_ms_p95"),
        ):
            values = [rows[str(level)][key] for level in levels]
            upper = [rows[str(level)][err] - v for level, v in zip(levels, values, strict=True)] if err else None
            axis.bar(xs, values, width, label=server, yerr=[[0] * len(values), upper] if upper else None, capsize=3)
    for axis, title in zip(
        axes, ("aggregate tokens/s", "time to first token, ms (p50, bar to p95)", "end-to-end latency, ms"), strict=True
    ):
        axis.set_xticks(range(len(levels)), [f"c={level}" for level in levels])
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend()
    config = report["config"]
    figure.suptitle(
        f"SmolLM2-135M Q4_1, {config['threads']} threads, {config['slots']} slots × {config['ctx']} ctx, "
        f"~40-token prompts, {MAX_TOKENS} tokens — {report['machine']['cpu']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return True


def print_table(report: dict[str, Any]) -> None:
    levels = report["config"]["levels"]
    print()
    print(f"{'server':<18}{'c':>3}{'tok/s':>9}{'(median)':>10}{'TTFT p50':>10}{'p95':>8}{'e2e p50':>9}{'p95':>8}")
    for server, rows in report["results"].items():
        for level in levels:
            row = rows[str(level)]
            print(
                f"{server:<18}{level:>3}{row['tokens_per_s']:>9.1f}{row['tokens_per_s_median']:>10.1f}"
                f"{row['ttft_ms_p50']:>10.1f}{row['ttft_ms_p95']:>8.1f}{row['e2e_ms_p50']:>9.0f}{row['e2e_ms_p95']:>8.0f}"
            )
    memory = report["memory"]
    mib = 2**20
    print(
        f"\nagent RSS with the model loaded (peak): {memory['agent_rss_peak_bytes'] / mib:.1f} MiB; model file "
        f"{memory['model_file_bytes'] / mib:.1f} MiB + KV cache for {report['config']['slots']} slots x "
        f"{report['config']['ctx']}: K f16 + V q8_0 {memory['kv_cache_bytes'] / mib:.1f} MiB (as allocated: ratio "
        f"{memory['ratio']:.3f}), f16 {memory['kv_cache_f16_bytes'] / mib:.1f} MiB (ratio {memory['ratio_to_f16']:.3f})"
    )
    for name, rss in memory["peers_rss_bytes"].items():
        print(f"{name} RSS: {rss / mib:.1f} MiB")
    print("\ntargets:")
    for check in report["targets"]:
        verdict = {True: "MET", False: "MISSED", None: "n/a"}[check["met"]]
        print(f"  {verdict:<7} {check['target']}: {check['value']}")
    loads = report["load_1m"]
    print(
        f"\n1-min load average: {loads['start']:.2f} at start, max {loads['max_before_block']:.2f} before a block, "
        f"{loads['end']:.2f} at the end (2 cores: above ~0.5 means something else ran)"
    )


# --- main ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def servers_running(starters: list[Callable[[], Server]]) -> Iterator[list[Server]]:
    started: list[Server] = []
    try:
        for start in starters:
            started.append(start())
        yield started
    finally:
        for server in started:
            server.stop()


@contextlib.asynccontextmanager
async def rss_sampler(server: Server, peak: list[int]) -> AsyncIterator[None]:
    """Sample ``server``'s RSS every 0.2 s while the block runs (keeps the peak in ``peak[0]``)."""

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], server.rss())
            await asyncio.sleep(0.2)

    task = asyncio.create_task(sample())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    model = ensure_model(MODELS["smollm2"])
    version = importlib.metadata.version("llama-cpp-python")
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    starters: list[Callable[[], Server]] = [lambda: start_agent(model, work, args, OUT / "inference-agent.log")]
    if not args.skip_pyserver and (python := ensure_bench_venv(version)) is not None:
        starters.append(lambda: start_pyserver(python, model, args, OUT / "inference-llama_cpp_server.log"))
    if not args.skip_llama_server and (binary := ensure_llama_server()) is not None:
        starters.append(lambda: start_llama_server(binary, model, args, OUT / "inference-llama-server.log"))
    loads = {"start": await wait_quiet(args.quiet_load, args.quiet_wait), "max_before_block": 0.0, "end": 0.0}
    blocks: list[Block] = []
    rss_peak = [0]
    other_rss: dict[str, int] = {}
    try:
        with servers_running(starters) as servers:
            for server in servers:
                await wait_ready(server, "/readyz" if server.name == AGENT else "/v1/models")
            for server in servers:  # warm-up: loads the agent's model, pages weights in, fills caches
                warm = Block(server.name, 1, -1, os.getloadavg()[0])
                await run_block(server, 2, 4, 10_000, warm)
                if warm.errors:
                    raise RuntimeError(f"{server.name} failed its warm-up requests")
            agent = next(s for s in servers if s.name == AGENT)
            rss_peak[0] = agent.rss()
            next_prompt = 0
            for level in args.levels:
                count = max(args.requests_per_slot * args.slots, 2 * level) if level > 1 else 2 * args.slots
                for round_ in range(args.rounds):
                    order = servers[round_ % len(servers) :] + servers[: round_ % len(servers)]
                    for server in order:
                        load = os.getloadavg()[0]
                        loads["max_before_block"] = max(loads["max_before_block"], load)
                        block = Block(server.name, level, round_, round(load, 2))
                        async with rss_sampler(agent, rss_peak):
                            await run_block(server, level, count, next_prompt, block)
                        blocks.append(block)
                        print(
                            f"c={level} round {round_ + 1}/{args.rounds} {server.name:<17} "
                            f"{block.tokens_per_s:7.1f} tok/s  load {load:.2f}"
                        )
                    next_prompt += count  # the same prompts for every server in a round
            for server in servers:
                if server.name != AGENT:
                    other_rss[server.name] = server.rss()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    loads["end"] = os.getloadavg()[0]

    results: dict[str, dict[int, dict[str, Any]]] = {}
    for name in (AGENT, LLAMASERVER, PYSERVER):
        for level in args.levels:
            mine = [b for b in blocks if b.server == name and b.concurrency == level]
            if mine:
                results.setdefault(name, {})[level] = summarise(mine)
    with model.open("rb") as f:
        shape = ModelShape.from_gguf(parse_gguf(f))
    kv_f16 = kv_cache_bytes(shape, n_ctx=args.ctx, n_slots=args.slots)
    # The agent's KV cache: K f16 (half of kv_f16), V q8_0 (the other half at q8_0's bytes per value).
    kv_q8 = kv_f16 // 2 + kv_f16 * Q8_0_BLOCK_BYTES // (4 * Q8_0_BLOCK_VALUES)
    size = model.stat().st_size
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores_logical": psutil.cpu_count(),
            "cores_physical": psutil.cpu_count(logical=False),
            "python": platform.python_version(),
            "llama_cpp_python": version,
        },
        "config": {
            "model": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else str(model),
            "threads": args.threads,
            "slots": args.slots,
            "ctx": args.ctx,
            "levels": args.levels,
            "rounds": args.rounds,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        },
        "results": {name: {str(k): v for k, v in rows.items()} for name, rows in results.items()},
        "memory": {
            "agent_rss_peak_bytes": rss_peak[0],
            "model_file_bytes": size,
            "kv_cache_bytes": kv_q8,
            "kv_cache_type": "k f16, v q8_0",
            "kv_cache_f16_bytes": kv_f16,
            "model_plus_kv_bytes": size + kv_q8,
            "model_plus_kv_f16_bytes": size + kv_f16,
            "ratio": round(rss_peak[0] / (size + kv_q8), 3),
            "ratio_to_f16": round(rss_peak[0] / (size + kv_f16), 3),
            "peers_rss_bytes": other_rss,
        },
        "load_1m": loads,
        "rounds": [asdict(b) | {"tokens_per_s": round(b.tokens_per_s, 2)} for b in blocks],
    }
    report["targets"] = targets(results, args.levels)
    memory = report["memory"]
    report["targets"].append(
        {
            "target": "agent RSS <= 1.3 x (model file + the KV cache the agent allocates: K f16, V q8_0)",
            "value": memory["ratio"],
            "met": memory["ratio"] <= 1.3,
        }
    )
    report["targets"].append(
        {
            "target": "agent RSS <= 1.3 x (model file + an f16 KV cache, llama.cpp's default, as llama-server's)",
            "value": memory["ratio_to_f16"],
            "met": memory["ratio_to_f16"] <= 1.3,
        }
    )
    return report


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends the benchmark like Ctrl-C, so the servers it started are stopped on the way out."""
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=4, help="parallel sequences (agent and llama-server)")
    parser.add_argument("--ctx", type=int, default=2048, help="context per slot")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levels", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests-per-slot", type=int, default=4, help="requests per block = this x slots")
    parser.add_argument("--quiet-load", type=float, default=1.0, help="wait for the 1-min load to drop below this")
    parser.add_argument("--quiet-wait", type=float, default=120.0, help="but at most this many seconds")
    parser.add_argument("--out", default="inference", help="name of the JSON and PNG files in .cache/bench/")
    parser.add_argument("--skip-pyserver", action="store_true")
    parser.add_argument("--skip-llama-server", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    report = asyncio.run(bench(args))
    (OUT / f"{args.out}.json").write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {OUT / f'{args.out}.json'}")
    if plot(report, OUT / f"{args.out}.png"):
        print(f"wrote {OUT / f'{args.out}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
