"""Fleet rollouts (DESIGN.md §7): which variant each device gets, in which wave, and when to stop.

Three parts, the python-tuf habit of pure rules apart from the driver that does I/O:

- **Selectors** (:func:`parse_selector`): ``dev1``, ``group:lab``, ``site=berlin`` (a label),
  ``ram>=2G,arch=aarch64`` (hardware predicates), ``all``. Within one selector, device ids and groups form a
  union (none: every device), and every label or hardware term must hold as well. ``str(parse_selector(s))``
  parses back to the same selector.
- **Variant choice** (:func:`choose_variant`): for a release *family* (every published variant of
  ``NAME@VERSION``), per device: the signed constraints (arch, accelerators, the publisher's ``min_ram_bytes``),
  the memory estimate (:func:`protocols.memory.estimate_memory` over the GGUF header at the configured context
  and slots, with this device's CPU repacking; ONNX: file bytes × overhead) times a safety margin against the
  device's reported RAM budget, and free disk for the download plus the install copy. Of the variants that fit,
  the highest precision (``prefer=quality``, the default) or the smallest (``prefer=speed``). Precision is the
  file size: every variant of a release is the same model, so more bytes means more bits per weight.
  Every rejected variant carries its reason; a device nothing fits is refused before anything is sent.
- **The driver** (:class:`RolloutDriver`): ``tick()`` is called by ``edge-fleet serve`` on its DB thread.
  Every decision is a transaction over the fleet DB (``rollouts``, ``rollout_devices``), so a controller
  restarted at any point resumes where it stopped: the state is the DB, the driver holds none.

Wave lifecycle: every device of the current wave gets a signed assignment (its previous desired models with this
family replaced by the chosen variant). Assignments are retained, so a device that is offline gets it when it
reconnects. A wave is evaluated when every assigned device reported on its generation — a device that is offline
stops blocking once the wave has been running, and this controller's link has been up, for a whole heartbeat window
(never on a ``last_seen`` that went stale while the controller could not see the devices) — or at the wave deadline
(an online device that did not report by then is a ``timeout`` failure; an offline one is ``offline``, not
counted; neither is judged before the link has been up for a heartbeat window). A paused rollout is not stepped,
even if the pause landed while a tick was under way; one rollout whose step raises does not stop the others.
Gates: install success rate, health-check pass rate, tokens/s and time to first token relative to the previous
model on the same device (from the device's earlier report on that model, else its bench results). A failing gate
halts the rollout and rolls back every device the release reached, offline ones included (a new assignment with
its previous desired models, which replaces the retained one); later waves never receive it. An ``offline``
device of a passed wave catches up when it returns: its late report is recorded (``caught_up``), not gated.

Device statuses: ``pending`` → ``assigned`` → ``ok`` | ``failed`` | ``timeout`` | ``offline`` (→ ``ok`` |
``failed`` when it reports late); any status that received the release → ``rolled_back``; ``pending`` →
``skipped`` on a halted or aborted rollout; ``unfit`` (nothing fits, never assigned).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from controller.errors import ControllerError
from controller.releases import ReleaseRepository, TargetEntry
from controller.store import FleetStore, is_online
from protocols.errors import DecodeError
from protocols.gguf import GgufInfo, parse_gguf
from protocols.keys import Ed25519PrivateKey
from protocols.limits import DEVICE_ID_RE, MODEL_NAME_RE, VARIANT_RE
from protocols.link import seal
from protocols.memory import ModelShape, estimate_memory, repack_types, repacked_bytes
from protocols.messages import Assignment, DesiredModel, HardwareProfile
from protocols.topics import TopicKind

__all__ = [
    "Candidate",
    "Choice",
    "DeviceFacts",
    "FitPolicy",
    "Gates",
    "RolloutDriver",
    "RolloutError",
    "Selector",
    "Term",
    "device_facts",
    "evaluate_gates",
    "format_size",
    "issue_assignment",
    "load_candidates",
    "parse_size",
    "parse_selector",
    "parse_waves",
    "refuse_while_rolling_out",
    "refuse_while_rolling_out_on",
    "start_rollout",
    "wave_plan",
    "choose_variant",
    "wave_counts",
]

log = structlog.get_logger(__name__)

HARDWARE_KEYS: Final = frozenset({"ram", "disk", "cores", "arch", "accel", "cpu"})
"""Selector keys that are hardware predicates (the rest of ``key=value`` terms are labels)."""
NUMERIC_KEYS: Final = frozenset({"ram", "disk", "cores"})
OPS: Final = (">=", "<=", "!=", "=", ">", "<")
LABEL_RE: Final = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
LABEL_VALUE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}")
GROUP_RE: Final = DEVICE_ID_RE
_SIZE_RE: Final = re.compile(r"(?P<n>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
TERMINAL: Final = frozenset({"halted", "completed", "aborted"})
REACHED: Final = frozenset({"assigned", "ok", "failed", "timeout"})
UNSETTLED: Final = ("assigned", "offline", "pending")
"""Device statuses an ended rollout still has work for (reports to collect, devices to skip)."""
DRIVEN: Final = frozenset({"running", "completed", "halted", "aborted"})
"""Rollout statuses a tick steps (``paused`` is not one of them)."""


class RolloutError(ControllerError):
    """A rollout cannot be planned, started or changed (bad selector, waves, release, state)."""


# --- sizes ------------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``2G``, ``512M``, ``1.5GiB``, ``1048576`` → bytes (binary units).

    Raises:
        ValueError: not a size.
    """
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size (e.g. 512M, 2G, 1048576)")
    return int(float(match["n"]) * _UNITS[match["unit"].lower()])


def format_size(n: int) -> str:
    """The shortest exact spelling of ``n`` bytes that :func:`parse_size` reads back (``2G``, ``1536M``)."""
    for unit in ("T", "G", "M", "K"):
        size = _UNITS[unit.lower()]
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def human(n: float) -> str:
    """``1.5 GiB`` for display."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --- selectors --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Term:
    """One selector term: ``kind`` is ``all``, ``device``, ``group``, ``label`` or ``hw``."""

    kind: str
    key: str = ""
    op: str = "="
    value: str = ""

    def __str__(self) -> str:
        if self.kind == "all":
            return "all"
        if self.kind == "device":
            return self.value
        if self.kind == "group":
            return f"group:{self.value}"
        if self.kind == "label" and self.key in HARDWARE_KEYS:
            return f"label:{self.key}={self.value}"
        if self.kind == "hw" and self.key in NUMERIC_KEYS and self.key != "cores":
            return f"{self.key}{self.op}{format_size(int(self.value))}"
        return f"{self.key}{self.op}{self.value}"


@dataclass(frozen=True, slots=True)
class Selector:
    """A parsed ``--to`` selector (see the module docstring)."""

    terms: tuple[Term, ...]

    def __str__(self) -> str:
        return ",".join(str(t) for t in self.terms)

    def matches(self, device: DeviceFacts) -> bool:
        """Whether ``device`` is selected."""
        members = [t for t in self.terms if t.kind in ("device", "group", "all")]
        if members and not any(_member(t, device) for t in members):
            return False
        return all(_holds(t, device) for t in self.terms if t.kind in ("label", "hw"))


def _member(term: Term, device: DeviceFacts) -> bool:
    if term.kind == "all":
        return True
    if term.kind == "device":
        return device.id == term.value
    return term.value in device.groups


def _compare(left: float | str, op: str, right: float | str) -> bool:
    if op == "=":
        return left == right
    if op == "!=":
        return left != right
    assert isinstance(left, int | float)
    assert isinstance(right, int | float)
    return {">=": left >= right, "<=": left <= right, ">": left > right, "<": left < right}[op]


def _holds(term: Term, device: DeviceFacts) -> bool:
    if term.kind == "label":
        value = device.labels.get(term.key)
        return value is not None and _compare(value, term.op, term.value)
    hw = device.hardware
    if hw is None:
        return False  # never reported: no hardware predicate holds
    if term.key in NUMERIC_KEYS:
        have = {"ram": hw.ram_budget_bytes, "disk": hw.disk_free_bytes, "cores": hw.cores}[term.key]
        return _compare(have, term.op, int(term.value))
    if term.key == "arch":
        return _compare(hw.arch, term.op, term.value)
    pool = hw.accelerators if term.key == "accel" else hw.cpu_features
    present = any(a == term.value or a.split(":")[0] == term.value for a in pool)
    return present if term.op == "=" else not present


def parse_selector(text: str) -> Selector:
    """Parse a selector (see the module docstring).

    Raises:
        RolloutError: an empty selector, an unknown term, a bad value or operator.
    """
    terms: list[Term] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            raise RolloutError(f"selector {text!r}: empty term")
        terms.append(_parse_term(part))
    return Selector(tuple(terms))


def _parse_term(part: str) -> Term:
    if part == "all":
        return Term("all")
    if part.startswith("group:"):
        group = part[len("group:") :]
        if not GROUP_RE.fullmatch(group):
            raise RolloutError(f"selector term {part!r}: bad group name")
        return Term("group", value=group)
    forced_label = part.startswith("label:")
    body = part[len("label:") :] if forced_label else part
    for op in OPS:
        key, sep, value = body.partition(op)
        if sep and key and not any(o in key for o in OPS):
            return _keyed(part, key.strip(), op, value.strip(), forced_label=forced_label)
    if forced_label or not DEVICE_ID_RE.fullmatch(part):
        raise RolloutError(f"selector term {part!r}: not a device id, group:G, key=value or a hardware predicate")
    return Term("device", value=part)


def _keyed(part: str, key: str, op: str, value: str, *, forced_label: bool) -> Term:
    if not LABEL_RE.fullmatch(key):
        raise RolloutError(f"selector term {part!r}: bad key {key!r}")
    if forced_label or key not in HARDWARE_KEYS:
        if op not in ("=", "!="):
            raise RolloutError(f"selector term {part!r}: labels compare with = or != only")
        if not LABEL_VALUE_RE.fullmatch(value):
            raise RolloutError(f"selector term {part!r}: bad label value {value!r}")
        return Term("label", key, op, value)
    if key in NUMERIC_KEYS:
        try:
            number = int(value) if key == "cores" else parse_size(value)
        except ValueError as exc:
            raise RolloutError(f"selector term {part!r}: {exc}") from exc
        return Term("hw", key, op, str(number))
    if op not in ("=", "!="):
        raise RolloutError(f"selector term {part!r}: {key} compares with = or != only")
    if not LABEL_VALUE_RE.fullmatch(value):
        raise RolloutError(f"selector term {part!r}: bad value {value!r}")
    return Term("hw", key, op, value)


# --- what the controller knows of a device ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """A device as selectors and the variant choice see it."""

    id: str
    online: bool
    hardware: HardwareProfile | None
    labels: Mapping[str, str] = field(default_factory=dict)
    groups: frozenset[str] = frozenset()
    bench: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


def _hardware(state: Mapping[str, Any] | None) -> HardwareProfile | None:
    raw = (state or {}).get("hardware")
    if not isinstance(raw, dict):
        return None
    try:
        return HardwareProfile(
            arch=str(raw["arch"]),
            cpu_features=tuple(raw.get("cpu_features", ())),
            cores=int(raw.get("cores", 1)),
            ram_bytes=int(raw["ram_bytes"]),
            ram_budget_bytes=int(raw["ram_budget_bytes"]),
            disk_free_bytes=int(raw.get("disk_free_bytes", 0)),
            accelerators=tuple(raw.get("accelerators", ())),
        )
    except (KeyError, TypeError, ValueError):
        return None


def device_facts(store: FleetStore, *, heartbeat_timeout: float, now: float) -> list[DeviceFacts]:
    """Every enrolled, non-revoked device with its last reported hardware, labels and groups."""
    labels = store.labels()
    groups: dict[str, set[str]] = {}
    for group, members in store.groups().items():
        for member in members:
            groups.setdefault(member, set()).add(group)
    out = []
    for row in store.list_devices():
        if row.revoked:
            continue
        bench = (row.state or {}).get("bench") or {}
        out.append(
            DeviceFacts(
                id=row.id,
                online=is_online(row, now=now, heartbeat_timeout=heartbeat_timeout),
                hardware=_hardware(row.state),
                labels=labels.get(row.id, {}),
                groups=frozenset(groups.get(row.id, ())),
                bench=bench if isinstance(bench, dict) else {},
            )
        )
    return out


# --- variant choice ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FitPolicy:
    """How the variant choice estimates and decides (defaults documented in docs/rollouts.md)."""

    n_ctx: int = 2048
    """Context per slot the devices serve with (their ``inference.n_ctx``)."""
    n_slots: int = 1
    """Parallel sequences (``inference.n_parallel``)."""
    margin: float = 1.25
    """The estimate is validated within 25 % of llama.cpp's measured peak: budget for the worst case."""
    onnx_overhead: float = 1.5
    """ONNX models: resident memory ≈ file bytes × this (onnxruntime's arena and initializers)."""
    prefer: str = "quality"
    """``quality``: the highest precision that fits; ``speed``: the smallest that fits."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One published variant of the release family."""

    entry: TargetEntry
    name: str
    version: int
    variant: str
    info: GgufInfo | None = None
    """The GGUF header (None for ONNX, or a GGUF whose header cannot be read)."""

    @property
    def desired(self) -> DesiredModel:
        """What an assignment names."""
        return DesiredModel(
            name=self.name,
            version=self.version,
            variant=self.variant,
            target_path=self.entry.path,
            sha256=self.entry.sha256,
            length=self.entry.length,
        )


@dataclass(frozen=True, slots=True)
class Choice:
    """The variant a device gets (or None: nothing fits), with one reason per variant considered."""

    device: str
    candidate: Candidate | None
    estimate_bytes: int
    reasons: tuple[str, ...]

    @property
    def summary(self) -> str:
        """One line: the chosen variant and why, or why nothing fits."""
        if self.candidate is None:
            return "nothing fits: " + "; ".join(self.reasons)
        return next((r for r in self.reasons if r.startswith(self.candidate.variant + ":")), "")


def load_candidates(repo: ReleaseRepository, name: str, version: int | None = None) -> list[Candidate]:
    """Every published variant of ``name@version`` (the newest published version if None).

    Raises:
        RolloutError: no such published release.
    """
    if not MODEL_NAME_RE.fullmatch(name):
        raise RolloutError(f"{name!r} is not a model name")
    published: dict[int, list[TargetEntry]] = {}
    for entry in repo.entries():
        parts = entry.path.split("/")
        if entry.published and len(parts) == 4 and parts[1] == name:
            published.setdefault(int(parts[2]), []).append(entry)
    if not published:
        raise RolloutError(f"no published release of {name}")
    chosen = max(published) if version is None else version
    if chosen not in published:
        raise RolloutError(f"{name}@{chosen} is not published (versions: {', '.join(map(str, sorted(published)))})")
    out = []
    for entry in published[chosen]:
        variant = entry.path.split("/")[3].rsplit(".", 1)[0]
        info = _read_header(repo.blob_path(entry.sha256)) if entry.fields.format == "gguf" else None
        out.append(Candidate(entry, name, chosen, variant, info))
    return sorted(out, key=lambda c: (-c.entry.length, c.variant))


def _read_header(path: Path) -> GgufInfo | None:
    try:
        with path.open("rb") as f:
            return parse_gguf(f)
    except (OSError, DecodeError):
        return None


def estimate_bytes(candidate: Candidate, hw: HardwareProfile, policy: FitPolicy) -> tuple[int, str]:
    """Estimated resident bytes of ``candidate`` on ``hw`` (before the margin), and how it was estimated."""
    if candidate.info is not None:
        try:
            estimate = estimate_memory(
                ModelShape.from_gguf(candidate.info),
                candidate.entry.length,
                n_ctx=policy.n_ctx,
                n_slots=policy.n_slots,
                repack_bytes=repacked_bytes(candidate.info, repack_types(hw.arch, hw.cpu_features)),
            )
            kv = human(estimate.kv_cache_bytes)
            return estimate.total_bytes, f"weights+runtime+KV {kv} at {policy.n_ctx}×{policy.n_slots}"
        except DecodeError:
            pass
    return int(candidate.entry.length * policy.onnx_overhead), f"file × {policy.onnx_overhead}"


def choose_variant(device: DeviceFacts, candidates: Sequence[Candidate], policy: FitPolicy) -> Choice:
    """The variant ``device`` gets under ``policy`` (see the module docstring), with reasons."""
    hw = device.hardware
    if hw is None:
        return Choice(device.id, None, 0, ("the device has not reported its hardware yet",))
    fitting: list[tuple[Candidate, int]] = []
    reasons = []
    for c in candidates:
        need, how = estimate_bytes(c, hw, policy)
        padded = int(need * policy.margin)
        misfit = c.entry.fields.fit_problem(arch=hw.arch, ram_bytes=hw.ram_budget_bytes, accelerators=hw.accelerators)
        if c.entry.fields.min_ram_bytes > hw.ram_budget_bytes:
            reasons.append(
                f"{c.variant}: needs {human(c.entry.fields.min_ram_bytes)} of RAM (signed minimum), "
                f"RAM budget {human(hw.ram_budget_bytes)}"
            )
        elif misfit is not None:
            reasons.append(f"{c.variant}: {misfit} (signed constraint)")
        elif padded > hw.ram_budget_bytes:
            reasons.append(
                f"{c.variant}: needs {human(need)} ({how}) × {policy.margin} = {human(padded)} "
                f"> RAM budget {human(hw.ram_budget_bytes)}"
            )
        elif 2 * c.entry.length > hw.disk_free_bytes:
            reasons.append(
                f"{c.variant}: needs {human(2 * c.entry.length)} of disk (download + install), "
                f"{human(hw.disk_free_bytes)} free"
            )
        else:
            fitting.append((c, padded))
            reasons.append(
                f"{c.variant}: fits: {human(padded)} with margin ≤ RAM budget {human(hw.ram_budget_bytes)}"
                + (f", min RAM {human(c.entry.fields.min_ram_bytes)}" if c.entry.fields.min_ram_bytes else "")
            )
    if not fitting:
        return Choice(device.id, None, 0, tuple(reasons))
    # candidates are sorted largest (highest precision) first
    best = fitting[-1] if policy.prefer == "speed" else fitting[0]
    return Choice(device.id, best[0], best[1], tuple(reasons))


# --- waves and gates --------------------------------------------------------------------------------------


def parse_waves(text: str) -> tuple[float, ...]:
    """``5%,25%,100%`` → ``(5.0, 25.0, 100.0)``: increasing cumulative percentages ending at 100.

    Raises:
        RolloutError: not percentages, not increasing, or not ending at 100 %.
    """
    waves = []
    for raw in text.split(","):
        part = raw.strip().removesuffix("%")
        try:
            value = float(part)
        except ValueError:
            raise RolloutError(f"--waves {text!r}: {raw!r} is not a percentage") from None
        if not 0 < value <= 100 or not math.isfinite(value):
            raise RolloutError(f"--waves {text!r}: {raw!r} is not in (0, 100]")
        waves.append(value)
    if any(b <= a for a, b in itertools.pairwise(waves)):
        raise RolloutError(f"--waves {text!r}: percentages must increase")
    if waves[-1] != 100:
        raise RolloutError(f"--waves {text!r}: the last wave must be 100%")
    return tuple(waves)


def wave_counts(n: int, waves: Sequence[float]) -> list[int]:
    """Cumulative device counts per wave for ``n`` devices: each wave at least one more (until all)."""
    counts = []
    previous = 0
    for percent in waves:
        count = min(n, max(math.ceil(n * percent / 100), previous + 1))
        counts.append(count)
        previous = count
    return counts


@dataclass(frozen=True, slots=True)
class Gates:
    """Thresholds a wave must meet to let the next one start."""

    min_install_rate: float = 1.0
    """Devices that installed / devices that reported (``timeout`` counts as a failure)."""
    min_health_rate: float = 1.0
    """Devices whose health check passed / devices that installed."""
    min_tps_ratio: float = 0.5
    """Worst device's tokens/s ÷ its tokens/s on the previous model (devices without a baseline skip)."""
    max_ttft_ratio: float = 2.0
    """Worst device's time to first token ÷ its TTFT on the previous model."""

    def to_dict(self) -> dict[str, float]:
        """JSON-able."""
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class GateResult:
    """A wave's gate values and verdict."""

    passed: bool
    values: dict[str, float | None]
    failures: tuple[str, ...]
    counted: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able."""
        return {
            "passed": self.passed,
            "values": self.values,
            "failures": list(self.failures),
            "counted": self.counted,
        }


def evaluate_gates(devices: Iterable[Mapping[str, Any]], gates: Gates) -> GateResult:
    """Evaluate ``gates`` over rollout-device rows (``status``, ``reason``, ``metrics_json``, ``baseline_json``).

    Offline devices are not counted. With no device counted the wave passes (nothing measured can fail it;
    the log says ``counted: 0``).
    """
    counted = [d for d in devices if d["status"] in ("ok", "failed", "timeout")]
    installed = [d for d in counted if d["status"] == "ok" or _health_failure(d)]
    healthy = [d for d in counted if d["status"] == "ok"]
    tps: list[float] = []
    ttft: list[float] = []
    for d in healthy:
        metrics, baseline = json.loads(d["metrics_json"]), json.loads(d["baseline_json"])
        if metrics.get("tokens_per_s") and baseline.get("tokens_per_s"):
            tps.append(metrics["tokens_per_s"] / baseline["tokens_per_s"])
        if metrics.get("ttft_ms") and baseline.get("ttft_ms"):
            ttft.append(metrics["ttft_ms"] / baseline["ttft_ms"])
    values: dict[str, float | None] = {
        "install_rate": len(installed) / len(counted) if counted else None,
        "health_rate": len(healthy) / len(installed) if installed else None,
        "tps_ratio": min(tps) if tps else None,
        "ttft_ratio": max(ttft) if ttft else None,
    }
    failures = []
    checks = (
        ("install_rate", gates.min_install_rate, True),
        ("health_rate", gates.min_health_rate, True),
        ("tps_ratio", gates.min_tps_ratio, True),
        ("ttft_ratio", gates.max_ttft_ratio, False),
    )
    for name, threshold, at_least in checks:
        value = values[name]
        if value is not None and (value < threshold if at_least else value > threshold):
            failures.append(f"{name} {value:.2f} {'<' if at_least else '>'} {threshold:.2f}")
    if counted and not installed:
        values["health_rate"] = 0.0
    return GateResult(not failures, values, tuple(failures), len(counted))


def _health_failure(device: Mapping[str, Any]) -> bool:
    return device["status"] == "failed" and str(device["reason"]).startswith("health")


# --- assignments ------------------------------------------------------------------------------------------


def issue_assignment(
    store: FleetStore,
    key: Ed25519PrivateKey,
    device: str,
    models: Sequence[DesiredModel],
    *,
    rollout_id: str | None = None,
    now: float | None = None,
) -> int:
    """Sign and store the device's next assignment (call inside a transaction); returns its generation.

    ``serve`` publishes it (retained) within ``controller.assignment_poll_s``.
    """
    generation = store.next_generation(device)
    assignment = Assignment(
        device=device,
        generation=generation,
        issued_ts_ms=int((now if now is not None else time.time()) * 1000),
        models=tuple(models),
        rollout_id=rollout_id,
    )
    store.add_assignment(device, generation, seal(assignment, TopicKind.ASSIGN, [key]), [m.to_dict() for m in models])
    return generation


def refuse_while_rolling_out(store: FleetStore, name: str) -> None:
    """Refuse another deploy of ``name`` while a rollout of it runs or is paused: its waves, gates and rollback
    would race the second one's assignments.

    Raises:
        RolloutError: naming the rollout to wait for or abort.
    """
    busy = [r["id"] for r in store.rollouts(status=("running", "paused")) if r["model"] == name]
    if busy:
        raise RolloutError(f"rollout {busy[0]} of {name} is still running or paused: wait for it or abort it first")


def refuse_while_rolling_out_on(store: FleetStore, device: str, names: Iterable[str]) -> None:
    """Refuse to replace ``device``'s desired models while a running or paused rollout of one of ``names`` (the
    models the new assignment names or drops) includes the device: its waves, gates and rollback would race it.

    Raises:
        RolloutError: naming the rollout to wait for or abort.
    """
    wanted = set(names)
    for r in store.rollouts(status=("running", "paused")):
        if r["model"] not in wanted:
            continue
        mine = [d for d in store.rollout_devices(r["id"]) if d["device"] == device and d["status"] != "unfit"]
        if mine:
            raise RolloutError(
                f"rollout {r['id']} of {r['model']} includes {device} ({mine[0]['status']}): wait for it, abort "
                "it, or pass --force"
            )


def current_models(store: FleetStore, device: str) -> list[dict[str, Any]]:
    """The device's newest desired models (as stored), or none."""
    rows = store.assignments(device, limit=1)
    return list(rows[0].models) if rows else []


def with_model(previous: Sequence[Mapping[str, Any]], model: DesiredModel) -> list[DesiredModel]:
    """``previous`` desired models with the family of ``model`` replaced by it."""
    kept = [DesiredModel(**dict(m)) for m in previous if m["name"] != model.name]
    return [*kept, model]


def new_rollout_id(name: str) -> str:
    """``r-<name prefix>-<random>``, valid as an assignment's ``rollout_id``."""
    return f"r-{name[:40].strip('.-_')}-{secrets.token_hex(4)}"


def wave_plan(choices: Sequence[Choice], waves: Sequence[float]) -> dict[str, int]:
    """Each fitting device's wave (0-based), in the order of ``choices``."""
    fits = [c.device for c in choices if c.candidate is not None]
    counts = wave_counts(len(fits), waves)
    return {device: next(w for w, count in enumerate(counts) if index < count) for index, device in enumerate(fits)}


def start_rollout(
    store: FleetStore,
    choices: Sequence[Choice],
    wave_of: Mapping[str, int],
    *,
    selector: str,
    waves: Sequence[float],
    wave_timeout_s: float,
    policy: FitPolicy,
    gates: Gates,
    now: float,
) -> str:
    """Record a planned rollout (its own transaction); ``serve`` drives it from its next tick. Returns its id.

    Raises:
        RolloutError: nothing fits, or another rollout of the same model is running or paused.
    """
    chosen = [c.candidate for c in choices if c.candidate is not None]
    if not chosen:
        raise RolloutError("nothing fits any selected device: no rollout started")
    name, version = chosen[0].name, chosen[0].version
    rollout_id = new_rollout_id(name)
    rows = [
        {
            "rollout_id": rollout_id,
            "device": c.device,
            "wave": wave_of.get(c.device, -1),
            "status": "pending" if c.candidate else "unfit",
            "variant": c.candidate.variant if c.candidate else None,
            "target_json": json.dumps(c.candidate.desired.to_dict()) if c.candidate else None,
            "reason": c.summary[:1000],
        }
        for c in choices
    ]
    with store.transaction():
        refuse_while_rolling_out(store, name)
        store.add_rollout(
            {
                "id": rollout_id,
                "created_ts": now,
                "updated_ts": now,
                "model": name,
                "version": version,
                "selector": selector,
                "waves_json": json.dumps(list(waves)),
                "wave_timeout_s": wave_timeout_s,
                "policy_json": json.dumps(policy.to_dict()),
                "gates_json": json.dumps(gates.to_dict()),
                "status": "running",
                "wave": 0,
            },
            rows,
        )
    return rollout_id


# --- the driver -------------------------------------------------------------------------------------------


class RolloutDriver:
    """Advances every active rollout one step per :meth:`tick` (see the module docstring).

    Stateless between ticks: everything lives in the fleet DB, so a restarted ``serve`` resumes.
    """

    def __init__(
        self,
        key: Ed25519PrivateKey,
        *,
        heartbeat_timeout: float,
        clock: Callable[[], float] = time.time,
        link_up_since: Callable[[], float | None] = lambda: None,
    ) -> None:
        self.key = key
        self.heartbeat_timeout = heartbeat_timeout
        self.clock = clock
        self.link_up_since = link_up_since
        """Since when (``clock`` time) this controller's link to the broker has been up; None while it is down.

        The default (always down) never judges a device offline: only a driver that is told about a link can.
        """

    def tick(self, store: FleetStore) -> int:
        """One step for every running (or ended, for catch-up) rollout; returns how many changed.

        Each rollout is its own transaction; one that raises is logged and rolled back, and the others still
        get their step (a bad row must not stop every rollout listed after it).
        """
        changed = 0
        for rollout in store.rollouts(status=("running", "completed", "halted", "aborted")):
            if rollout["status"] != "running" and not self._ended_has_work(store, rollout):
                continue  # an ended rollout with nothing to collect, catch up or skip: no write transaction
            try:
                with store.transaction():
                    current = store.rollout(rollout["id"])  # re-read inside the transaction (CLI may change it)
                    if current is None or current["status"] not in DRIVEN:
                        continue  # paused (or gone) since the list was read: the CLI's change wins
                    if self._step(store, current):
                        changed += 1
            except Exception:
                log.exception("rollout.step_failed", rollout=rollout["id"])
        return changed

    @staticmethod
    def _ended_has_work(store: FleetStore, rollout: dict[str, Any]) -> bool:
        """Whether an ended rollout needs a step: devices to skip, or a report that settles a device.

        Read only: an ``offline`` device that never returns costs one query per tick, not a write transaction.
        """
        for d in store.rollout_devices(rollout["id"], status=UNSETTLED):
            if d["status"] == "pending" or _settling_report(store, d) is not None:
                return True
        return False

    def _judged_offline(self, store: FleetStore, now: float, since: float) -> dict[str, bool] | None:
        """Which devices this controller has itself seen to be offline for a whole heartbeat window since
        ``since``; None (no judgement at all) while its link is down or has been up for less than
        ``heartbeat_timeout``: a restarted controller, or one back from a broker outage, first reads the retained
        states and the queued reports in, and until then a stale ``last_seen`` is no evidence."""
        up = self.link_up_since()
        if up is None or now - max(up, since) <= self.heartbeat_timeout:
            return None
        return {
            row.id: not is_online(row, now=now, heartbeat_timeout=self.heartbeat_timeout)
            for row in store.list_devices()
        }

    def _step(self, store: FleetStore, rollout: dict[str, Any]) -> bool:
        now = self.clock()
        devices = store.rollout_devices(rollout["id"])
        changed = self._collect(store, rollout, devices)
        devices = store.rollout_devices(rollout["id"]) if changed else devices
        status = rollout["status"]
        if status in ("halted", "aborted"):
            return self._skip_unreached(store, rollout, devices) or changed
        if status == "completed":
            return changed
        wave = int(rollout["wave"])
        in_wave = [d for d in devices if d["wave"] == wave]
        if rollout["wave_started_ts"] is None:  # start the wave: every device of it gets the release
            for d in in_wave:
                if d["status"] == "pending":
                    self._assign(store, rollout, d, now)
            deadline = now + float(rollout["wave_timeout_s"])
            store.update_rollout(rollout["id"], wave_started_ts=now, wave_deadline_ts=deadline, updated_ts=now)
            log.info("rollout.wave_started", rollout=rollout["id"], wave=wave, devices=len(in_wave))
            return True
        if rollout["wave_deadline_ts"] is None:  # a wave started while paused by an older serve: give it time
            deadline = now + float(rollout["wave_timeout_s"])
            store.update_rollout(rollout["id"], wave_deadline_ts=deadline, updated_ts=now)
            log.warning("rollout.deadline_restored", rollout=rollout["id"], wave=wave)
            return True
        # An offline device stops blocking the wave once this controller has watched it for a whole heartbeat
        # window, with its link up, since the wave started (a device that only looked stale at the start, or
        # after a controller restart or a broker outage, still gets counted).
        offline = self._judged_offline(store, now, since=float(rollout["wave_started_ts"]))
        waiting = [d for d in in_wave if d["status"] == "assigned"]
        blocking = [d for d in waiting if offline is None or not offline.get(d["device"], False)]
        if blocking and now < float(rollout["wave_deadline_ts"]):
            return changed
        # At the deadline: silence from a device seen online is a failure, a device not seen for a heartbeat window
        # is not counted. Neither is judged before the link has been up for a heartbeat window (the device's report
        # may still be queued for us): the wave waits until then, at most a heartbeat window of link time past its
        # deadline. (The wave's own grace window does not apply here: a deadline shorter than it stays in force.)
        if waiting:
            offline = self._judged_offline(store, now, since=0.0)
            if offline is None:
                return changed
        for d in waiting:
            if offline is not None and offline.get(d["device"], False):
                store.update_rollout_device(
                    rollout["id"], d["device"], status="offline", reason="offline: catches up when it returns"
                )
            else:
                store.update_rollout_device(
                    rollout["id"], d["device"], status="timeout", result_ts=now, reason="no report by the deadline"
                )
        in_wave = [d for d in store.rollout_devices(rollout["id"]) if d["wave"] == wave]
        result = evaluate_gates(in_wave, Gates(**json.loads(rollout["gates_json"])))
        gate_log = [*json.loads(rollout["gate_log_json"]), {"wave": wave, "ts": now, **result.to_dict()}]
        if not result.passed:
            reason = f"wave {wave + 1} failed its gates: {'; '.join(result.failures)}"
            store.update_rollout(
                rollout["id"], status="halted", reason=reason, gate_log_json=json.dumps(gate_log), updated_ts=now
            )
            self.roll_back(store, rollout["id"], now=now)
            log.warning("rollout.halted", rollout=rollout["id"], reason=reason)
            return True
        waves = len(json.loads(rollout["waves_json"]))
        if wave + 1 >= waves:
            store.update_rollout(
                rollout["id"], status="completed", reason="every wave passed its gates", updated_ts=now,
                gate_log_json=json.dumps(gate_log),
            )  # fmt: skip
            log.info("rollout.completed", rollout=rollout["id"])
        else:
            store.update_rollout(
                rollout["id"], wave=wave + 1, wave_started_ts=None, wave_deadline_ts=None, updated_ts=now,
                gate_log_json=json.dumps(gate_log),
            )  # fmt: skip
            log.info("rollout.wave_passed", rollout=rollout["id"], wave=wave, gates=result.values)
        return True

    def _assign(self, store: FleetStore, rollout: dict[str, Any], d: dict[str, Any], now: float) -> None:
        """Issue the device's assignment (retained: an offline device gets it when it reconnects)."""
        target = DesiredModel(**json.loads(d["target_json"]))
        previous = current_models(store, d["device"])
        generation = issue_assignment(
            store, self.key, d["device"], with_model(previous, target), rollout_id=rollout["id"], now=now
        )
        baseline = self._baseline(store, d["device"], previous, target.name)
        store.update_rollout_device(
            rollout["id"],
            d["device"],
            status="assigned",
            generation=generation,
            assigned_ts=now,
            previous_json=json.dumps(previous, sort_keys=True),
            baseline_json=json.dumps(baseline, sort_keys=True),
            reason="",
        )

    @staticmethod
    def _baseline(store: FleetStore, device: str, previous: Sequence[Mapping[str, Any]], name: str) -> dict[str, Any]:
        """The device's tokens/s and TTFT on the previous model of the family (its health report, else bench)."""
        for m in previous:
            if m["name"] != name:
                continue
            ref = {"name": m["name"], "version": m["version"], "variant": m["variant"]}
            for report in store.model_reports(device, json.dumps(ref, sort_keys=True)):
                metrics = json.loads(report["metrics_json"])
                if report["outcome"] == "ok" and metrics.get("tokens_per_s"):
                    return {**metrics, "model": f"{m['name']}@{m['version']}:{m['variant']}"}
            row = store.get_device(device)
            bench = (
                ((row.state if row else None) or {}).get("bench", {}).get(f"{m['name']}/{m['version']}/{m['variant']}")
            )
            if bench:
                return {**bench, "model": f"{m['name']}@{m['version']}:{m['variant']}"}
        return {}

    def _collect(self, store: FleetStore, rollout: dict[str, Any], devices: list[dict[str, Any]]) -> bool:
        """Turn the reports on assigned generations into outcomes."""
        changed = False
        for d in devices:
            outcome = _settling_report(store, d)
            if outcome is None:
                continue
            ok = outcome["outcome"] == "ok"
            store.update_rollout_device(
                rollout["id"],
                d["device"],
                status="ok" if ok else "failed",
                result_ts=self.clock(),
                reason=f"{outcome['kind']}: {outcome['reason']}"[:1000],
                metrics_json=outcome["metrics_json"],
                caught_up=1 if d["status"] == "offline" else d["caught_up"],
            )
            changed = True
        return changed

    @staticmethod
    def _skip_unreached(store: FleetStore, rollout: dict[str, Any], devices: list[dict[str, Any]]) -> bool:
        """Devices of waves that never started: they never receive the release."""
        changed = False
        for d in devices:
            if d["status"] == "pending":
                store.update_rollout_device(rollout["id"], d["device"], status="skipped", reason=rollout["reason"])
                changed = True
        return changed

    def roll_back(self, store: FleetStore, rollout_id: str, *, now: float) -> list[str]:
        """Give every device the release reached its previous desired models (call inside a transaction)."""
        rolled = []
        for d in store.rollout_devices(rollout_id):
            if d["status"] not in REACHED and not (d["status"] == "offline" and d["generation"] is not None):
                continue
            # only this release's family goes back to what it was; whatever else was assigned since (another
            # model's rollout, a deploy) stays
            name = json.loads(d["target_json"])["name"]
            kept = [DesiredModel(**dict(m)) for m in current_models(store, d["device"]) if m["name"] != name]
            before = [DesiredModel(**m) for m in json.loads(d["previous_json"]) if m["name"] == name]
            models = [*kept, *before]
            generation = issue_assignment(store, self.key, d["device"], models, rollout_id=rollout_id, now=now)
            store.update_rollout_device(
                rollout_id,
                d["device"],
                status="rolled_back",
                reason=f"rolled back (generation {generation}) after: {d['status']} {d['reason']}".strip()[:1000],
            )
            rolled.append(d["device"])
        log.info("rollout.rolled_back", rollout=rollout_id, devices=rolled)
        return rolled


def _settling_report(store: FleetStore, d: Mapping[str, Any]) -> dict[str, Any] | None:
    """The report that gives an ``assigned`` or ``offline`` rollout device its outcome, if one arrived."""
    if d["status"] not in ("assigned", "offline") or d["generation"] is None:
        return None  # an "offline" device reporting late is one catching up
    target = json.loads(d["target_json"])
    outcome = None
    # a newer assignment (a key rotation re-signs, another deploy) may replace ours before the device applies
    # it: a report on a later generation counts when it is about this very release
    for report in store.reports_since(d["device"], int(d["generation"])):
        model = json.loads(report["model"]) if report["model"] else {}
        if model.get("name") != target["name"]:
            continue
        if report["generation"] != d["generation"] and (
            model.get("version") != target["version"] or model.get("variant") != target["variant"]
        ):
            continue
        outcome = report
        if report["outcome"] != "ok" or report["kind"] in ("install", "health"):
            break
    return outcome


def check_variant(variant: str) -> str:
    """Validate a variant name (for the CLI)."""
    if not VARIANT_RE.fullmatch(variant):
        raise RolloutError(f"{variant!r} is not a variant name")
    return variant
