"""The device's hardware profile for the state message (DESIGN.md §7: hardware-aware variant choice).

Architecture, the CPU features that matter for quantized inference, logical cores, RAM (and the budget the
agent may use for models), free disk in the state directory, and usable accelerators. Facts come from
``platform``, ``psutil`` and, on Linux, ``/proc/cpuinfo``; nothing here needs privileges. Blocking (a few
file reads and syscalls): call it from a worker thread.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import psutil

from protocols.messages import TOKEN_RE, HardwareProfile

__all__ = ["INFERENCE_CPU_FEATURES", "cpu_features", "hardware_profile"]

INFERENCE_CPU_FEATURES = frozenset(
    {
        # x86
        "sse3", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
        "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
        # arm (aarch64 /proc/cpuinfo "Features")
        "neon", "asimd", "asimdhp", "asimddp", "fphp", "sve", "sve2", "i8mm", "bf16", "dotprod",
    }
)  # fmt: skip
"""CPU flags relevant to inference engines (llama.cpp / onnxruntime kernels)."""


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """Inference-relevant CPU flags, sorted; empty where they cannot be read."""
    found: set[str] = set()
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in {"flags", "features"}:
            found.update(flag for flag in value.split() if flag in INFERENCE_CPU_FEATURES)
            break  # every core lists the same flags
    if sys.platform == "darwin" and platform.machine() == "arm64":
        found.add("neon")
    return tuple(sorted(found))


def _accelerators() -> tuple[str, ...]:
    found = []
    if sys.platform == "darwin" and platform.machine() == "arm64":
        found.append("metal")
    found += [f"cuda:{p.name.removeprefix('nvidia')}" for p in sorted(Path("/dev").glob("nvidia[0-9]*"))]
    return tuple(a for a in found if TOKEN_RE.fullmatch(a))


def hardware_profile(state_dir: Path, memory_budget_bytes: int) -> HardwareProfile:
    """This machine's profile; ``ram_budget_bytes`` is ``memory_budget_bytes`` capped at the RAM."""
    ram = int(psutil.virtual_memory().total)
    try:
        free = int(psutil.disk_usage(str(state_dir)).free)
    except OSError:
        free = 0
    arch = platform.machine() or "unknown"
    return HardwareProfile(
        arch=arch if TOKEN_RE.fullmatch(arch) else "unknown",
        cpu_features=cpu_features(),
        cores=max(1, min(os.cpu_count() or 1, 65535)),
        ram_bytes=ram,
        ram_budget_bytes=min(memory_budget_bytes, ram),
        disk_free_bytes=free,
        accelerators=_accelerators(),
    )
