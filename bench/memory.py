"""Where the agent's resident memory goes: ``/proc/<pid>/smaps`` of the benchmark's agent, mapping by mapping.

Starts ``edge-agent run`` exactly as ``bench/inference.py`` does (same model, ``--slots``, ``--ctx``,
``--threads``), prints its resident set when ready (no model loaded), then after blocks of streamed completions at
concurrency 1, 2, 4 and 8, grouped into: the model file, the KV cache and compute buffer (llama.cpp's one large
anonymous mapping), the malloc arenas of threads (the decode thread's holds llama.cpp's vocabulary), the main heap,
the other anonymous mappings (mostly Python's object arenas), and shared libraries.
With ``--embeddings`` it also asks for embeddings at the end (the second llama context they need).

Writes ``.cache/bench/memory.json``. This explains the memory line of ``bench/inference.py``; it measures no target.

Usage: ``python bench/memory.py [--slots 4] [--ctx 2048] [--threads 2] [--embeddings]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inference

MIB = 1 << 20
LARGE = 32 * MIB
"""The largest anonymous mapping at least this large is llama.cpp's KV cache and compute buffer."""
ARENA_ALIGN = 64 * MIB
_MAPPING = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$")


def breakdown(pid: int, model: Path) -> dict[str, float]:
    """Resident MiB of ``pid`` by kind of mapping."""
    parts: collections.Counter[str] = collections.Counter()
    largest_anon = ("", 0)
    kind = "other"
    anon_rss: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        match = _MAPPING.match(line)
        if match:
            start, end, name = int(match[1], 16), int(match[2], 16), match[3].strip()
            if name in ("", "[anon]"):
                if start % ARENA_ALIGN == 0:  # glibc aligns a thread arena's heap to its 64 MiB reservation
                    kind = "thread malloc arenas (the decode thread's holds the vocabulary)"
                elif end - start >= LARGE:
                    kind = f"anon:{start:x}"
                else:
                    kind = "other anonymous mappings (Python's object arenas)"
            elif name == "[heap]":
                kind = "main heap (malloc)"
            elif name.startswith("["):
                kind = "other"
            elif Path(name).name == model.name or "/blobs/sha256/" in name:
                kind = "model file (mapped)"
            else:
                kind = "shared libraries and other files"
        elif line.startswith("Rss:"):
            kb = int(line.split()[1])
            if kind.startswith("anon:"):
                anon_rss[kind] = anon_rss.get(kind, 0) + kb
                if anon_rss[kind] > largest_anon[1]:
                    largest_anon = (kind, anon_rss[kind])
            else:
                parts[kind] += kb
    for name, kb in anon_rss.items():
        label = "KV cache + compute buffer (llama.cpp)" if name == largest_anon[0] else "other large anonymous mappings"
        parts[label] += kb
    return {name: round(kb / 1024, 1) for name, kb in parts.most_common() if kb >= 52}  # >= 0.05 MiB


def totals(pid: int) -> dict[str, float]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile")):
            key, value = line.split(":")
            values[key] = round(int(value.split()[0]) / 1024, 1)
    return values


def show(stage: str, pid: int, model: Path, report: list[dict[str, Any]]) -> None:
    parts, total = breakdown(pid, model), totals(pid)
    report.append({"stage": stage, "totals_mib": total, "parts_mib": parts})
    print(f"{stage}: VmRSS {total['VmRSS']:.1f} MiB (peak {total['VmHWM']:.1f})")
    for name, mib in parts.items():
        print(f"  {mib:7.1f}  {name}")


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    model = inference.ensure_model(inference.MODELS["smollm2"])
    work = Path(tempfile.mkdtemp(prefix="edgefleet-memory-"))
    report: list[dict[str, Any]] = []
    server = inference.start_agent(model, work, args, work / "agent.log")
    try:
        await inference.wait_ready(server, "/readyz")
        show("ready, no model loaded", server.process.pid, model, report)
        for level, count in ((1, 2), (2, 4), (4, 8), (8, 16)):
            block = inference.Block(server.name, level, 0, 0.0)
            await inference.run_block(server, level, count, 100 * level, block)
            if block.errors:
                raise RuntimeError(f"{block.errors} requests failed at c={level}")
            show(f"after {count} completions at c={level}", server.process.pid, model, report)
        if args.embeddings:
            async with (
                aiohttp.ClientSession(connector=server.connector(1)) as session,
                session.post(
                    server.base_url + "/v1/embeddings",
                    json={"model": inference.MODEL_NAME, "input": ["a cat sat on the mat", "taxes"]},
                ) as reply,
            ):
                if reply.status != 200:
                    raise RuntimeError(f"embeddings: HTTP {reply.status}: {await reply.text()}")
            show("after an embeddings request", server.process.pid, model, report)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--embeddings", action="store_true", help="also ask for embeddings at the end")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    inference.OUT.mkdir(parents=True, exist_ok=True)
    out = inference.OUT / "memory.json"
    out.write_text(json.dumps({"config": vars(args), "stages": report}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
